"""Rotary position embedding (RoPE) for q and k in one call, both layouts.

Layers: `_core.rope` (csrc/cpu/rope.cpp, csrc/cuda/rope.cu) -> torch.library op
`mixkit::rope` with fake and autograd registrations -> `rope()` below.

Half-split (HF, NeoX, OLMo) rotates x[i] against x[i + D/2]; interleaved (Meta
and Mistral native weights) rotates x[2i] against x[2i + 1]. Frequencies are
theta^(-2i/D); angles are float32(position) * frequency in float32, and cos/sin
are computed from them in float32 (CONVENTIONS.md). The backward pass is the
same rotation by minus the angle.
"""
from __future__ import annotations

import torch

from .. import _core
from .._backend import DTYPE_CODES, launch_args
from . import _checks
from ._library import define

MAX_HEAD_DIM = 1024


def _token_stride(op: str, name: str, t: torch.Tensor) -> int:
    """Stride between consecutive tokens once the leading dims are flattened.

    q and k may be views into a fused QKV projection: any head and token
    strides are fine as long as the last dimension is contiguous and the
    leading dimensions flatten without a copy.
    """
    if t.stride(-1) != 1:
        raise ValueError(f"{op}: the last dimension of {name} must be contiguous (got strides {t.stride()})")
    try:
        return t.view(-1, t.shape[-2], t.shape[-1]).stride(0)
    except RuntimeError:
        raise ValueError(
            f"{op}: the leading dimensions of {name} do not flatten to one token stride (strides {t.stride()}); "
            "call .contiguous() first") from None


def _check(q, k, positions, theta):
    op = "rope"
    _checks.tensor(op, "q", q, min_dim=3)
    _checks.tensor(op, "k", k, min_dim=3)
    _checks.same_device(op, "q", q, "k", k)
    _checks.same_dtype(op, "q", q, "k", k)
    _checks.tensor(op, "positions", positions, dtypes=_checks.INDEX_DTYPES, min_dim=0)
    _checks.same_device(op, "q", q, "positions", positions)
    d = q.shape[-1]
    if d % 2 or d == 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dimension must be even and in [2, {MAX_HEAD_DIM}], got {d}")
    if k.shape[-1] != d:
        raise ValueError(f"{op}: q and k must share the head dimension, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"{op}: q and k must have the same leading (token) dimensions, "
                         f"got {tuple(q.shape[:-2])} and {tuple(k.shape[:-2])}")
    try:
        broadcast = torch.broadcast_shapes(positions.shape, q.shape[:-2])
    except RuntimeError:
        broadcast = None
    if broadcast is None:
        raise ValueError(f"{op}: positions of shape {tuple(positions.shape)} do not broadcast to the token "
                         f"dimensions {tuple(q.shape[:-2])} of q")
    if broadcast != q.shape[:-2]:
        raise ValueError(f"{op}: positions of shape {tuple(positions.shape)} are larger than the token "
                         f"dimensions {tuple(q.shape[:-2])} of q")
    _checks.finite_float(op, "theta", theta, positive=True)


def _rope(q, k, positions, theta, interleaved, inverse):
    _check(q, k, positions, theta)
    q_stride = _token_stride("rope", "q", q)
    k_stride = _token_stride("rope", "k", k)
    pos = positions.expand(q.shape[:-2]).reshape(-1).contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    backend, device, stream = launch_args(q.device)
    _core.rope(backend, device, stream, DTYPE_CODES[q.dtype], pos.dtype == torch.int64, pos.data_ptr(),
               pos.numel(), q.shape[-1], theta, interleaved, inverse,
               q.data_ptr(), q_out.data_ptr(), q.shape[-2], q_stride, q.stride(-2),
               k.data_ptr(), k_out.data_ptr(), k.shape[-2], k_stride, k.stride(-2))
    return q_out, k_out


define("rope(Tensor q, Tensor k, Tensor positions, float theta, bool interleaved, bool inverse) -> (Tensor, Tensor)",
       _rope)


@torch.library.register_fake("mixkit::rope")
def _(q, k, positions, theta, interleaved, inverse):
    _check(q, k, positions, theta)
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _save(ctx, inputs, output):
    _q, _k, positions, theta, interleaved, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.rotation = (theta, interleaved, not inverse)


def _backward(ctx, grad_q, grad_k):
    (positions,) = ctx.saved_tensors
    grad_q, grad_k = torch.ops.mixkit.rope(grad_q.contiguous(), grad_k.contiguous(), positions, *ctx.rotation)
    return grad_q, grad_k, None, None, None, None


torch.library.register_autograd("mixkit::rope", _backward, setup_context=_save)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
         interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (..., Hq, D) and k (..., Hkv, D) by their token positions.

    positions: int32/int64 integer positions, broadcastable to the leading
    (token) dimensions, e.g. (S,) or (B, S) for q of shape (B, S, Hq, D).
    theta: 1e4 for Llama 2, OLMo and Mistral 7B v0.1; 1e6 for Mixtral.
    interleaved: False for half-split (HF) weights, True for Meta/Mistral
    native weights. Returns new contiguous tensors; differentiable in q and k.
    """
    return torch.ops.mixkit.rope(q, k, positions, float(theta), bool(interleaved), False)
