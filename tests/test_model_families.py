"""mixkit.models on the newer families against Hugging Face transformers'
eager implementation, one tiny random model per family.

Shapes are chosen to be awkward: 6 query heads over 2 KV heads (GQA 3),
head_dim 16, odd FFN widths, 3 layers (Ministral and Gemma 3: sliding, full,
sliding), a sliding window of 5 well inside every prompt, and MoE layers of
16 experts with the family's top-k of 8 (OLMoE, Qwen3-MoE, which also has a
dense layer among them), so that routing is neither trivial nor total.

Tolerances. float32: the two implementations compute the same math in a
different order (flash-style online softmax, fused qkv and gate/up
projections, grouped expert GEMMs, RoPE cos/sin evaluated in the kernel), a
few float32 ulps per op: logits agree to ~1e-6; we allow 5e-5. bfloat16:
the FlashAttention rule against transformers' float32 logits,
max|ours - ref32| <= 2 max|hf_bf16 - ref32| + 1e-3 (per median token for
MoE models, where a bf16 router logit one ulp from a tie sends a token to
other experts; test_models.py explains the rule).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mixkit.models import generate, load, save
from mixkit.models.loading import _hf_map, Relayout

transformers = pytest.importorskip("transformers")

from test_models import assert_within_lowp_rule  # noqa: E402

W = 5
VOCAB = 97
ATOL = 5e-5
COMMON = dict(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


def _configs():
    t = transformers
    return {
        "olmo2": (t.Olmo2ForCausalLM, t.Olmo2Config(**{k: v for k, v in COMMON.items() if k != "head_dim"},
                                                       intermediate_size=44, rms_norm_eps=1e-6)),
        "olmoe": (t.OlmoeForCausalLM, t.OlmoeConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"},
                                                    intermediate_size=20, num_experts=16, num_experts_per_tok=8,
                                                    clip_qkv=3.0, router_aux_loss_coef=0.01)),
        "qwen3_moe": (t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(**COMMON, intermediate_size=44, moe_intermediate_size=20,
                                                              num_experts=16, num_experts_per_tok=8,
                                                              norm_topk_prob=True, mlp_only_layers=[1],
                                                              use_sliding_window=True, sliding_window=W,
                                                              rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1e6})),
        "ministral": (t.MinistralForCausalLM, t.MinistralConfig(**COMMON, intermediate_size=44, sliding_window=W,
                                                                layer_types=LAYERS)),
        "gemma3": (t.Gemma3ForCausalLM, t.Gemma3TextConfig(**COMMON, intermediate_size=44, sliding_window=W,
                                                           layer_types=LAYERS, query_pre_attn_scalar=24,
                                                           final_logit_softcapping=None)),
        # Softcaps low enough to bite on these logits (Gemma 2's are 50 and 30).
        "gemma2": (t.Gemma2ForCausalLM, t.Gemma2Config(**COMMON, intermediate_size=44, sliding_window=W,
                                                       layer_types=LAYERS, query_pre_attn_scalar=24,
                                                       attn_logit_softcapping=2.0, final_logit_softcapping=1.5)),
        "gpt_oss": (t.GptOssForCausalLM, t.GptOssConfig(**{**COMMON, "intermediate_size": 24}, sliding_window=W,
                                                        layer_types=LAYERS, num_local_experts=8,
                                                        num_experts_per_tok=4, router_aux_loss_coef=0.01)),
    }


FAMILIES = list(_configs())
MOE = ("olmoe", "qwen3_moe", "gpt_oss")


def hf_model(family, seed=0):
    torch.manual_seed(seed)
    cls, config = _configs()[family]
    model = cls(config).eval()
    model.set_attn_implementation("eager")
    if family in MOE:
        model.set_experts_implementation("eager")
    with torch.no_grad():  # transformers initialises the norm weights to 1 (Gemma: 0); make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.2)
            elif name.endswith(("_bias", "router.bias", "sinks")):  # gpt-oss starts its biases at 0
                p.normal_(0, 0.5)
            elif name.endswith("gate_up_proj"):  # gate and up values beyond the clamp at +-7
                p.mul_(150)
            elif family == "gemma2" and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)  # attention scores beyond Gemma 2's softcap
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        out[family] = (model, path)
    return out


def _tokens(batch, seqlen, seed=0):
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_float32(checkpoints, family):
    hf, path = checkpoints[family]
    ours = load(path)
    for seqlen in (W + 1, 3 * W + 4):
        tokens = _tokens(2, seqlen, seqlen)
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_bfloat16(checkpoints, family):
    hf, path = checkpoints[family]
    ours = load(path, dtype=torch.bfloat16)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    tokens = _tokens(2, 3 * W + 4, 7)
    with torch.no_grad():
        ref = hf(tokens).logits
        assert_within_lowp_rule(ours(tokens), ref, hf16(tokens).logits, family, median_token=family in MOE)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf_past_the_window(checkpoints, family):
    """Prompts of 2W + 3 tokens (chunked prefill through the sliding layers'
    rings), then 40 new tokens: every sliding layer's ring wraps many times
    while the full layers' linear caches keep every token."""
    hf, path = checkpoints[family]
    ours = load(path)
    prompt = _tokens(1, 2 * W + 3, 11)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, min_new_tokens=40,
                      do_sample=False)[0, prompt.shape[1]:].tolist()
    got = generate(ours, prompt[0].tolist(), max_new_tokens=40)[0]
    assert got == ref


