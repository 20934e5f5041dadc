"""mixkit.data: readers, parallel tokenization into shards, packing with
cu_seqlens, SFT packing, the resumable weighted mixture, the stdlib corpus."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from mixkit.data import (IGNORE_INDEX, Component, DataError, Documents, DocumentTooLongError, MixtureLoader,
                         PackedStream, build_mixture, read_documents, sft_documents, sft_example, sft_stream,
                         stdlib_documents, token_dtype, tokenize_files, tokenize_texts)
from mixkit.tokenizer import ByteTokenizer, encode_chat

BOS, EOS = 256, 257
TOK = ByteTokenizer()


def write_jsonl(path, texts, field="text"):
    data = "".join(json.dumps({field: t, "meta": 1}) + "\n" for t in texts).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif path.name.endswith(".zst"):
        zstandard = pytest.importorskip("zstandard")
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


# ------------------------------------------------------------------ readers

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_read_documents(tmp_path, suffix):
    texts = ["first doc", "ünïcode 🤖", "x" * 5000]
    path = write_jsonl(tmp_path / f"d{suffix}", texts, field="content")
    assert list(read_documents(path, field="content")) == texts
    with pytest.raises(DataError, match=r"d\.jsonl.*:1: no field 'text'"):
        list(read_documents(path))


def test_read_documents_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no documents"):
        list(read_documents(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        list(read_documents(bad))
    notstr = tmp_path / "notstr.jsonl"
    notstr.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"notstr.jsonl:1: field 'text' is int"):
        list(read_documents(notstr))
    gz = write_jsonl(tmp_path / "trunc.jsonl.gz", ["a" * 1000, "b"] * 50)
    gz.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"trunc.jsonl.gz.*corrupt or truncated"):
        list(read_documents(gz))
    zst = write_jsonl(tmp_path / "bad.jsonl.zst", ["hello"] * 10)
    raw = bytearray(zst.read_bytes())
    raw[6:12] = b"\xff" * 6
    zst.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"bad.jsonl.zst.*corrupt or truncated"):
        list(read_documents(zst))
    whole = write_jsonl(tmp_path / "cut.jsonl.zst", ["hello"] * 10).read_bytes()
    zst.write_bytes(whole + whole[:-4])  # a second frame, cut short: 10 good lines first
    with pytest.raises(DataError, match=r"bad.jsonl.zst:11: corrupt or truncated"):
        list(read_documents(zst))
    with pytest.raises(DataError, match="unknown document file type"):
        list(read_documents(tmp_path / "x.txt"))


# ------------------------------------------------------------- tokenization

class _BigVocab(ByteTokenizer):
    vocab_size = 70_000

    def encode(self, text):
        return [69_999] + super().encode(text)


def test_tokenize_files_parallel_and_resumable(tmp_path):
    files = [write_jsonl(tmp_path / f"part{i}.jsonl", [f"doc {i}.{j} " * (j + 1) for j in range(5)])
             for i in range(3)]
    out = tmp_path / "tok"
    docs = tokenize_files(files, TOK, out, workers=2, progress=False)  # spawned workers
    expect = tokenize_texts([t for f in files for t in read_documents(f)], TOK)
    assert len(docs) == 15 and docs.n_tokens == expect.n_tokens
    for i in range(len(docs)):
        np.testing.assert_array_equal(docs[i], expect[i])
    bins = sorted(out.glob("*.tokens.bin"))
    assert len(bins) == 3 and docs.parts[0].tokens.dtype == np.uint16
    metas = sorted(out.glob("*.json"))
    stamps = {m: m.stat().st_mtime_ns for m in metas}
    # A crash mid-shard: the shard's metadata never got renamed into place and a temp file is left over.
    victim = metas[1]
    victim.unlink()
    (out / f".{victim.stem}.tokens.bin.tmp999").write_bytes(b"junk")
    again = tokenize_files(files, TOK, out, workers=0, progress=False)
    assert [m.stat().st_mtime_ns for m in metas if m != victim] == [stamps[m] for m in metas if m != victim]
    assert victim.exists()
    np.testing.assert_array_equal(again[7], expect[7])
    # A changed source file is re-tokenized.
    write_jsonl(files[0], ["changed"])
    assert len(tokenize_files(files, TOK, out, workers=0, progress=False)) == 11


def test_tokenize_files_uint32_for_large_vocab(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", ["hi", "there"])
    docs = tokenize_files([f], _BigVocab(), tmp_path / "tok", workers=0, progress=False)
    assert token_dtype(65_535) == np.uint16 and token_dtype(65_536) == np.uint32
    assert docs.parts[0].tokens.dtype == np.uint32 and int(docs[1][0]) == 69_999


def test_tokenize_files_names_the_bad_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["ok"])
    bad = tmp_path / "empty.jsonl"
    bad.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no documents"):
        tokenize_files([good, bad], TOK, tmp_path / "tok", workers=0, progress=False)


# ------------------------------------------------------------------ packing

def _segments(tokens, cu):
    return [tokens[a:b] for a, b in zip(cu[:-1], cu[1:])]


def check_sequence(tokens, labels, cu, seq_len):
    """The batch invariants: cu_seqlens int32 from 0 to seq_len, labels the next
    token within a segment and -100 at each segment's last position."""
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == seq_len and (np.diff(cu) > 0).all()
    assert len(tokens) == len(labels) == seq_len
    for a, b in zip(cu[:-1], cu[1:]):
        assert labels[b - 1] == IGNORE_INDEX
        inner = labels[a:b - 1]
        ok = (inner == tokens[a + 1:b]) | (inner == IGNORE_INDEX)
        assert ok.all()


