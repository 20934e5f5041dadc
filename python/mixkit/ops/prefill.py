"""Chunked prefill over a rolling-buffer KV cache: `prefill_attn`.

A prompt longer than the window W is processed in chunks of at most W tokens
(CONVENTIONS.md). Each chunk attends to the cached tail, unrolled from the
ring buffer in position order, plus itself, with flash_attn's
bottom-right-aligned causal window mask; then the chunk is appended to the
cache. Built from three ops: a gather of the tail slots (index_select with
host-known slot numbers), `flash_attn` and `kv_cache_append`. Nothing reads
tensor values on the host.

The other design, a kernel that reads the ring buffer in place, would save
the gather's copy of up to W - 1 keys and values per chunk (at most as many
bytes as the chunk's own K and V when the chunk is W tokens); which one wins
on a GPU is still to be measured (issue 4 notes).
"""
from __future__ import annotations

import torch

from . import _checks
from .decode import kv_cache_append
from .flash_attn import _tensor_args, flash_attn


def prefill_tail(start_pos: int, capacity: int, window: int | None) -> int:
    """Cached tokens a chunk starting at start_pos attends to: the first
    query sees W - 1 earlier keys (W including itself), and without a window
    every earlier token, all of which must still be in the cache."""
    want = start_pos if window is None else min(start_pos, window - 1)
    if want > capacity:
        raise ValueError(f"prefill_attn: the chunk at position {start_pos} needs the {want} tokens before it, "
                         f"but the cache holds only {capacity} (capacity must be >= the window - 1, or the whole "
                         "sequence without a window)")
    return want


def prefill_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 start_pos: int, window: int | None = None, softmax_scale: float | None = None,
                 return_lse: bool = False, sinks: torch.Tensor | None = None, softcap: float | None = None):
    """Attention for one prefill chunk, then the chunk appended to the caches.

    q (B, S, H, D), k and v (B, S, Hkv, D): the chunk's queries, keys and
    values (RoPE applied) at absolute positions start_pos .. start_pos + S - 1,
    the same for every row. k_cache, v_cache (B, C, Hkv, D) hold each row's
    earlier tokens, position p in slot p % C (written by earlier
    prefill_attn / kv_cache_append calls). Query start_pos + i sees the keys
    at positions start_pos + i - W + 1 .. start_pos + i. With S <= W the
    chunk never overwrites a slot it still needs; longer chunks are allowed
    without a window only (the cache then holds the whole sequence).

    Returns the chunk's attention output (B, S, H, D) (and the float32
    (B, H, S) log-sum-exp with return_lse). Differentiable in q, k, v and
    sinks through flash_attn; the caches are written in place. sinks ((H,)
    float32) and softcap as in flash_attn: each chunk row's softmax carries
    the sink once, so chunked and whole prefill agree.
    """
    _tensor_args("prefill_attn", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"prefill_attn: start_pos must be an int >= 0, got {start_pos!r}")
    if q.dim() != 4 or k.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"prefill_attn: q, k, v must be (B, S, heads, D) and the caches (B, C, Hkv, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(k_cache.shape)}")
    _checks.sink_softcap_types("prefill_attn", sinks, softcap, q)
    _checks.sinks("prefill_attn", sinks, q.shape[2], q)
    b, s = q.shape[:2]
    c = k_cache.shape[1]
    if window is not None and s > window:
        raise ValueError(f"prefill_attn: a chunk holds at most the window's {window} tokens, got {s}")
    if window is None and start_pos + s > c:
        raise ValueError(f"prefill_attn: without a window the cache must hold the whole sequence, but positions "
                         f"up to {start_pos + s - 1} do not fit its {c} slots")
    tail = prefill_tail(start_pos, c, window)
    keys, values = k, v
    if tail:
        slots = torch.arange(start_pos - tail, start_pos, device=k_cache.device).remainder_(c)
        keys = torch.cat([k_cache.index_select(1, slots), k], 1)
        values = torch.cat([v_cache.index_select(1, slots), v], 1)
    out = flash_attn(q, keys, values, causal=True, window=window, softmax_scale=softmax_scale,
                     return_lse=return_lse, sinks=sinks, softcap=softcap)
    positions = torch.arange(start_pos, start_pos + s, device=k_cache.device).expand(b, s)
    kv_cache_append(k, v, k_cache, v_cache, positions)
    return out
