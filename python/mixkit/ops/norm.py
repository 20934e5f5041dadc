"""RMSNorm, fused residual-add + RMSNorm, and OLMo's non-parametric LayerNorm.

Layers: `_core.norm_fwd/norm_bwd` (csrc/cpu/norm.cpp, csrc/cuda/norm.cu) ->
torch.library ops `mixkit::rms_norm`, `mixkit::rms_norm_residual`,
`mixkit::layer_norm` with fake and autograd registrations -> the functions at
the bottom. Arithmetic is float32 with one rounding at the end (CONVENTIONS.md).
"""
from __future__ import annotations

import torch

from .. import _core
from .._backend import DTYPE_CODES, launch_args, ptr
from . import _checks
from ._library import define

F32 = torch.float32


def _check(op, x, weight=None, residual=None, *, has_weight=True):
    _checks.tensor(op, "x", x)
    _checks.contiguous(op, "x", x)
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: the normalised (last) dimension of x must be > 0, got shape {tuple(x.shape)}")
    if has_weight:
        _checks.tensor(op, "weight", weight)
        _checks.same_device(op, "x", x, "weight", weight)
        _checks.same_dtype(op, "x", x, "weight", weight)
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"{op}: weight must have shape ({x.shape[-1]},) to match x, got {tuple(weight.shape)}")
        _checks.contiguous(op, "weight", weight)
    if residual is not None:
        _checks.tensor(op, "residual", residual)
        _checks.same_device(op, "x", x, "residual", residual)
        _checks.same_dtype(op, "x", x, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        _checks.contiguous(op, "residual", residual)


def _fwd(x, residual, weight, y, h, mean, rstd, eps, centered):
    backend, device, stream = launch_args(x.device)
    cols = x.shape[-1]
    _core.norm_fwd(backend, device, stream, DTYPE_CODES[x.dtype], centered, x.data_ptr(), ptr(residual),
                   ptr(weight), y.data_ptr(), ptr(h), ptr(mean), ptr(rstd), x.numel() // cols, cols, eps)


def _stats(x):
    return torch.empty(x.shape[:-1], dtype=F32, device=x.device)


# ---- rms_norm -----------------------------------------------------------------

def _rms_norm(x, weight, eps):
    _check("rms_norm", x, weight)
    _checks.finite_float("rms_norm", "eps", eps)
    y, rstd = torch.empty_like(x), _stats(x)
    _fwd(x, None, weight, y, None, None, rstd, eps, False)
    return y, rstd


define("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)", _rms_norm)


@torch.library.register_fake("mixkit::rms_norm")
def _(x, weight, eps):
    _check("rms_norm", x, weight)
    return torch.empty_like(x), _stats(x)


def _rms_norm_residual(x, residual, weight, eps):
    _check("rms_norm_residual", x, weight, residual)
    _checks.finite_float("rms_norm_residual", "eps", eps)
    y, h, rstd = torch.empty_like(x), torch.empty_like(x), _stats(x)
    _fwd(x, residual, weight, y, h, None, rstd, eps, False)
    return y, h, rstd


define("rms_norm_residual(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)",
       _rms_norm_residual)


@torch.library.register_fake("mixkit::rms_norm_residual")
def _(x, residual, weight, eps):
    _check("rms_norm_residual", x, weight, residual)
    return torch.empty_like(x), torch.empty_like(x), _stats(x)


def _rms_norm_backward(grad_y, grad_h, x, weight, rstd):
    backend, device, stream = launch_args(x.device)
    cols = x.shape[-1]
    rows = x.numel() // cols
    grad_x = torch.empty_like(x)
    if rows == 0:
        return grad_x, torch.zeros_like(weight)
    dtype = DTYPE_CODES[x.dtype]
    partials = _core.norm_bwd_partials(backend, device, dtype, rows, cols)
    grad_w = torch.empty((partials, cols), dtype=F32, device=x.device)
    _core.norm_bwd(backend, device, stream, dtype, False, grad_y.data_ptr(), ptr(grad_h), x.data_ptr(),
                   weight.data_ptr(), 0, rstd.data_ptr(), grad_x.data_ptr(), grad_w.data_ptr(), partials, rows, cols)
    return grad_x, grad_w.sum(0).to(weight.dtype)


define("rms_norm_backward(Tensor grad_y, Tensor? grad_h, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
       _rms_norm_backward)


@torch.library.register_fake("mixkit::rms_norm_backward")
def _(grad_y, grad_h, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _save_rms(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.mark_non_differentiable(rstd)  # a saved statistic, not a result to differentiate
    ctx.save_for_backward(x, weight, rstd)


def _save_rms_residual(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    _y, h, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(h, weight, rstd)


def _rms_norm_bwd(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = torch.ops.mixkit.rms_norm_backward(grad_y.contiguous(), None, x, weight, rstd)
    return grad_x, grad_w, None


def _rms_norm_residual_bwd(ctx, grad_y, grad_h, _grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    grad, grad_w = torch.ops.mixkit.rms_norm_backward(grad_y.contiguous(), grad_h.contiguous(), h, weight, rstd)
    # h = x + residual: both inputs receive the same gradient.
    return grad, grad, grad_w, None


torch.library.register_autograd("mixkit::rms_norm", _rms_norm_bwd, setup_context=_save_rms)
torch.library.register_autograd("mixkit::rms_norm_residual", _rms_norm_residual_bwd,
                                setup_context=_save_rms_residual)


# ---- layer_norm (non-parametric) ------------------------------------------------

def _layer_norm(x, eps):
    _check("layer_norm", x, has_weight=False)
    _checks.finite_float("layer_norm", "eps", eps)
    y, mean, rstd = torch.empty_like(x), _stats(x), _stats(x)
    _fwd(x, None, None, y, None, mean, rstd, eps, True)
    return y, mean, rstd


define("layer_norm(Tensor x, float eps) -> (Tensor, Tensor, Tensor)", _layer_norm)


@torch.library.register_fake("mixkit::layer_norm")
def _(x, eps):
    _check("layer_norm", x, has_weight=False)
    return torch.empty_like(x), _stats(x), _stats(x)


def _layer_norm_backward(grad_y, x, mean, rstd):
    backend, device, stream = launch_args(x.device)
    cols = x.shape[-1]
    grad_x = torch.empty_like(x)
    _core.norm_bwd(backend, device, stream, DTYPE_CODES[x.dtype], True, grad_y.data_ptr(), 0, x.data_ptr(), 0,
                   mean.data_ptr(), rstd.data_ptr(), grad_x.data_ptr(), 0, 0, x.numel() // cols, cols)
    return grad_x


define("layer_norm_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd) -> Tensor", _layer_norm_backward)


@torch.library.register_fake("mixkit::layer_norm_backward")
def _(grad_y, x, mean, rstd):
    return torch.empty_like(x)


def _save_ln(ctx, inputs, output):
    x, _eps = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, mean, rstd)


def _layer_norm_bwd(ctx, grad_y, _grad_mean, _grad_rstd):
    x, mean, rstd = ctx.saved_tensors
    return torch.ops.mixkit.layer_norm_backward(grad_y.contiguous(), x, mean, rstd), None


torch.library.register_autograd("mixkit::layer_norm", _layer_norm_bwd, setup_context=_save_ln)


# ---- public API ---------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(mean(x**2, -1) + eps) * weight`, reduced and scaled in float32.

    x: (..., hidden), contiguous, float32/float16/bfloat16; weight: (hidden,),
    same dtype. Differentiable in x and weight.
    """
    return torch.ops.mixkit.rms_norm(x, weight, eps)[0]


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `h = x + residual; y = rms_norm(h)`; returns `(y, h)`.

    h is rounded to x.dtype before it is normalised, so the result equals the
    unfused ops in that dtype while saving a full read and write of h.
    """
    y, h, _ = torch.ops.mixkit.rms_norm_residual(x, residual, weight, eps)
    return y, h


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """OLMo's non-parametric LayerNorm: `(x - mean) / sqrt(var + eps)` over the
    last dimension in float32, no weight and no bias."""
    return torch.ops.mixkit.layer_norm(x, eps)[0]
