"""Mixtral routing: the top-k router, token permutation by expert and the
weighted un-permutation, forward and backward.

Layers: `_core.moe_*` (csrc/cpu/moe_route.cpp, csrc/cuda/moe_route.cu, layout
in csrc/common/moe.h) -> torch.library ops `mixkit::moe_route`,
`mixkit::moe_permute`, `mixkit::moe_unpermute` with fake and autograd
registrations -> the functions at the bottom.

Router rules (CONVENTIONS.md): top-k by logit, ties to the lower expert index,
softmax over the k selected logits in float32 (renormalize=True), or the k
selected entries of the softmax over all experts (renormalize=False: OLMoE,
Qwen3-MoE without norm_topk_prob). NaN ranks above every number (as in
torch.topk), so a NaN logit is selected and its token's weights are NaN.

The (token, slot) pairs are numbered r = t * k + slot. `moe_permute` puts pair
r at row `row_map[r]` of the permuted buffer, grouped by expert and stable, so
expert e owns rows `offsets[e]:offsets[e + 1]` and a grouped GEMM over the
(T * k, H) rows consumes them as they are. Every output size follows from the
input shapes: nothing syncs with the host, and the path captures in a CUDA
graph. Un-permuting is a gather (each token sums its own k rows in float32),
so it is deterministic without atomics.
"""
from __future__ import annotations

import math

import torch

from .. import _core
from .._backend import DTYPE_CODES, launch_args, ptr
from . import _checks
from ._library import define

F32 = torch.float32
MAX_EXPERTS = 256  # csrc/common/moe.h kMoeMaxExperts
MAX_ROWS = 2 ** 31 - 1  # T * k rows are indexed by an int32 row map


def _check_rows(op: str, tokens, top_k) -> None:
    if tokens * top_k > MAX_ROWS:
        raise ValueError(f"{op}: tokens * top_k = {tokens} * {top_k} exceeds the int32 row map (2^31 - 1 rows); "
                         "route fewer tokens per call")


def _check_index(op: str, name: str, t, shape=None) -> None:
    _checks.tensor(op, name, t, dtypes=(torch.int32,))
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _checks.contiguous(op, name, t)


# ---- moe_route ------------------------------------------------------------------

def _check_route(logits, top_k):
    op = "moe_route"
    _checks.tensor(op, "router_logits", logits)
    _checks.contiguous(op, "router_logits", logits)
    experts = logits.shape[-1]
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"moe_route: router_logits must have 1 to {MAX_EXPERTS} experts in its last dimension, "
                         f"got shape {tuple(logits.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"moe_route: top_k must be an integer in [1, num_experts = {experts}], got {top_k!r}")


def _route_outputs(logits, top_k):
    shape = (*logits.shape[:-1], top_k)
    return (torch.empty(shape, dtype=F32, device=logits.device),
            torch.empty(shape, dtype=torch.int32, device=logits.device))


def _moe_route(router_logits, top_k, renormalize=True):
    _check_route(router_logits, top_k)
    weights, ids = _route_outputs(router_logits, top_k)
    experts = router_logits.shape[-1]
    backend, device, stream = launch_args(router_logits.device)
    _core.moe_route(backend, device, stream, DTYPE_CODES[router_logits.dtype], router_logits.data_ptr(),
                    weights.data_ptr(), ids.data_ptr(), router_logits.numel() // experts, experts, top_k,
                    renormalize)
    return weights, ids


define("moe_route(Tensor router_logits, int top_k, bool renormalize=True) -> (Tensor, Tensor)", _moe_route)


@torch.library.register_fake("mixkit::moe_route")
def _(router_logits, top_k, renormalize=True):
    _check_route(router_logits, top_k)
    return _route_outputs(router_logits, top_k)


def _moe_route_backward(grad_weights, weights, expert_ids, logits, num_experts, dtype):
    top_k = weights.shape[-1]
    grad_logits = torch.empty((*weights.shape[:-1], num_experts), dtype=dtype, device=weights.device)
    backend, device, stream = launch_args(weights.device)
    _core.moe_route_bwd(backend, device, stream, DTYPE_CODES[dtype], grad_weights.data_ptr(), weights.data_ptr(),
                        expert_ids.data_ptr(), grad_logits.data_ptr(), ptr(logits), weights.numel() // top_k,
                        num_experts, top_k)
    return grad_logits


