"""How a torch tensor maps onto a `_core` call: backend code, device, stream.

`_core` takes raw pointers, sizes and strides plus an explicit stream handle;
this module is the one place that turns torch devices and dtypes into those
codes (they mirror csrc/common/ops.h and csrc/common/dtype.h).
"""
from __future__ import annotations

import torch

from . import _core

CPU, CUDA, HIP = 0, 1, 2
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_BUILT = frozenset(_core.backends())
_NAMES = {CPU: "cpu", CUDA: "cuda", HIP: "hip"}
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def backends() -> list[str]:
    """Backends compiled into this build of mixkit._core, e.g. ['cpu', 'cuda']."""
    return sorted(_BUILT)


def gpu_backend() -> str:
    """The mixkit backend that serves torch's "cuda" devices in this torch build."""
    return "hip" if torch.version.hip else "cuda"


def has_gpu() -> bool:
    """True when a GPU is visible to torch and this build has its backend."""
    return torch.cuda.is_available() and gpu_backend() in _BUILT


def launch_args(device: torch.device) -> tuple[int, int, int]:
    """(backend code, device ordinal, stream handle) for a call on `device`.

    The stream is torch's current stream for that device, so the kernels order
    with surrounding torch work and are captured by CUDA graphs.
    """
    if device.type == "cpu":
        return CPU, 0, 0
    if device.type != "cuda":
        raise ValueError(f"mixkit: tensors on '{device.type}' are not supported; use cpu or cuda tensors")
    code = HIP if torch.version.hip else CUDA
    if _NAMES[code] not in _BUILT:
        how = "hipcc on PATH or -DMIXKIT_HIP=ON" if code == HIP else "nvcc on PATH or -DMIXKIT_CUDA=ON"
        raise RuntimeError(
            f"mixkit was built without the {_NAMES[code].upper()} backend (built: {', '.join(sorted(_BUILT))}); "
            f"reinstall with {how}"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _raw_stream(index) if _raw_stream is not None else torch.cuda.current_stream(index).cuda_stream
    return code, index, stream
