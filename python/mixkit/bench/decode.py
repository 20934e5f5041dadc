"""Decode attention and KV-cache append at Mistral 7B shapes.

`tokens` is the number of tokens each sequence has seen (decode_attn) or
appends in one call (kv_cache_append). The cache holds C = min(tokens, 4096)
slots with Mistral's window W = 4096, so lengths past 4096 run on a wrapped
ring buffer. Bytes count what must move: the K and V actually visible, plus q
and the output (decode); the written part of k and v, read once and written
once, plus positions (append).

Peers: the eager float32 reference below, torch.compile of it, and SDPA with
its best backend over the visible part of the cache. The variant ops
(gpt-oss's sinks at its decode shape, 64 / 8 heads of 64 with W = 128;
Gemma 2's softcap 50 at head dim 256, 16 / 8 heads) drop SDPA, which has
neither, and take FlexAttention with the cap as its score_mod and the sinks
folded in from its lse, and FlashAttention's decode op where it takes the
feature. With W >= C the visible
slots are the first min(seen, C) ones, and attention for a single query does
not depend on key order, so SDPA reads a slice of the ring, not a gathered copy.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from mixkit.bench.flash_attn import fa_feature_kwargs
from mixkit.bench.harness import Case, compiled, mixkit_op

N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128  # Mistral 7B
WINDOW = 4096  # Mistral 7B v0.1 sliding window = cache capacity


def decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n: int, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, D) against the first n slots of (B, C, Hkv, D) caches, float32.
    GQA by a (B, Hkv, group, D) view of q: no repeated K/V. softcap: c *
    tanh(s / c); sinks (H,): one more logit per row, dropped after the softmax."""
    b, h, d = q.shape
    hkv = k_cache.shape[2]
    qg = q.float().view(b, hkv, h // hkv, d)
    s = torch.einsum("bkgd,bnkd->bkgn", qg, k_cache[:, :n].float()) / math.sqrt(d)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if sinks is None:
        p = torch.softmax(s, dim=-1)
    else:
        col = sinks.float().view(1, hkv, h // hkv, 1).expand(b, hkv, h // hkv, 1)
        p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bkgn,bnkd->bkgd", p, v_cache[:, :n].float())
    return out.reshape(b, h, d).to(q.dtype)


def decode_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n: int) -> torch.Tensor:
    k = k_cache[:, :n].transpose(1, 2)  # (B, Hkv, n, D) views: no copy
    v = v_cache[:, :n].transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def _flex_decode(compile_mode: str, softcap: float | None = None, sinks: torch.Tensor | None = None):
    """FlexAttention over the visible slots, compiled: one query per
    sequence sees every slot, so no block mask is needed. A softcap is its
    score_mod; sinks are folded in from its lse (out * exp(lse -
    logaddexp(lse, sink))), as transformers' flex path does."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = compiled(flex_attention, compile_mode)
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

    def run(q, k_cache, v_cache, n):
        k = k_cache[:, :n].transpose(1, 2)
        v = v_cache[:, :n].transpose(1, 2)
        if sinks is None:
            return flex(q[:, :, None], k, v, score_mod=score_mod, enable_gqa=True)[:, :, 0]
        out, lse = flex(q[:, :, None], k, v, score_mod=score_mod, enable_gqa=True, return_lse=True)
        keep = torch.exp(lse[:, :, 0] - torch.logaddexp(lse[:, :, 0], sinks.view(1, -1)))
        return (out[:, :, 0] * keep[..., None]).to(q.dtype)

    return run


def _fa_kvcache(softcap: float | None = None, sinks: torch.Tensor | None = None):
    """FlashAttention's decode op, when the package is importable and takes
    the softcap / sinks asked for."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    extra = fa_feature_kwargs(flash_attn_with_kvcache, softcap, sinks)
    if extra is None:
        return None

    def run(q, k_cache, v_cache, n, seqlens):
        # Every visible slot holds a token and order does not matter for one
        # query, so the ring needs no unrolling: cache_seqlens = n.
        return flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=seqlens.clamp(max=n),
                                       **extra)[:, 0]

    return run


# Caches above this many bytes are skipped (batch 128 at 32k tokens without a
# window would need 17 GB per tensor).
MAX_CACHE_BYTES = 4 << 30


# The variant ops' shapes: (query heads, KV heads, head dim, window, softcap,
# sinks): gpt-oss-20b's sliding layers and Gemma 2 9B's global layers, as in
# flash_attn.VARIANTS.
VARIANTS = {
    "sinks_w128": (64, 8, 64, 128, None, True),
    "softcap_hd256": (16, 8, 256, None, 50.0, False),
}


