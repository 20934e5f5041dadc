"""Mixtral's expert MLP over permuted rows: the grouped GEMM, its weight
gradient, the whole sparse MoE layer (`moe_mlp`) and the load-balancing loss.

Layers: `_core.grouped_gemm` / `_core.grouped_wgrad` (csrc/cpu/grouped_gemm.cpp,
csrc/cuda/grouped_gemm.cu, layout in csrc/common/grouped_gemm.h) ->
torch.library ops `mixkit::grouped_gemm` (autograd: the activation gradient is
the same op with the other weight layout, the weight gradient is
`mixkit::grouped_gemm_wgrad`) -> `moe_mlp`, composed of differentiable ops:

    logits = x @ router_weight.T                    (torch.matmul)
    weights, ids = moe_route(logits, top_k)
    x_perm, offsets, row_map = moe_permute(x, ids, E)
    h = grouped_gemm(x_perm, w13, offsets, trans_b=True)        (N, 2F)
    a = silu(h[:, :F]) * h[:, F:]                   (torch elementwise)
    y = moe_unpermute(grouped_gemm(a, w2, offsets, trans_b=True), row_map, weights)

With `fused_swiglu=True` the first two lines are one op, `grouped_swiglu`
(`mixkit::grouped_swiglu`): the GEMM's epilogue applies the SwiGLU.

Weights use Hugging Face's nn.Linear layouts: w13 (E, 2F, H) holds the gate
rows (w1) then the up rows (w3); w2 (E, H, F). Every size follows from the
shapes and the GPU kernels read the offsets on the device, so the layer never
syncs with the host and captures in a CUDA graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F_

from .. import _core
from .._backend import DTYPE_CODES, gpu_kernels, launch_args, ptr
from . import _checks
from ._library import define
from .moe import MAX_EXPERTS, moe_permute, moe_route, moe_unpermute

GPU_DTYPES = (torch.float16, torch.bfloat16)


# ---- grouped_gemm ---------------------------------------------------------------

def _check_gemm(op, a, b, offsets, trans_b, a_name="a", b_name="b"):
    """(rows, K, N_out, E) after validating a (rows, K), b (E, K, N_out) or
    (E, N_out, K) and offsets int64 (E + 1,)."""
    _checks.tensor(op, a_name, a, min_dim=2)
    if a.dim() != 2:
        raise ValueError(f"{op}: {a_name} must have shape (rows, K), got {tuple(a.shape)}")
    _checks.contiguous(op, a_name, a)
    _checks.tensor(op, b_name, b, min_dim=3)
    if b.dim() != 3:
        layout = "(experts, N_out, K)" if trans_b else "(experts, K, N_out)"
        raise ValueError(f"{op}: {b_name} must have shape {layout}, got {tuple(b.shape)}")
    _checks.contiguous(op, b_name, b)
    _checks.same_dtype(op, a_name, a, b_name, b)
    _checks.same_device(op, a_name, a, b_name, b)
    experts = b.shape[0]
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"{op}: {b_name} must hold 1 to {MAX_EXPERTS} experts, got shape {tuple(b.shape)}")
    n_out, kb = (b.shape[1], b.shape[2]) if trans_b else (b.shape[2], b.shape[1])
    rows, k = a.shape
    if kb != k or k == 0 or n_out == 0:
        where = "shape[2]" if trans_b else "shape[1]"
        raise ValueError(f"{op}: {b_name}.{where} must equal K = {a_name}.shape[1] = {k} (> 0), got {b_name} of "
                         f"shape {tuple(b.shape)} with trans_b={trans_b}")
    _check_offsets(op, offsets, experts, a_name, a)
    if gpu_kernels(a.device):
        if a.dtype not in GPU_DTYPES:
            raise TypeError(f"{op}: on the GPU {a_name} and {b_name} must be bfloat16 or float16, got {a.dtype}")
        if k % 8 or n_out % 8:
            raise ValueError(f"{op}: on the GPU K ({k}) and N_out ({n_out}) must be multiples of 8 "
                             "(16-byte rows for cp.async)")
    return rows, k, n_out, experts


def _check_offsets(op, offsets, experts, ref_name, ref):
    """expert_offsets: int64, contiguous, (experts + 1,), on ref's device."""
    _checks.tensor(op, "expert_offsets", offsets, dtypes=(torch.int64,))
    if tuple(offsets.shape) != (experts + 1,):
        raise ValueError(f"{op}: expert_offsets must have shape (experts + 1,) = ({experts + 1},), "
                         f"got {tuple(offsets.shape)}")
    _checks.contiguous(op, "expert_offsets", offsets)
    _checks.same_device(op, ref_name, ref, "expert_offsets", offsets)