define("moe_route_backward(Tensor grad_weights, Tensor weights, Tensor expert_ids, Tensor? logits, "
       "int num_experts, ScalarType dtype) -> Tensor", _moe_route_backward)


@torch.library.register_fake("mixkit::moe_route_backward")
def _(grad_weights, weights, expert_ids, logits, num_experts, dtype):
    return weights.new_empty((*weights.shape[:-1], num_experts), dtype=dtype)


def _save_route(ctx, inputs, output):
    logits, _top_k, renormalize = inputs
    weights, ids = output
    ctx.mark_non_differentiable(ids)
    # Without renormalization the gradient reaches every expert through the
    # full softmax, which the backward recomputes from the logits.
    ctx.save_for_backward(weights, ids, None if renormalize else logits)
    ctx.logits = (logits.shape[-1], logits.dtype)


def _route_bwd(ctx, grad_weights, _grad_ids):
    weights, ids, logits = ctx.saved_tensors
    experts, dtype = ctx.logits
    grad = torch.ops.mixkit.moe_route_backward(grad_weights.float().contiguous(), weights, ids, logits, experts,
                                               dtype)
    return grad, None, None


torch.library.register_autograd("mixkit::moe_route", _route_bwd, setup_context=_save_route)


# ---- moe_permute ----------------------------------------------------------------

def _check_permute(x, expert_ids, num_experts):
    op = "moe_permute"
    _checks.tensor(op, "x", x, min_dim=2)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{op}: x must have shape (tokens, hidden) with hidden > 0, got {tuple(x.shape)}")
    _checks.contiguous(op, "x", x)
    _checks.tensor(op, "expert_ids", expert_ids, dtypes=(torch.int32,), min_dim=2)
    if expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0] or expert_ids.shape[1] == 0:
        raise ValueError(f"{op}: expert_ids must have shape (tokens = {x.shape[0]}, top_k) with top_k > 0, "
                         f"got {tuple(expert_ids.shape)}")
    _checks.contiguous(op, "expert_ids", expert_ids)
    _checks.same_device(op, "x", x, "expert_ids", expert_ids)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"{op}: num_experts must be an integer in [1, {MAX_EXPERTS}], got {num_experts!r}")
    if expert_ids.shape[1] > num_experts:
        raise ValueError(f"{op}: top_k = {expert_ids.shape[1]} (expert_ids.shape[1]) exceeds "
                         f"num_experts = {num_experts}")
    _check_rows(op, x.shape[0], expert_ids.shape[1])


def _permute_outputs(x, expert_ids, num_experts):
    rows = x.shape[0] * expert_ids.shape[1]
    return (x.new_empty((rows, x.shape[1])), x.new_empty((num_experts + 1,), dtype=torch.int64),
            x.new_empty((rows,), dtype=torch.int32))


def _moe_permute(x, expert_ids, num_experts):
    _check_permute(x, expert_ids, num_experts)
    x_perm, offsets, row_map = _permute_outputs(x, expert_ids, num_experts)
    tokens, top_k = expert_ids.shape
    backend, device, stream = launch_args(x.device)
    scratch = _core.moe_permute_workspace(backend, tokens, top_k, num_experts)
    workspace = torch.empty(scratch, dtype=torch.int32, device=x.device) if scratch else None
    _core.moe_permute(backend, device, stream, DTYPE_CODES[x.dtype], x.data_ptr(), expert_ids.data_ptr(),
                      x_perm.data_ptr(), offsets.data_ptr(), row_map.data_ptr(), ptr(workspace), tokens, top_k,
                      x.shape[1], num_experts)
    return x_perm, offsets, row_map


define("moe_permute(Tensor x, Tensor expert_ids, int num_experts) -> (Tensor, Tensor, Tensor)", _moe_permute)