def decode_attn_case(device, tokens: int, dtype, compile_mode: str | None, batch: int = 8,
                     window: int | None = WINDOW, variant: str | None = None) -> Case | None:
    """One decode step after `tokens` seen. With Mistral's window the cache
    holds C = W = 4096 slots (a full ring past 4096 tokens); without one it
    holds every token."""
    heads, kv_heads, head_dim, softcap, sinks = N_Q_HEADS, N_KV_HEADS, HEAD_DIM, None, None
    if variant is not None:
        heads, kv_heads, head_dim, window, softcap, with_sinks = VARIANTS[variant]
        # gpt-oss's sinks sit around the scores' own log-sum-exp scale.
        sinks = torch.randn(heads, device=device) + 2.0 if with_sinks else None
    capacity = min(tokens, window) if window else tokens
    n = capacity  # seen >= C or seen == C: every slot is visible
    if 2 * batch * capacity * kv_heads * head_dim * torch.finfo(dtype).bits // 8 > MAX_CACHE_BYTES:
        return None
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(batch, capacity, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.full((batch,), tokens, dtype=torch.int32, device=device)
    op = mixkit_op("decode_attn")
    extra = dict(softcap=softcap, sinks=sinks) if variant is not None else {}
    impls = {
        "mixkit": lambda: op(q, k_cache, v_cache, seqlens, window=window, **extra),
        "eager": lambda: decode_ref(q, k_cache, v_cache, n, softcap, sinks),
    }
    if variant is None:
        impls["sdpa"] = lambda: decode_sdpa(q, k_cache, v_cache, n)
    if compile_mode:
        ref = compiled(decode_ref, compile_mode)
        impls["compile"] = lambda: ref(q, k_cache, v_cache, n, softcap, sinks)
        if torch.device(device).type == "cuda":
            flex = _flex_decode(compile_mode, softcap, sinks)
            impls["flex"] = lambda: flex(q, k_cache, v_cache, n)
    fa = _fa_kvcache(softcap, sinks) if torch.device(device).type == "cuda" else None
    if fa:
        impls["fa2_kvcache"] = lambda: fa(q, k_cache, v_cache, n, seqlens)
    kv_bytes = 2 * batch * n * kv_heads * head_dim * k_cache.element_size()
    nbytes = kv_bytes + 2 * q.numel() * q.element_size() + seqlens.numel() * 4
    shape = f"B={batch} seen={tokens} C={capacity} W={window or 'none'} H={heads} Hkv={kv_heads} D={head_dim}"
    name = "decode_attn" if window else "decode_attn_nowin"
    if variant is not None:
        name = f"decode_attn_{variant}"
        shape += f" softcap={softcap or 'none'} sinks={'yes' if sinks is not None else 'no'}"
    return Case(name, shape, dtype, nbytes, impls, tokens=tokens)


# The batch sizes, as separate ops so that each is one line of a plot.
decode_attn_b1_case = functools.partial(decode_attn_case, batch=1)
decode_attn_b8_case = functools.partial(decode_attn_case, batch=8)
decode_attn_b32_case = functools.partial(decode_attn_case, batch=32)
decode_attn_b128_case = functools.partial(decode_attn_case, batch=128)
decode_attn_nowin_b1_case = functools.partial(decode_attn_case, batch=1, window=None)
decode_attn_nowin_b8_case = functools.partial(decode_attn_case, batch=8, window=None)
decode_attn_nowin_b32_case = functools.partial(decode_attn_case, batch=32, window=None)
decode_attn_sinks_w128_b8_case = functools.partial(decode_attn_case, batch=8, variant="sinks_w128")
decode_attn_softcap_hd256_b8_case = functools.partial(decode_attn_case, batch=8, variant="softcap_hd256")

# Seen lengths (issue 4): 1k, 4k and 32k on the GPU.
SEEN = {
    ("cuda", False): (1024, 4096, 32768),
    ("cuda", True): (4096, 32768),
    ("cpu", False): (16, 256, 1024),
    ("cpu", True): (64,),
}


def append_ref(k, v, k_cache, v_cache, positions):
    """Eager scatter: slot p % C, the last C tokens of the call only."""
    c, s = k_cache.shape[1], k.shape[1]
    keep = slice(max(0, s - c), s)
    slots = positions[:, keep] % c
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    k_cache[rows, slots] = k[:, keep]
    v_cache[rows, slots] = v[:, keep]
    return k_cache, v_cache


def kv_cache_append_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    """One sequence appends `tokens` new tokens (a prefill chunk, or a decode
    step at tokens=1) to a 4096-slot cache, starting at position 10000 so the
    ring wraps inside the call."""
    batch, capacity, start = 1, WINDOW, 10000
    k = torch.randn(batch, tokens, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    positions = (start + torch.arange(tokens, device=device)).expand(batch, tokens).contiguous()

    def caches():
        return (torch.zeros(batch, capacity, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
                torch.zeros(batch, capacity, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype))

    op = mixkit_op("kv_cache_append")
    mk_caches, eager_caches, compile_caches = caches(), caches(), caches()

    def run_mixkit():
        op(k, v, *mk_caches, positions)
        return mk_caches

    impls = {"mixkit": run_mixkit, "eager": lambda: append_ref(k, v, *eager_caches, positions)}
    if compile_mode:
        ref = compiled(append_ref, compile_mode)
        impls["compile"] = lambda: ref(k, v, *compile_caches, positions)
    written = min(tokens, capacity)
    nbytes = 2 * 2 * batch * written * N_KV_HEADS * HEAD_DIM * k.element_size() + positions.numel() * 8
    shape = f"B={batch} new={tokens} C={capacity} Hkv={N_KV_HEADS} D={HEAD_DIM}"
    return Case("kv_cache_append", shape, dtype, nbytes, impls, tokens=tokens)
