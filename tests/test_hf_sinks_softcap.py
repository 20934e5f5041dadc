"""mixkit.hf on the attention of today's open models, against Hugging Face's
own eager attention on tiny random models (as tests/test_hf.py does for
Mistral and friends): gpt-oss (`GptOssAttention`: learnable sinks, 128-token
windows on alternate layers, here W = 5) and Gemma 2 (`Gemma2Attention`:
logit softcapping, head dim 256, alternating local and global layers).

Only the attention interface is swapped (attn_implementation="mixkit"); the
rest of each model is HF's. Both sides compute in float32; the differences are
summation order and the online softmax, about 1e-6 on logits of magnitude ~1
(ATOL 2e-5, gradients 1e-4 relative). The negative controls (sinks or the
softcap not handed to the kernels) move logits far beyond that, so the
comparisons can tell.
"""
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

import mixkit.hf as mh
from test_hf import ATOL, VOCAB, W, _assert_ran, _greedy, _inputs

ROPE = {"rope_type": "default", "rope_theta": 1e4}


def make_gpt_oss(seed=0):
    torch.manual_seed(seed)
    config = GptOssConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=16, sliding_window=W,
                          layer_types=["sliding_attention", "full_attention"], num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=128, pad_token_id=0, rope_parameters=ROPE)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():  # sinks on the scale of the scores, so that they matter
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(6) * 2)
    model.set_attn_implementation("eager")
    return model


def make_gemma2(seed=0, softcap=1.0):
    """head_dim 256 (Gemma 2's), 2 query heads on one KV head, and q/k
    weights scaled up so that the softcap bends most logits."""
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=W,
                          layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=softcap,
                          query_pre_attn_scalar=256, max_position_embeddings=128, pad_token_id=0,
                          rope_parameters=ROPE)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    model.set_attn_implementation("eager")
    return model


MODELS = {"gpt_oss": make_gpt_oss, "gemma2": make_gemma2}


@pytest.mark.parametrize("family", list(MODELS))
def test_forward_logits_with_and_without_left_padding(family):
    model = MODELS[family]()
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids).logits
        ref_pad = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("mixkit")
        mh.reset_counters()
        out = model(ids).logits
        out_pad = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    valid = mask.bool()
    torch.testing.assert_close(out_pad[valid], ref_pad[valid], rtol=0, atol=ATOL)
    _assert_ran("flash_attn", "flash_attn_varlen")


@pytest.mark.parametrize("family", list(MODELS))
def test_training_gradients_equal_eager(family):
    """Loss and every parameter gradient, gpt-oss's sinks included, with left
    padding and the labels masked there."""
    model = MODELS[family]()
    model.train()
    ids, mask = _inputs(seqlen=12, pad=(0, 3))
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100

    def grads():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = grads()
    model.set_attn_implementation("mixkit")
    mh.reset_counters()
    loss, got = grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys()
    if family == "gpt_oss":
        assert "model.layers.0.self_attn.sinks" in got
    for name in ref:
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4 * scale + 1e-7, msg=name)
    _assert_ran("flash_attn_varlen")


@pytest.mark.parametrize("family", list(MODELS))
def test_greedy_generate_past_the_window(family):
    """7-token prompts + 14 new tokens (4 windows), row 1 left-padded: decode
    with sinks / softcap on the sliding and the full layer."""
    model = MODELS[family]()
    ids, mask = _inputs(seqlen=7, pad=(0, 3))
    with torch.no_grad():
        ref_seq, ref_logits = _greedy(model, ids, mask, "dynamic")
        model.set_attn_implementation("mixkit")
        mh.reset_counters()
        seq, logits = _greedy(model, ids, mask, "dynamic")
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    _assert_ran("decode_attn", "flash_attn_varlen")


@pytest.mark.parametrize("family,dropped", [("gpt_oss", "sinks"), ("gemma2", "softcap"), ("gpt_oss", "window")])
def test_negative_control_dropped_feature_fails(family, dropped, monkeypatch):
    """Sinks, the softcap or the per-layer window not handed to the kernels
    must be caught by the same comparison."""
    model = MODELS[family]()
    ids, _ = _inputs(batch=1, pad=(0,))
    with torch.no_grad():
        ref = model(ids).logits
        model.set_attn_implementation("mixkit")
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=ATOL)
        if dropped == "window":
            monkeypatch.setattr(mh, "_window", lambda w: None)
        else:
            real = mh.ops.flash_attn

            def without(*args, **kw):
                kw[dropped] = None
                return real(*args, **kw)
            monkeypatch.setattr(mh.ops, "flash_attn", without)
        wrong = model(ids).logits
    assert (wrong - ref).abs().max() > 100 * ATOL
