"""Model-level (end-to-end) benchmarks: Mistral 7B decode and prefill, and a
Mixtral 8x7B layer stack, against Hugging Face transformers on the same GPU.

    mixkit bench models [--device cuda|cpu] [--quick] [--sections families,hf] [--out FILE.json]
    python -m mixkit.bench.models ...            (the same)

Random weights at the real shapes, built straight on the device in the
benchmark dtype (meta init, to_empty, normal_ on the device: no float32 copy
of 7B weights on the host). One model is alive at a time.

Rows (one dict per measurement, like bench.harness rows):

- decode / <model> B=b ctx=c: one `decode_step` per call after a prefill of c
  tokens per sequence, each call feeding back its greedy token. Impls:
  "mixkit" (eager), "mixkit+graph" (the same step captured in one CUDA graph,
  checked against an eager step from the same state), "hf-sdpa" / "hf-fa2"
  (transformers with a DynamicCache, one token at a time), "hf-compile"
  (torch.compile(hf.forward, mode="reduce-overhead") with a StaticCache).
- prefill / <model> T=t: one forward over t tokens, batch 1, no cache.
- moe_decode / mixtral-8x7b[n layers]: decode over a stack of n Mixtral layers
  (plus embedding, final norm and LM head), mixkit and transformers.
- family_prefill, family_decode / tiny-gpt-oss, tiny-qwen3-moe: the newer
  MoE families at their tiny configs (gpt-oss: sinks, alternating windows,
  biases, the clamped SwiGLU, YaRN; Qwen3-MoE: per-head q/k norms, top-4 of
  8, a dense layer), mixkit against transformers on the same weights (the
  mixkit model saved with mixkit.models.save and read by transformers'
  from_pretrained; transformers' gpt-oss has no sdpa path, so its rows use
  eager attention).

Rooflines. Decode is memory bound: a step must read every weight matrix it
touches once, whatever the batch, plus the visible KV cache:

    bytes = sum(weights touched)             # all matrices; embedding: B rows;
                                             # MoE: gate + experts the router picked
          + n_layers * 2 * B * visible * n_kv_heads * head_dim * elt   # K and V read
    roofline_us = bytes / copy_bandwidth     # harness.copy_bandwidth_gbps (read + write)
    roofline_pct = 100 * roofline_us / median_us

visible = min(position + 1, window) at the middle of the timed steps. For the
MoE stack the experts touched are counted: forward hooks on mixkit's router
record the distinct top-k experts per layer over a few untimed steps, and the
mean per layer is used (at B=1 that is top_k, at B=32 most of the experts).
The transformers Mixtral rows reuse that count (its random router picks
differently but alike).

Prefill is compute bound: flops = 2 * matmul params * T + 4 * visible pairs *
n_heads * head_dim * n_layers (flash_attn.visible_pairs), and roofline_pct is
the percentage of harness.matmul_tflops.

Timing: harness.time_fn with CUDA events and no L2 flush (the weights are far
bigger than L2, and a flush before each call would hide host launch overhead,
which end to end is part of the cost). On the CPU (`--device cpu`) the same
code runs on the tiny named configs: a smoke test of the wiring, not numbers.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mixkit.bench import harness
from mixkit.bench.flash_attn import visible_pairs
from mixkit.models import CONFIGS, ModelArgs, Transformer

SECTIONS = ("mixkit", "hf", "compile", "mixtral", "families")
FAMILIES = ("tiny-gpt-oss", "tiny-qwen3-moe")
BATCHES = (1, 32)


# ---------------------------------------------------------------------------
# Plan: shapes per device and run kind
# ---------------------------------------------------------------------------


def plan(device: str, quick: bool, mixtral_layers: int | None = None, context: int | None = None,
         steps: int | None = None, tiny: bool = False) -> dict:
    """Configs and sizes. GPU: the real Mistral 7B and Mixtral 8x7B shapes;
    CPU (or `tiny`): the tiny named configs, small enough for CI."""
    cuda = torch.device(device).type == "cuda"
    layers = mixtral_layers or (2 if quick else 4)
    if cuda and not tiny:
        p = dict(mistral=("mistral-7b", CONFIGS["mistral-7b-v0.1"]),
                 mixtral=(f"mixtral-8x7b[{layers} layers]", CONFIGS["mixtral-8x7b"].replace(n_layers=layers)),
                 context=1024, prefill=4096, steps=20 if quick else 100, prefill_reps=3 if quick else 10,
                 compile_batches=(1,) if quick else BATCHES, compile_prefill=not quick)
    else:
        p = dict(mistral=("tiny-mistral", CONFIGS["tiny-mistral"]),
                 mixtral=(f"tiny-mixtral[{layers} layers]", CONFIGS["tiny-mixtral"].replace(n_layers=layers)),
                 context=32, prefill=128, steps=6 if quick else 20, prefill_reps=3,
                 compile_batches=(1,), compile_prefill=True)
    p.update(batches=BATCHES, dtype=torch.bfloat16, probe_steps=4)
    if context:
        p["context"] = context
    if steps:
        p["steps"] = steps
    return p


# ---------------------------------------------------------------------------
# Models with random weights, built on the device
# ---------------------------------------------------------------------------


def build_mixkit(args: ModelArgs, device, dtype=torch.bfloat16, seed: int = 0, std: float = 0.02) -> Transformer:
    """Transformer on the meta device, materialised in `dtype` on `device`,
    N(0, std) matrices and unit norm weights drawn there."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)  # dtype first: never a float32 copy
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                p.normal_(0.0, std, generator=gen)
    return model.eval()


