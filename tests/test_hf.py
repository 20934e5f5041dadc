"""mixkit.hf against Hugging Face's own eager path on tiny random models.

Every family (Mistral, Mixtral, Llama, OLMo) at shapes chosen to be awkward:
6 query heads over 2 or 3 KV heads, head_dim 16, 2 layers, float32, and a
sliding window of 5 for Mistral and Mixtral, so that every generation runs
well past the window. The reference is the same model object before patching
(attn_implementation="eager", experts_implementation="eager").

Tolerance: float32 everywhere. The differences are summation order
(flash-style online softmax against one softmax, grouped GEMM against per
expert matmuls) and RoPE's cos/sin (mixkit computes them in the kernel; HF
from a table): a few ulp per op, about 1e-6 on logits of magnitude ~1. We
allow 2e-5 (outputs) and 1e-4 relative (gradients, summed over all tokens),
while the negative control (window W - 1 or W + 1) moves logits by ~1e-2.
"""
import pytest
import torch
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          MixtralConfig, MixtralForCausalLM, OlmoConfig, OlmoForCausalLM)

import mixkit.hf as mh

W = 5
VOCAB = 97
ATOL = 2e-5
def _recording(seen):
    """aot_eager, after noting which ops dynamo's graph calls: proof that the
    compiled model runs mixkit's ops (the counters do not count inside
    compiled code). Dynamo's full-graph capture, the fake (meta)
    registrations and AOT autograd are what the compile tests check;
    inductor's code generation would add ~40 s per test on a 2-core CPU and
    nothing mixkit-specific."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        seen.update(str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)
    return backend


def _config(family):
    common = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=6, head_dim=16, max_position_embeddings=128, pad_token_id=0)
    if family == "mistral":
        return MistralForCausalLM, MistralConfig(num_key_value_heads=2, sliding_window=W, **common)
    if family == "mixtral":
        return MixtralForCausalLM, MixtralConfig(num_key_value_heads=3, sliding_window=W, num_local_experts=4,
                                                 num_experts_per_tok=2, router_aux_loss_coef=0.02,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                                 **common)
    if family == "llama":
        return LlamaForCausalLM, LlamaConfig(num_key_value_heads=2, **common)
    return OlmoForCausalLM, OlmoConfig(num_key_value_heads=3, clip_qkv=2.5, **common)


FAMILIES = ["mistral", "mixtral", "llama", "olmo"]


def make_model(family, seed=0, layers=2):
    torch.manual_seed(seed)
    cls, config = _config(family)
    config.num_hidden_layers = layers
    model = cls(config).eval()
    model.set_attn_implementation("eager")
    if hasattr(config, "num_local_experts"):
        model.set_experts_implementation("eager")
    return model


def _inputs(batch=2, seqlen=13, pad=(0, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=g)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    for row, p in enumerate(pad):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def _assert_ran(*ops, absent=("fallback",)):
    for op in ops:
        assert mh.counters[op] > 0, f"{op} never ran: {dict(mh.counters)}"
    bad = [k for k in mh.counters if any(k.startswith(a) for a in absent)]
    assert not bad, f"unexpected fallbacks: {bad}"


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_logits_with_and_without_left_padding(family):
    model = make_model(family)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids).logits
        ref_pad = model(ids, attention_mask=mask).logits
        report = mh.patch(model)
        mh.reset_counters()
        out = model(ids).logits
        out_pad = model(ids, attention_mask=mask).logits
    assert set(report["patched"]) >= {"attention", "norms", "rope"}
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    valid = mask.bool()  # padded query rows are garbage in both and unused
    torch.testing.assert_close(out_pad[valid], ref_pad[valid], rtol=0, atol=ATOL)
    norm = "layer_norm" if family == "olmo" else "rms_norm"
    _assert_ran("flash_attn", "flash_attn_varlen", "rope", norm, *(["moe_experts"] if family == "mixtral" else []))


def _greedy(model, ids, mask, cache_implementation, new_tokens=14):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         cache_implementation=cache_implementation, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", ["mistral", "llama"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_past_the_window(family, cache):
    """7-token prompts + 14 new tokens = 4 windows; row 0 unpadded, row 1
    left-padded by 3 (in one batch, as generate() runs them).
    Mistral's caches are the sliding-window ones (DynamicSlidingWindowLayer,
    StaticSlidingWindowLayer); Llama's the full ones (StaticLayer's buffer
    holds unwritten slots)."""
    model = make_model(family)
    ids, mask = _inputs(seqlen=7, pad=(0, 3))
    with torch.no_grad():
        ref_seq, ref_logits = _greedy(model, ids, mask, cache)
        mh.patch(model)
        mh.reset_counters()
        seq, logits = _greedy(model, ids, mask, cache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    _assert_ran("decode_attn", "flash_attn_varlen")


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_prefill_continues_from_a_cache(family):
    """A prompt in two chunks (6 then 5 tokens; the second chunk's queries see
    the cached tail), left padding in row 1, then one decode step."""
    model = make_model(family)
    ids, mask = _inputs(seqlen=11, pad=(0, 2))

    def run():
        cache = DynamicCache(config=model.config)
        a = model(ids[:, :6], attention_mask=mask[:, :6], cache=cache, use_cache=True).logits
        b = model(ids[:, 6:], attention_mask=mask, cache=cache, use_cache=True).logits
        nxt = b[:, -1:].argmax(-1)
        c = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), cache=cache,
                  use_cache=True).logits
        return a, b, c

    with torch.no_grad():
        ref = run()
        mh.patch(model)
        out = run()
    for r, o, rows in zip(ref, out, (mask[:, :6], mask[:, 6:], torch.ones(2, 1))):
        torch.testing.assert_close(o[rows.bool()], r[rows.bool()], rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["mistral", "olmo"])
def test_packed_rows_equal_separate_sequences(family):
    """Three documents (4, 9 and 6 tokens) in one row, told apart by
    position_ids (HF's packing rule) or by cu_seq_lens_q/k (FlashAttention
    kwargs, DataCollatorWithFlattening); each equals the document alone
    through HF's eager path."""
    model = make_model(family)
    lens = [4, 9, 6]
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(1, VOCAB, (1, n), generator=g) for n in lens]
    with torch.no_grad():
        ref = torch.cat([model(d).logits for d in docs], 1)
        mh.patch(model)
        packed = torch.cat(docs, 1)
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        mh.reset_counters()
        by_pos = model(packed, position_ids=pos).logits
        _assert_ran("flash_attn_varlen")
        cu = torch.tensor([0, 4, 13, 19], dtype=torch.int32)
        by_cu = model(packed, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                      max_length_k=9).logits
    torch.testing.assert_close(by_pos, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(by_cu, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_training_gradients_equal_eager(family):
    """Loss (with Mixtral's aux loss through output_router_logits) and every
    parameter gradient, with left padding and labels masked there."""
    model = make_model(family)
    model.train()
    ids, mask = _inputs(seqlen=12, pad=(0, 3))
    # Padded query rows hold garbage in both paths: no loss term may read one,
    # so the first real token (predicted from a padded row) is masked too.
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100
    kw = dict(output_router_logits=True) if family == "mixtral" else {}

    def grads(m):
        m.zero_grad()
        out = m(ids, attention_mask=mask, labels=labels, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_out, ref = grads(model)
    mh.patch(model)
    mh.reset_counters()
    out, got = grads(model)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-6, atol=1e-6)
    if family == "mixtral":
        torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, rtol=1e-6, atol=1e-6)
        valid = mask.reshape(-1).bool()
        for a, b in zip(out.router_logits, ref_out.router_logits):
            torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=ATOL)
    assert got.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4 * scale + 1e-7, msg=name)
    _assert_ran("flash_attn_varlen", *(["moe_experts"] if family == "mixtral" else []))