def _gpu_ready(op, *tensors):
    if not gpu_kernels(tensors[0].device):
        return
    for t in tensors:
        if t.data_ptr() % 16:
            raise ValueError(f"{op}: GPU tensors must start at 16-byte aligned addresses; call .clone() on views")


def _check_bias(op, name, bias, ref, shape):
    if bias is None:
        return
    _checks.tensor(op, name, bias, min_dim=2)
    _checks.same_dtype(op, "a" if op == "grouped_gemm" else "x", ref, name, bias)
    _checks.same_device(op, "a" if op == "grouped_gemm" else "x", ref, name, bias)
    if tuple(bias.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape (experts, N_out) = {tuple(shape)}, got {tuple(bias.shape)}")
    _checks.contiguous(op, name, bias)


def _grouped_gemm(a, b, expert_offsets, trans_b, bias=None):
    rows, k, n_out, experts = _check_gemm("grouped_gemm", a, b, expert_offsets, trans_b)
    _check_bias("grouped_gemm", "bias", bias, a, (experts, n_out))
    c = a.new_empty((rows, n_out))
    if rows == 0:
        return c
    _gpu_ready("grouped_gemm", a, b, c)
    backend, device, stream = launch_args(a.device)
    _core.grouped_gemm(backend, device, stream, DTYPE_CODES[a.dtype], a.data_ptr(), b.data_ptr(),
                       expert_offsets.data_ptr(), c.data_ptr(), rows, k, n_out, experts, trans_b, ptr(bias))
    return c


define("grouped_gemm(Tensor a, Tensor b, Tensor expert_offsets, bool trans_b, Tensor? bias=None) -> Tensor",
       _grouped_gemm)


@torch.library.register_fake("mixkit::grouped_gemm")
def _(a, b, expert_offsets, trans_b, bias=None):
    rows, _k, n_out, experts = _check_gemm("grouped_gemm", a, b, expert_offsets, trans_b)
    _check_bias("grouped_gemm", "bias", bias, a, (experts, n_out))
    return a.new_empty((rows, n_out))


# ---- grouped_bias_grad: the bias gradient, per-expert sums of rows ------------------

def _check_bias_grad(grad_out, expert_offsets, experts):
    """(rows, N) after validating grad_out (rows, N) and offsets int64 (experts + 1,)."""
    op = "grouped_bias_grad"
    _checks.tensor(op, "grad_out", grad_out, min_dim=2)
    if grad_out.dim() != 2:
        raise ValueError(f"{op}: grad_out must have shape (rows, N), got {tuple(grad_out.shape)}")
    _checks.contiguous(op, "grad_out", grad_out)
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"{op}: experts must be in [1, {MAX_EXPERTS}], got {experts}")
    _check_offsets(op, expert_offsets, experts, "grad_out", grad_out)
    if gpu_kernels(grad_out.device) and grad_out.dtype not in GPU_DTYPES:
        raise TypeError(f"{op}: on the GPU grad_out must be bfloat16 or float16, got {grad_out.dtype}")
    return grad_out.shape


def _grouped_bias_grad(grad_out, expert_offsets, experts):
    rows, n = _check_bias_grad(grad_out, expert_offsets, experts)
    db = grad_out.new_empty((experts, n))
    backend, device, stream = launch_args(grad_out.device)
    _core.grouped_bias_grad(backend, device, stream, DTYPE_CODES[grad_out.dtype], grad_out.data_ptr(),
                            expert_offsets.data_ptr(), db.data_ptr(), rows, n, experts)
    return db


define("grouped_bias_grad(Tensor grad_out, Tensor expert_offsets, int experts) -> Tensor", _grouped_bias_grad)


@torch.library.register_fake("mixkit::grouped_bias_grad")
def _(grad_out, expert_offsets, experts):
    _check_bias_grad(grad_out, expert_offsets, experts)
    return grad_out.new_empty((experts, grad_out.shape[1]))


def _wgrad_shape(k, n_out, experts, trans_b):
    return (experts, n_out, k) if trans_b else (experts, k, n_out)


