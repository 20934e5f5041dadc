"""mixkit.hf.patch on the newer families (OLMo 2, OLMoE, Qwen3-MoE,
Ministral, Gemma 3 text) and on every model class of each supported family,
against transformers' own eager path on tiny random models.

Shapes as in test_hf.py: 6 query heads over 2 KV heads, head_dim 16, float32,
a window of 5 on the sliding layers; MoE layers of 16 experts with top-8.
Tolerance: float32 summation-order differences, ~1e-6 on logits of
magnitude ~1; 2e-5 allowed (test_hf.py explains the budget).
"""
import importlib

import pytest
import torch
import transformers

import mixkit.hf as mh

W = 5
VOCAB = 97
ATOL = 2e-5
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
COMMON = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=44, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0)


def _config(family, **over):
    t = transformers
    no_hd = {k: v for k, v in COMMON.items() if k != "head_dim"}
    configs = {
        "olmo2": lambda: t.Olmo2Config(**no_hd),
        "olmoe": lambda: t.OlmoeConfig(**{**no_hd, "intermediate_size": 20}, num_experts=16, num_experts_per_tok=8,
                                       clip_qkv=3.0),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**COMMON, moe_intermediate_size=20, num_experts=16,
                                              num_experts_per_tok=8, mlp_only_layers=[1], use_sliding_window=True,
                                              sliding_window=W),
        "ministral": lambda: t.MinistralConfig(**COMMON, sliding_window=W, layer_types=LAYERS),
        "gemma3": lambda: t.Gemma3TextConfig(**COMMON, sliding_window=W, layer_types=LAYERS,
                                             query_pre_attn_scalar=24),
        "llama": lambda: t.LlamaConfig(**COMMON),
        "mistral": lambda: t.MistralConfig(**COMMON, sliding_window=W),
        "mixtral": lambda: t.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
        "olmo": lambda: t.OlmoConfig(**no_hd),
        "gemma2": lambda: t.Gemma2Config(**COMMON, sliding_window=W, layer_types=LAYERS, query_pre_attn_scalar=24,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=1.5),
        "gpt_oss": lambda: t.GptOssConfig(**{**COMMON, "intermediate_size": 24}, sliding_window=W,
                                          layer_types=LAYERS, num_local_experts=8, num_experts_per_tok=4),
    }
    config = configs[family]()
    for k, v in over.items():
        setattr(config, k, v)
    return config


NEW = ["olmo2", "olmoe", "qwen3_moe", "ministral", "gemma3", "gemma2", "gpt_oss"]
MOE = ("olmoe", "qwen3_moe", "gpt_oss")
CAUSAL = {"olmo2": "Olmo2ForCausalLM", "olmoe": "OlmoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
          "ministral": "MinistralForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
          "gpt_oss": "GptOssForCausalLM"}


def make(family, cls_name=None, seed=0, **over):  # noqa: C901
    torch.manual_seed(seed)
    cls = getattr(transformers, cls_name or CAUSAL[family])
    model = cls(_config(family, **over)).eval()
    model.set_attn_implementation("eager")
    if getattr(model.config, "_experts_implementation", None) is not None:
        model.set_experts_implementation("eager")
    with torch.no_grad():  # norm weights start at 1 (Gemma: 0); make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.2)
            elif name.endswith(("_bias", "router.bias", "sinks")):  # gpt-oss starts them at 0
                p.normal_(0, 0.5)
            elif name.endswith("gate_up_proj"):  # gate and up values beyond gpt-oss's clamp at +-7
                p.mul_(150)
            elif family == "gemma2" and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)  # attention scores beyond the softcap
    return model


def _inputs(batch=2, seqlen=13, pad=(0, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=g)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    for row, p in enumerate(pad):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def _no_fallback(*ops):
    for op in ops:
        assert mh.counters[op] > 0, f"{op} never ran: {dict(mh.counters)}"
    bad = [k for k in mh.counters if k.startswith("fallback")]
    assert not bad, f"unexpected fallbacks: {bad}"


@pytest.mark.parametrize("family", NEW)
def test_logits_with_and_without_left_padding(family):
    model = make(family)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids).logits
        ref_pad = model(ids, attention_mask=mask).logits
        report = mh.patch(model)
        mh.reset_counters()
        out = model(ids).logits
        out_pad = model(ids, attention_mask=mask).logits
    assert set(report["patched"]) >= {"attention", "norms", "rope"}, report
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    valid = mask.bool()
    torch.testing.assert_close(out_pad[valid], ref_pad[valid], rtol=0, atol=ATOL)
    _no_fallback("flash_attn", "flash_attn_varlen", "rope", "rms_norm", *(["moe_experts"] if family in MOE else []))


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_matches_eager(family, cache):
    """7-token prompts (row 1 left-padded by 3) and 14 new tokens: the sliding
    layers' caches wrap several times, with dynamic and static caches."""
    from test_hf import _greedy

    model = make(family)
    ids, mask = _inputs(seqlen=7, pad=(0, 3))
    with torch.no_grad():
        ref_seq, ref_logits = _greedy(model, ids, mask, cache)
        mh.patch(model)
        mh.reset_counters()
        seq, logits = _greedy(model, ids, mask, cache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    _no_fallback("decode_attn", "flash_attn_varlen")


@pytest.mark.parametrize("family", NEW)
def test_training_gradients_equal_eager(family):
    """Loss (MoE: with the aux loss through output_router_logits) and every
    parameter gradient. No padding: see README on left-padded training."""
    model = make(family, router_aux_loss_coef=0.01)
    model.train()
    ids, _ = _inputs(pad=(0, 0))
    moe = family in MOE
    kw = dict(output_router_logits=True) if moe else {}

    def grads():
        model.zero_grad()
        out = model(ids, labels=ids, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref = grads()
    mh.patch(model)
    mh.reset_counters()
    out, got = grads()
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-6, atol=1e-6)
    if moe:
        torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4 * scale + 1e-7, msg=name)