def test_patch_is_idempotent_and_unpatch_restores_exact_logits():
    model = make_model("mixtral")
    ids, mask = _inputs()
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        first = mh.patch(model)
        once = model(ids, attention_mask=mask).logits
        second = mh.patch(model)
        twice = model(ids, attention_mask=mask).logits
        assert first == second and torch.equal(once, twice)
        assert list(model.state_dict()) == keys
        for n, m in model.named_modules():  # same class names, still instances of HF's classes
            assert type(m).__name__ == classes[n].__name__ and isinstance(m, classes[n])
        assert model.config._attn_implementation == "mixkit"
        mh.unpatch(model)
        back = model(ids, attention_mask=mask).logits
    assert torch.equal(back, ref)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == "eager"
    assert model.config._experts_implementation == "eager"


@pytest.mark.parametrize("shift", [-1, 1])
def test_negative_control_window_off_by_one_fails(shift, monkeypatch):
    """W - 1 or W + 1 handed to the kernels must be caught by the comparison
    (13 tokens, W = 5), in prefill and in decode."""
    model = make_model("mistral")
    ids, _ = _inputs(batch=1, pad=(0,))
    with torch.no_grad():
        ref = model(ids).logits
        ref_seq, ref_logits = _greedy(model, ids[:, :6], None, "dynamic", new_tokens=8)
        mh.patch(model)
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=ATOL)
        monkeypatch.setattr(mh, "_window", lambda w: w + shift)
        wrong = model(ids).logits
        _, wrong_logits = _greedy(model, ids[:, :6], None, "dynamic", new_tokens=8)
    assert (wrong - ref).abs().max() > 100 * ATOL
    assert (wrong_logits - ref_logits).abs().max() > 100 * ATOL


