"""Decode over a rolling-buffer KV cache: `kv_cache_append` and `decode_attn`.

Layers: `_core.kv_cache_append/decode_attn` (csrc/cpu/decode.cpp,
csrc/cuda/decode.cu) -> torch.library ops `mixkit::kv_cache_append` (mutates
its caches, returns nothing) and `mixkit::decode_attn` with fake
registrations -> the functions at the bottom. Inference only: no autograd.

The cache follows CONVENTIONS.md: capacity C is the window W (or the maximum
length without one); the token at absolute position p lives in slot p % C;
decode attends to the last min(seen, W, C) tokens, so slots that were never
written, or hold tokens older than the window, are never read.

Nothing here reads tensor values on the host, so an append + decode step has
fixed shapes and launches and can be captured in a CUDA graph. The GPU split
count (flash-decoding) comes from shapes and the SM count only.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _core
from .._backend import DTYPE_CODES, launch_args, ptr, gpu_kernels
from . import _checks
from ._library import define

F32 = torch.float32
GPU_HEAD_DIMS = (64, 128, 256)
MAX_HEAD_DIM = 1024


def _cache_pair(op, k_cache, v_cache, strided=False):
    """strided: the readers (decode_attn, decode_attn_paged) take any strides
    with a contiguous last dim; kv_cache_append writes contiguous caches."""
    _checks.tensor(op, "k_cache", k_cache, min_dim=4)
    _checks.tensor(op, "v_cache", v_cache, min_dim=4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be (batch, capacity, kv_heads, head_dim), got shape {tuple(t.shape)}")
        if not strided:
            _checks.contiguous(op, name, t)
        elif t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{op}: the last dimension of {name} must be contiguous (stride 1), "
                             f"got strides {t.stride()}")
    _checks.same_device(op, "k_cache", k_cache, "v_cache", v_cache)
    _checks.same_dtype(op, "k_cache", k_cache, "v_cache", v_cache)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache must have the shape of k_cache {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    b, c, hkv, d = k_cache.shape
    if c == 0 or hkv == 0 or d == 0:
        raise ValueError(f"{op}: capacity, kv_heads and head_dim of k_cache must be > 0, got {tuple(k_cache.shape)}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be <= {MAX_HEAD_DIM}, got {d}")


def _gpu_head_dim(op, t, d):
    if gpu_kernels(t.device) and d not in GPU_HEAD_DIMS:
        raise ValueError(f"{op}: head_dim {d} is not supported on the GPU (supported: "
                         f"{', '.join(map(str, GPU_HEAD_DIMS))}); the CPU backend takes any head_dim")


def _aligned16(op, **tensors):
    for name, t in tensors.items():
        if gpu_kernels(t.device) and t.data_ptr() % 16:
            raise ValueError(f"{op}: {name} must be 16-byte aligned on the GPU (its storage offset breaks that)")
        vec = 16 // t.element_size()
        if gpu_kernels(t.device) and any(s % vec for s in t.stride()[:-1]):
            raise ValueError(f"{op}: on the GPU the strides of {name} {t.stride()} must be multiples of 16 bytes")


# ---- kv_cache_append ------------------------------------------------------------

def _check_append(k, v, k_cache, v_cache, positions):
    op = "kv_cache_append"
    _cache_pair(op, k_cache, v_cache)
    for name, t in (("k", k), ("v", v)):
        _checks.tensor(op, name, t, min_dim=4)
        _checks.same_device(op, "k_cache", k_cache, name, t)
        _checks.same_dtype(op, "k_cache", k_cache, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be (batch, new_tokens, kv_heads, head_dim), got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: the last dimension of {name} must be contiguous (got strides {t.stride()})")
    b, _, hkv, d = k_cache.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"{op}: k of shape {tuple(k.shape)} does not match k_cache {tuple(k_cache.shape)} "
                         "in batch, kv_heads or head_dim")
    _checks.tensor(op, "positions", positions, dtypes=_checks.INDEX_DTYPES)
    _checks.same_device(op, "k_cache", k_cache, "positions", positions)
    if positions.shape != k.shape[:2]:
        raise ValueError(f"{op}: positions must have shape (batch, new_tokens) = {tuple(k.shape[:2])}, "
                         f"got {tuple(positions.shape)}")


def _kv_cache_append(k, v, k_cache, v_cache, positions):
    _check_append(k, v, k_cache, v_cache, positions)
    b, s, hkv, d = k.shape
    pos = positions.contiguous()
    backend, device, stream = launch_args(k_cache.device)
    _core.kv_cache_append(backend, device, stream, DTYPE_CODES[k_cache.dtype], pos.dtype == torch.int64,
                          pos.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                          b, s, hkv, d, k_cache.shape[1], *k.stride()[:3], *v.stride()[:3])


define("kv_cache_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions) -> ()",
       _kv_cache_append)


@torch.library.register_fake("mixkit::kv_cache_append")
def _(k, v, k_cache, v_cache, positions):
    _check_append(k, v, k_cache, v_cache, positions)


# ---- decode_attn -----------------------------------------------------------------

def _check_query(op, q, cache_name, cache, batch, cache_seqlens, window, softmax_scale, cache_starts=None,
                 sinks=None, softcap=None):
    """Checks shared by decode_attn and decode_attn_paged: q (batch, H, D)
    against the cache's Hkv and D, cache_seqlens and cache_starts (batch,)
    int32, window, scale, sinks, softcap and the GPU head dims."""
    _checks.tensor(op, "q", q, min_dim=3)
    _checks.same_device(op, cache_name, cache, "q", q)
    _checks.same_dtype(op, cache_name, cache, "q", q)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be (batch, heads, head_dim), one token per sequence, got shape {tuple(q.shape)}")
    if q.stride(-1) != 1 and q.shape[-1] > 1:
        raise ValueError(f"{op}: the last dimension of q must be contiguous (stride 1), got strides {q.stride()}")
    hkv, d = cache.shape[2], cache.shape[3]
    if q.shape[0] != batch:
        raise ValueError(f"{op}: q has batch {q.shape[0]} but {cache_name} has {batch}")
    if q.shape[2] != d:
        raise ValueError(f"{op}: q has head_dim {q.shape[2]} but {cache_name} has {d}")
    if q.shape[1] == 0 or q.shape[1] % hkv:
        raise ValueError(f"{op}: the {q.shape[1]} query heads of q must be a positive multiple of the "
                         f"{hkv} kv_heads of {cache_name} (GQA)")
    _checks.tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32,))
    _checks.same_device(op, cache_name, cache, "cache_seqlens", cache_seqlens)
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"{op}: cache_seqlens must have shape ({batch},), got {tuple(cache_seqlens.shape)}")
    _checks.contiguous(op, "cache_seqlens", cache_seqlens)
    if cache_starts is not None:
        _checks.tensor(op, "cache_starts", cache_starts, dtypes=(torch.int32,))
        _checks.same_device(op, cache_name, cache, "cache_starts", cache_starts)
        if cache_starts.shape != (batch,):
            raise ValueError(f"{op}: cache_starts must have shape ({batch},), got {tuple(cache_starts.shape)}")
        _checks.contiguous(op, "cache_starts", cache_starts)
    if window is not None and window < 1:
        raise ValueError(f"{op}: window must be >= 1 or None, got {window}")
    if softmax_scale is not None:
        _checks.finite_float(op, "softmax_scale", softmax_scale, positive=True)
    _checks.sinks(op, sinks, q.shape[1], q)
    _checks.softcap(op, softcap)
    _gpu_head_dim(op, q, d)


def _check_decode(q, k_cache, v_cache, cache_seqlens, window, softmax_scale, cache_starts, sinks, softcap):
    _cache_pair("decode_attn", k_cache, v_cache, strided=True)
    _check_query("decode_attn", q, "k_cache", k_cache, k_cache.shape[0], cache_seqlens, window, softmax_scale,
                 cache_starts, sinks, softcap)


@functools.lru_cache(maxsize=1024)
def _splits(backend, device, dtype, b, h, hkv, d, c, window):
    """Split-KV count from shapes, the kernel's occupancy and the SM count
    (csrc/cuda/decode.cu); cached, since decode asks for the same shapes at
    every layer of every step."""
    return _core.decode_splits(backend, device, dtype, b, h, hkv, d, c, window)


def _lse_like(q):
    return torch.empty(q.shape[:2], dtype=F32, device=q.device)


def _out_like(q):
    # Contiguous whatever q's strides are; the fake registrations use the same
    # function, so a compiled graph sees the real op's strides.
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _run_decode(q, k, v, cache_seqlens, cache_starts, capacity, window, softmax_scale, sinks, softcap,
                paged=(0, 0, 0, 0)):
    """The _core.decode_attn call shared by the ring and paged forms: k, v are
    the caches or the page pools; paged = (block_table pointer, page_size,
    max_pages, num_pages), zeros for the ring."""
    b, h, d = q.shape
    hkv = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out, lse = _out_like(q), _lse_like(q)
    backend, device, stream = launch_args(q.device)
    splits = _splits(backend, device, DTYPE_CODES[q.dtype], b, h, hkv, d, capacity, window or 0)
    ws_out = ws_lse = None
    if splits > 1:
        # Float32 partials, allocated here so _core owns no GPU memory; under
        # CUDA-graph capture they come from the graph's private pool.
        ws_out = torch.empty((b, h, splits, d), dtype=F32, device=q.device)
        ws_lse = torch.empty((b, h, splits), dtype=F32, device=q.device)
    _core.decode_attn(backend, device, stream, DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                      cache_seqlens.data_ptr(), ptr(cache_starts), out.data_ptr(), lse.data_ptr(), b, h, hkv, d,
                      capacity, window or 0, scale, float(softcap or 0.0), ptr(sinks), q.stride()[:2], k.stride()[:3], v.stride()[:3], splits,
                      ptr(ws_out), ptr(ws_lse), *paged)
    return out, lse


def _decode_attn(q, k_cache, v_cache, cache_seqlens, window, softmax_scale, cache_starts=None, sinks=None,
                 softcap=None):
    _check_decode(q, k_cache, v_cache, cache_seqlens, window, softmax_scale, cache_starts, sinks, softcap)
    _aligned16("decode_attn", q=q, k_cache=k_cache, v_cache=v_cache)
    return _run_decode(q, k_cache, v_cache, cache_seqlens, cache_starts, k_cache.shape[1], window, softmax_scale,
                       sinks, softcap)


define("decode_attn(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, int? window, "
       "float? softmax_scale, Tensor? cache_starts=None, Tensor? sinks=None, float? softcap=None) "
       "-> (Tensor, Tensor)", _decode_attn)


@torch.library.register_fake("mixkit::decode_attn")
def _(q, k_cache, v_cache, cache_seqlens, window, softmax_scale, cache_starts=None, sinks=None, softcap=None):
    _check_decode(q, k_cache, v_cache, cache_seqlens, window, softmax_scale, cache_starts, sinks, softcap)
    return _out_like(q), _lse_like(q)


# ---- decode_attn_paged -------------------------------------------------------------

def _check_paged(q, k_pages, v_pages, block_table, cache_seqlens, window, softmax_scale, cache_starts, sinks,
                 softcap):
    op = "decode_attn_paged"
    _cache_pair(op, k_pages, v_pages, strided=True)
    b = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() >= 1 else 0
    _check_query(op, q, "k_pages", k_pages, b, cache_seqlens, window, softmax_scale, cache_starts, sinks, softcap)
    _checks.tensor(op, "block_table", block_table, dtypes=(torch.int32,))
    _checks.same_device(op, "k_pages", k_pages, "block_table", block_table)
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.shape[1] == 0:
        raise ValueError(f"{op}: block_table must be (batch, max_pages) = ({b}, >= 1), got {tuple(block_table.shape)}")
    _checks.contiguous(op, "block_table", block_table)


def _decode_attn_paged(q, k_pages, v_pages, block_table, cache_seqlens, window, softmax_scale, cache_starts=None,
                       sinks=None, softcap=None):
    _check_paged(q, k_pages, v_pages, block_table, cache_seqlens, window, softmax_scale, cache_starts, sinks, softcap)
    _aligned16("decode_attn_paged", q=q, k_pages=k_pages, v_pages=v_pages)
    num_pages, page_size = k_pages.shape[:2]
    max_pages = block_table.shape[1]
    return _run_decode(q, k_pages, v_pages, cache_seqlens, cache_starts, max_pages * page_size, window,
                       softmax_scale, sinks, softcap, (block_table.data_ptr(), page_size, max_pages, num_pages))


define("decode_attn_paged(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor cache_seqlens, "
       "int? window, float? softmax_scale, Tensor? cache_starts=None, Tensor? sinks=None, float? softcap=None) "
       "-> (Tensor, Tensor)", _decode_attn_paged)


@torch.library.register_fake("mixkit::decode_attn_paged")
def _(q, k_pages, v_pages, block_table, cache_seqlens, window, softmax_scale, cache_starts=None, sinks=None,
      softcap=None):
    _check_paged(q, k_pages, v_pages, block_table, cache_seqlens, window, softmax_scale, cache_starts, sinks, softcap)
    return _out_like(q), _lse_like(q)


# ---- public API ------------------------------------------------------------------

def kv_cache_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    positions: torch.Tensor) -> None:
    """Write new keys and values into rolling-buffer caches, in place.

    k, v: (B, S, Hkv, D), S >= 1 new tokens per sequence, any batch/token/head
    strides with a contiguous last dim (views into a fused QKV output are
    fine). k_cache, v_cache: contiguous (B, C, Hkv, D) of the same dtype.
    positions: (B, S) int32/int64 absolute positions; the token at position p
    goes to slot p % C.

    When S > C only the last C tokens of each sequence are written: the
    earlier ones would be overwritten within the same call. Positions within a
    call are expected to be distinct modulo C (consecutive positions are);
    otherwise which token lands in a shared slot is unspecified. Negative
    positions raise on the CPU; on the GPU they are not checked (that would
    need a host sync) but wrap into [0, C), so nothing outside the cache is
    ever written.
    """
    torch.ops.mixkit.kv_cache_append(k, v, k_cache, v_cache, positions)


def decode_attn(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                window: int | None = None, softmax_scale: float | None = None,
                return_lse: bool = False, cache_starts: torch.Tensor | None = None,
                sinks: torch.Tensor | None = None,
                softcap: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decode step of grouped-query attention over rolling-buffer caches.

    q: (B, H, D), one new token per sequence. k_cache, v_cache: (B, C, Hkv, D),
    H a multiple of Hkv; query head h uses KV head h // (H // Hkv). q and
    the caches may be strided views with a contiguous last dim: a Hugging
    Face (B, Hkv, C, D) cache passes as `.transpose(1, 2)`, with no copy.
    cache_starts: optional (B,) int32, the first position each row may read
    (left padding, or leading slots a static cache never wrote); the row then
    attends to positions max(seqlen - n, cache_starts[b]) .. seqlen - 1. It
    is read on the device, so a step still needs no host sync.
    cache_seqlens: (B,) int32, tokens each sequence has seen including the
    current one (its k/v already appended). Each query attends to the last
    n = min(cache_seqlens[b], window or C, C) tokens, positions
    seqlen - n .. seqlen - 1 in slots pos % C. `window` counts the current
    token (CONVENTIONS.md); a window larger than C sees the C cached tokens.
    A sequence with cache_seqlens 0 gets zeros (and lse -inf). Lengths larger
    than what was appended cannot be detected without a host sync: stale slots
    would then be read.

    softmax_scale defaults to 1/sqrt(D). Scores, softmax and the weighted sum
    are float32; the output is q's dtype. With return_lse, also returns the
    float32 (B, H) natural-log log-sum-exp of the scaled scores.
    softcap and sinks ((H,) float32) as in flash_attn: the lse then includes
    the sink, and a sequence with nothing visible gets zeros and lse = sink.
    With split-KV the sink enters once, in the combine. No gradient (decode is
    inference only).
    GPU: float32/float16/bfloat16, D in (64, 128, 256). CPU: any D.
    """
    if isinstance(q, torch.Tensor):
        _checks.sink_softcap_types("decode_attn", sinks, softcap, q)
    out, lse = torch.ops.mixkit.decode_attn(q, k_cache, v_cache, cache_seqlens, window, softmax_scale,
                                            cache_starts, sinks, softcap)
    return (out, lse) if return_lse else out