def _family_classes(family):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return [n for n in module.__all__ if not n.endswith("PreTrainedModel") and n not in mh._UNSUPPORTED_CLASSES]


@pytest.mark.parametrize("family", ["mistral", "mixtral", "llama", "olmo", "olmo2", "olmoe", "qwen3_moe", "ministral",
                                    "gemma2", "gemma3", "gpt_oss"])
def test_patch_takes_every_class_of_the_family(family):
    """Base models, causal LMs, sequence/token classification and QA heads:
    each patches and gives eager's outputs."""
    names = _family_classes(family)
    assert any(n.endswith("Model") for n in names) and any("ForCausalLM" in n for n in names)
    ids, _ = _inputs(batch=2, seqlen=9, pad=(0, 0))
    for name in names:
        model = make(family, name, num_labels=3)
        with torch.no_grad():
            ref = model(ids)
            report = mh.patch(model)
            mh.reset_counters()
            out = model(ids)
        assert "rope" in report["patched"] and "norms" in report["patched"], (name, report)
        key = "last_hidden_state" if name.endswith("Model") else "logits" if "logits" in out else "start_logits"
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=ATOL, msg=name)
        _no_fallback("flash_attn", "rope")


def test_multimodal_gemma3_is_refused():
    with pytest.raises(TypeError, match="Gemma3ForConditionalGeneration"):
        mh.patch(transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            text_config=_config("gemma3").to_dict(), vision_config=dict(hidden_size=32, intermediate_size=37,
                                                                        num_hidden_layers=1, num_attention_heads=2,
                                                                        image_size=28, patch_size=14))))


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "relu"])
def test_non_silu_experts_run_in_mixkit(act):
    """Experts with another activation run as mixkit's grouped GEMMs with the
    activation between them: no fallback, eager's logits."""
    model = make("olmoe", hidden_act=act)
    ids, _ = _inputs(pad=(0, 0))
    with torch.no_grad():
        ref = model(ids).logits
        mh.patch(model)
        mh.reset_counters()
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    _no_fallback("moe_experts")


def test_unknown_expert_gate_falls_back_to_grouped_mm():
    """A gate mixkit does not know goes to transformers' grouped_mm experts
    (what it would run itself), counted, never to the per-expert loop."""
    model = make("qwen3_moe")
    ids, _ = _inputs(pad=(0, 0))
    experts = model.model.layers[0].mlp.experts
    cls = type(experts)
    with torch.no_grad():
        ref = model(ids).logits
        mh.patch(model)
        loop = cls.forward.__wrapped__
        cls._apply_gate = lambda self, gu: torch.nn.functional.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]
        try:
            cls.forward.__wrapped__ = None  # the loop must not run
            mh.reset_counters()
            out = model(ids).logits
        finally:
            cls.forward.__wrapped__ = loop
            del cls._apply_gate
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    assert any("custom gate function" in k for k in mh.counters), dict(mh.counters)


def test_gpt_oss_default_config_patches_everything():
    """gpt-oss's defaults (YaRN RoPE, sinks, alternating windows, router and
    expert biases, the clamped SwiGLU on transposed, interleaved weights):
    every part patched, nothing falls back."""
    model = make("gpt_oss")
    report = mh.patch(model, strict=True)
    assert "yarn" in report["patched"]["rope"] and "moe" in report["patched"], report
    ids, mask = _inputs()
    mh.reset_counters()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    _no_fallback("moe_experts", "rope", "flash_attn_varlen", "rms_norm")


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}])
def test_scaled_rope_is_patched(scaling):
    model = make("ministral", rope_parameters={**scaling, "rope_theta": 1e4})
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        report = mh.patch(model, strict=True)
        mh.reset_counters()
        out = model(ids, attention_mask=mask).logits
    assert scaling["rope_type"] in report["patched"]["rope"]
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=ATOL)
    _no_fallback("rope")


def test_rope_kinds_mixkit_lacks_are_left_alone():
    model = make("ministral", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    report = mh.patch(model)
    assert "rope" not in report["patched"] and "dynamic" in report["left_alone"]["rope"]
    with pytest.raises(mh.MixkitFallback, match="RoPE left alone"):
        mh.patch(model, strict=True)


@pytest.mark.slow
def test_non_silu_experts_compile_fullgraph():
    """transformers' per-expert loop breaks torch.compile(fullgraph=True) on a
    data-dependent shape; mixkit's experts with a GELU between the grouped
    GEMMs trace as one graph (aot_eager: the fake registrations and AOT
    autograd, no C++ build) and give eager's logits."""
    from test_hf import _recording

    model = make("olmoe", hidden_act="gelu_pytorch_tanh", num_hidden_layers=1)
    ids, _ = _inputs(pad=(0, 0))
    with torch.no_grad():
        ref = model(ids).logits
        mh.patch(model)
        torch._dynamo.reset()
        seen = set()
        out = torch.compile(model, fullgraph=True, backend=_recording(seen))(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    assert {"mixkit.grouped_gemm", "mixkit.moe_permute"} <= seen, seen
