"""mixkit.evaluation against log-likelihoods computed directly with Hugging
Face transformers, and the rolling-window rule (every token scored once).

Tolerance: float32 on both sides. mixkit's logits match HF's to about 1e-6
(tests/test_models.py); summed over ~200 tokens the NLL then agrees to a
relative 1e-6 or so, so rtol 1e-5 fails on any scoring mistake (a token
scored twice or missed changes the sum by a few percent at this vocabulary).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixkit.evaluation import evaluate, rolling_windows
from mixkit.models import CONFIGS, Transformer, load
from mixkit.tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers")

TOK = ByteTokenizer()
DOCS = {
    "prose": ["The quick brown fox jumps over the lazy dog.", "Ünïcödé bytes count: 日本 🤖!"],
    "code": ["def f(x):\n    return x * 2\n" * 3],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=256, sliding_window=None, bos_token_id=None,
                                     eos_token_id=None, pad_token_id=None)
    hf = transformers.MistralForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("mistral")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, load(path, dtype=torch.float32)


def hf_nll(hf, ids: list[int], context_start=lambda j: 0) -> float:
    """Summed NLL of targets 1..n-1, target j predicted from ids[context_start(j):j]:
    one causal HF forward per distinct context start covers all its targets."""
    groups: dict[int, list[int]] = {}
    for j in range(1, len(ids)):
        groups.setdefault(context_start(j), []).append(j)
    total = 0.0
    with torch.no_grad():
        for s, js in groups.items():
            logp = hf(torch.tensor(ids[s:max(js)])[None]).logits[0].log_softmax(-1)
            total -= sum(logp[j - 1 - s, ids[j]].item() for j in js)
    return total


def test_bits_per_byte_matches_hf(models):
    hf, model = models
    res = evaluate(model, TOK, DOCS, seq_len=128)
    assert set(res) == {"prose", "code"}
    for name, texts in DOCS.items():
        nll = sum(hf_nll(hf, [TOK.bos_id] + TOK.encode(t)) for t in texts)
        n_tokens = sum(len(t.encode("utf-8")) for t in texts)  # byte tokens: one per byte, all scored after BOS
        n_bytes = n_tokens
        r = res[name]
        assert (r.tokens, r.bytes, r.documents) == (n_tokens, n_bytes, len(texts))
        ell = nll / n_tokens
        bpb = (n_tokens / n_bytes) * ell / math.log(2)  # The Pile's definition
        assert r.loss == pytest.approx(ell, rel=1e-5)
        assert r.bits_per_byte == pytest.approx(bpb, rel=1e-5)
        assert r.perplexity == pytest.approx(math.exp(ell), rel=1e-5)


@pytest.mark.parametrize("seq_len,stride", [(16, 4), (16, 16), (20, 7), (8, 1)])
def test_rolling_windows_match_hf_with_limited_context(models, seq_len, stride):
    """Target j is predicted with the context of its window: all of t[0:j] in
    the first window (j <= seq_len), else t[b - seq_len : j] where b is the last
    target of its window."""
    hf, model = models
    text = DOCS["code"][0][:60]
    ids = [TOK.bos_id] + TOK.encode(text)
    n = len(ids)

    def context_start(j):
        if j <= seq_len:
            return 0
        w = -(-(j - seq_len) // stride)
        b = min(seq_len + w * stride, n - 1)
        return b - seq_len

    res = evaluate(model, TOK, [text], seq_len=seq_len, stride=stride, batch_size=3)["documents"]
    assert res.tokens == n - 1
    assert res.nll == pytest.approx(hf_nll(hf, ids, context_start), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 40, 41, 100])
@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 5), (16, 1), (7, 3)])
def test_rolling_windows_score_each_token_once(n, seq_len, stride):
    wins = rolling_windows(n, seq_len, stride)
    targets = [t for s, e, k in wins for t in range(e - k + 1, e + 1)]
    assert targets == list(range(1, n))
    for i, (s, e, k) in enumerate(wins):
        assert 0 <= s < e and e - s <= seq_len and 1 <= k <= e - s
        if i:  # later windows: at most stride new targets, full context when available
            assert k <= stride and e - s == min(seq_len, e)


def test_short_document_equals_one_full_forward(models):
    _, model = models
    text = "short text"
    ids = torch.tensor([TOK.bos_id] + TOK.encode(text))
    with torch.no_grad():
        want = F.cross_entropy(model(ids[None])[0, :-1], ids[1:], reduction="sum").item()
    for seq_len, stride in [(64, 32), (len(ids) - 1, 1)]:
        res = evaluate(model, TOK, [text], seq_len=seq_len, stride=stride)["documents"]
        assert res.tokens == len(ids) - 1
        assert res.nll == pytest.approx(want, rel=1e-5)


def test_batching_does_not_change_the_result(models):
    _, model = models
    texts = DOCS["prose"] + DOCS["code"]
    one = evaluate(model, TOK, texts, seq_len=12, stride=5, batch_size=1)["documents"]
    many = evaluate(model, TOK, texts, seq_len=12, stride=5, batch_size=16)["documents"]
    assert one.tokens == many.tokens
    assert one.nll == pytest.approx(many.nll, rel=1e-5)
    assert not model.training


def test_evaluate_rejects_bad_input(models):
    _, model = models
    with pytest.raises(ValueError, match="stride"):
        evaluate(model, TOK, ["abc"], seq_len=8, stride=9)
    with pytest.raises(ValueError, match="component 'empty' has no documents"):
        evaluate(model, TOK, {"empty": []}, seq_len=8)
    with pytest.raises(TypeError, match="not one str"):
        evaluate(model, TOK, "abc", seq_len=8)
    small = Transformer(CONFIGS["tiny-llama"])  # vocab 256 < the byte tokenizer's 258
    with pytest.raises(ValueError, match="258 ids but the model only 256"):
        evaluate(small, TOK, ["abc"], seq_len=8)