def test_packing_keeps_documents_and_splits_long_ones():
    lens = [3, 10, 1, 30, 7, 12, 0]
    docs = Documents.from_lists([list(range(i * 100, i * 100 + n)) for i, n in enumerate(lens)], "toy")
    L = 16
    PAD = 999
    stream = PackedStream(docs, L, bos_id=BOS, eos_id=EOS, shuffle=False, pad_id=PAD)
    n = stream.sequences_per_epoch()
    segs = []
    for k in range(n):
        tokens, labels, cu = stream.sequence(k)
        check_sequence(tokens, labels, cu, L)
        segs += [s for s in _segments(tokens, cu) if not (s == PAD).all()]
    # Reassembled in order, the segments are exactly [BOS] + doc + [EOS] of
    # every document, and the 32-token one (BOS/EOS included) is two pieces of 16.
    expect = [BOS, 0, 1, 2, EOS] + [BOS, *range(100, 110), EOS] + [BOS, 200, EOS]
    long_doc = [BOS, *range(300, 330), EOS]
    assert [list(s) for s in segs[:5]] == [expect[:5], expect[5:17], expect[17:], long_doc[:16], long_doc[16:]]
    np.testing.assert_array_equal(np.concatenate(segs),
                                  np.concatenate([[BOS, *docs[i], EOS] for i in range(len(lens))]))
    assert n == 6  # [5] [12 3] [16] [16] [9] [14 2]: the 12- and 14-token documents did not fit
    # Labels never cross documents: EOS is never followed by a label equal to BOS.
    tokens, labels, cu = stream.sequence(0)
    assert list(cu) == [0, 5, 16] and list(tokens[:5]) == [BOS, 0, 1, 2, EOS]
    assert list(labels[:5]) == [0, 1, 2, EOS, IGNORE_INDEX]
    assert labels[15] == IGNORE_INDEX  # the 12-token document did not fit: padding segment
    with pytest.raises(DocumentTooLongError, match="document 3 has 32 tokens.*seq_len 16"):
        PackedStream(docs, L, bos_id=BOS, eos_id=EOS, long_documents="error")


def test_packing_epochs_reshuffle_and_cover_all_documents():
    docs = Documents.from_lists([[i] * (1 + i % 5) for i in range(40)], "toy")
    stream = PackedStream(docs, 12, bos_id=BOS, eos_id=EOS, seed=3)
    n0 = stream.sequences_per_epoch(0)

    def epoch_docs(first, count):
        seen = []
        for k in range(first, first + count):
            tokens, _, cu = stream.sequence(k)
            seen += [int(s[1]) for s in _segments(tokens, cu) if s[0] == BOS]
        return seen

    e0 = epoch_docs(0, n0)
    e1 = epoch_docs(n0, stream.sequences_per_epoch(1))
    assert sorted(e0) == sorted(e1) == list(range(40))
    assert e0 != e1  # a new permutation per epoch


