"""The serving engine (mixkit.serve) on every family of mixkit.models: per-layer
sliding and full attention (layer_types), q/k norms, Gemma's embedding scale,
query scalar and softcaps, gpt-oss's sinks, YaRN RoPE and the MoE variants.

- Against transformers' own generate, on the tiny random Hugging Face models
  of test_model_families (window 5, head_dim 16, GQA 3, 8 or 16 experts):
  several requests served together, prompts past the window, in a page pool
  small enough that the sliding groups free pages as they go.
- Against mixkit's own generate, on each tiny-* config, with chunks smaller
  than the window and requests arriving while others decode.
- Teacher-forced logits of the runner (mixed decode and prefill batches) against
  the model's full forward on every device: float32 on the CPU, and the
  low-precision rule on the emulated GPU.
"""
import pytest
import torch

from mixkit import models
from mixkit._backend import emulate
from mixkit.serve import Engine, SamplingParams
from mixkit.serve.runner import Chunk

from conftest import DEVICES, gpu, on

transformers = pytest.importorskip("transformers")

from test_bench_models import one_thread  # noqa: E402,F401
from test_model_families import FAMILIES, W, _tokens, hf_model  # noqa: E402
from test_models import assert_within_lowp_rule  # noqa: E402

TINY = ["tiny-mistral", "tiny-mixtral", "tiny-llama", "tiny-olmo", "tiny-olmo2", "tiny-olmoe", "tiny-qwen3-moe",
        "tiny-ministral", "tiny-gemma2", "tiny-gemma3", "tiny-gpt-oss"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (test_bench_models.one_thread)."""


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def serve(engine, requests, every=1):
    """Add requests (prompt, n) one at a time between steps; {rid: tokens}."""
    out, pending, step = {}, list(requests), 0
    while pending or engine.has_work():
        if pending and step % every == 0:
            prompt, n = pending.pop(0)
            out[engine.add(prompt, greedy(n))] = []
        for o in engine.step():
            out[o.rid] += o.token_ids
        step += 1
    return [out[rid] for rid in sorted(out)]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_transformers_generate(family, tmp_path):
    """Three requests (prompts of 2W + 3, 3 and W + 1 tokens, 16 new tokens
    each) served together in pages of 4, chunks of 4: every token equals
    transformers' greedy generate of the request alone."""
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    ours = models.load(tmp_path)
    prompts = [_tokens(1, n, seed)[0].tolist() for n, seed in ((2 * W + 3, 11), (3, 12), (W + 1, 13))]
    n = 16
    engine = Engine(ours, num_pages=40, page_size=4, max_batch=3, token_budget=8, chunk=4)
    got = serve(engine, [(p, n) for p in prompts])
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False)[0, len(prompt):].tolist()
        assert tokens == ref, f"prompt of {len(prompt)}"
    if any(g.window is not None for g in engine.blocks.groups):
        sliding = [i for i, g in enumerate(engine.blocks.groups) if g.window is not None]
        # a sliding group held fewer pages than its requests' full lengths would take
        assert all(engine.blocks.peak_held[i] < sum(-(-(len(p) + n) // 4) for p in prompts) for i in sliding)
    assert engine.blocks.num_free() == [40] * len(engine.blocks.groups)


def tiny(name, device="cpu"):
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    return models.Transformer(models.CONFIGS[name]).init_weights(0, std=0.1).to(on(device), dtype).eval()


@pytest.mark.parametrize("name", TINY)
def test_engine_matches_generate_alone(name):
    """Four requests arriving over time (prompts of 1 to 2 windows + 5,
    12 to 24 new tokens), chunks of 8 under a window of 16: each equals
    mixkit.generate on it alone."""
    model = tiny(name)
    g = torch.Generator().manual_seed(3)
    requests = [(torch.randint(0, 256, (n,), generator=g).tolist(), m) for n, m in ((37, 12), (1, 20), (17, 24),
                                                                                   (9, 16))]
    engine = Engine(model, num_pages=48, page_size=4, max_batch=4, token_budget=12, chunk=8)
    got = serve(engine, requests, every=2)
    for (prompt, n), tokens in zip(requests, got):
        assert tokens == models.generate(model, prompt, n)[0], f"prompt of {len(prompt)}"


def _teacher_forced(engine, seqs, prompt_len, chunk):
    """Logits (2, S - 1, vocab) of positions 1 .. S - 1 of two sequences fed
    to the runner: sequence 0 prefills in chunks, then decodes one token a
    step while sequence 1 prefills beside it (mixed batches), then both
    decode. Position 0 is left out: the first chunk's logits begin there."""
    runner, blocks = engine.runner, engine.blocks
    total = seqs.shape[1]
    nxt, out = [0, None], torch.zeros(2, total, engine.model.args.vocab_size)
    while nxt[1] is None or min(nxt) < total:
        step = []
        for rid, s in enumerate(nxt):
            if s is not None and s < total:
                step.append((rid, s, min(chunk, prompt_len - s) if s < prompt_len else 1))
        step.sort(key=lambda c: c[2] != 1)  # decodes first
        for rid, s, n in step:
            assert blocks.allocate(rid, s, s + n)
        inp = runner.prepare([Chunk(rid, seqs[rid, s:s + n].tolist(), s, True) for rid, s, n in step])
        with torch.inference_mode():
            logits = runner.forward(inp, torch.arange(inp["n_tokens"])).float().cpu()
        at = 0
        for rid, s, n in step:
            out[rid, s:s + n] = logits[at:at + n]
            at += n
            nxt[rid] = s + n
        if nxt[1] is None and nxt[0] >= prompt_len:
            nxt[1] = 0
    return out[:, 1:]


def _runner_cases():
    """Every family on every device, but on the emulated GPU one MoE family
    (Qwen3-MoE, a dense layer among its MoE ones) stands for the three: the
    runner hands the FFN to the model's own code, each family's MoE is tested
    there (test_models.py), and an emulated grouped GEMM takes about a second."""
    for d in DEVICES:
        device, marks = (d.values[0], d.marks) if hasattr(d, "values") else (d, ())
        for name in TINY:
            if device != "emu" or name not in ("tiny-mixtral", "tiny-olmoe"):
                yield pytest.param(name, device, marks=marks, id=f"{name}-{device}")


@pytest.mark.parametrize("name,device", list(_runner_cases()))
def test_runner_logits_match_full_forward(name, device):
    """Two sequences of 3 windows + 5 tokens (prompts of 21, chunks of 8,
    pages of 4, sliding pages freed behind the window): the runner's logits of
    every position equal the model's full forward (float32 CPU), or keep to
    the low-precision rule against it (bfloat16, emulated GPU: 20 tokens,
    prompts of 13, still past the window, for the emulator's time)."""
    model = tiny(name, device)
    engine = Engine(model, num_pages=32, page_size=4, max_batch=2, token_budget=16, chunk=8, max_model_len=64)
    total, prompt = (20, 13) if gpu(device) else (53, 21)
    seqs = torch.randint(0, 256, (2, total), generator=torch.Generator().manual_seed(7))
    got = _teacher_forced(engine, seqs, prompt_len=prompt, chunk=8)
    with torch.no_grad():
        full = model(seqs.to(on(device))).float().cpu()[:, 1:]
        if not gpu(device):
            torch.testing.assert_close(got, full, atol=1e-4, rtol=0)
            return
        with emulate(False):
            ref = tiny(name)(seqs)[:, 1:]
    assert_within_lowp_rule(got, ref, full, name, median_token=bool(model.args.moe_num_experts))


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_gpu_engine_refuses_a_head_dim_the_paged_kernels_lack(device):
    """Refused when the engine is built, naming the head dim, not at a step."""
    args = models.CONFIGS["tiny-llama"].replace(head_dim=32)
    model = models.Transformer(args).init_weights(0).to(on(device), torch.bfloat16).eval()
    with pytest.raises(ValueError, match="head_dim 32"):
        Engine(model, num_pages=8, page_size=4, max_batch=1, token_budget=8, chunk=8, max_model_len=32)