def _hf_layout_grads(model, mapping):
    """mixkit parameter gradients in Hugging Face's keys and layouts (what
    `save` does with the weights)."""
    params = dict(model.named_parameters())
    out = {}
    for key, (name, index, transform) in mapping.items():
        g = params[name].grad
        g = g if index is None else g[index]
        out[key] = transform.save(g) if isinstance(transform, Relayout) else g
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_match_hf(checkpoints, family):
    """Summed next-token cross-entropy (plus OLMoE's load-balancing loss,
    coefficient 0.01 as transformers adds it): every parameter's gradient."""
    hf, path = checkpoints[family]
    hf = copy.deepcopy(hf).train()
    ours = load(path).train()
    tokens = _tokens(2, 3 * W + 4, 3)
    labels = tokens[:, 1:]

    aux_coef = 0.01 if family == "olmoe" else 0.0
    out = hf(tokens, output_router_logits=family in MOE)
    ref_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1),
                                                 reduction="sum")
    if aux_coef:
        ref_loss = ref_loss + aux_coef * out.aux_loss
    ref_loss.backward()

    from mixkit.models.model import MoE
    from mixkit import ops
    moes = [m for m in ours.modules() if isinstance(m, MoE)]
    for m in moes:
        m.keep_router_logits = True
    logits = ours(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    if aux_coef:
        kept = [m.router_logits for m in moes]
        loss = loss + aux_coef * ops.moe_aux_loss(torch.cat([lg for lg, _ in kept]), torch.cat([i for _, i in kept]),
                                                  moes[0].num_experts, moes[0].top_k)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-5)

    ref = dict(hf.named_parameters())
    mapping, _ = _hf_map(ours.args, set(ref))  # transformers' in-memory names: fused expert tensors
    got = _hf_layout_grads(ours, mapping)
    assert set(got) == {k for k, p in ref.items() if p.grad is not None}
    for key, g in got.items():
        r = ref[key].grad
        scale = r.abs().max().item() + 1e-6
        torch.testing.assert_close(g / scale, r / scale, atol=2e-4, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_with_transformers(checkpoints, family, tmp_path):
    """mixkit.models.save writes what AutoModelForCausalLM reads back, with
    the same weights: logits identical to the original transformers model."""
    hf, path = checkpoints[family]
    ours = load(path)
    save(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    if family in MOE:
        back.set_experts_implementation("eager")
    assert type(back) is type(hf)
    tokens = _tokens(2, 2 * W + 1, 5)
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, hf(tokens).logits)
    assert load(tmp_path).args == ours.args


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_config_field_raises_naming_it(checkpoints, family, tmp_path):
    _, path = checkpoints[family]
    cfg = json.loads((path / "config.json").read_text())
    cfg["attention_temperature_tuning"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match="'attention_temperature_tuning'"):
        load(tmp_path)


def test_config_values_mixkit_does_not_implement_raise():
    from mixkit.models import from_hf_config

    _, cfg = _configs()["olmoe"]
    base = cfg.to_dict()
    with pytest.raises(ValueError, match="attention_dropout"):
        from_hf_config({**base, "attention_dropout": 0.1})
    with pytest.raises(ValueError, match="quantization_config"):
        from_hf_config({**base, "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(ValueError, match="longrope"):
        from_hf_config({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}})


def test_the_caps_and_clamps_bite(checkpoints):
    """The tiny models exercise what they test: gpt-oss's gate/up values pass
    the clamp at +-7, and Gemma 2's softcaps change the logits."""
    hf, path = checkpoints["gpt_oss"]
    layer = hf.model.layers[0]
    with torch.no_grad():
        x = layer.post_attention_layernorm(hf.model.embed_tokens(_tokens(2, 9)))
        gate_up = x.reshape(-1, x.shape[-1]) @ layer.mlp.experts.gate_up_proj[0]
    assert (gate_up.abs() > 7).float().mean() > 0.1
    ours = load(checkpoints["gemma2"][1])
    tokens = _tokens(2, 3 * W, 4)
    with torch.no_grad():
        capped = ours(tokens)
        for layer in ours.layers:
            layer.attention.softcap = None
        assert (ours(tokens) - capped).abs().max() > 1e-2
        assert capped.abs().max() <= 1.5 and ours.args.final_softcap == 1.5


def test_parallel_layouts_refuse_what_they_do_not_split():
    """Tensor and expert parallelism name the features their layouts do not
    cover instead of computing something else."""
    from mixkit.models import CONFIGS
    from mixkit.parallel.layout import check_ep, check_tp, tp_splits

    with pytest.raises(ValueError, match="qk_norm 'proj'"):
        check_tp(CONFIGS["tiny-olmo2"].replace(n_kv_heads=2), 2)
    with pytest.raises(ValueError, match="expert biases"):
        check_tp(CONFIGS["tiny-gpt-oss"].replace(n_kv_heads=2), 2)
    with pytest.raises(ValueError, match="expert biases"):
        check_ep(CONFIGS["tiny-gpt-oss"], 2)
    qwen = CONFIGS["tiny-qwen3-moe"].replace(n_kv_heads=2)
    splits = tp_splits(qwen, 0, 2)  # the experts split by their own width, the dense layer by hidden_dim
    assert splits["layers.0.feed_forward.w2"].segments == (0, qwen.expert_dim)
    assert splits["layers.1.feed_forward.w2.weight"].segments == (0, qwen.hidden_dim)
