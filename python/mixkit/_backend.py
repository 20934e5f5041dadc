"""How a torch tensor maps onto a `_core` call: backend code, device, stream.

`_core` takes raw pointers, sizes and strides plus an explicit stream handle;
this module is the one place that turns torch devices and dtypes into those
codes (they mirror csrc/common/ops.h and csrc/common/dtype.h).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from . import _core

CPU, CUDA, HIP, EMU = 0, 1, 2, 3
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_BUILT = frozenset(_core.backends())
_NAMES = {CPU: "cpu", CUDA: "cuda", HIP: "hip", EMU: "emu"}
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_arch_checked: set[int] = set()


def ptr(t: torch.Tensor | None) -> int:
    """The address `_core` takes for an optional tensor: 0 for None."""
    return 0 if t is None else t.data_ptr()


def backends() -> list[str]:
    """Backends compiled into this build of mixkit._core, e.g. ['cpu', 'cuda']."""
    return sorted(_BUILT)


def gpu_backend() -> str:
    """The mixkit backend that serves torch's "cuda" devices in this torch build."""
    return "hip" if torch.version.hip else "cuda"


def has_gpu() -> bool:
    """True when a GPU is visible to torch and this build has its backend."""
    return torch.cuda.is_available() and gpu_backend() in _BUILT


# The emulated GPU (a `-DMIXKIT_EMULATE=ON` test build of _core): while
# `emulate()` is active, ops on CPU tensors run the GPU kernels' own code on
# the emulator instead of the CPU backend, with the GPU path's checks.
_emulating = False


@contextlib.contextmanager
def emulate(enabled: bool = True):
    """Runs mixkit ops on CPU tensors through the emulated GPU ("emu" backend)."""
    global _emulating
    if enabled and "emu" not in _BUILT:
        raise RuntimeError("mixkit was built without the emulated GPU; rebuild with -DMIXKIT_EMULATE=ON")
    prev, _emulating = _emulating, enabled
    try:
        yield
    finally:
        _emulating = prev


def gpu_kernels(device: torch.device) -> bool:
    """Whether ops on `device` run the GPU kernels (and so their checks): a
    CUDA/ROCm device, or CPU tensors under `emulate()`."""
    return device.type == "cuda" or (_emulating and device.type == "cpu")


def launch_args(device: torch.device) -> tuple[int, int, int]:
    """(backend code, device ordinal, stream handle) for a call on `device`.

    The stream is torch's current stream for that device, so the kernels order
    with surrounding torch work and are captured by CUDA graphs.
    """
    if device.type == "cpu":
        return (EMU if _emulating else CPU), 0, 0
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
    if index not in _arch_checked:
        problem = arch_mismatch(index)
        if problem:
            raise RuntimeError(problem)
        _arch_checked.add(index)
    stream = _raw_stream(index) if _raw_stream is not None else torch.cuda.current_stream(index).cuda_stream
    return code, index, stream


def cuda_arch_supported(capability: tuple[int, int], archs: str) -> bool:
    """Whether code built for `archs` (CMake CUDA_ARCHITECTURES entries, comma
    separated: "80", "90a-real", "90-virtual") runs on a GPU of `capability`.

    Machine code (SASS) for sm_XY runs on X.Y' for Y' >= Y; sm_XYa only on X.Y.
    PTX for compute_XY is JIT-compiled on any X.Y' >= X.Y, but compute_XYa
    PTX only on X.Y. A plain entry carries both.
    """
    for entry in filter(None, archs.split(",")):
        name, _, kind = entry.partition("-")
        specific = name.endswith("a")
        major, minor = divmod(int(name.rstrip("af")), 10)
        if kind in ("", "real"):
            if major == capability[0] and (minor == capability[1] if specific else minor <= capability[1]):
                return True
        if kind in ("", "virtual"):
            if (major, minor) == capability if specific else (major, minor) <= capability:
                return True
    return False


def _describe(entry: str) -> str:
    name, _, kind = entry.partition("-")
    return f"compute_{name} PTX" if kind == "virtual" else f"sm_{name}"


def arch_mismatch(index: int) -> str | None:
    """A message if this build has no code for GPU `index`, else None."""
    props = torch.cuda.get_device_properties(index)
    info = _core.build_info()
    if torch.version.hip:
        arch = getattr(props, "gcnArchName", "").split(":")[0]
        built = [a for a in info["hip_archs"].split(",") if a]
        if not arch or arch in built:
            return None
        return (f"mixkit was built for {'/'.join(built)}; this GPU ({props.name}, device {index}) is {arch}. "
                f"Reinstall with -Ccmake.define.MIXKIT_HIP_ARCHS={arch}")
    if cuda_arch_supported((props.major, props.minor), info["cuda_archs"]):
        return None
    built = "/".join(_describe(entry) for entry in info["cuda_archs"].split(",") if entry)
    return (f"mixkit was built for {built}; this GPU ({props.name}, cuda:{index}) is sm_{props.major}{props.minor}. "
            f"Reinstall with -Ccmake.define.MIXKIT_CUDA_ARCHS={props.major}{props.minor}")


def warn_on_unsupported_gpus() -> None:
    """At import: name GPUs this build cannot run on, but only if CUDA is
    already initialised. Importing mixkit never initialises CUDA itself (that
    would break fork-based data loaders); otherwise the check runs on the first
    call on each GPU, where a mismatch raises."""
    if gpu_backend() not in _BUILT or not torch.cuda.is_initialized():
        return
    for index in range(torch.cuda.device_count()):
        problem = arch_mismatch(index)
        if problem:
            warnings.warn(problem, RuntimeWarning, stacklevel=3)
