"""mixkit.models against Hugging Face transformers on tiny random models, and
the rolling-cache generation path against a full forward.

Tolerance on the CPU: all comparisons are float32 on both sides. The two
models run the same math in a different order (fused qkv/w13 matmuls,
float32 RoPE and norm kernels, per-expert matmuls), so logits differ by
float32 rounding only: about 1e-6 here; 1e-4 leaves room for other BLAS
builds.

On the GPU the models run in bfloat16 (the GPU attention kernels take 16-bit
inputs), and the rule is FlashAttention's: the error of mixkit's bf16 logits
against the float32 reference may be at most twice that of the reference
model itself run in bf16 (plus 1e-3 slack).
"""
from __future__ import annotations

import copy

import pytest
import torch

from mixkit._backend import emulate
from conftest import DEVICES, on, gpu
from mixkit.models import CONFIGS, Transformer, generate, load

transformers = pytest.importorskip("transformers")

WINDOW = 8
VOCAB = 128
# head_dim 64: the GPU decode kernel takes 64 and 128.
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              head_dim=64, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_key_value_heads=2)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **COMMON, num_key_value_heads=2, sliding_window=WINDOW)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)),
    "olmo": lambda: transformers.OlmoForCausalLM(transformers.OlmoConfig(
        **{k: v for k, v in COMMON.items() if k not in ("head_dim", "hidden_size")}, hidden_size=256,
        clip_qkv=0.5, tie_word_embeddings=True)),
}


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    if family == "olmo":  # make clip_qkv bite: the default init gives |qkv| well under 0.5
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(20)
                layer.self_attn.k_proj.weight.mul_(20)
    return model


def save_hf(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def tol(device):
    return 1e-4 if device == "cpu" else 1e-3


def gpu_dtype(device):
    return torch.bfloat16 if gpu(device) else torch.float32


def assert_within_lowp_rule(got, ref32, ref_lowp, name="", median_token=False):
    """max|got - ref32| <= 2 max|ref_lowp - ref32| + 1e-3 (bf16 runs).

    median_token (MoE models): the rule holds for the median token's largest
    error. A bf16 router logit one unit in the last place from a tie sends a
    token to another expert pair, and then that token's logits differ by far
    more than rounding; which tokens sit that close to a tie depends on the
    order of every bf16 sum before it, so it differs between backends (seen
    on the emulated GPU: one token of 58, one ulp of router logit)."""
    def err(x):
        e = (x.float().cpu() - ref32.float().cpu()).abs()
        return e.amax(-1).median().item() if median_token else e.max().item()
    bound = 2 * err(ref_lowp) + 1e-3
    assert err(got) <= bound, f"{name}: error {err(got):.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF model, saved directory), built once per module."""
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        out[family] = (model, save_hf(model, tmp_path_factory.mktemp(family)))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_hf(checkpoints, family, device):
    hf, path = checkpoints[family]
    ours = load(path, device=on(device), dtype=gpu_dtype(device))
    hf_lowp = copy.deepcopy(hf).to(on(device), gpu_dtype(device)) if gpu(device) else None
    # Mistral: sequences of W+1, 2W and more than 2W tokens, all past the window.
    for seqlen in ([WINDOW + 1, 2 * WINDOW, 3 * WINDOW + 5] if family == "mistral" else [2, 3 * WINDOW + 5]):
        tokens = torch.randint(0, VOCAB, (2, seqlen), generator=torch.Generator().manual_seed(seqlen))
        with torch.no_grad():
            ref = hf(tokens).logits
            got = ours(tokens.to(on(device))).cpu()
            if hf_lowp is None:
                torch.testing.assert_close(got, ref, atol=tol(device), rtol=0)
            else:
                assert_within_lowp_rule(got, ref, hf_lowp(tokens.to(on(device))).logits, f"{family} S={seqlen}",
                                        median_token=family == "mixtral")


def test_olmo_clip_qkv_is_active(checkpoints):
    hf, _ = checkpoints["olmo"]
    x = torch.randn(1, 3, 256)
    assert hf.model.layers[0].self_attn.q_proj(x).abs().max() > 0.5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf(checkpoints, family):
    hf, path = checkpoints[family]
    ours = load(path)
    for prompt_len in (5, 2 * WINDOW + 3):  # shorter and longer than the window
        prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2 * WINDOW,
                          do_sample=False, min_new_tokens=2 * WINDOW)[0, prompt_len:].tolist()
        got = generate(ours, prompt[0].tolist(), max_new_tokens=2 * WINDOW)[0]
        assert got == ref


def _tiny(name, seed=0, device="cpu"):
    return Transformer(CONFIGS[name]).init_weights(seed, std=0.1).to(on(device), gpu_dtype(device)).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-mixtral", "tiny-olmo", "tiny-ministral", "tiny-olmo2",
                                  "tiny-olmoe", "tiny-qwen3-moe", "tiny-gemma3", "tiny-gemma2", "tiny-gpt-oss"])