def test_from_pretrained_with_mixkit_attention_and_experts(tmp_path):
    model = make_model("mixtral")
    model.save_pretrained(tmp_path)
    ids, mask = _inputs()
    loaded = MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation="mixkit",
                                                experts_implementation="mixkit").eval()
    mh.reset_counters()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = loaded(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=0, atol=ATOL)
    _assert_ran("flash_attn_varlen", "moe_experts")
    loaded.set_attn_implementation("eager")
    loaded.set_attn_implementation("mixkit")


def test_fallbacks_are_reported_and_strict_raises():
    model = make_model("llama")
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_attentions=True)
        mh.patch(model)
        mh.reset_counters()
        out = model(ids, attention_mask=mask, output_attentions=True)
        assert mh.counters["fallback: output_attentions"] == 2
        for a, b in zip(out.attentions, ref.attentions):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        # A 4D mask of the user's own goes to HF's sdpa.
        mask4 = torch.tril(torch.ones(13, 13, dtype=torch.bool))[None, None].expand(2, 1, 13, 13)
        model(ids, attention_mask=mask4)
        assert mh.counters["fallback: user-supplied 4D mask"] == 2
        holes = torch.ones(2, 13, dtype=torch.long)
        holes[0, 5] = 0
        model(ids, attention_mask=holes)
        assert mh.counters["fallback: padding mask with holes (not left/right padding)"] == 2
        mh.patch(model, strict=True)
        with pytest.raises(mh.MixkitFallback, match="output_attentions"):
            model(ids, output_attentions=True)
        model(ids)  # supported calls still run
    with pytest.raises(TypeError, match="supports"):
        mh.patch(torch.nn.Linear(2, 2))
    # Attention dropout in training: HF's sdpa applies it.
    mh.unpatch(model)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    mh.patch(model)
    mh.reset_counters()
    model.train()
    model(ids)
    assert mh.counters["fallback: attention dropout in training"] == 2
    model.eval()
    model(ids)
    assert mh.counters["flash_attn"] == 2


@pytest.mark.slow
def test_torch_compile_fullgraph_forward():
    model = make_model("mistral", layers=1)  # one layer: inductor's compile time is most of this test
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        mh.patch(model)
        torch._dynamo.reset()
        seen = set()
        compiled = torch.compile(model, fullgraph=True, backend=_recording(seen))
        out = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=0, atol=ATOL)
    assert {"mixkit.flash_attn", "mixkit.rope", "mixkit.rms_norm"} <= seen, seen


