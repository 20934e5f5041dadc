"""Rotary position embedding (RoPE) for q and k in one call, both layouts.

Layers: `_core.rope` (csrc/cpu/rope.cpp, csrc/cuda/rope.cu) -> torch.library op
`mixkit::rope` with fake and autograd registrations -> `rope()` below.

Half-split (HF, NeoX, OLMo) rotates x[i] against x[i + D/2]; interleaved (Meta
and Mistral native weights) rotates x[2i] against x[2i + 1]. Frequencies are
theta^(-2i/D); angles are float32(position) * frequency in float32, and cos/sin
are computed from them in float32 (CONVENTIONS.md). The backward pass is the
same rotation by minus the angle.

Scaled RoPE (`scaling`, Hugging Face's `rope_parameters` / `rope_scaling`):
"linear" divides the frequencies by `factor`; "yarn" blends interpolated and
original frequencies per dimension and multiplies cos and sin by an
attention factor. `rope_frequencies` computes the (D/2,) float32 table the
way transformers does (float32 torch arithmetic, the same formulas), and the
kernels read it instead of theta^(-2i/D); the backward rotates by minus the
same angles with the same factor.
"""
from __future__ import annotations

import functools
import math

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


# ---- scaled frequencies -------------------------------------------------------

SCALINGS = ("default", "linear", "yarn")
_KEYS = {"default": {"rope_type", "rope_theta", "type"},
         "linear": {"rope_type", "rope_theta", "type", "factor"},
         "yarn": {"rope_type", "rope_theta", "type", "factor", "original_max_position_embeddings",
                  "max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                  "mscale_all_dim", "truncate"}}


def scaling_kind(scaling: dict | None) -> str:
    """The rope_type of a Hugging Face rope_parameters / rope_scaling dict
    ("default" for None); ValueError for kinds mixkit does not compute and
    for keys it would otherwise ignore."""
    if not scaling:
        return "default"
    if not isinstance(scaling, dict):
        raise TypeError(f"rope: scaling must be a dict (Hugging Face rope_parameters), got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SCALINGS:
        raise ValueError(f"rope: rope_type {kind!r} is not supported (supported: {', '.join(SCALINGS)})")
    unknown = sorted(set(scaling) - _KEYS[kind])
    if unknown:
        raise ValueError(f"rope: {kind} RoPE does not take {', '.join(map(repr, unknown))}")
    if kind != "default":
        factor = scaling.get("factor")
        if kind == "linear" or factor is not None:
            _checks.finite_float("rope", "scaling['factor']", factor if factor is not None else -1, positive=True)
    if kind == "yarn" and scaling.get("original_max_position_embeddings") is None:
        raise ValueError("rope: yarn RoPE needs original_max_position_embeddings")
    return kind


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor | None, float]:
    """(inv_freq (head_dim / 2,) float32 on the CPU, attention factor) of a
    scaled RoPE, as transformers' modeling_rope_utils computes them (float32
    torch arithmetic); (None, 1.0) for plain RoPE, whose frequencies the
    kernels compute themselves (theta^(-2i/D), correctly rounded)."""
    kind = scaling_kind(scaling)
    if kind == "default":
        return None, 1.0
    inv_freq, factor = _frequencies(int(head_dim), float(theta), kind, _params(scaling))
    return inv_freq.clone(), factor


def _params(scaling: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in scaling.items() if k not in ("rope_type", "type", "rope_theta")))


@functools.lru_cache(maxsize=64)
def _frequencies(dim: int, base: float, kind: str, key: tuple) -> tuple[torch.Tensor, float]:
    p = dict(key)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "linear":
        return 1.0 / (base ** exponents) / float(p["factor"]), 1.0
    # YaRN (arXiv 2309.00071): frequencies that turn fewer than beta_slow
    # times over the original context are interpolated (divided by factor),
    # those turning more than beta_fast times kept, a linear ramp between.
    original = p["original_max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:
        factor = p["max_position_embeddings"] / original
    attention = p.get("attention_factor")
    if attention is None:
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_for(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** exponents
    keep = 1 - ramp  # the share of the original (extrapolated) frequency
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    return inv_freq, float(attention)


_DEVICE_TABLES: dict = {}


def _table_on(head_dim: int, theta: float, kind: str, params: tuple, device: torch.device):
    """(the frequency table on `device`, attention factor), one copy per
    device and scaling: tables are tiny, and this saves a host-to-device copy
    per call."""
    key = (head_dim, theta, kind, params, device)
    hit = _DEVICE_TABLES.get(key)
    if hit is None:
        table, factor = _frequencies(head_dim, theta, kind, params)
        hit = _DEVICE_TABLES[key] = (table.to(device), factor)
    return hit


def _check(q, k, positions, theta, inv_freq=None, attention_factor=1.0):
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
    _checks.finite_float(op, "attention_factor", attention_factor, positive=True)
    if inv_freq is not None:
        _checks.tensor(op, "inv_freq", inv_freq, dtypes=(torch.float32,))
        if tuple(inv_freq.shape) != (d // 2,):
            raise ValueError(f"{op}: inv_freq must have shape (head_dim / 2,) = ({d // 2},), got {tuple(inv_freq.shape)}")
        _checks.contiguous(op, "inv_freq", inv_freq)
        _checks.same_device(op, "q", q, "inv_freq", inv_freq)


def _rope(q, k, positions, theta, interleaved, inverse, inv_freq=None, attention_factor=1.0):
    _check(q, k, positions, theta, inv_freq, attention_factor)
    q_stride = _token_stride("rope", "q", q)
    k_stride = _token_stride("rope", "k", k)
    pos = positions.expand(q.shape[:-2]).reshape(-1).contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    backend, device, stream = launch_args(q.device)
    _core.rope(backend, device, stream, DTYPE_CODES[q.dtype], pos.dtype == torch.int64, pos.data_ptr(),
               pos.numel(), q.shape[-1], theta, interleaved, inverse,
               q.data_ptr(), q_out.data_ptr(), q.shape[-2], q_stride, q.stride(-2),
               k.data_ptr(), k_out.data_ptr(), k.shape[-2], k_stride, k.stride(-2),
               0 if inv_freq is None else inv_freq.data_ptr(), attention_factor)
    return q_out, k_out


define("rope(Tensor q, Tensor k, Tensor positions, float theta, bool interleaved, bool inverse, "
       "Tensor? inv_freq=None, float attention_factor=1.0) -> (Tensor, Tensor)", _rope)


@torch.library.register_fake("mixkit::rope")
def _(q, k, positions, theta, interleaved, inverse, inv_freq=None, attention_factor=1.0):
    _check(q, k, positions, theta, inv_freq, attention_factor)
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _save(ctx, inputs, output):
    _q, _k, positions, theta, interleaved, inverse, inv_freq, attention_factor = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.rotation = (theta, interleaved, not inverse)
    ctx.attention_factor = attention_factor


def _backward(ctx, grad_q, grad_k):
    # (a R(angle))^T = a R(-angle): the same op, inverse, same factor.
    positions, inv_freq = ctx.saved_tensors
    grad_q, grad_k = torch.ops.mixkit.rope(grad_q.contiguous(), grad_k.contiguous(), positions, *ctx.rotation,
                                           inv_freq, ctx.attention_factor)
    return grad_q, grad_k, None, None, None, None, None, None


torch.library.register_autograd("mixkit::rope", _backward, setup_context=_save)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
         interleaved: bool = False, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (..., Hq, D) and k (..., Hkv, D) by their token positions.

    positions: int32/int64 integer positions, broadcastable to the leading
    (token) dimensions, e.g. (S,) or (B, S) for q of shape (B, S, Hq, D).
    theta: 1e4 for Llama 2, OLMo and Mistral 7B v0.1; 1e6 for Mixtral.
    interleaved: False for half-split (HF) weights, True for Meta/Mistral
    native weights. scaling: a Hugging Face rope_parameters dict for scaled
    RoPE, {"rope_type": "linear", "factor": f} or {"rope_type": "yarn",
    "factor": f, "original_max_position_embeddings": n, ...} (gpt-oss);
    None or rope_type "default" for plain RoPE. Returns new contiguous
    tensors; differentiable in q and k.
    """
    kind = scaling_kind(scaling)
    inv_freq, factor = None, 1.0
    if kind != "default":
        inv_freq, factor = _table_on(int(q.shape[-1]), float(theta), kind, _params(scaling), q.device)
    return torch.ops.mixkit.rope(q, k, positions, float(theta), bool(interleaved), False, inv_freq, factor)
