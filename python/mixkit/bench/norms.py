"""RMSNorm, fused residual add + RMSNorm, and OLMo's LayerNorm at Mistral 7B shapes.

Peers: the eager reference below (float32 math written plainly, as in HF
model code), torch.compile of that same reference, and Liger-Kernel when it
is installed (CUDA only).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mixkit.bench.harness import Case, compiled, liger_for, mixkit_op

HIDDEN = 4096  # Mistral 7B
RMS_EPS = 1e-6
LN_EPS = 1e-5  # OLMo-1


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rms_norm_residual_ref(x, residual, w, eps: float = RMS_EPS):
    h = x + residual  # rounded once to the input dtype, as HF's residual add is
    return rms_norm_ref(h, w, eps), h


def layer_norm_ref(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    # OLMo's modelling code: float32, no weight, no bias.
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _inputs(tokens: int, device, dtype):
    x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(HIDDEN, device=device)).to(dtype)
    return x, w


def _shape(tokens: int) -> str:
    return f"T={tokens} H={HIDDEN}"


def rms_norm_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    x, w = _inputs(tokens, device, dtype)
    op, lg = mixkit_op("rms_norm"), liger_for(device)
    impls = {"mixkit": lambda: op(x, w, RMS_EPS), "eager": lambda: rms_norm_ref(x, w, RMS_EPS)}
    if compile_mode:
        ref = compiled(rms_norm_ref, compile_mode)
        impls["compile"] = lambda: ref(x, w, RMS_EPS)
    if lg:
        impls["liger"] = lambda: lg["rms_norm"](x, w, RMS_EPS)
    # read x and w, write y
    nbytes = (2 * x.numel() + w.numel()) * x.element_size()
    return Case("rms_norm", _shape(tokens), dtype, nbytes, impls, tokens=tokens)


def rms_norm_residual_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    x, w = _inputs(tokens, device, dtype)
    r = torch.randn_like(x)
    op, lg = mixkit_op("rms_norm_residual"), liger_for(device)
    impls = {"mixkit": lambda: op(x, r, w, RMS_EPS), "eager": lambda: rms_norm_residual_ref(x, r, w, RMS_EPS)}
    if compile_mode:
        ref = compiled(rms_norm_residual_ref, compile_mode)
        impls["compile"] = lambda: ref(x, r, w, RMS_EPS)
    if lg and "rms_norm_residual" in lg:
        impls["liger"] = lambda: lg["rms_norm_residual"](x, r, w, RMS_EPS)
    # read x, residual and w, write y and h
    nbytes = (4 * x.numel() + w.numel()) * x.element_size()
    return Case("rms_norm_residual", _shape(tokens), dtype, nbytes, impls, tokens=tokens)


def layer_norm_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    x, _ = _inputs(tokens, device, dtype)
    op = mixkit_op("layer_norm")
    impls = {"mixkit": lambda: op(x, LN_EPS), "eager": lambda: layer_norm_ref(x, LN_EPS)}
    if compile_mode:
        ref = compiled(layer_norm_ref, compile_mode)
        impls["compile"] = lambda: ref(x, LN_EPS)
    # read x, write y
    nbytes = 2 * x.numel() * x.element_size()
    return Case("layer_norm", _shape(tokens), dtype, nbytes, impls, tokens=tokens)


def rms_norm_bwd_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    x, w = _inputs(tokens, device, dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    dy = torch.randn_like(x)

    def backward_of(forward: Callable, dy: torch.Tensor) -> Callable:
        # Forward once, on first use; each timed call is the backward alone.
        saved = []

        def run():
            if not saved:
                saved.append(forward(x, w, RMS_EPS))
            return torch.autograd.grad(saved[0], (x, w), dy, retain_graph=True)

        return run

    impls = {"mixkit": backward_of(mixkit_op("rms_norm"), dy), "eager": backward_of(rms_norm_ref, dy)}
    if compile_mode:
        impls["compile"] = backward_of(compiled(rms_norm_ref, compile_mode), dy)
    if lg := liger_for(device):
        # Liger's backward writes dx into dy's storage by default: give it its own dy.
        impls["liger"] = backward_of(lg["rms_norm"], dy.clone())
    # read x, dy and w, write dx and dw
    nbytes = (3 * x.numel() + 2 * w.numel()) * x.element_size()
    return Case("rms_norm_bwd", _shape(tokens), dtype, nbytes, impls, tokens=tokens)