@pytest.mark.slow
def test_static_cache_generate_with_compiled_decode_step_without_recompiles():
    """HF's own static-cache generate() with its compiled decode step
    (CompileConfig(fullgraph=True)), left padding included: the same tokens
    and logits as eager generate, mixkit's decode_attn inside the graph, and
    one graph for all 10 steps (Llama: StaticLayer keeps its length in a
    tensor, so nothing in HF recompiles either)."""
    from torch._dynamo.utils import counters as dynamo_counters
    from transformers import CompileConfig

    model = make_model("llama", layers=1)
    ids, mask = _inputs(seqlen=7, pad=(0, 3))
    with torch.no_grad():
        ref_seq, ref_logits = _greedy(model, ids, mask, "static", new_tokens=10)
        mh.patch(model)
        seen = set()
        config = CompileConfig(fullgraph=True, backend=_recording(seen), mode=None)
        config._compile_all_devices = True  # HF compiles only on accelerators unless told
        torch._dynamo.reset()
        dynamo_counters.clear()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             cache_implementation="static", return_dict_in_generate=True, output_logits=True,
                             pad_token_id=0, compile_config=config)
    assert torch.equal(out.sequences, ref_seq)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref_logits, rtol=0, atol=ATOL)
    assert "mixkit.decode_attn" in seen, seen
    assert dynamo_counters["stats"]["unique_graphs"] == 1, dict(dynamo_counters["stats"])


def test_old_transformers_raises_import_error_naming_the_minimum():
    # The check the import runs; a subprocess importing with a faked version
    # costs ~5 s of torch + transformers imports for the same line.
    with pytest.raises(ImportError, match=r"mixkit.hf needs transformers >= 5.0.0, found 4.57.0"):
        mh.check_transformers_version("4.57.0")
    mh.check_transformers_version("5.24.0")


def test_bench_cases_run_and_agree():
    """`mixkit bench --ops hf_forward,hf_fwd_bwd,hf_decode` on the CPU: every
    peer runs once and matches HF's eager model (float32, 8 tokens)."""
    from mixkit.bench import hf as bench_hf

    for make in (bench_hf.hf_forward_case, bench_hf.hf_fwd_bwd_case, bench_hf.hf_decode_case):
        case = make("cpu", 8, torch.float32, None)
        assert set(case.impls) == {"eager", "sdpa", "mixkit"} and case.flops > 0
        ref = case.impls["eager"]()
        for name in ("sdpa", "mixkit"):
            torch.testing.assert_close(case.impls[name](), ref, rtol=0, atol=1e-4, msg=f"{case.op} {name}")
        torch.testing.assert_close(case.impls["mixkit"](), ref, rtol=0, atol=1e-4)  # a second call: same state
    bench_hf._MODELS.clear()


def test_ops_take_hf_layouts_and_fakes_match_real_strides():
    """The views mixkit.hf passes, through torch.library.opcheck (schema, fake
    tensor shapes and strides against the real op, AOT dispatch): q/k/v as
    (B, H, S, D).transpose(1, 2), and a (B, Hkv, C, D) cache transposed with
    per-row starts for decode."""
    from torch.library import opcheck

    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    q = torch.randn(2, 6, 9, 16).transpose(1, 2)
    k = torch.randn(2, 3, 9, 16).transpose(1, 2)
    opcheck(torch.ops.mixkit.flash_attn.default, (q, k, k, None, None, 9, 9, True, W, None, False), test_utils=checks)
    cache = torch.randn(2, 3, 12, 16).transpose(1, 2)
    q1 = torch.randn(2, 6, 1, 16)[:, :, 0]
    opcheck(torch.ops.mixkit.decode_attn.default,
            (q1, cache, cache, torch.tensor([12, 7], dtype=torch.int32), W, None, torch.tensor([0, 2], dtype=torch.int32)),
            test_utils=checks[:2])
