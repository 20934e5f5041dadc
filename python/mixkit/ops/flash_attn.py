"""Exact attention without the S x S score matrix: `flash_attn` and
`flash_attn_varlen`, forward and backward, GQA, causal and sliding-window masks,
logit softcap and attention sinks.

Layers: `_core.flash_attn_fwd/bwd` (csrc/cpu/flash_attn.cpp; CUDA sm_80 kernels
in csrc/cuda/flash_attn_{fwd,bwd}_sm80.cuh, also run on sm_90a; layout in
csrc/common/flash_attn.h) -> torch.library ops `mixkit::flash_attn` (returns
output and log-sum-exp) and `mixkit::flash_attn_bwd`, with fake registrations
-> autograd -> the two functions at the bottom.

Masks follow CONVENTIONS.md. With sq queries and sk keys in a sequence, query
i is the absolute position i + sk - sq: the queries are the last sq positions
(bottom-right alignment, as in a chunked prefill). Key j is visible when
j <= i + sk - sq (causal) and j > i + sk - sq - W (window W: W keys, the
query's own included). A query that sees no key outputs zeros.

softcap c (Gemma 2): the scaled score s = scale * q.k becomes c * tanh(s / c)
before the mask. sinks (gpt-oss): one float32 logit per query head, in the
units of the (capped) scores, added to every row's softmax denominator with
no value: lse_i = log(sum_j exp(s_ij) + exp(sink_h)) and out_i = sum_j
exp(s_ij - lse_i) v_j. The returned lse includes the sink; a query that sees
no key then outputs zeros with lse = sink_h. The sink's gradient is
dsink_h = -sum_i exp(sink_h - lse_i) * (dO_i . O_i) over the head's rows
(d out_i / d sink_h = -P_sink,i out_i), formed here from the backward's lse
and delta, so no kernel carries a sink term in its backward.
"""
from __future__ import annotations

import math

import torch

from .. import _core
from .._backend import DTYPE_CODES, launch_args, ptr, gpu_kernels
from . import _checks
from ._library import define

F32 = torch.float32
GPU_HEAD_DIMS = (64, 128, 256)
GPU_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 1024
INT32_MAX = 2**31 - 1


# ---- checks ----------------------------------------------------------------------

def _check(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale, sinks=None, softcap=None):
    """Validates the arguments; returns (batch, sq_or_max, sk_or_max, varlen)."""
    varlen = cu_q is not None or cu_k is not None
    op = "flash_attn_varlen" if varlen else "flash_attn"
    dims, layout = (3, "(tokens, heads, head_dim)") if varlen else (4, "(batch, seqlen, heads, head_dim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(op, name, t, min_dim=dims)
        if t.dim() != dims:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: the last dimension of {name} must be contiguous (stride 1), "
                             f"got strides {t.stride()}")
    for name, t in (("k", k), ("v", v)):
        _checks.same_device(op, "q", q, name, t)
        _checks.same_dtype(op, "q", q, name, t)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    h, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"{op}: q has head_dim {d} but k has {k.shape[-1]}; they must match")
    if d == 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if h == 0 or hkv == 0 or h % hkv:
        raise ValueError(f"{op}: the {h} query heads must be a positive multiple of the {hkv} key/value heads "
                         "(GQA)")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"{op}: window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"{op}: window must be >= 1 (the keys a query sees, itself included) or None, "
                             f"got {window}")
        if not causal:
            raise ValueError(f"{op}: a sliding window needs causal=True (window=W sees keys i-W+1..i)")
    if softmax_scale is not None:
        _checks.finite_float(op, "softmax_scale", softmax_scale, positive=True)
    _checks.sinks(op, sinks, h, q)
    _checks.softcap(op, softcap)
    if gpu_kernels(q.device):
        if q.dtype not in GPU_DTYPES:
            raise TypeError(f"{op}: on the GPU q, k and v must be bfloat16 or float16, got {q.dtype} "
                            "(float32 runs on the CPU)")
        if d not in GPU_HEAD_DIMS:
            raise ValueError(f"{op}: head_dim {d} is not supported on the GPU (supported: "
                             f"{', '.join(map(str, GPU_HEAD_DIMS))}); the CPU backend takes any head_dim")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1]):
                raise ValueError(f"{op}: on the GPU {name} needs 16-byte aligned rows (data pointer and strides "
                                 f"{t.stride()[:-1]} multiples of 8 elements); call .contiguous() first")
    if not varlen:
        b = q.shape[0]
        if b == 0:
            raise ValueError(f"{op}: empty batch (q has shape {tuple(q.shape)})")
        if k.shape[0] != b:
            raise ValueError(f"{op}: q has batch {b} but k has {k.shape[0]}")
        if q.shape[1] > INT32_MAX or k.shape[1] > INT32_MAX:
            raise ValueError(f"{op}: sequence lengths must be < 2^31")
        return b, q.shape[1], k.shape[1], False

    if cu_q is None or cu_k is None:
        raise ValueError(f"{op}: give both cu_seqlens_q and cu_seqlens_k")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        _checks.tensor(op, name, cu, dtypes=(torch.int32,))
        _checks.same_device(op, "q", q, name, cu)
        if cu.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D (batch + 1,), got shape {tuple(cu.shape)}")
        _checks.contiguous(op, name, cu)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same shape (batch + 1,), got "
                         f"{tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
    b = cu_q.shape[0] - 1
    if b < 1:
        raise ValueError(f"{op}: empty batch (cu_seqlens must hold batch + 1 >= 2 offsets, got {b + 1})")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= INT32_MAX:
            raise ValueError(f"{op}: {name} must be an int in [0, 2^31), got {m!r}")
    if q.shape[0] > INT32_MAX or k.shape[0] > INT32_MAX:
        raise ValueError(f"{op}: packed token counts must be < 2^31 (cu_seqlens are int32)")
    return b, max_q, max_k, True