def hf_config(args: ModelArgs):
    """transformers MistralConfig / MixtralConfig for the same model;
    `mixkit.models.from_hf_config(hf_config(args).to_dict())` gives `args` back."""
    import transformers

    if args.norm != "rms" or args.bias or args.clip_qkv is not None or args.rope_interleaved:
        raise ValueError("hf_config: only Mistral/Mixtral-style ModelArgs have a transformers peer here")
    common = dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                  num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                  num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                  max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                  sliding_window=args.sliding_window, tie_word_embeddings=args.tie_embeddings,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if args.moe_num_experts:
        return transformers.MixtralConfig(**common, num_local_experts=args.moe_num_experts,
                                          num_experts_per_tok=args.moe_top_k, router_jitter_noise=0.0)
    return transformers.MistralConfig(**common)


def hf_attn_impls(device) -> list[tuple[str, str | None]]:
    """(impl name, attn_implementation or None when it cannot run here, with the reason)."""
    impls = [("hf-sdpa", "sdpa")]
    if torch.device(device).type == "cuda":
        try:
            from transformers.utils import is_flash_attn_2_available

            fa2 = is_flash_attn_2_available()
        except ImportError:
            fa2 = False
        impls.append(("hf-fa2", "flash_attention_2" if fa2 else None))
    return impls


def build_hf(args: ModelArgs, device, dtype=torch.bfloat16, attn: str = "sdpa", seed: int = 0):
    """MistralForCausalLM / MixtralForCausalLM from the same ModelArgs, with
    transformers' own random init, built directly on `device` in `dtype`."""
    import transformers

    cfg = hf_config(args)
    cls = transformers.MixtralForCausalLM if args.moe_num_experts else transformers.MistralForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = cls._from_config(cfg, dtype=dtype, attn_implementation=attn)
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            model = cls._from_config(cfg, torch_dtype=dtype, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).eval()