def test_sft_labels_cover_answers_only():
    ex = [sft_example([5, 6, 7], [8, 9], bos_id=BOS, eos_id=EOS),
          encode_chat(TOK, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]),
          sft_example([1] * 10, [2] * 3, bos_id=BOS, eos_id=EOS)]
    stream = sft_stream(ex, 32, shuffle=False)
    tokens, labels, cu = stream.sequence(0)
    check_sequence(tokens, labels, cu, 32)
    segs = _segments(tokens, cu)
    assert list(segs[0]) == [BOS, 5, 6, 7, 8, 9, EOS]
    assert list(labels[:7]) == [-100, -100, -100, 8, 9, EOS, -100]
    chat_labels = labels[cu[1]:cu[2]]
    assert [int(x) for x in chat_labels if x != -100] == TOK.encode(" yo") + [EOS]
    assert stream.sequences_per_epoch() == 2  # the third example does not fit in what is left
    with pytest.raises(DocumentTooLongError, match="document 1 has 22 tokens"):
        sft_stream(ex, 16, shuffle=False)
    # The same examples through a MixtureLoader: the batch labels only answers.
    loader = MixtureLoader([Component("sft", sft_documents(ex), weight=1)], 32, 2, add_bos=False, add_eos=False,
                           long_documents="error", shuffle=False)
    b = loader.batch(0)
    assert torch.equal(b["labels"][0, :32], torch.from_numpy(labels))
    with pytest.raises(DocumentTooLongError):
        MixtureLoader([Component("sft", sft_documents(ex), weight=1)], 16, add_bos=False, add_eos=False,
                      long_documents="error")


# ------------------------------------------------------------------ mixture

def _toy_components(weights):
    return [Component(f"c{i}", Documents.from_lists([[i] * (3 + j % 7) for j in range(50)], f"c{i}"), weight=w)
            for i, w in enumerate(weights)]


def test_mixture_proportions_match_weights():
    weights = [6.0, 3.0, 1.0]
    loader = MixtureLoader(_toy_components(weights), 16, bos_id=BOS, eos_id=EOS, seed=1)
    n = 20_000
    counts = np.bincount([loader.locate(g)[0] for g in range(n)], minlength=3)
    p = np.array(weights) / sum(weights)
    # Each draw is categorical(p): the share's std is sqrt(p(1-p)/n) <= 0.0035;
    # 0.015 is over 4 standard deviations, so a fixed-seed pass is no fluke
    # and a wrong proportion (say 0.5/0.3/0.2 equal-ish) fails.
    np.testing.assert_allclose(counts / n, p, atol=0.015, rtol=0)
    # Sequences of a component are that component's own stream, in order.
    c, k = loader.locate(123)
    assert k == sum(loader.locate(g)[0] == c for g in range(123))


def test_mixture_epochs_mean_tokens_times_epochs():
    a = Documents.from_lists([[1] * 10] * 10, "a")  # 100 tokens
    b = Documents.from_lists([[2] * 10] * 30, "b")  # 300 tokens
    loader = build_mixture({"a": {"epochs": 3}, "b": {"epochs": 1}}, {"a": a, "b": b}, 16, bos_id=BOS, eos_id=EOS)
    np.testing.assert_allclose(loader.probs, [0.5, 0.5])
    assert [r["name"] for r in loader.table(100)] == ["a", "b"]