def _check_cu_values(cu, total, max_seqlen, name, max_name):
    """GPU: validates cu_seqlens values on the host, once per tensor version.

    This is one device-to-host copy per new cu_seqlens tensor (a model passes
    the same one to every layer). It is skipped during CUDA-graph capture and
    torch.compile tracing, where it cannot run; the kernels clamp every
    sequence to the tensors, so bad offsets there give wrong rows, never an
    out-of-bounds access. The CPU backend checks in C++ on every call.
    """
    # (Only CUDA/ROCm tensors can be under capture; a CPU-only torch raises on
    # the query, which the emulated GPU's CPU tensors would reach.)
    capturing = cu.is_cuda and torch.cuda.is_current_stream_capturing()
    if not gpu_kernels(cu.device) or capturing or torch.compiler.is_compiling():
        return
    stamp = (cu._version, total, max_seqlen)
    if getattr(cu, "_mixkit_checked", None) == stamp:
        return
    vals = cu.tolist()
    lens = [b - a for a, b in zip(vals, vals[1:])]
    op = "flash_attn_varlen"
    if vals[0] != 0:
        raise ValueError(f"{op}: {name}[0] must be 0, got {vals[0]}")
    if min(lens) < 0:
        raise ValueError(f"{op}: {name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{op}: {name}[-1] = {vals[-1]} must equal the number of packed tokens {total}")
    if max(lens) > max_seqlen:
        raise ValueError(f"{op}: {max_name} = {max_seqlen} is smaller than the real maximum length {max(lens)}")
    cu._mixkit_checked = stamp


# ---- the ops ---------------------------------------------------------------------

def _strides(t, varlen):
    s = t.stride()
    return (0, s[0], s[1]) if varlen else (s[0], s[1], s[2])


def _lse_shape(q, varlen):
    # fixed (B, H, Sq), varlen (H, Tq), as FlashAttention returns it.
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _lse_strides(q, varlen):
    return (0, q.shape[0]) if varlen else (q.shape[2] * q.shape[1], q.shape[1])


def _scale(softmax_scale, d):
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)


def _core_args(q, k, v, out, lse, cu_q, cu_k, b, max_q, max_k, varlen, causal, window, softmax_scale, sinks,
               softcap):
    h, d, hkv = q.shape[-2], q.shape[-1], k.shape[-2]
    total_q = q.shape[0] if varlen else q.shape[0] * q.shape[1]
    total_k = k.shape[0] if varlen else k.shape[0] * k.shape[1]
    return (DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            ptr(cu_q), ptr(cu_k), b, h, hkv, d, max_q, max_k, total_q, total_k,
            _strides(q, varlen), _strides(k, varlen), _strides(v, varlen), _strides(out, varlen),
            _lse_strides(q, varlen), causal, window or 0, _scale(softmax_scale, d), float(softcap or 0.0),
            ptr(sinks))