def free(*_):
    """Return the memory of dropped models to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Decode and prefill runners (shared by the benchmark and its tests)
# ---------------------------------------------------------------------------


def make_prompt(batch: int, length: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


class MixkitDecoder:
    """Prefill `prompt` (B, ctx) into fresh caches, then `step()` decodes one
    token per sequence with `decode_step`, feeding back the greedy token.
    `token` (B,) and `seqlens` (B,) are static tensors updated in place, so
    `step` can be captured in a CUDA graph and replayed."""

    def __init__(self, model: Transformer, prompt: torch.Tensor, max_len: int):
        self.model = model
        b, ctx = prompt.shape
        windows = [w for w in model.args.windows if w is not None]
        model.setup_caches(b, max_len)  # full layers get max_len slots, sliding ones their window
        chunk = min(min(windows, default=ctx), ctx)
        with torch.no_grad():
            for start in range(0, ctx, chunk):  # as generate(): chunks of at most the window
                logits = model(prompt[:, start:start + chunk], start_pos=start)
            self.token = logits[:, -1].argmax(-1)
        del logits
        self.seqlens = torch.full((b,), ctx, dtype=torch.int32, device=prompt.device)

    def step(self) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model.decode_step(self.token, self.seqlens)
            self.token.copy_(logits.argmax(-1))
            self.seqlens.add_(1)
        return logits

    def position(self) -> int:
        """Position of the next token (host sync: call outside timing)."""
        return int(self.seqlens[0])

    def close(self):
        self.model.clear_caches()


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _cache_kwarg(model) -> str:
    # transformers renamed past_key_values to `cache` (5.2x); older releases take past_key_values.
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def make_hf_cache(model, kind: str, batch: int, max_len: int):
    import transformers

    cfg = model.config
    if kind == "dynamic":
        try:
            return transformers.DynamicCache(config=cfg)
        except TypeError:  # transformers 4.x
            return transformers.DynamicCache()
    params = inspect.signature(transformers.StaticCache.__init__).parameters
    if "max_batch_size" in params:  # transformers 4.x: shapes and device up front
        p = next(model.parameters())
        return transformers.StaticCache(config=cfg, max_batch_size=batch, max_cache_len=max_len, device=p.device,
                                        dtype=p.dtype)
    return transformers.StaticCache(config=cfg, max_cache_len=max_len)


class HFDecoder:
    """The same loop for a transformers model: prefill into a DynamicCache or
    StaticCache, then one token per call through `forward` (or `fwd`, a
    compiled forward), greedy token fed back. Positions are passed
    explicitly, and cache_position where the release still takes it."""

    def __init__(self, model, prompt: torch.Tensor, cache: str, max_len: int, fwd: Callable | None = None):
        self.model, self.fwd = model, fwd or model.forward
        b, ctx = prompt.shape
        self.cache = make_hf_cache(model, cache, b, max_len)
        self.cache_kw = _cache_kwarg(model)
        self.takes_cache_position = "cache_position" in _forward_params(model)
        self.compiled = fwd is not None
        positions = torch.arange(ctx, device=prompt.device).expand(b, ctx)
        with torch.no_grad():
            out = model(input_ids=prompt, **self._kwargs(positions), logits_to_keep=1)
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        del out
        self.positions = torch.full((b, 1), ctx, dtype=torch.int64, device=prompt.device)

    def _kwargs(self, positions):
        kw = {"position_ids": positions, self.cache_kw: self.cache, "use_cache": True}
        if self.takes_cache_position:
            kw["cache_position"] = positions[0]
        return kw

    def step(self) -> torch.Tensor:
        if self.compiled and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier graph outputs may be overwritten
        with torch.no_grad():
            out = self.fwd(input_ids=self.token, **self._kwargs(self.positions))
            logits = out.logits[:, -1]
            self.token = logits.argmax(-1, keepdim=True)  # a new tensor: never a graph-owned output
            self.positions = self.positions + 1
        return logits

    def position(self) -> int:
        return int(self.positions[0, 0])

    def close(self):
        self.cache = None


# ---------------------------------------------------------------------------
# Rooflines
# ---------------------------------------------------------------------------


def _attn_params(args: ModelArgs) -> int:
    return args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + args.n_heads * args.head_dim * args.dim


def decode_weight_elems(args: ModelArgs, batch: int, experts_touched: float | None = None) -> float:
    """Weight elements one decode step reads: every matrix once (whatever the
    batch), the embedding's B rows only, and for MoE the router plus
    `experts_touched` experts per layer (default all)."""
    per_layer = _attn_params(args) + 2 * args.dim  # + attention_norm, ffn_norm
    touched = args.moe_num_experts if experts_touched is None else experts_touched
    total = 0
    for i in range(args.n_layers):
        if args.is_moe(i):
            total += per_layer + args.dim * args.moe_num_experts + touched * 3 * args.dim * args.expert_dim
        else:
            total += per_layer + 3 * args.dim * args.hidden_dim
    head = args.vocab_size * args.dim + args.dim  # LM head + final norm
    embed = 0 if args.tie_embeddings else batch * args.dim  # tied: the LM head already reads the whole table
    return total + head + embed


def decode_kv_elems(args: ModelArgs, batch: int, position: int) -> int:
    """K and V elements decode attention reads for the token at `position`,
    each layer's window its own."""
    visible = sum(position + 1 if w is None else min(position + 1, w) for w in args.windows)
    return 2 * batch * visible * args.n_kv_heads * args.head_dim


def decode_bytes(args: ModelArgs, batch: int, position: int, elt: int, experts_touched: float | None = None) -> int:
    elems = decode_weight_elems(args, batch, experts_touched) + decode_kv_elems(args, batch, position)
    return int(round(elems * elt))


