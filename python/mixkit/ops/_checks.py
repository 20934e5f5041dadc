"""Argument checks shared by the ops. Each raises a Python exception that names
the op and the argument; `_core` re-checks what its kernels rely on."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} is on '{t.device}'; mixkit supports cpu and cuda tensors")


def same_device(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (got strides {t.stride()}); call .contiguous() first")


def finite_float(op: str, name: str, v, positive: bool = False) -> None:
    v = float(v)
    if not v == v or v in (float("inf"), float("-inf")) or v < 0 or (positive and v == 0):
        raise ValueError(f"{op}: {name} must be a finite {'positive' if positive else 'non-negative'} number, got {v}")


def sink_softcap_types(op: str, s, c, ref: torch.Tensor) -> None:
    """The part of the sinks/softcap checks that must run before the
    dispatcher sees the arguments: it would turn a wrong type into a
    RuntimeError of its own (or a bool softcap into 1.0), and send a sinks
    tensor on another device to that device's kernel."""
    if s is not None:
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{op}: sinks must be a torch.Tensor or None, got {type(s).__name__}")
        same_device(op, "q", ref, "sinks", s)
    softcap(op, c)


def sinks(op: str, s, heads: int, ref: torch.Tensor) -> None:
    """Attention sinks: None or a (heads,) float32 tensor on ref's device."""
    if s is None:
        return
    sink_softcap_types(op, s, None, ref)
    if s.dtype != torch.float32:
        raise TypeError(f"{op}: sinks must be float32 (one logit per query head), got "
                        f"{str(s.dtype).replace('torch.', '')}; pass sinks.float()")
    same_device(op, "q", ref, "sinks", s)
    if s.shape != (heads,):
        raise ValueError(f"{op}: sinks must have shape (heads,) = ({heads},), got {tuple(s.shape)}")
    if heads > 1 and s.stride(0) != 1:
        raise ValueError(f"{op}: sinks must be contiguous, got stride {s.stride()}")


def softcap(op: str, c) -> None:
    """Logit softcap: None or a finite number > 0."""
    if c is None:
        return
    if isinstance(c, bool) or not isinstance(c, (int, float, torch.SymFloat)):
        raise TypeError(f"{op}: softcap must be a float or None, got {type(c).__name__}")
    c = float(c)
    if not (c > 0 and c != float("inf")):
        raise ValueError(f"{op}: softcap must be a finite number > 0 (c in c * tanh(s / c)), or None, got {c}")
