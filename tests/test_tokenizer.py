"""mixkit.tokenizer: byte, Hugging Face and SentencePiece tokenizers behind one
interface, load_tokenizer, and the Mistral / Llama 2 chat formats."""
from __future__ import annotations

import pickle

import pytest

from mixkit.tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, encode_chat, format_chat,
                              load_tokenizer)

TEXTS = ["", "hello world", "naïve café — 日本語 🤖 \U0010FFFF", "tabs\tand\nnewlines\r\n", "\x00 nul"]

LINES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
         "all that glitters is not gold", "the early bird catches the worm",
         "where there is smoke there is fire", "practice makes perfect every day"] * 4


def test_byte_tokenizer_round_trips_any_unicode():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (258, 256, 257, None)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    # specials are dropped on decode, never turned into bytes
    assert tok.decode([256, *tok.encode("hi"), 257]) == "hi"


def _hf_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    return path


def test_hf_tokenizer(tmp_path):
    tok = load_tokenizer(_hf_json(tmp_path).parent)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    for text in ["the quick brown fox", "naïve café 日本語"]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.decode(ids) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned
    clone = pickle.loads(pickle.dumps(tok))  # what spawned tokenizer workers receive
    assert clone.encode("the lazy dog") == tok.encode("the lazy dog") and clone.eos_id == tok.eos_id


def _sp_model(tmp_path):
    try:
        import sentencepiece as spm
    except ImportError:
        pytest.skip("sentencepiece is not installed (pip install sentencepiece)")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    prefix = tmp_path / "tokenizer"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=320, model_type="bpe",
                                   character_coverage=1.0, byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    return prefix.with_suffix(".model")


def test_sentencepiece_tokenizer(tmp_path):
    path = _sp_model(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (320, 1, 2, None)
    text = "the lazy fox catches smoke"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.decode(ids) == text
    # byte fallback: characters never seen in training still round-trip
    assert tok.decode(tok.encode("日本 🤖")) == "日本 🤖"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids
    assert load_tokenizer(path).encode(text) == ids


def test_load_tokenizer_prefers_tokenizer_json_and_errors(tmp_path):
    _sp_model(tmp_path)
    _hf_json(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "nothing")


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " What is 2+2? "},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_format_chat_mistral():
    assert format_chat(MESSAGES) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4.</s>[INST] And 3+3? [/INST]")
    assert format_chat(MESSAGES[1:3]) == "<s>[INST] What is 2+2? [/INST] 4.</s>"


def test_format_chat_llama2():
    # Meta's llama/generation.py chat_completion: every turn in its own <s> ... </s>.
    assert format_chat(MESSAGES, style="llama2") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s><s>[INST] And 3+3? [/INST]")


def test_encode_chat_ids_and_loss_mask():
    tok = ByteTokenizer()
    ids, mask = encode_chat(tok, MESSAGES)
    text = format_chat(MESSAGES)
    assert ids.count(256) == 1 and ids.count(257) == 1 and ids[0] == 256
    assert tok.decode(ids) == text.replace("<s>", "").replace("</s>", "")
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode(" 4.") + [257]  # the answer and its EOS only
    ids2, _ = encode_chat(tok, MESSAGES, style="llama2")
    assert ids2.count(256) == 2


@pytest.mark.parametrize("bad", [
    [],
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}],
    [{"role": "robot", "content": "x"}],
])
def test_format_chat_rejects_bad_conversations(bad):
    with pytest.raises(ValueError, match="format_chat"):
        format_chat(bad)
    with pytest.raises(ValueError, match="style"):
        format_chat(MESSAGES, style="chatml")