def prefill_flops(args: ModelArgs, tokens: int) -> int:
    """Matmul flops of one forward over `tokens` (batch 1): projections, FFN
    (top_k experts per token for MoE), LM head, and causal attention."""
    moe = 3 * args.dim * args.expert_dim * args.moe_top_k + args.dim * args.moe_num_experts
    dense = 3 * args.dim * args.hidden_dim
    ffn = sum(moe if args.is_moe(i) else dense for i in range(args.n_layers))
    matmul_params = args.n_layers * _attn_params(args) + ffn + args.vocab_size * args.dim
    attn = 4 * sum(visible_pairs(tokens, w) for w in args.windows) * args.n_heads * args.head_dim
    return 2 * matmul_params * tokens + attn


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


class Bench:
    """Collects rows; every measurement is guarded so that one failure (a peer
    that will not compile, a capture that fails, an OOM) becomes an error row."""

    def __init__(self, device: str, p: dict, log: Callable[[str], None] | None = print):
        self.device, self.p, self.log = device, p, log
        self.cuda = torch.device(device).type == "cuda"
        self.dtype = p["dtype"]
        self.elt = torch.finfo(self.dtype).bits // 8
        self.copy_gbps = harness.copy_bandwidth_gbps(device)
        self.peak_tflops = harness.matmul_tflops(device)
        self.rows: list[dict] = []
        self.experts_touched: dict[int, float] = {}  # batch -> mean experts per layer (mixtral stack)

    # -- row helpers --

    def row(self, op: str, model: str, shape: str, impl: str, **extra) -> dict:
        r = {"op": op, "model": model, "shape": shape, "dtype": str(self.dtype).removeprefix("torch."),
             "impl": impl, **extra}
        self.rows.append(r)
        return r

    def emit(self, r: dict):
        if self.log:
            self.log(_one_line(r))

    def fail(self, r: dict, exc: BaseException):
        r["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        free()

    def time(self, fn: Callable[[], Any], reps: int, warmup: int = 3) -> harness.Timing:
        return harness.time_fn(fn, self.device, budget_s=0.0, min_reps=reps, max_reps=reps, warmup=warmup,
                               flush_l2=False)

    def record_timing(self, r: dict, t: harness.Timing, tokens: int):
        r.update(median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, reps=t.reps, method=t.method,
                 tokens_per_s=tokens / (t.median_us * 1e-6))

    def decode_roofline(self, r: dict, args: ModelArgs, batch: int, position: int, touched: float | None = None):
        nbytes = decode_bytes(args, batch, position, self.elt, touched)
        roof_us = nbytes / (self.copy_gbps * 1e9) * 1e6
        r.update(bytes=nbytes, roofline="copy-bandwidth", roofline_us=roof_us)
        if "median_us" in r:
            r["gbps"] = nbytes / (r["median_us"] * 1e-6) / 1e9
            r["roofline_pct"] = 100 * roof_us / r["median_us"]

    def prefill_roofline(self, r: dict, args: ModelArgs, tokens: int):
        flops = prefill_flops(args, tokens)
        roof_us = flops / (self.peak_tflops * 1e12) * 1e6
        r.update(flops=flops, roofline="matmul-peak", roofline_us=roof_us)
        if "median_us" in r:
            r["tflops"] = flops / (r["median_us"] * 1e-6) / 1e12
            r["roofline_pct"] = 100 * roof_us / r["median_us"]

    # -- measurements --

    def _max_len(self) -> int:
        # Every call advances the caches: prefill, probes, warm-ups, the
        # capture's own warm-ups, a check step, the timed steps; plenty of room.
        return self.p["context"] + 2 * self.p["steps"] + 64

    def decode(self, op: str, name: str, args: ModelArgs, impl: str, batch: int,
               make: Callable[[torch.Tensor], Any], note: str | None = None, graph: bool = False,
               count_experts: bool = False):
        """One decode row: `make(prompt)` builds a decoder (prefill included)."""
        ctx, steps = self.p["context"], self.p["steps"]
        r = self.row(op, name, f"{name} B={batch} ctx={ctx}", impl, batch=batch, context=ctx, tokens=batch)
        if note:
            r["note"] = note
        dec = None
        position = ctx
        try:
            prompt = make_prompt(batch, ctx, args.vocab_size, self.device)
            dec = make(prompt)
            del prompt
            if count_experts:
                self.experts_touched[batch] = self._count_experts(dec)
            if count_experts or batch in self.experts_touched:
                r["experts_touched_per_layer"] = self.experts_touched[batch]
            dec.step()  # first call outside timing (allocations, compilation)
            if graph:
                fn, err = self._graph(dec)
                r["max_abs_err_vs_eager"] = err
            else:
                fn = dec.step
            position = dec.position()
            self.record_timing(r, self.time(fn, steps), batch)
        except Exception as exc:
            self.fail(r, exc)
        finally:
            if dec is not None:
                dec.close()
            del dec
            free()
        touched = self.experts_touched.get(batch) if args.moe_num_experts else None
        if args.moe_num_experts and touched is None:
            r["note"] = (r.get("note", "") + "; no expert count: the roofline assumes all experts").lstrip("; ")
        # KV read at the middle of the timed steps (after time_fn's 3 warm-ups and its probe)
        self.decode_roofline(r, args, batch, position + 4 + steps // 2, touched)
        self.emit(r)

    def _count_experts(self, dec: MixkitDecoder) -> float:
        """Mean distinct experts per layer per step that mixkit's router picks,
        over a few untimed steps (forward hooks on each layer's gate)."""
        picks: list[list[torch.Tensor]] = []
        hooks = []
        for layer in dec.model.layers:
            ff = layer.feed_forward
            seen: list[torch.Tensor] = []
            picks.append(seen)
            hooks.append(ff.gate.register_forward_hook(
                lambda mod, inp, out, seen=seen, k=ff.top_k: seen.append(out.topk(k, dim=-1).indices)))
        try:
            for _ in range(self.p["probe_steps"]):
                dec.step()
        finally:
            for h in hooks:
                h.remove()
        counts = [ids.unique().numel() for layer in picks for ids in layer]
        return sum(counts) / len(counts)

    def _graph(self, dec: MixkitDecoder) -> tuple[Callable[[], Any], float]:
        """Capture dec.step in a CUDA graph; check one replay against an eager
        step from the same state; return (replay, max abs logit error)."""
        # A host sync inside the step cannot be captured. Find one first with
        # an eager step under sync-debug "error", rather than failing mid-capture.
        torch.cuda.synchronize()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            dec.step()
        except RuntimeError as exc:
            if "synchroniz" not in str(exc):  # torch: "called a synchronizing CUDA operation"
                raise
            raise RuntimeError(f"not capturable, decode_step syncs with the host: {exc}".splitlines()[0]) from None
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        for _ in range(3):
            dec.step()
        graph, logits = harness.capture_cuda_graph(dec.step)  # capture does not run the step
        # Replaying and then stepping eagerly from the same (token, seqlens)
        # writes the same K/V to the same slot, so both must give the same logits.
        token0, seqlens0 = dec.token.clone(), dec.seqlens.clone()
        graph.replay()
        replayed = logits.clone()
        dec.token.copy_(token0)
        dec.seqlens.copy_(seqlens0)
        eager = dec.step()
        err = (replayed.float() - eager.float()).abs().max().item()
        scale = eager.float().abs().max().item()
        if not err <= 1e-2 * max(scale, 1.0):
            raise RuntimeError(f"CUDA-graph replay disagrees with eager decode_step: max abs err {err:.3g} "
                               f"(logits up to {scale:.3g})")
        return graph.replay, err

    def prefill(self, name: str, args: ModelArgs, impl: str, forward: Callable[[torch.Tensor], Any],
                note: str | None = None, op: str = "prefill"):
        tokens = self.p["prefill"]
        r = self.row(op, name, f"{name} T={tokens} B=1", impl, batch=1, context=tokens, tokens=tokens)
        if note:
            r["note"] = note
        try:
            ids = make_prompt(1, tokens, args.vocab_size, self.device, seed=1)

            def fn():
                with torch.no_grad():
                    return forward(ids)

            fn()  # compile / allocate outside timing
            self.record_timing(r, self.time(fn, self.p["prefill_reps"], warmup=1), tokens)
        except Exception as exc:
            self.fail(r, exc)
        free()
        self.prefill_roofline(r, args, tokens)
        self.emit(r)

    def skipped(self, op: str, name: str, impl: str, reason: str, batch: int | None = None):
        """A row for a measurement that cannot run here, saying why."""
        shape = f"{name} T={self.p['prefill']} B=1" if batch is None else f"{name} B={batch} ctx={self.p['context']}"
        r = self.row(op, name, shape, impl, batch=batch or 1, skipped=reason)
        self.emit(r)

    # -- sections --

    def mistral_mixkit(self, graph: bool):
        name, args = self.p["mistral"]
        model = build_mixkit(args, self.device, self.dtype)
        max_len = self._max_len()
        self.prefill(name, args, "mixkit", lambda ids: model(ids))
        for b in self.p["batches"]:
            self.decode("decode", name, args, "mixkit", b, lambda prompt: MixkitDecoder(model, prompt, max_len))
        for b in self.p["batches"]:
            if not graph:
                self.skipped("decode", name, "mixkit+graph", "CUDA graphs need --device cuda", b)
                continue
            self.decode("decode", name, args, "mixkit+graph", b,
                        lambda prompt: MixkitDecoder(model, prompt, max_len), graph=True)
        model = None  # the last reference: frees the weights
        free()

    def hf_eager(self, op: str, name: str, args: ModelArgs):
        for impl, attn in hf_attn_impls(self.device):
            if attn is None:
                for b in self.p["batches"]:
                    self.skipped(op, name, impl, "flash_attn (FlashAttention 2) is not importable", b)
                continue
            try:
                model = build_hf(args, self.device, self.dtype, attn)
            except Exception as exc:
                r = self.row(op, name, name, impl)
                self.fail(r, exc)
                self.emit(r)
                continue
            max_len = self._max_len()
            note = f"DynamicCache, attn_implementation={attn}"
            experts = getattr(model.config, "_experts_implementation", None)
            if args.moe_num_experts and experts:
                note += f", experts_implementation={experts}"
            if op == "decode":
                self.prefill(name, args, impl, lambda ids: model(input_ids=ids, use_cache=False).logits,
                             note=f"no cache, attn_implementation={attn}")
            for b in self.p["batches"]:
                self.decode(op, name, args, impl, b,
                            lambda prompt: HFDecoder(model, prompt, "dynamic", max_len), note=note)
            model = None
            free()

    def hf_compiled(self):
        """torch.compile(hf.forward, mode="reduce-overhead") with a StaticCache
        (the transformers recipe). On the CPU: backend "eager", a trace-only
        smoke test of the same calls (inductor would need minutes of C++ builds)."""
        name, args = self.p["mistral"]
        if self.cuda:
            kw, how = dict(mode="reduce-overhead"), "torch.compile(mode=reduce-overhead), StaticCache"
        else:
            kw, how = dict(backend="eager"), "torch.compile(backend=eager) on CPU: a trace smoke test, StaticCache"
        max_len = self._max_len()
        if args.sliding_window is not None:
            # transformers' sliding-window StaticCache layer keeps its length in
            # a Python int that dynamo guards on: a recompile every step. Without
            # the window the StaticCache keeps it in a tensor. While every
            # position stays inside the window the attention is the same.
            same = max_len <= args.sliding_window and self.p["prefill"] <= args.sliding_window
            how += (", sliding_window=None (the same attention: ctx+steps and T fit in the window)" if same else
                    ", sliding_window=None (NOT the same attention: positions pass the window)")
            args = args.replace(sliding_window=None)
        cfg = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):  # one graph per batch size and the prefill
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), 64))
        model = build_hf(args, self.device, self.dtype, "sdpa")
        fwd = None
        try:
            fwd = torch.compile(model.forward, dynamic=False, **kw)
            for b in self.p["compile_batches"]:
                self.decode("decode", name, args, "hf-compile", b,
                            lambda prompt: HFDecoder(model, prompt, "static", max_len, fwd=fwd), note=how)
            for b in [b for b in self.p["batches"] if b not in self.p["compile_batches"]]:
                self.skipped("decode", name, "hf-compile",
                             "--quick compiles batch 1 only (each batch size is a 7B compile)", b)
            if self.p["compile_prefill"]:
                self.prefill(name, args, "hf-compile", lambda ids: fwd(input_ids=ids, use_cache=False).logits,
                             note=how.replace(", StaticCache", ", no cache"))
            else:
                self.skipped("prefill", name, "hf-compile", "--quick skips the compiled prefill (another 7B compile)")
        finally:
            model = fwd = None
            torch._dynamo.reset()  # compiled code and CUDA-graph pools hold the model's weights
            free()

    def mixtral(self, graph: bool, hf: bool):
        name, args = self.p["mixtral"]
        model = build_mixkit(args, self.device, self.dtype)
        max_len = self._max_len()
        for b in self.p["batches"]:
            self.decode("moe_decode", name, args, "mixkit", b, lambda prompt: MixkitDecoder(model, prompt, max_len),
                        count_experts=True, note="roofline counts the experts the router picked")
        model = None  # the last reference: frees the weights
        free()
        if hf:
            self.hf_eager("moe_decode", name, args)
        if graph:  # last: a failed capture is the likeliest thing to leave the device unwell
            model = build_mixkit(args, self.device, self.dtype)
            for b in self.p["batches"]:
                self.decode("moe_decode", name, args, "mixkit+graph", b,
                            lambda prompt: MixkitDecoder(model, prompt, max_len), graph=True)
            model = None
            free()
        else:
            for b in self.p["batches"]:
                self.skipped("moe_decode", name, "mixkit+graph", "CUDA graphs need --device cuda", b)


    def families(self, hf: bool):
        """The newer MoE families (FAMILIES) at their tiny configs: mixkit
        and, on the same weights, transformers."""
        import tempfile

        from mixkit.models import save

        for name in FAMILIES:
            args = CONFIGS[name]
            model = build_mixkit(args, self.device, self.dtype, std=0.05)
            max_len = self._max_len()
            self.prefill(name, args, "mixkit", lambda ids: model(ids), op="family_prefill")
            for b in self.p["batches"]:
                self.decode("family_decode", name, args, "mixkit", b,
                            lambda prompt: MixkitDecoder(model, prompt, max_len))
            if not hf:
                model = None
                free()
                continue
            attn = "eager" if args.attn_sinks else "sdpa"  # transformers' gpt-oss has no sdpa path
            impl = f"hf-{attn}"
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    save(model, tmp)
                    model = None
                    free()
                    import transformers
                    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                        tmp, dtype=self.dtype, attn_implementation=attn).to(self.device).eval()
                except Exception as exc:
                    r = self.row("family_decode", name, name, impl)
                    self.fail(r, exc)
                    self.emit(r)
                    continue
            experts = getattr(hf_model.config, "_experts_implementation", None)
            note = f"same weights, attn_implementation={attn}, experts_implementation={experts}"
            self.prefill(name, args, impl, lambda ids: hf_model(input_ids=ids, use_cache=False).logits,
                         note=note, op="family_prefill")
            for b in self.p["batches"]:
                self.decode("family_decode", name, args, impl, b,
                            lambda prompt: HFDecoder(hf_model, prompt, "dynamic", max_len),
                            note="DynamicCache, " + note)
            hf_model = None
            free()


