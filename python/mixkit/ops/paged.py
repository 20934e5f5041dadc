"""Paged KV cache ops for a serving engine: `paged_kv_append` and
`paged_prefill_attn` (decode over the same pages is `decode_attn_paged`).

Layers: `_core.paged_kv_append/paged_prefill_attn` (csrc/cpu/paged.cpp,
csrc/cuda/paged.cu) -> torch.library ops `mixkit::paged_kv_append` (mutates
the pools, returns nothing) and `mixkit::paged_prefill_attn` with fake
registrations -> the functions at the bottom. Inference only: no autograd.

A pool is (num_pages, page_size, Hkv, D), shared by every sequence: slot s is
row s % page_size of page s // page_size, and position p of sequence b is at
row p % page_size of page block_table[b, p // page_size]. Attention reads only
the pages that hold a key some query sees, so an engine may free and reuse
the pages behind a sliding window while the sequence runs. Nothing here reads
tensor values on the host.
"""
from __future__ import annotations

import math

import torch

from .. import _core
from .._backend import DTYPE_CODES, gpu_kernels, launch_args, ptr
from . import _checks
from ._library import define
from .decode import _aligned16, _cache_pair

GPU_HEAD_DIMS = (64, 128, 256)


def _pools(op, k_pages, v_pages, strided):
    _cache_pair(op, k_pages, v_pages, strided=strided)


def _tokens(op, name, t, pools, heads_name, heads=None):
    """A (T, heads, D) tensor with a contiguous last dim, matching the pools'
    dtype, device and head dim (and Hkv when heads is None)."""
    _checks.tensor(op, name, t, min_dim=3)
    _checks.same_device(op, "k_pages", pools, name, t)
    _checks.same_dtype(op, "k_pages", pools, name, t)
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must be (tokens, {heads_name}, head_dim), got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{op}: the last dimension of {name} must be contiguous (stride 1), got strides {t.stride()}")
    if t.shape[2] != pools.shape[3]:
        raise ValueError(f"{op}: {name} has head_dim {t.shape[2]} but k_pages has {pools.shape[3]}")
    if heads is None and t.shape[1] != pools.shape[2]:
        raise ValueError(f"{op}: {name} has {t.shape[1]} kv_heads but k_pages has {pools.shape[2]}")


def _index(op, name, t, pools, dtypes=(torch.int32,), dim=1):
    _checks.tensor(op, name, t, dtypes=dtypes)
    _checks.same_device(op, "k_pages", pools, name, t)
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimension(s), got shape {tuple(t.shape)}")
    _checks.contiguous(op, name, t)


# ---- paged_kv_append ---------------------------------------------------------------

def _check_append(k, v, k_pages, v_pages, slot_mapping):
    op = "paged_kv_append"
    _pools(op, k_pages, v_pages, strided=False)
    _tokens(op, "k", k, k_pages, "kv_heads")
    _tokens(op, "v", v, k_pages, "kv_heads")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _index(op, "slot_mapping", slot_mapping, k_pages, dtypes=_checks.INDEX_DTYPES)
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"{op}: slot_mapping must have shape ({k.shape[0]},), one slot per token, "
                         f"got {tuple(slot_mapping.shape)}")
    if k_pages.shape[0] * k_pages.shape[1] >= 2 ** 31:
        raise ValueError(f"{op}: num_pages * page_size must be < 2^31, got {k_pages.shape[0] * k_pages.shape[1]}")


def _paged_kv_append(k, v, k_pages, v_pages, slot_mapping):
    _check_append(k, v, k_pages, v_pages, slot_mapping)
    t, hkv, d = k.shape
    backend, device, stream = launch_args(k_pages.device)
    _core.paged_kv_append(backend, device, stream, DTYPE_CODES[k_pages.dtype], slot_mapping.dtype == torch.int64,
                          slot_mapping.data_ptr(), k.data_ptr(), v.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr(),
                          t, hkv, d, k_pages.shape[0], k_pages.shape[1], k.stride()[:2], v.stride()[:2])


define("paged_kv_append(Tensor k, Tensor v, Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor slot_mapping) -> ()",
       _paged_kv_append)


@torch.library.register_fake("mixkit::paged_kv_append")
def _(k, v, k_pages, v_pages, slot_mapping):
    _check_append(k, v, k_pages, v_pages, slot_mapping)


# ---- paged_prefill_attn --------------------------------------------------------------

def _check_prefill(q, k_pages, v_pages, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window, softmax_scale,
                   sinks=None, softcap=None):
    op = "paged_prefill_attn"
    _pools(op, k_pages, v_pages, strided=True)
    _tokens(op, "q", q, k_pages, "heads", heads=True)
    hkv, d = k_pages.shape[2], k_pages.shape[3]
    if q.shape[1] == 0 or q.shape[1] % hkv:
        raise ValueError(f"{op}: the {q.shape[1]} query heads of q must be a positive multiple of the {hkv} "
                         "kv_heads of k_pages (GQA)")
    _index(op, "block_table", block_table, k_pages, dim=2)
    _index(op, "cu_seqlens_q", cu_seqlens_q, k_pages)
    _index(op, "seqlens_k", seqlens_k, k_pages)
    b = block_table.shape[0]
    if block_table.shape[1] == 0:
        raise ValueError(f"{op}: block_table must be (batch, max_pages >= 1), got {tuple(block_table.shape)}")
    if cu_seqlens_q.shape != (b + 1,):
        raise ValueError(f"{op}: cu_seqlens_q must have shape (batch + 1,) = ({b + 1},), got {tuple(cu_seqlens_q.shape)}")
    if seqlens_k.shape != (b,):
        raise ValueError(f"{op}: seqlens_k must have shape (batch,) = ({b},), got {tuple(seqlens_k.shape)}")
    if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"{op}: max_seqlen_q must be an int >= 0, got {max_seqlen_q!r}")
    if window is not None and window < 1:
        raise ValueError(f"{op}: window must be >= 1 or None, got {window}")
    if softmax_scale is not None:
        _checks.finite_float(op, "softmax_scale", softmax_scale, positive=True)
    _checks.sinks(op, sinks, q.shape[1], q)
    _checks.softcap(op, softcap)
    if gpu_kernels(q.device):
        if d not in GPU_HEAD_DIMS or (d == 256 and q.dtype == torch.float32):
            raise ValueError(f"{op}: head_dim {d} in {q.dtype} is not supported on the GPU (head_dim 64 and 128 in "
                             "any dtype, 256 in bfloat16/float16); the CPU backend takes any head_dim")