def _grouped_gemm_wgrad(a, grad_out, expert_offsets, trans_b):
    op = "grouped_gemm_wgrad"
    _checks.tensor(op, "a", a, min_dim=2)
    _checks.tensor(op, "grad_out", grad_out, min_dim=2)
    _checks.same_dtype(op, "a", a, "grad_out", grad_out)
    if a.dim() != 2 or grad_out.dim() != 2 or a.shape[0] != grad_out.shape[0]:
        raise ValueError(f"{op}: a (rows, K) and grad_out (rows, N_out) must share rows, got {tuple(a.shape)} "
                         f"and {tuple(grad_out.shape)}")
    _checks.same_device(op, "a", a, "grad_out", grad_out)
    _checks.contiguous(op, "a", a)
    _checks.contiguous(op, "grad_out", grad_out)
    _checks.tensor(op, "expert_offsets", expert_offsets, dtypes=(torch.int64,))
    if expert_offsets.dim() != 1 or not 2 <= expert_offsets.shape[0] <= MAX_EXPERTS + 1:
        raise ValueError(f"{op}: expert_offsets must have shape (experts + 1,) with 1 <= experts <= {MAX_EXPERTS}, "
                         f"got {tuple(expert_offsets.shape)}")
    _checks.contiguous(op, "expert_offsets", expert_offsets)
    _checks.same_device(op, "a", a, "expert_offsets", expert_offsets)
    if gpu_kernels(a.device) and a.dtype not in GPU_DTYPES:
        raise TypeError(f"{op}: on the GPU a and grad_out must be bfloat16 or float16, got {a.dtype}")
    experts = expert_offsets.shape[0] - 1
    rows, k = a.shape
    n_out = grad_out.shape[1]
    if gpu_kernels(a.device) and (k % 8 or n_out % 8):
        raise ValueError(f"{op}: on the GPU K ({k}) and N_out ({n_out}) must be multiples of 8 "
                         "(16-byte rows for cp.async)")
    db = a.new_empty(_wgrad_shape(k, n_out, experts, trans_b))
    _gpu_ready(op, a, grad_out, db)
    backend, device, stream = launch_args(a.device)
    _core.grouped_wgrad(backend, device, stream, DTYPE_CODES[a.dtype], a.data_ptr(), grad_out.data_ptr(),
                        expert_offsets.data_ptr(), db.data_ptr(), rows, k, n_out, experts, trans_b)
    return db


define("grouped_gemm_wgrad(Tensor a, Tensor grad_out, Tensor expert_offsets, bool trans_b) -> Tensor",
       _grouped_gemm_wgrad)


@torch.library.register_fake("mixkit::grouped_gemm_wgrad")
def _(a, grad_out, expert_offsets, trans_b):
    return a.new_empty(_wgrad_shape(a.shape[1], grad_out.shape[1], expert_offsets.shape[0] - 1, trans_b))


def _save_gemm(ctx, inputs, output):
    a, b, offsets, trans_b, *_bias = inputs
    ctx.save_for_backward(a, b, offsets)
    ctx.trans_b = trans_b