def _speedups(rows: list[dict]):
    """mixkit_speedup = this row's time / the mixkit row's (same op and shape): > 1, mixkit is faster."""
    mine = {(r["op"], r["shape"]): r for r in rows if r["impl"] == "mixkit" and "median_us" in r}
    for r in rows:
        ref = mine.get((r["op"], r["shape"]))
        if ref is not None and r is not ref and "median_us" in r:
            r["mixkit_speedup"] = r["median_us"] / ref["median_us"]


def run(device: str | None = None, quick: bool = False, sections: list[str] | None = None,
        mixtral_layers: int | None = None, context: int | None = None, steps: int | None = None,
        compile: bool = True, tiny: bool = False,
        log: Callable[[str], None] | None = print) -> tuple[dict, list[dict]]:
    """Run the model benchmarks; returns (metadata, rows). `tiny`: the CPU
    run's tiny configs on any device (a fast check of the GPU code paths)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device cuda asked for, but torch {torch.__version__} sees no CUDA GPU")
    sections = list(sections or SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    if not compile and "compile" in sections:
        sections.remove("compile")
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
        sections = [s for s in sections if s not in ("hf", "compile")]

    torch.manual_seed(0)
    p = plan(device, quick, mixtral_layers, context, steps, tiny)
    meta = harness.collect_metadata(device)
    bench = Bench(device, p, log)
    meta.update(copy_gbps=bench.copy_gbps, matmul_tflops=bench.peak_tflops, quick=quick, tiny=tiny, sections=sections,
                transformers=tf_version, context=p["context"], prefill_tokens=p["prefill"], decode_steps=p["steps"],
                batches=list(p["batches"]), mistral=p["mistral"][0], mixtral=p["mixtral"][0],
                timing="cuda-events, no L2 flush" if cuda else "perf_counter",
                compile_mode=("reduce-overhead" if cuda else "backend=eager") if "compile" in sections else None)
    if log:
        log(f"{meta['device_name']}: copy {bench.copy_gbps:.1f} GB/s, matmul {bench.peak_tflops:.1f} TFLOP/s")
    t0 = time.perf_counter()
    runners = {"mixkit": lambda: bench.mistral_mixkit(graph=cuda),
               "hf": lambda: bench.hf_eager("decode", *p["mistral"]),
               "compile": bench.hf_compiled,
               "mixtral": lambda: bench.mixtral(graph=cuda, hf="hf" in sections),
               "families": lambda: bench.families(hf="hf" in sections)}
    for section in SECTIONS:
        if section not in sections:
            continue
        try:
            runners[section]()
        except Exception as exc:  # building a model failed (out of memory, say): one row, then go on
            model = ", ".join(FAMILIES) if section == "families" else p["mixtral" if section == "mixtral"
                                                                          else "mistral"][0]
            r = bench.row("section", model, model, section)
            bench.fail(r, exc)
            bench.emit(r)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    _speedups(bench.rows)
    return meta, bench.rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _f(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _one_line(r: dict) -> str:
    head = f"{r['op']:<10} {r['shape']:<34} {r['impl']:<13}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    line = f"{head} {r['median_us'] / 1e3:9.3f} ms {r['tokens_per_s']:10.1f} tok/s"
    if "roofline_pct" in r:
        line += f" {r['roofline_pct']:5.1f}% of {r['roofline']}"
    return line


def render_table(rows: list[dict]) -> str:
    header = ["op", "shape", "dtype", "impl", "median ms", "p20-p80 ms", "tokens/s", "% roofline", "roofline",
              "roofline ms", "mixkit speedup (x)", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        note = r.get("note", "")
        if "experts_touched_per_layer" in r:
            note = f"{r['experts_touched_per_layer']:.2f} experts/layer touched; " + note
        if "error" in r:
            note = "error: " + r["error"]
        elif "skipped" in r:
            note = "skipped: " + r["skipped"]
        timed = "median_us" in r
        cells = [r["op"], r["shape"], r["dtype"], r["impl"],
                 _f(r.get("median_us", 0) / 1e3, ".3f") if timed else "",
                 f"{r['p20_us'] / 1e3:.3f}-{r['p80_us'] / 1e3:.3f}" if timed else "",
                 _f(r.get("tokens_per_s"), ".1f"), _f(r.get("roofline_pct"), ".1f"), r.get("roofline", ""),
                 _f(r["roofline_us"] / 1e3 if "roofline_us" in r else None, ".3f"),
                 _f(r.get("mixkit_speedup"), ".2f"), note.replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(meta: dict, rows: list[dict]) -> str:
    keys = ["date_utc", "device_name", "driver", "torch", "cuda", "transformers", "commit", "copy_gbps",
            "matmul_tflops", "timing", "compile_mode", "context", "decode_steps", "wall_s"]
    head = "\n".join(f"- {k}: {meta.get(k)}" for k in keys if meta.get(k) is not None)
    return (f"# mixkit model benchmarks, {meta['device_name']}\n\n{head}\n\n{render_table(rows)}\n\n"
            "Decode roofline: (weights touched per step + KV read) / copy bandwidth; prefill: flops / matmul peak. "
            "mixkit speedup = row time / mixkit time.\n")


def write_results(path: str | Path, meta: dict, rows: list[dict]) -> list[Path]:
    return harness.write_json_and_markdown(path, meta, rows, render_markdown(meta, rows), suffix="_models")


def build_parser() -> argparse.ArgumentParser:
    from mixkit.cli import Parser, device, integer, names, output_path

    sections = names("sections", lambda: list(SECTIONS), ["nope", "mixkit,nope", ""])
    ap = Parser(prog="mixkit bench models", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="few timed steps; on the GPU compile batch 1 decode only")
    ap.add_argument("--out", type=output_path, metavar="PATH",
                    help="results JSON (a .md table is written beside it); a directory picks the name")
    ap.add_argument("--sections", type=sections, help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--mixtral-layers", type=integer(1), default=None,
                    help="layers in the Mixtral stack (default: 2 quick, 4 full)")
    ap.add_argument("--context", type=integer(1), default=None,
                    help="tokens prefilled before decode (default: 1024 on the GPU)")
    ap.add_argument("--steps", type=integer(1), default=None, help="timed decode steps per row (default: by device)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the GPU too: checks the code paths fast")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        meta, rows = run(device=a.device, quick=a.quick, sections=a.sections,
                         mixtral_layers=a.mixtral_layers, context=a.context, steps=a.steps,
                         compile=not a.no_compile, tiny=a.tiny)
    except ValueError as exc:
        print(f"mixkit bench models: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(render_table(rows))
    if a.out:
        for path in write_results(a.out, meta, rows):
            print(f"wrote {path}")
    # A failing mixkit measurement fails the command; failing peers (and a
    # failed CUDA-graph capture, recorded in its row) are only shown.
    return 1 if any("error" in r and r["impl"] == "mixkit" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
