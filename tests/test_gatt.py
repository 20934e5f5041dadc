"""Ghost Attention samples (mixkit.data.gatt): the instruction's place in the
sampling and training dialogues, the loss mask, tokenization round trips,
SFT packing, the instruction sampler and bad input."""
from __future__ import annotations

import random

import numpy as np
import pytest

from mixkit.data import IGNORE_INDEX, sft_stream
from mixkit.data.gatt import (DEFAULT_CONSTRAINTS, Constraint, gatt_example, gatt_examples, sample_instruction,
                              sampling_messages, training_messages)
from mixkit.tokenizer import ByteTokenizer, encode_chat, format_chat

TOK = ByteTokenizer()
INST = "Always answer with a haiku."
DIALOGUE = [{"role": "user", "content": "What is the sea?"}, {"role": "assistant", "content": "Blue water, deep."},
            {"role": "user", "content": "And the sky?"}, {"role": "assistant", "content": "Air over us."},
            {"role": "user", "content": "Rain?"}, {"role": "assistant", "content": "Clouds let it fall."}]


def test_instruction_on_every_user_turn_for_sampling():
    msgs = sampling_messages(DIALOGUE[:5], INST)
    assert [m["content"] for m in msgs if m["role"] == "user"] == [f"{INST} {m['content']}" for m in DIALOGUE[0:5:2]]
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == [DIALOGUE[1]["content"], DIALOGUE[3]["content"]]


def test_instruction_only_in_first_user_turn_for_training():
    ids, _ = gatt_example(TOK, DIALOGUE, INST)
    text = TOK.decode(ids)
    assert text.count(INST) == 1
    first_turn = text.split("[/INST]")[0]
    assert INST in first_turn and "What is the sea?" in first_turn
    users = [m["content"] for m in training_messages(DIALOGUE, INST) if m["role"] == "user"]
    assert users == [f"{INST} What is the sea?", "And the sky?", "Rain?"]


def test_loss_mask_covers_only_last_assistant_turn():
    ids, mask = gatt_example(TOK, DIALOGUE, INST)
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == TOK.encode(" Clouds let it fall. ") + [TOK.eos_id]
    # contiguous, at the end: nothing of the earlier turns, their answers included
    first = mask.index(True)
    assert all(mask[first:]) and not any(mask[:first])
    # against encode_chat's SFT mask, which trains every answer
    _, sft_mask = encode_chat(TOK, training_messages(DIALOGUE, INST), style="llama2")
    assert sum(sft_mask) > sum(mask) and all(s or not m for s, m in zip(sft_mask, mask))


def test_tokenization_round_trips():
    ids, mask = gatt_example(TOK, DIALOGUE, INST)
    msgs = training_messages(DIALOGUE, INST)
    assert TOK.decode(ids) == format_chat(msgs, bos="", eos="", style="llama2")
    assert ids == encode_chat(TOK, msgs, style="llama2")[0]
    assert ids.count(TOK.bos_id) == 3 and ids.count(TOK.eos_id) == 3  # Llama 2: one BOS/EOS pair per turn
    assert len(mask) == len(ids)


def test_packed_through_sft_stream():
    examples = gatt_examples(TOK, [DIALOGUE, DIALOGUE[:2]], instructions=[INST, "Language: French."])
    stream = sft_stream(examples, seq_len=512, shuffle=False)
    tokens, labels, cu = stream.sequence(0)
    assert list(cu) == [0, len(examples[0][0]), len(examples[0][0]) + len(examples[1][0]), 512]
    for (ids, mask), lo in zip(examples, cu[:-2]):
        n = len(ids)
        np.testing.assert_array_equal(tokens[lo:lo + n], ids)
        # labels[t] = ids[t + 1] exactly where ids[t + 1] is trained on
        want = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
        np.testing.assert_array_equal(labels[lo:lo + n], want)
    # the one-turn dialogue trains its only answer
    assert TOK.decode([t for t, m in zip(*examples[1]) if m]) == " Blue water, deep. "


def test_sample_instruction():
    a = [sample_instruction(random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]  # seeded
    rng = random.Random(0)
    texts = {c.text for cs in DEFAULT_CONSTRAINTS.values() for c in cs}
    shorts = {c.short for cs in DEFAULT_CONSTRAINTS.values() for c in cs}
    seen_multi = seen_short = False
    for _ in range(200):
        inst = sample_instruction(rng, shorten=True)
        parts = [p for p in texts | shorts if p in inst]
        assert parts and len(" ".join(parts)) >= len(inst) - 1
        kinds = [k for k, cs in DEFAULT_CONSTRAINTS.items() for c in cs if c.text in inst or c.short in inst]
        assert len(kinds) == len(set(kinds))  # one constraint per kind
        seen_multi |= len(kinds) > 1
        seen_short |= any(s in inst for s in shorts)
    assert seen_multi and seen_short
    assert all(sample_instruction(rng, shorten=False).split(".")[0] + "." in texts for _ in range(50))
    custom = {"tone": [Constraint("Be formal.", "Tone: formal.")]}
    assert sample_instruction(random.Random(0), custom) == "Be formal."
    assert sample_instruction(random.Random(0), max_constraints=1).count(".") == 1


def test_bad_input():
    with pytest.raises(ValueError, match="no user turn"):
        gatt_example(TOK, [], INST)
    with pytest.raises(ValueError, match="no user turn"):
        sampling_messages([{"role": "assistant", "content": "hi"}], INST)
    with pytest.raises(ValueError, match="instruction is empty"):
        gatt_example(TOK, DIALOGUE, "  ")
    with pytest.raises(ValueError, match="end with an assistant"):
        gatt_example(TOK, DIALOGUE[:3], INST)
    with pytest.raises(ValueError, match="message 1"):
        gatt_example(TOK, [DIALOGUE[0], DIALOGUE[0], DIALOGUE[1]], INST)
    with pytest.raises(ValueError, match="system"):
        gatt_example(TOK, [{"role": "system", "content": "x"}] + DIALOGUE, INST)
    with pytest.raises(ValueError, match="no constraints"):
        sample_instruction(random.Random(0), {})
    with pytest.raises(ValueError, match="2 dialogues"):
        gatt_examples(TOK, [DIALOGUE, DIALOGUE], instructions=[INST])
