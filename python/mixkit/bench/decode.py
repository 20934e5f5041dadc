"""Decode attention and KV-cache append at Mistral 7B shapes.

`tokens` is the number of tokens each sequence has seen (decode_attn) or
appends in one call (kv_cache_append). The cache holds C = min(tokens, 4096)
slots with Mistral's window W = 4096, so lengths past 4096 run on a wrapped
ring buffer. Bytes count what must move: the K and V actually visible, plus q
and the output (decode); the written part of k and v, read once and written
once, plus positions (append).

Peers: the eager float32 reference below, torch.compile of it, and SDPA with
its best backend over the visible part of the cache. With W >= C the visible
slots are the first min(seen, C) ones, and attention for a single query does
not depend on key order, so SDPA reads a slice of the ring, not a gathered copy.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from mixkit.bench.harness import Case, compiled, mixkit_op

N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128  # Mistral 7B
WINDOW = 4096  # Mistral 7B v0.1 sliding window = cache capacity


def decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n: int) -> torch.Tensor:
    """q (B, H, D) against the first n slots of (B, C, Hkv, D) caches, float32.
    GQA by a (B, Hkv, group, D) view of q: no repeated K/V."""
    b, h, d = q.shape
    hkv = k_cache.shape[2]
    qg = q.float().view(b, hkv, h // hkv, d)
    s = torch.einsum("bkgd,bnkd->bkgn", qg, k_cache[:, :n].float()) / math.sqrt(d)
    out = torch.einsum("bkgn,bnkd->bkgd", torch.softmax(s, dim=-1), v_cache[:, :n].float())
    return out.reshape(b, h, d).to(q.dtype)


def decode_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n: int) -> torch.Tensor:
    k = k_cache[:, :n].transpose(1, 2)  # (B, Hkv, n, D) views: no copy
    v = v_cache[:, :n].transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def decode_attn_case(device, tokens: int, dtype, compile_mode: str | None, batch: int = 8) -> Case:
    capacity = min(tokens, WINDOW)
    n = capacity  # seen >= C or seen == C: every slot is visible
    q = torch.randn(batch, N_Q_HEADS, HEAD_DIM, device=device, dtype=dtype)
    k_cache = torch.randn(batch, capacity, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.full((batch,), tokens, dtype=torch.int32, device=device)
    op = mixkit_op("decode_attn")
    impls = {
        "mixkit": lambda: op(q, k_cache, v_cache, seqlens, window=WINDOW),
        "eager": lambda: decode_ref(q, k_cache, v_cache, n),
        "sdpa": lambda: decode_sdpa(q, k_cache, v_cache, n),
    }
    if compile_mode:
        ref = compiled(decode_ref, compile_mode)
        impls["compile"] = lambda: ref(q, k_cache, v_cache, n)
    kv_bytes = 2 * batch * n * N_KV_HEADS * HEAD_DIM * k_cache.element_size()
    nbytes = kv_bytes + 2 * q.numel() * q.element_size() + seqlens.numel() * 4
    shape = f"B={batch} seen={tokens} C={capacity} W={WINDOW} H={N_Q_HEADS} Hkv={N_KV_HEADS} D={HEAD_DIM}"
    return Case("decode_attn", shape, dtype, nbytes, impls, tokens=tokens)


# The batch sizes, as separate ops so that each is one line of a plot.
decode_attn_b1_case = functools.partial(decode_attn_case, batch=1)
decode_attn_b8_case = functools.partial(decode_attn_case, batch=8)
decode_attn_b32_case = functools.partial(decode_attn_case, batch=32)


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