def _paged_prefill_attn(q, k_pages, v_pages, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window,
                        softmax_scale, sinks=None, softcap=None):
    _check_prefill(q, k_pages, v_pages, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window, softmax_scale,
                   sinks, softcap)
    _aligned16("paged_prefill_attn", q=q, k_pages=k_pages, v_pages=v_pages)
    tq, h, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((tq, h), dtype=torch.float32, device=q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    backend, device, stream = launch_args(q.device)
    _core.paged_prefill_attn(backend, device, stream, DTYPE_CODES[q.dtype], q.data_ptr(), k_pages.data_ptr(),
                             v_pages.data_ptr(), block_table.data_ptr(), cu_seqlens_q.data_ptr(),
                             seqlens_k.data_ptr(), out.data_ptr(), lse.data_ptr(), block_table.shape[0], h,
                             k_pages.shape[2], d, tq, max_seqlen_q, k_pages.shape[0], k_pages.shape[1],
                             block_table.shape[1], window or 0, scale, float(softcap or 0.0), ptr(sinks),
                             q.stride()[:2], k_pages.stride()[:3],
                             v_pages.stride()[:3])
    return out, lse


define("paged_prefill_attn(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor cu_seqlens_q, "
       "Tensor seqlens_k, int max_seqlen_q, int? window, float? softmax_scale, Tensor? sinks=None, "
       "float? softcap=None) -> (Tensor, Tensor)",
       _paged_prefill_attn)


@torch.library.register_fake("mixkit::paged_prefill_attn")
def _(q, k_pages, v_pages, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window, softmax_scale, sinks=None,
      softcap=None):
    _check_prefill(q, k_pages, v_pages, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window, softmax_scale,
                   sinks, softcap)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))


# ---- public API ------------------------------------------------------------------

def paged_kv_append(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Write new keys and values into page pools, in place.

    k, v: (T, Hkv, D), any token/head strides with a contiguous last dim
    (views into a fused QKV output are fine). k_pages, v_pages: contiguous
    (num_pages, page_size, Hkv, D). slot_mapping: (T,) int32/int64; token t
    goes to row slot % page_size of page slot // page_size. A negative slot
    skips its token (padding rows of a fixed-shape batch). A slot past the
    pool raises on the CPU; the GPU, which cannot raise without a host sync,
    skips it, so nothing outside the pools is ever written.
    """
    torch.ops.mixkit.paged_kv_append(k, v, k_pages, v_pages, slot_mapping)


def paged_prefill_attn(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, seqlens_k: torch.Tensor, max_seqlen_q: int,
                       window: int | None = None, softmax_scale: float | None = None,
                       return_lse: bool = False, sinks: torch.Tensor | None = None, softcap: float | None = None):
    """Chunked prefill of several sequences over paged caches.

    q: (Tq, H, D) packed queries; sequence b owns rows cu_seqlens_q[b] ..
    cu_seqlens_q[b + 1] (int32 (B + 1,), from 0 to Tq). Its keys and values,
    the chunk's own already written with paged_kv_append, are positions
    0 .. seqlens_k[b] - 1 (int32 (B,)) in the pages of block_table[b]
    ((B, max_pages) int32), and its queries are the last positions:
    seqlens_k[b] - sq .. seqlens_k[b] - 1 (bottom-right aligned, as in
    flash_attn). The query at position p sees keys p - W + 1 .. p with a
    window W (CONVENTIONS.md), every earlier key without one; H is a multiple
    of Hkv (GQA). Only pages holding a visible key are read: entries of
    freed pages behind every window may hold anything. max_seqlen_q bounds
    every sequence's query count (it sizes the GPU grid).

    Returns the output (Tq, H, D) in q's dtype, and with return_lse the
    float32 (Tq, H) natural-log log-sum-exp of the scaled scores. Scores,
    softmax and the sum are float32. The CPU checks every index value and
    raises; the GPU clamps them. GPU: head_dim 64 and 128 (any dtype) and 256
    (bfloat16/float16). CPU: any head_dim.

    softcap: c * tanh(s / c) on the scaled scores before masking (Gemma 2).
    sinks: (H,) float32 logits that join each row's softmax denominator once,
    with no value (gpt-oss); a row that sees no key then gets zeros and
    lse = its sink. Both on every backend.
    """
    _checks.sink_softcap_types("paged_prefill_attn", sinks, softcap, q)
    out, lse = torch.ops.mixkit.paged_prefill_attn(q, k_pages, v_pages, block_table, cu_seqlens_q, seqlens_k,
                                                   max_seqlen_q, window, softmax_scale, sinks, softcap)
    return (out, lse) if return_lse else out