def decode_attn_paged(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                      cache_seqlens: torch.Tensor, window: int | None = None, softmax_scale: float | None = None,
                      return_lse: bool = False, cache_starts: torch.Tensor | None = None,
                      sinks: torch.Tensor | None = None,
                      softcap: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """decode_attn over a paged KV cache (vLLM-style block tables).

    k_pages, v_pages: (num_pages, page_size, Hkv, D), pages shared by all
    sequences. block_table: (B, max_pages) int32; position p of sequence b
    lives at row p % page_size of page block_table[b, p // page_size].
    cache_seqlens: (B,) int32 tokens seen, the current one included, at most
    max_pages * page_size. Each query attends to the last
    min(cache_seqlens[b], window) positions, so pages older than the window
    are never read (an engine may recycle them). The kernel is decode_attn's,
    with the ring slot replaced by a page lookup: the same split-KV, GQA
    sharing and CUDA-graph capturability. The CPU checks page indices and
    lengths and raises; the GPU cannot without a host sync, and clamps them
    into the page pool instead. cache_starts, strided views, sinks and softcap
    work as in decode_attn.
    """
    if isinstance(q, torch.Tensor):
        _checks.sink_softcap_types("decode_attn_paged", sinks, softcap, q)
    out, lse = torch.ops.mixkit.decode_attn_paged(q, k_pages, v_pages, block_table, cache_seqlens, window,
                                                  softmax_scale, cache_starts, sinks, softcap)
    return (out, lse) if return_lse else out