def _gemm_bwd(ctx, grad_c):
    a, b, offsets = ctx.saved_tensors
    grad_c = grad_c.contiguous()
    grad_a = grad_b = grad_bias = None
    if ctx.needs_input_grad[0]:
        # C = A B  -> dA = dC B^T;  C = A B^T -> dA = dC B: the other layout.
        grad_a = torch.ops.mixkit.grouped_gemm(grad_c, b, offsets, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        grad_b = torch.ops.mixkit.grouped_gemm_wgrad(a, grad_c, offsets, ctx.trans_b)
    if len(ctx.needs_input_grad) > 4 and ctx.needs_input_grad[4]:
        grad_bias = torch.ops.mixkit.grouped_bias_grad(grad_c, offsets, b.shape[0])
    return grad_a, grad_b, None, None, grad_bias


torch.library.register_autograd("mixkit::grouped_gemm", _gemm_bwd, setup_context=_save_gemm)


# ---- public API ---------------------------------------------------------------

def grouped_gemm(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor,
                 trans_b: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert GEMM over grouped rows: `c[o[e]:o[e+1]] = a[o[e]:o[e+1]] @ b[e] (+ bias[e])`.

    a: (N, K) rows grouped by expert (moe_permute's x_perm); b: (E, K, N_out),
    or (E, N_out, K) with trans_b=True (nn.Linear's layout, then b[e] is
    transposed); expert_offsets: int64 (E + 1,) on a's device; bias: optional
    (E, N_out) in a's dtype (gpt-oss's expert biases), added in float32.
    Returns (N, N_out) in a's dtype, accumulated in float32 and rounded once;
    rows from offsets[E] on are zero. GPU: bfloat16/float16, K and N_out
    multiples of 8. Differentiable in a, b and bias.
    """
    return torch.ops.mixkit.grouped_gemm(a, b, expert_offsets, bool(trans_b), bias)


def grouped_gemm_wgrad(a: torch.Tensor, grad_out: torch.Tensor, expert_offsets: torch.Tensor,
                       trans_b: bool = False) -> torch.Tensor:
    """The weight gradient of grouped_gemm: `db[e] = a_e^T @ grad_out_e`
    (E, K, N_out), or its transpose (E, N_out, K) with trans_b=True."""
    return torch.ops.mixkit.grouped_gemm_wgrad(a, grad_out, expert_offsets, bool(trans_b))


# ---- grouped_swiglu: the first expert GEMM with SwiGLU in its epilogue ------------
#
# Backward needs the pre-activations h = (gate, up). Two choices: store h from
# the epilogue, or store nothing and recompute the GEMM in the backward.
# Recomputing costs 2 * N * H * 2F FLOPs, 2/3 of the layer's forward FLOPs
# (~22% more for forward plus backward), to save N * 2F stored elements. We
# store h, but only when a gradient will be taken (store_h): training then
# moves 3F elements per row in the epilogue (h and act written) against 5F
# for the unfused path (h written, h read, act written) and keeps 2F per row
# for backward where autograd keeps 3F (h and silu(gate)); inference writes
# only act, F per row. The backward's elementwise part runs in float32 from
# the stored h and rounds dh once.

GLU_CODES = {"silu": 0, "swiglu_oss": 1}  # csrc/common/grouped_gemm.h GluActivation


def _swiglu_shapes(x, w13, expert_offsets, trans_b=True, interleaved=False, activation="silu", alpha=1.702,
                   limit=7.0, bias=None):
    op = "grouped_swiglu"
    rows, k, n_out, experts = _check_gemm(op, x, w13, expert_offsets, trans_b, "x", "w13")
    if n_out % 2:
        raise ValueError(f"{op}: w13 must have 2 * ffn outputs per expert (gate and up), got shape "
                         f"{tuple(w13.shape)}")
    if not trans_b and not interleaved:
        raise ValueError(f"{op}: a w13 of shape (experts, K, 2F) must have interleaved gate/up columns "
                         "(gpt-oss's layout): pass interleaved=True, or use grouped_gemm")
    if activation not in GLU_CODES:
        raise ValueError(f"{op}: activation must be one of {tuple(GLU_CODES)}, got {activation!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"{op}: alpha must be finite, got {alpha}")
    _checks.finite_float(op, "limit", limit, positive=True)
    if gpu_kernels(x.device) and (n_out // 2) % 8:
        raise ValueError(f"{op}: on the GPU ffn ({n_out // 2}) must be a multiple of 8")
    _check_bias(op, "bias", bias, x, (experts, n_out))
    return rows, k, n_out // 2, experts


def _grouped_swiglu(x, w13, expert_offsets, store_h, trans_b=True, interleaved=False, activation="silu",
                    alpha=1.702, limit=7.0, bias=None):
    rows, k, ffn, experts = _swiglu_shapes(x, w13, expert_offsets, trans_b, interleaved, activation, alpha, limit,
                                           bias)
    act = x.new_empty((rows, ffn))
    h = x.new_empty((rows if store_h else 0, 2 * ffn))
    if rows == 0:
        return act, h
    _gpu_ready("grouped_swiglu", x, w13, act, h)
    backend, device, stream = launch_args(x.device)
    _core.grouped_swiglu(backend, device, stream, DTYPE_CODES[x.dtype], x.data_ptr(), w13.data_ptr(),
                         expert_offsets.data_ptr(), act.data_ptr(), h.data_ptr() if store_h else 0, rows, k, ffn,
                         experts, trans_b, interleaved, GLU_CODES[activation], alpha, limit, ptr(bias))
    return act, h


define("grouped_swiglu(Tensor x, Tensor w13, Tensor expert_offsets, bool store_h, bool trans_b=True, "
       "bool interleaved=False, str activation='silu', float alpha=1.702, float limit=7.0, Tensor? bias=None) "
       "-> (Tensor, Tensor)", _grouped_swiglu)


@torch.library.register_fake("mixkit::grouped_swiglu")
def _(x, w13, expert_offsets, store_h, trans_b=True, interleaved=False, activation="silu", alpha=1.702, limit=7.0,
      bias=None):
    rows, _k, ffn, _e = _swiglu_shapes(x, w13, expert_offsets, trans_b, interleaved, activation, alpha, limit, bias)
    return x.new_empty((rows, ffn)), x.new_empty((rows if store_h else 0, 2 * ffn))


def _save_swiglu(ctx, inputs, output):
    x, w13, offsets, store_h, trans_b, interleaved, activation, alpha, limit, bias = inputs
    ctx.save_for_backward(x, w13, offsets, output[1])
    ctx.store_h = store_h
    ctx.layout = (trans_b, interleaved, activation, alpha, limit)


def _glu_grads(gate, up, grad, activation, alpha, limit):
    """(d gate, d up) of act = glu(gate, up) in float32. gpt-oss: torch.clamp's
    gradient, which passes where the input lies within the bounds (ends
    included) and is exactly 0 elsewhere, NaN inputs included."""
    if activation == "silu":
        sig = torch.sigmoid(gate)
        # d silu(g) / dg = s (1 + g (1 - s)).
        return grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    sig = torch.sigmoid(alpha * g)
    d_glu = sig * (1 + alpha * g * (1 - sig))
    d_gate = torch.where(gate <= limit, grad * (u + 1) * d_glu, 0.0)
    d_up = torch.where((up >= -limit) & (up <= limit), grad * g * sig, 0.0)
    return d_gate, d_up


def _swiglu_bwd(ctx, grad_act, grad_h):
    x, w13, offsets, h = ctx.saved_tensors
    if not ctx.store_h:
        raise RuntimeError("grouped_swiglu: backward needs store_h=True (the pre-activations are not stored)")
    trans_b, interleaved, activation, alpha, limit = ctx.layout
    ffn = h.shape[1] // 2
    h32 = h.float()
    gate, up = (h32[:, 0::2], h32[:, 1::2]) if interleaved else h32.split(ffn, dim=1)
    d_gate, d_up = _glu_grads(gate, up, grad_act.float(), activation, alpha, limit)
    dh = torch.stack([d_gate, d_up], -1).flatten(1) if interleaved else torch.cat([d_gate, d_up], dim=1)
    if grad_h is not None and grad_h.numel():
        dh = dh + grad_h.float()
    dh = dh.to(x.dtype).contiguous()
    grad_x = grad_w = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.mixkit.grouped_gemm(dh, w13, offsets, not trans_b)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.mixkit.grouped_gemm_wgrad(x, dh, offsets, trans_b)
    if len(ctx.needs_input_grad) > 9 and ctx.needs_input_grad[9]:
        grad_bias = torch.ops.mixkit.grouped_bias_grad(dh, offsets, w13.shape[0])
    return grad_x, grad_w, None, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("mixkit::grouped_swiglu", _swiglu_bwd, setup_context=_save_swiglu)


def grouped_swiglu(x: torch.Tensor, w13: torch.Tensor, expert_offsets: torch.Tensor, store_h: bool = True, *,
                   trans_b: bool = True, interleaved: bool = False, activation: str = "silu",
                   alpha: float = 1.702, limit: float = 7.0,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' first GEMM with the gated activation in its epilogue:
    `h = grouped_gemm(x, w13, expert_offsets, trans_b, bias)`, then
    `act[:, j] = act_fn(gate_j, up_j)` in float32 from the unrounded sums,
    rounded once.

    x: (N, H) grouped rows; w13: (E, 2F, H) (trans_b=True, nn.Linear's
    layout) or (E, H, 2F) (gpt-oss's); its 2F outputs are the F gates then
    the F ups (Mixtral), or interleaved gate, up, gate, up, ...
    (interleaved=True, gpt-oss; required for the (E, H, 2F) layout). bias:
    optional (E, 2F) in w13's output order. activation: "silu"
    (silu(gate) * up) or "swiglu_oss" (gpt-oss's clamped SwiGLU with alpha
    and limit: `ops.swiglu_oss`, the exact clamps of transformers' code,
    gradient included). Returns (act (N, F), h): h is the (N, 2F)
    pre-activations (bias included, w13's output order) when store_h, else
    an empty (0, 2F) tensor; backward needs store_h=True. Rows from
    offsets[E] on are zero. GPU: bfloat16/float16, H and F multiples of 8.
    Differentiable in x, w13 and bias.
    """
    return torch.ops.mixkit.grouped_swiglu(x, w13, expert_offsets, bool(store_h), bool(trans_b), bool(interleaved),
                                           activation, float(alpha), float(limit), bias)


def _check_mlp(x, router_weight, w13, w2, top_k):
    op = "moe_mlp"
    _checks.tensor(op, "x", x, min_dim=2)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{op}: x must have shape (tokens, hidden) with hidden > 0, got {tuple(x.shape)}")
    hidden = x.shape[1]
    for name, t in (("router_weight", router_weight), ("w13", w13), ("w2", w2)):
        _checks.tensor(op, name, t)
        _checks.same_dtype(op, "x", x, name, t)
        _checks.same_device(op, "x", x, name, t)
    if router_weight.dim() != 2 or router_weight.shape[1] != hidden or not 1 <= router_weight.shape[0] <= MAX_EXPERTS:
        raise ValueError(f"{op}: router_weight must have shape (experts <= {MAX_EXPERTS}, hidden = {hidden}), "
                         f"got {tuple(router_weight.shape)}")
    experts = router_weight.shape[0]
    if w13.dim() != 3 or w13.shape[0] != experts or w13.shape[2] != hidden or w13.shape[1] % 2 or w13.shape[1] == 0:
        raise ValueError(f"{op}: w13 must have shape (experts = {experts}, 2 * ffn, hidden = {hidden}) "
                         f"(gate rows, then up rows), got {tuple(w13.shape)}")
    ffn = w13.shape[1] // 2
    if tuple(w2.shape) != (experts, hidden, ffn):
        raise ValueError(f"{op}: w2 must have shape (experts, hidden, ffn) = ({experts}, {hidden}, {ffn}), "
                         f"got {tuple(w2.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"{op}: top_k must be an integer in [1, num_experts = {experts}], got {top_k!r}")
    return experts, ffn


def moe_mlp(x: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int = 2,
            return_router_logits: bool = False, fused_swiglu: bool = False, *, renormalize: bool = True,
            router_bias: torch.Tensor | None = None, activation="silu"):
    """The sparse MoE block: `y[t] = sum_j w_j * w2_e(act(w1_e x) * w3_e x)`
    over the top_k experts e of token t (CONVENTIONS.md router rules).

    x: (T, H); router_weight: (E, H); w13: (E, 2F, H), gate rows first, then
    up; w2: (E, H, F). Returns y (T, H), and the router logits (T, E) when
    return_router_logits (for moe_aux_loss). Differentiable in x,
    router_weight, w13 and w2 (and router_bias).

    renormalize: moe_route's option (False: OLMoE's weights, the full
    softmax's top k). router_bias: (E,), added to the router logits.
    activation: as in moe_experts.

    fused_swiglu: apply the SwiGLU in the first grouped GEMM's epilogue
    (`grouped_swiglu`) instead of a separate torch elementwise op. One
    rounding instead of three, and less memory traffic on paper, but it is
    off by default until it has been measured on a GPU: the fused kernel
    uses 64-column output tiles, and its speed against the unfused path is
    not known yet.
    """
    experts, ffn = _check_mlp(x, router_weight, w13, w2, top_k)
    x = x.contiguous()
    if router_bias is not None:
        _checks.tensor("moe_mlp", "router_bias", router_bias)
        _checks.same_dtype("moe_mlp", "x", x, "router_bias", router_bias)
        _checks.same_device("moe_mlp", "x", x, "router_bias", router_bias)
        if tuple(router_bias.shape) != (experts,):
            raise ValueError(f"moe_mlp: router_bias must have shape (experts,) = ({experts},), "
                             f"got {tuple(router_bias.shape)}")
    logits = F_.linear(x, router_weight, router_bias)
    weights, ids = moe_route(logits, top_k, renormalize=renormalize)
    y = _experts(x, ids, weights, w13, w2, experts, ffn, fused_swiglu, _Glu("moe_mlp", activation))
    return (y, logits) if return_router_logits else y


def swiglu_oss(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU, exactly as transformers' GptOssExperts
    computes it: gate clamped from above at limit, up to [-limit, limit],
    `(up + 1) * gate * sigmoid(alpha * gate)`. torch.clamp passes the
    gradient where the input lies within the bounds, ends included, and
    propagates NaN."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


_GATES = {"silu": F_.silu, "gelu_tanh": lambda t: F_.gelu(t, approximate="tanh")}
ACTIVATIONS = (*_GATES, "swiglu_oss")


class _Glu:
    """The experts' gated unit, act(gate, up): a named activation (the fused
    epilogue computes "silu" and "swiglu_oss" itself) or any elementwise
    callable applied to the gate."""

    def __init__(self, op, activation, alpha=1.702, limit=7.0):
        if not callable(activation) and activation not in ACTIVATIONS:
            raise ValueError(f"{op}: activation must be one of {ACTIVATIONS} or a callable, got {activation!r}")
        if activation == "swiglu_oss":
            _checks.finite_float(op, "swiglu_alpha", abs(alpha))
            _checks.finite_float(op, "swiglu_limit", limit, positive=True)
        self.activation, self.alpha, self.limit = activation, float(alpha), float(limit)
        self.fusable = isinstance(activation, str) and activation in GLU_CODES

    def __call__(self, gate, up):
        if callable(self.activation):
            return self.activation(gate) * up
        if self.activation == "swiglu_oss":
            return swiglu_oss(gate, up, self.alpha, self.limit)
        return _GATES[self.activation](gate) * up


def _experts(x, ids, weights, w13, w2, experts, ffn, fused_swiglu, glu=None, *, w13_bias=None, w2_bias=None,
             transposed=False, interleaved=False):
    glu = glu or _Glu("moe_experts", "silu")
    x_perm, offsets, row_map = moe_permute(x, ids, experts)
    w13, trans_b = w13.contiguous(), not transposed
    if fused_swiglu and glu.fusable and (trans_b or interleaved):
        store_h = torch.is_grad_enabled() and (x_perm.requires_grad or w13.requires_grad or
                                               (w13_bias is not None and w13_bias.requires_grad))
        act, _h = grouped_swiglu(x_perm, w13, offsets, store_h=store_h, trans_b=trans_b, interleaved=interleaved,
                                 activation=glu.activation, alpha=glu.alpha, limit=glu.limit, bias=w13_bias)
    else:
        h = grouped_gemm(x_perm, w13, offsets, trans_b=trans_b, bias=w13_bias)
        gate, up = (h[:, 0::2], h[:, 1::2]) if interleaved else (h[:, :ffn], h[:, ffn:])
        act = glu(gate, up)
    y = grouped_gemm(act.contiguous(), w2.contiguous(), offsets, trans_b=trans_b, bias=w2_bias)
    return moe_unpermute(y, row_map, weights)


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, fused_swiglu: bool = False, *, activation="silu",
                w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None, transposed: bool = False,
                interleaved: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> torch.Tensor:
    """The expert half of `moe_mlp`, for a router that lives elsewhere (a
    Hugging Face `MixtralTopKRouter`, whose logits then still feed
    `output_router_logits` and the aux loss).

    x: (T, H); topk_ids: (T, k) int32 or int64 expert indices; topk_weights:
    (T, k), any float dtype (used in float32); w13: (E, 2F, H), gate rows
    first; w2: (E, H, F). Those are Hugging Face's `gate_up_proj` and
    `down_proj` layouts, so a Mixtral experts module passes its parameters
    as they are. Returns `sum_j topk_weights[t, j] * w2_e(act(w1_e x) * w3_e x)`
    (T, H) in x's dtype, through moe_permute, the grouped GEMMs and
    moe_unpermute; differentiable in x, topk_weights, w13 and w2.

    activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU), "swiglu_oss"
    (gpt-oss's clamped SwiGLU with swiglu_alpha and swiglu_limit, see
    `swiglu_oss`) or any elementwise callable applied to the gate (a Hugging
    Face expert module's act_fn), between the two grouped GEMMs;
    fused_swiglu computes "silu" and "swiglu_oss" in the first GEMM's
    epilogue (grouped_swiglu) instead.

    gpt-oss's layout, served on its own tensors without copies:
    transposed: w13 (E, H, 2F) and w2 (E, F, H) (inputs first, Hugging
    Face's is_transposed); interleaved: gate and up alternate in w13's 2F
    outputs (gate, up, gate, up, ...); w13_bias (E, 2F) in w13's output
    order and w2_bias (E, H), added to each expert's rows. Differentiable in
    the biases too.
    """
    op = "moe_experts"
    _checks.tensor(op, "x", x, min_dim=2)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{op}: x must have shape (tokens, hidden) with hidden > 0, got {tuple(x.shape)}")
    _checks.tensor(op, "topk_ids", topk_ids, dtypes=_checks.INDEX_DTYPES, min_dim=2)
    _checks.tensor(op, "topk_weights", topk_weights, min_dim=2)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.shape[1] == 0:
        raise ValueError(f"{op}: topk_ids must have shape (tokens = {x.shape[0]}, top_k >= 1), "
                         f"got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{op}: topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    for name, t in (("w13", w13), ("w2", w2)):
        _checks.tensor(op, name, t, min_dim=3)
        _checks.same_dtype(op, "x", x, name, t)
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("w13", w13), ("w2", w2)):
        _checks.same_device(op, "x", x, name, t)
    hidden = x.shape[1]
    w13_in, w13_out = (1, 2) if transposed else (2, 1)
    if w13.dim() != 3 or w13.shape[w13_in] != hidden or w13.shape[w13_out] % 2 or w13.shape[w13_out] == 0:
        layout = "(experts, hidden, 2 * ffn)" if transposed else "(experts, 2 * ffn, hidden)"
        raise ValueError(f"{op}: w13 must have shape {layout} with hidden = {hidden}, got {tuple(w13.shape)}")
    experts, ffn = w13.shape[0], w13.shape[w13_out] // 2
    w2_shape = (experts, ffn, hidden) if transposed else (experts, hidden, ffn)
    if tuple(w2.shape) != w2_shape:
        layout = "(experts, ffn, hidden)" if transposed else "(experts, hidden, ffn)"
        raise ValueError(f"{op}: w2 must have shape {layout} = {w2_shape}, got {tuple(w2.shape)}")
    for name, b, shape in (("w13_bias", w13_bias, (experts, 2 * ffn)), ("w2_bias", w2_bias, (experts, hidden))):
        if b is None:
            continue
        _checks.tensor(op, name, b, min_dim=2)
        _checks.same_dtype(op, "x", x, name, b)
        _checks.same_device(op, "x", x, name, b)
        if tuple(b.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(b.shape)}")
    glu = _Glu(op, activation, swiglu_alpha, swiglu_limit)
    ids = topk_ids.to(torch.int32).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    return _experts(x.contiguous(), ids, weights, w13, w2, experts, ffn, fused_swiglu, glu, w13_bias=w13_bias,
                    w2_bias=w2_bias, transposed=bool(transposed), interleaved=bool(interleaved))


def moe_aux_loss(router_logits: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                 top_k: int) -> torch.Tensor:
    """HF's load-balancing loss `E * sum_e f_e * P_e` (CONVENTIONS.md): f_e is
    the number of (token, slot) assignments to e over the token count (so
    sum_e f_e = k), P_e the mean full-softmax probability of e. A uniform
    router gives k. float32 scalar, differentiable in router_logits.
    """
    op = "moe_aux_loss"
    _checks.tensor(op, "router_logits", router_logits, min_dim=2)
    if router_logits.dim() != 2 or router_logits.shape[1] != num_experts:
        raise ValueError(f"{op}: router_logits must have shape (tokens, num_experts = {num_experts}), "
                         f"got {tuple(router_logits.shape)}")
    _checks.tensor(op, "expert_ids", expert_ids, dtypes=_checks.INDEX_DTYPES, min_dim=2)
    if tuple(expert_ids.shape) != (router_logits.shape[0], top_k):
        raise ValueError(f"{op}: expert_ids must have shape (tokens, top_k) = ({router_logits.shape[0]}, {top_k}), "
                         f"got {tuple(expert_ids.shape)}")
    _checks.same_device(op, "router_logits", router_logits, "expert_ids", expert_ids)
    probs = torch.softmax(router_logits.float(), dim=-1).mean(dim=0)
    counts = F_.one_hot(expert_ids.long().flatten(), num_experts).sum(dim=0).float()
    return num_experts * (counts / router_logits.shape[0] * probs).sum()