@torch.library.register_fake("mixkit::moe_permute")
def _(x, expert_ids, num_experts):
    _check_permute(x, expert_ids, num_experts)
    return _permute_outputs(x, expert_ids, num_experts)


def _gather(rows, row_map, weights, top_k):
    """out[t] = sum_s weights[t, s] * rows[row_map[t * k + s]] (weights None: 1)."""
    tokens = row_map.shape[0] // top_k
    out = rows.new_empty((tokens, rows.shape[1]))
    backend, device, stream = launch_args(rows.device)
    _core.moe_gather(backend, device, stream, DTYPE_CODES[rows.dtype], rows.data_ptr(), row_map.data_ptr(),
                     ptr(weights), out.data_ptr(), 0, 0, tokens, top_k, rows.shape[1])
    return out


def _moe_permute_backward(grad_x_perm, row_map, top_k):
    return _gather(grad_x_perm, row_map, None, top_k)


define("moe_permute_backward(Tensor grad_x_perm, Tensor row_map, int top_k) -> Tensor", _moe_permute_backward)


@torch.library.register_fake("mixkit::moe_permute_backward")
def _(grad_x_perm, row_map, top_k):
    return grad_x_perm.new_empty((row_map.shape[0] // top_k, grad_x_perm.shape[1]))


def _save_permute(ctx, inputs, output):
    _x, expert_ids, _num_experts = inputs
    _x_perm, offsets, row_map = output
    ctx.mark_non_differentiable(offsets, row_map)
    ctx.save_for_backward(row_map)
    ctx.top_k = expert_ids.shape[1]


def _permute_bwd(ctx, grad_x_perm, _grad_offsets, _grad_row_map):
    (row_map,) = ctx.saved_tensors
    return torch.ops.mixkit.moe_permute_backward(grad_x_perm.contiguous(), row_map, ctx.top_k), None, None


torch.library.register_autograd("mixkit::moe_permute", _permute_bwd, setup_context=_save_permute)


# ---- moe_unpermute --------------------------------------------------------------

def _check_unpermute(y_rows, row_map, weights):
    op = "moe_unpermute"
    _checks.tensor(op, "y_rows", y_rows, min_dim=2)
    if y_rows.dim() != 2 or y_rows.shape[1] == 0:
        raise ValueError(f"{op}: y_rows must have shape (tokens * top_k, hidden) with hidden > 0, "
                         f"got {tuple(y_rows.shape)}")
    _checks.contiguous(op, "y_rows", y_rows)
    _checks.tensor(op, "weights", weights, dtypes=(F32,), min_dim=2)
    if weights.dim() != 2 or weights.shape[1] == 0:
        raise ValueError(f"{op}: weights must have shape (tokens, top_k), got {tuple(weights.shape)}")
    _checks.contiguous(op, "weights", weights)
    _checks.same_device(op, "y_rows", y_rows, "weights", weights)
    tokens, top_k = weights.shape
    _check_rows(op, tokens, top_k)
    if y_rows.shape[0] != tokens * top_k:
        raise ValueError(f"{op}: y_rows has {y_rows.shape[0]} rows but weights of shape {tuple(weights.shape)} "
                         f"need tokens * top_k = {tokens * top_k}")
    _check_index(op, "row_map", row_map, (tokens * top_k,))
    _checks.same_device(op, "y_rows", y_rows, "row_map", row_map)


def _moe_unpermute(y_rows, row_map, weights):
    _check_unpermute(y_rows, row_map, weights)
    return _gather(y_rows, row_map, weights, weights.shape[1])


define("moe_unpermute(Tensor y_rows, Tensor row_map, Tensor weights) -> Tensor", _moe_unpermute)


@torch.library.register_fake("mixkit::moe_unpermute")
def _(y_rows, row_map, weights):
    _check_unpermute(y_rows, row_map, weights)
    return y_rows.new_empty((weights.shape[0], y_rows.shape[1]))


def _moe_unpermute_backward(grad_y, y_rows, row_map, weights):
    tokens, top_k = weights.shape
    hidden = y_rows.shape[1]
    grad_rows = torch.empty_like(y_rows)
    grad_weights = torch.empty_like(weights)
    backend, device, stream = launch_args(y_rows.device)
    dtype = DTYPE_CODES[y_rows.dtype]
    _core.moe_scatter(backend, device, stream, dtype, grad_y.data_ptr(), weights.data_ptr(), row_map.data_ptr(),
                      grad_rows.data_ptr(), tokens, top_k, hidden)
    _core.moe_gather(backend, device, stream, dtype, y_rows.data_ptr(), row_map.data_ptr(), 0, 0,
                     grad_y.data_ptr(), grad_weights.data_ptr(), tokens, top_k, hidden)
    return grad_rows, grad_weights


define("moe_unpermute_backward(Tensor grad_y, Tensor y_rows, Tensor row_map, Tensor weights) -> (Tensor, Tensor)",
       _moe_unpermute_backward)


@torch.library.register_fake("mixkit::moe_unpermute_backward")
def _(grad_y, y_rows, row_map, weights):
    return torch.empty_like(y_rows), torch.empty_like(weights)


def _save_unpermute(ctx, inputs, output):
    y_rows, row_map, weights = inputs
    ctx.save_for_backward(y_rows, row_map, weights)


def _unpermute_bwd(ctx, grad_y):
    y_rows, row_map, weights = ctx.saved_tensors
    grad_rows, grad_weights = torch.ops.mixkit.moe_unpermute_backward(grad_y.contiguous(), y_rows, row_map, weights)
    return grad_rows, None, grad_weights


torch.library.register_autograd("mixkit::moe_unpermute", _unpermute_bwd, setup_context=_save_unpermute)


# ---- public API ---------------------------------------------------------------

def _int_arg(op: str, name: str, v) -> int:
    """An integer count from an int or an integral float; anything else raises
    TypeError/ValueError naming the argument (int(inf) would raise
    OverflowError, int(nan) ValueError without the name)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise ValueError(f"{op}: {name} must be a whole number, got {v!r}")
    return int(v)


def moe_route(router_logits: torch.Tensor, top_k: int = 2,
              renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k router: `(weights, expert_ids)`, each of shape (..., top_k).

    router_logits: (..., E), contiguous, float32/float16/bfloat16, E <= 256.
    expert_ids (int32) are the top_k experts by logit in descending order, ties
    to the lower index; weights (float32) are the softmax over the selected
    logits (renormalize=True: Mixtral, gpt-oss, Qwen3-MoE with
    norm_topk_prob), or the selected entries of the softmax over all E
    (renormalize=False: OLMoE, Qwen3-MoE without it; they then sum to less
    than 1). Differentiable in router_logits: renormalized, the gradient is
    zero outside the selected experts; otherwise every logit gets one.
    """
    if not isinstance(renormalize, bool):
        raise TypeError(f"moe_route: renormalize must be a bool, got {type(renormalize).__name__}")
    return torch.ops.mixkit.moe_route(router_logits, _int_arg("moe_route", "top_k", top_k), renormalize)


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor,
                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, slot) rows of x by expert: `(x_perm, offsets, row_map)`.

    x: (T, H); expert_ids: (T, k) int32 as returned by moe_route.
    x_perm (T * k, H) holds expert e's rows at `offsets[e]:offsets[e + 1]`
    (offsets: int64 (E + 1,), on x's device), in ascending (token, slot) order;
    row_map (T * k,) int32 is where pair `t * k + slot` went. Ids outside
    [0, num_experts) raise on the CPU; on the GPU they go after
    `offsets[num_experts]`, which is then less than T * k. Differentiable in x.
    """
    return torch.ops.mixkit.moe_permute(x, expert_ids, _int_arg("moe_permute", "num_experts", num_experts))


def moe_unpermute(y_rows: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`y[t] = sum_slot weights[t, slot] * y_rows[row_map[t * k + slot]]`.

    y_rows: (T * k, H), the expert outputs in moe_permute's order; weights:
    (T, k) float32. Accumulated in float32 and rounded once to y_rows.dtype;
    deterministic. Differentiable in y_rows and weights.
    """
    return torch.ops.mixkit.moe_unpermute(y_rows, row_map, weights)