def test_mixture_resume_gives_identical_batches():
    kw = dict(seq_len=24, batch_size=3, bos_id=BOS, eos_id=EOS, seed=7)
    run = MixtureLoader(_toy_components([1, 2]), **kw)
    full = [next(run) for _ in range(12)]
    state = None
    resumed = MixtureLoader(_toy_components([1, 2]), **kw)
    for i in range(12):
        if i == 5:
            state = json.loads(json.dumps(resumed.state_dict()))  # survives a JSON checkpoint
            resumed = MixtureLoader(_toy_components([1, 2]), **kw)
            resumed.load_state_dict(state)
        b = next(resumed)
        for key in ("input_ids", "labels", "cu_seqlens"):
            assert torch.equal(b[key], full[i][key]), (i, key)
        assert b["components"] == full[i]["components"]
    assert state["step"] == 5
    # Jumping straight to a late step equals iterating to it.
    fresh = MixtureLoader(_toy_components([1, 2]), **kw)
    assert torch.equal(fresh.batch(11)["input_ids"], full[11]["input_ids"])
    other_seed = MixtureLoader(_toy_components([1, 2]), **{**kw, "seed": 8})
    assert not torch.equal(other_seed.batch(0)["input_ids"], full[0]["input_ids"])
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


def test_mixture_batch_format_and_rank_split():
    loader = MixtureLoader(_toy_components([1, 1]), 20, batch_size=2, bos_id=BOS, eos_id=EOS)
    b = loader.batch(0)
    assert b["input_ids"].shape == b["labels"].shape == (1, 40)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.int64 and b["cu_seqlens"].dtype == torch.int32
    cu = b["cu_seqlens"].numpy()
    assert cu[0] == 0 and cu[-1] == 40 and 20 in cu and b["max_seqlen"] == int(np.diff(cu).max())
    check_sequence(b["input_ids"][0].numpy(), b["labels"][0].numpy(), cu, 40)
    r0 = MixtureLoader(_toy_components([1, 1]), 20, batch_size=2, bos_id=BOS, eos_id=EOS, rank=0, world_size=2)
    r1 = MixtureLoader(_toy_components([1, 1]), 20, batch_size=2, bos_id=BOS, eos_id=EOS, rank=1, world_size=2)
    both = torch.cat([r0.batch(0)["input_ids"], r1.batch(0)["input_ids"]], 1)
    assert torch.equal(both, torch.cat([loader.batch(0)["input_ids"], loader.batch(1)["input_ids"]], 1))


def test_batch_trains_a_model():
    from mixkit.models import CONFIGS, Transformer

    model = Transformer(CONFIGS["tiny-llama"].replace(vocab_size=TOK.vocab_size)).init_weights(0)
    b = MixtureLoader(_toy_components([1]), 32, batch_size=2, bos_id=BOS, eos_id=EOS).batch(0)
    logits = model(b["input_ids"], cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"])
    loss = torch.nn.functional.cross_entropy(logits[0], b["labels"][0], ignore_index=IGNORE_INDEX)
    loss.backward()
    assert math.isfinite(loss.item()) and model.output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_mixture_rejects_bad_weights(bad):
    with pytest.raises(ValueError, match="component 'c1': weight must be finite and > 0"):
        MixtureLoader(_toy_components([1.0, bad]), 16, bos_id=BOS, eos_id=EOS)


def test_mixture_rejects_unknown_and_duplicate_components():
    a = Documents.from_lists([[1, 2]], "a")
    with pytest.raises(KeyError, match="unknown component 'wiki'; known: a"):
        build_mixture({"wiki": {"weight": 1}}, {"a": a}, 8, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="duplicate"):
        MixtureLoader([Component("a", a, 1), Component("a", a, 2)], 8, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="exactly one of weight and epochs"):
        MixtureLoader([Component("a", a, 1, 2)], 8, bos_id=BOS, eos_id=EOS)


# ------------------------------------------------------------- stdlib corpus

def test_stdlib_corpus_is_deterministic_split_and_capped():
    train = stdlib_documents(max_bytes=200_000)
    again = stdlib_documents(max_bytes=200_000)
    held = stdlib_documents("heldout", max_bytes=200_000)
    assert [d.path for d in train] == [d.path for d in again] and len(train) > 3
    assert not {d.path for d in train} & {d.path for d in held}
    assert sum(len(d.text.encode()) for d in train) <= 200_000
    assert all(d.path.endswith(".py") and "site-packages" not in d.path for d in train)
    small = stdlib_documents(max_files=3, max_bytes=None)
    assert [d.path for d in small] == [d.path for d in stdlib_documents(max_files=5, max_bytes=None)][:3]
    docs = tokenize_texts([d.text for d in small], TOK, "stdlib")
    assert TOK.decode(docs[0]) == small[0].text
