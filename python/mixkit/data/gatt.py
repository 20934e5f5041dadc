"""Ghost Attention (GAtt) data, Llama 2 (Touvron et al. 2023, section 3.3).

Given a multi-turn dialogue [u_1, a_1, ..., u_n, a_n] and an instruction
`inst` that should hold for the whole conversation:

1. Sampling: `sampling_messages` concatenates inst to every user turn; the
   latest RLHF model answers each turn of that dialogue (rejection sampling
   or plain generation, outside this module).
2. Training: `gatt_example` keeps inst in the first user turn only, with
   the sampled answers, and sets the loss to zero on every token of the
   earlier turns, assistant turns included: only the last assistant turn
   (and its EOS) is trained on.

Instructions are drawn from constraint lists (style, language, persona, ...)
combined at random (`sample_instruction`); with `shorten`, each constraint
is replaced by its terse form half of the time, the paper's way of making
the instruction text less verbose ("Always act as Napoleon from now" ->
"Figure: Napoleon.").

Examples are (ids, loss_mask) pairs in Llama 2's chat format
(mixkit.tokenizer.encode_chat, style "llama2"), so they go straight into
SFT packing: `mixkit.data.sft_stream(examples, seq_len)`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from ..tokenizer import Tokenizer, encode_chat


@dataclass(frozen=True)
class Constraint:
    """One constraint: its full instruction text and a terse form."""
    text: str
    short: str


# A few of each kind the paper lists (hobbies, language, public figures); extend or replace freely.
DEFAULT_CONSTRAINTS: dict[str, list[Constraint]] = {
    "style": [Constraint("Always answer with a haiku.", "Style: haiku."),
              Constraint("Always answer in one short sentence.", "Style: one sentence."),
              Constraint("Always answer with emojis only.", "Style: emojis."),
              Constraint("Always answer in the form of a list.", "Style: list.")],
    "language": [Constraint("Always respond in French.", "Language: French."),
                 Constraint("Always respond in Spanish.", "Language: Spanish."),
                 Constraint("Always respond in German.", "Language: German.")],
    "persona": [Constraint("Always act as Napoleon from now on.", "Figure: Napoleon."),
                Constraint("Always act as Ada Lovelace from now on.", "Figure: Ada Lovelace."),
                Constraint("Always act as a pirate captain from now on.", "Figure: pirate captain."),
                Constraint("You enjoy tennis; bring it up when you can.", "Hobby: tennis.")],
}


def sample_instruction(rng: random.Random, constraints: dict[str, Sequence[Constraint]] | None = None,
                       max_constraints: int | None = None, shorten: bool = False) -> str:
    """A random instruction: 1 .. max_constraints (default: all) kinds drawn
    without repetition, one constraint of each, joined by spaces; with
    shorten, each constraint in its terse form with probability 1/2."""
    constraints = DEFAULT_CONSTRAINTS if constraints is None else constraints
    kinds = sorted(k for k, v in constraints.items() if v)
    if not kinds:
        raise ValueError("sample_instruction: no constraints to draw from")
    top = len(kinds) if max_constraints is None else min(max_constraints, len(kinds))
    if top < 1:
        raise ValueError(f"sample_instruction: max_constraints must be >= 1, got {max_constraints}")
    chosen = rng.sample(kinds, rng.randint(1, top))
    parts = []
    for kind in chosen:
        c = rng.choice(list(constraints[kind]))
        parts.append(c.short if shorten and rng.random() < 0.5 else c.text)
    return " ".join(parts)


def _check(dialogue: Sequence[dict], instruction: str, need_answer: bool) -> list[dict]:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("gatt: the instruction is empty")
    msgs = [dict(m) for m in dialogue]
    if msgs and msgs[0].get("role") == "system":
        raise ValueError("gatt: the instruction takes the place of a system message; the dialogue must start "
                         "with a user turn")
    if not any(m.get("role") == "user" for m in msgs):
        raise ValueError("gatt: the dialogue has no user turn")
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want or not isinstance(m.get("content"), str):
            raise ValueError(f"gatt: message {i} must be a {want} turn with str content, got {m!r}")
    if need_answer and msgs[-1]["role"] != "assistant":
        raise ValueError("gatt: a training dialogue must end with an assistant turn (the one trained on)")
    return msgs


def _with_instruction(instruction: str, user: str) -> str:
    return f"{instruction.strip()} {user.strip()}"


def sampling_messages(dialogue: Sequence[dict], instruction: str) -> list[dict]:
    """The dialogue with the instruction concatenated to every user turn: the
    prompt from which the model samples each assistant turn."""
    msgs = _check(dialogue, instruction, need_answer=False)
    return [{"role": m["role"], "content": _with_instruction(instruction, m["content"]) if m["role"] == "user"
             else m["content"]} for m in msgs]


def training_messages(dialogue: Sequence[dict], instruction: str) -> list[dict]:
    """The dialogue (with its sampled answers) with the instruction in the
    first user turn only."""
    msgs = _check(dialogue, instruction, need_answer=True)
    msgs[0] = {"role": "user", "content": _with_instruction(instruction, msgs[0]["content"])}
    return msgs


def gatt_example(tokenizer: Tokenizer, dialogue: Sequence[dict], instruction: str) -> tuple[list[int], list[bool]]:
    """One GAtt training example as (ids, loss_mask), Llama 2 chat format:
    the instruction in the first user turn only, the mask True only on the
    last assistant turn's tokens and its EOS."""
    msgs = training_messages(dialogue, instruction)
    ids, mask = encode_chat(tokenizer, msgs, style="llama2")
    # The last answer is the final run of True in encode_chat's mask: keep it, clear every earlier one.
    end = len(mask)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids, [False] * start + mask[start:]


def gatt_examples(tokenizer: Tokenizer, dialogues: Sequence[Sequence[dict]], *, seed: int = 0,
                  constraints: dict[str, Sequence[Constraint]] | None = None, max_constraints: int | None = None,
                  shorten: bool = False, instructions: Sequence[str] | None = None
                  ) -> list[tuple[list[int], list[bool]]]:
    """GAtt training examples for dialogues whose answers were sampled with
    `sampling_messages`: with `instructions` given, one per dialogue;
    otherwise drawn with sample_instruction from Random(seed). The result
    feeds mixkit.data.sft_stream / sft_documents."""
    rng = random.Random(seed)
    if instructions is not None and len(instructions) != len(dialogues):
        raise ValueError(f"gatt_examples: {len(instructions)} instructions for {len(dialogues)} dialogues")
    out = []
    for i, dialogue in enumerate(dialogues):
        inst = instructions[i] if instructions is not None else sample_instruction(rng, constraints, max_constraints,
                                                                                   shorten)
        out.append(gatt_example(tokenizer, dialogue, inst))
    return out