def _prepare(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale, sinks, softcap):
    b, max_q, max_k, varlen = _check(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale, sinks,
                                     softcap)
    if varlen:
        _check_cu_values(cu_q, q.shape[0], max_q, "cu_seqlens_q", "max_seqlen_q")
        _check_cu_values(cu_k, k.shape[0], max_k, "cu_seqlens_k", "max_seqlen_k")
    return b, max_q, max_k, varlen


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale, deterministic, sinks=None,
                softcap=None):
    b, max_q, max_k, varlen = _prepare(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale, sinks,
                                       softcap)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, varlen), dtype=F32, device=q.device)
    backend, device, stream = launch_args(q.device)
    _core.flash_attn_fwd(backend, device, stream,
                         *_core_args(q, k, v, out, lse, cu_q, cu_k, b, max_q, max_k, varlen, causal, window,
                                     softmax_scale, sinks, softcap))
    return out, lse


define("flash_attn(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
       "SymInt max_seqlen_k, bool causal, int? window, float? softmax_scale, bool deterministic, Tensor? sinks=None, "
       "float? softcap=None) -> (Tensor, Tensor)", _flash_attn)


@torch.library.register_fake("mixkit::flash_attn")
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale, deterministic, sinks=None, softcap=None):
    varlen = cu_q is not None or cu_k is not None
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(_lse_shape(q, varlen), dtype=F32, device=q.device))


def _dsinks(sinks, lse, delta, varlen):
    """dsink_h = -sum over the head's rows of P_sink,i * delta_i, with
    P_sink,i = exp(sink_h - lse_i) (lse includes the sink) and delta_i =
    dO_i . O_i. A row whose lse is -inf (no key and a -inf sink) adds 0."""
    s = sinks[:, None] if varlen else sinks[None, :, None]
    p = torch.where(lse == float("-inf"), 0.0, torch.exp(s - lse))
    return -(p * delta).sum(dim=1 if varlen else (0, 2))


def _flash_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale,
                    deterministic, sinks=None, softcap=None):
    b, max_q, max_k, varlen = _prepare(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale, sinks,
                                       softcap)
    if dout.shape != q.shape or dout.dtype != q.dtype:
        raise ValueError(f"flash_attn backward: the output gradient must have q's shape {tuple(q.shape)} and "
                         f"dtype {q.dtype}, got {tuple(dout.shape)} {dout.dtype}")
    if dout.stride(-1) != 1 or (gpu_kernels(dout.device) and (dout.data_ptr() % 16 or
                                                                 any(s % 8 for s in dout.stride()[:-1]))):
        dout = dout.contiguous()
    # With no keys at all the GPU launches nothing: dq must already be zeros.
    dq = (torch.zeros if k.numel() == 0 else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    dq_accum = None
    if gpu_kernels(q.device) and not deterministic:
        total_q = q.shape[0] if varlen else q.shape[0] * q.shape[1]
        dq_accum = torch.zeros((total_q, q.shape[-2], q.shape[-1]), dtype=F32, device=q.device)
    backend, device, stream = launch_args(q.device)
    _core.flash_attn_bwd(backend, device, stream,
                         *_core_args(q, k, v, out, lse, cu_q, cu_k, b, max_q, max_k, varlen, causal, window,
                                     softmax_scale, sinks, softcap),
                         dout.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                         _strides(dout, varlen), _strides(dq, varlen), _strides(dk, varlen), _strides(dv, varlen),
                         delta.data_ptr(), ptr(dq_accum), deterministic)
    dsinks = _dsinks(sinks, lse, delta, varlen) if sinks is not None else _no_dsinks(q)
    return dq, dk, dv, dsinks


def _no_dsinks(q):
    return torch.empty((0,), dtype=F32, device=q.device)


# dsinks is (heads,) float32 when sinks are given (they only are when they
# need a gradient), else empty.
define("flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
       "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, int? window, "
       "float? softmax_scale, bool deterministic, Tensor? sinks=None, float? softcap=None) "
       "-> (Tensor, Tensor, Tensor, Tensor)", _flash_attn_bwd)


@torch.library.register_fake("mixkit::flash_attn_bwd")
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, window, softmax_scale, deterministic,
      sinks=None, softcap=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device),
            torch.empty(sinks.shape, dtype=F32, device=q.device) if sinks is not None else _no_dsinks(q))


_INPUTS = ("q", "k", "v", "cu_q", "cu_k", "max_q", "max_k", "causal", "window", "softmax_scale", "deterministic",
           "sinks", "softcap")


def _save(ctx, inputs, output):
    args = dict(zip(_INPUTS, inputs))
    out, lse = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["cu_q"], args["cu_k"], args["sinks"])
    ctx.params = tuple(args[n] for n in ("max_q", "max_k", "causal", "window", "softmax_scale", "deterministic",
                                         "softcap"))