def test_prefill_decode_matches_full_forward(name, device):
    """Chunked prefill plus decode steps give the logits of one full forward,
    across the window and with the rolling cache wrapping several times
    (tiny-ministral: its sliding layers' rings wrap while its full layer's
    linear cache holds every token). On the emulated GPU the decode steps
    run to 2W + 3: the ring still wraps inside the prefill and again during
    the decode steps (at 2W), at a third of the launches."""
    model = _tiny(name, device=device)
    window = model.args.sliding_window or 16
    total, prompt = (2 if device == "emu" else 4) * window + 3, window + 5
    tokens = torch.randint(0, 256, (2, total), generator=torch.Generator().manual_seed(1)).to(on(device))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, max_seq_len=total)
        assert [layer.attention.cache.capacity for layer in model.layers] == model.cache_layout(total)
        chunks = []
        for start in range(0, prompt, window):
            end = min(start + window, prompt)
            chunks.append(model(tokens[:, start:end], start_pos=start))
        steps = [model.decode_step(tokens[:, p], torch.full((2,), p, dtype=torch.int32, device=on(device)))
                 for p in range(prompt, total)]
        model.clear_caches()
    if device == "cpu":
        torch.testing.assert_close(torch.cat(chunks, 1), full[:, :prompt], atol=tol(device), rtol=0)
        torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt:], atol=tol(device), rtol=0)
    else:  # bf16: each path against the float32 CPU model, no worse than twice the full forward's error
        with torch.no_grad(), emulate(False):
            ref = _tiny(name)(tokens.cpu())
        moe = bool(model.args.moe_num_experts)
        assert_within_lowp_rule(torch.cat(chunks, 1), ref[:, :prompt], full[:, :prompt], "prefill", moe)
        assert_within_lowp_rule(torch.stack(steps, 1), ref[:, prompt:], full[:, prompt:], "decode", moe)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-llama", "tiny-mixtral"])
def test_cuda_graph_decode_matches_eager(name):
    model = _tiny(name, device="cuda")
    prompts = [list(range(3, 40)), [5, 6, 7]]
    eager = generate(model, prompts, max_new_tokens=24)
    graphed = generate(model, prompts, max_new_tokens=24, cuda_graph=True)
    assert graphed == eager


def test_batched_generation_equals_single():
    model = _tiny("tiny-mistral")
    prompts = [list(range(3, 8)), list(range(40, 70)), [7]]
    batched = generate(model, prompts, max_new_tokens=20)
    alone = [generate(model, p, max_new_tokens=20)[0] for p in prompts]
    assert batched == alone


def test_sampling_is_seeded_and_stops():
    model = _tiny("tiny-llama")
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50)
    a = generate(model, [1, 2, 3], seed=3, **kw)
    assert a == generate(model, [1, 2, 3], seed=3, **kw)
    stop = a[0][4]
    cut = generate(model, [1, 2, 3], seed=3, stop=[stop], **kw)[0]
    assert cut == a[0][:a[0].index(stop) + 1]


def test_generate_rejects_bad_prompts():
    model = _tiny("tiny-llama")
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [1] * 500, max_new_tokens=20)
    # a window has no length limit: the cache rolls
    assert len(generate(_tiny("tiny-mistral"), [1] * 40, max_new_tokens=3)[0]) == 3


def test_named_configs():
    m7 = CONFIGS["mistral-7b-v0.1"]
    assert (m7.n_heads, m7.n_kv_heads, m7.head_dim, m7.sliding_window, m7.rope_theta) == (32, 8, 128, 4096, 1e4)
    mx = CONFIGS["mixtral-8x7b"]
    assert (mx.moe_num_experts, mx.moe_top_k, mx.sliding_window, mx.rope_theta) == (8, 2, None, 1e6)
    assert CONFIGS["llama-2-70b"].n_kv_heads == 8 and CONFIGS["llama-2-13b"].n_kv_heads == 40
    assert CONFIGS["olmo-1b"].tie_embeddings and CONFIGS["olmo-1b"].norm == "layer_np"


def test_cli_generate(capsys):
    from mixkit.cli import main

    assert main(["generate", "--model", "tiny-mistral", "--prompt", "hello", "--max-new-tokens", "8"]) == 0
    assert "tokens/s" in capsys.readouterr().err


def test_decode_step_compiles_without_graph_breaks():
    """A dense model's decode step has no host sync, so it traces as one graph:
    the precondition for CUDA graphs / torch.compile(mode="reduce-overhead")
    on the GPU. aot_eager needs no C++ compiler."""
    model = _tiny("tiny-mistral")
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    step = torch.compile(model.decode_step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2)
        model(tokens[:, :16], start_pos=0)
        out = torch.stack([step(tokens[:, p], torch.full((2,), p, dtype=torch.int32)) for p in range(16, 40)], 1)
        model.clear_caches()
    torch.testing.assert_close(out, full[:, 16:], atol=1e-4, rtol=0)


def test_interleaved_rope_equals_permuted_weights():
    """rope_interleaved=True on native-layout q/k rows gives the logits of the
    half-split model on HF-layout rows (CONVENTIONS.md RoPE layouts)."""
    from test_loading import half_split_to_native

    half = _tiny("tiny-llama")
    args = half.args.replace(rope_interleaved=True)
    inter = Transformer(args).eval()
    inter.load_state_dict(half.state_dict())
    h, hkv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    with torch.no_grad():
        for layer in inter.layers:
            w = layer.attention.wqkv.weight
            w[:h] = half_split_to_native(w[:h].clone(), args.n_heads)
            w[h:h + hkv] = half_split_to_native(w[h:h + hkv].clone(), args.n_kv_heads)
        tokens = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(inter(tokens), half(tokens), atol=1e-5, rtol=0)


def test_packed_documents_equal_separate_forwards():
    model = _tiny("tiny-mistral")
    docs = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 37, 1, 20)]
    cu_seqlens = torch.tensor([0, 5, 42, 43, 63], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], cu_seqlens=cu_seqlens)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