def _backward(ctx, dout, dlse):
    # lse is returned for chunked prefill and split-KV merging; no gradient
    # flows through it (as in FlashAttention).
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    max_q, max_k, causal, window, softmax_scale, deterministic, softcap = ctx.params
    if dout is None:
        return (None,) * len(_INPUTS)
    want_dsinks = sinks is not None and ctx.needs_input_grad[_INPUTS.index("sinks")]
    dq, dk, dv, dsinks = torch.ops.mixkit.flash_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal,
                                                         window, softmax_scale, deterministic,
                                                         sinks if want_dsinks else None, softcap)
    return (dq, dk, dv) + (None,) * 8 + (dsinks if want_dsinks else None, None)


torch.library.register_autograd("mixkit::flash_attn", _backward, setup_context=_save)


# ---- public API ------------------------------------------------------------------

def _tensor_args(op: str, **tensors) -> None:
    """TypeError naming the first argument that is not a tensor, before
    anything touches .shape (which would raise AttributeError)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def flash_attn_fwd_arch(device: torch.device | str) -> int:
    """The forward kernel flash_attn runs on `device`: 90 (Hopper wgmma), 80
    (mma.sync; also what MIXKIT_FORCE_SM80=1 selects on an H100) or 0 (CPU)."""
    backend, index, _ = launch_args(torch.device(device))
    return _core.flash_attn_fwd_arch(backend, index)


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None,
               softmax_scale: float | None = None, return_lse: bool = False, deterministic: bool = False,
               sinks: torch.Tensor | None = None, softcap: float | None = None):
    """Exact (sliding-window) attention, differentiable, never forming S x S.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H a multiple of Hkv (query
    head h reads key/value head h // (H // Hkv)). Any batch/token/head strides
    with a contiguous last dim (views into a fused QKV projection need no copy).
    When Sq != Sk the queries are the last Sq positions (bottom-right-aligned
    masks). `window=W` (needs causal) lets query i see keys i-W+1 .. i.
    softmax_scale defaults to 1/sqrt(D).

    Returns the output (B, Sq, H, D); with return_lse also the float32
    (B, H, Sq) natural-log log-sum-exp of the scaled scores (-inf for a query
    that sees no key), which carries no gradient. `deterministic=True` makes
    the GPU backward accumulate dQ in a fixed order, without atomics (slower);
    the CPU backward is always deterministic.

    softcap: c > 0 caps the scaled scores at c * tanh(s / c) before the mask
    (Gemma 2). sinks: a (H,) float32 tensor of per-head sink logits (gpt-oss),
    differentiable; each row's softmax denominator gains exp(sink_h), with no
    value, and the lse includes it (a query that sees no key then outputs
    zeros with lse = sink_h). See the module docstring for the exact rule.

    GPU: bfloat16/float16, D in (64, 128, 256). CPU: float32/float16/bfloat16, any D.
    """
    _tensor_args("flash_attn", q=q, k=k, v=v)
    _checks.sink_softcap_types("flash_attn", sinks, softcap, q)
    out, lse = torch.ops.mixkit.flash_attn(q, k, v, None, None, q.shape[1] if q.dim() == 4 else 0,
                                           k.shape[1] if k.dim() == 4 else 0, causal, window, softmax_scale,
                                           deterministic, sinks, softcap)
    return (out, lse) if return_lse else out


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                      window: int | None = None, softmax_scale: float | None = None, return_lse: bool = False,
                      deterministic: bool = False, sinks: torch.Tensor | None = None,
                      softcap: float | None = None):
    """`flash_attn` over packed sequences: q (Tq, H, D), k and v (Tk, Hkv, D).

    Sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] of q and
    cu_seqlens_k[b] .. cu_seqlens_k[b+1] of k and v (int32, (B+1,), starting
    at 0, non-decreasing, ending at Tq / Tk); no query sees another sequence's
    keys, so packed training documents stay apart. max_seqlen_q/k bound the
    lengths (they size the GPU grid); a bound below a real length raises.
    With return_lse, also returns the float32 (H, Tq) log-sum-exp. sinks and
    softcap as in flash_attn (a zero-length document contributes nothing to
    dsinks).
    """
    _tensor_args("flash_attn_varlen", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _checks.sink_softcap_types("flash_attn_varlen", sinks, softcap, q)
    out, lse = torch.ops.mixkit.flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                           window, softmax_scale, deterministic, sinks, softcap)
    return (out, lse) if return_lse else out
