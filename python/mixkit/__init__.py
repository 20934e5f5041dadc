"""mixkit: hand-written CUDA/HIP kernels and models for Mistral-family LLMs.

`mixkit.ops` holds the differentiable ops (torch.library ops in the `mixkit`
namespace); `mixkit.backends()` lists the backends compiled into `_core`.
"""
# torch first: wheels take libgomp from the one torch has loaded, so mixkit and
# torch share one OpenMP runtime.
import torch as _torch  # noqa: F401

import os as _os

if _os.environ.get("MIXKIT_CORE"):
    # Another build of the extension, by path: how the test suite runs against
    # the emulated-GPU build (-DMIXKIT_EMULATE=ON) without reinstalling.
    import importlib.util as _util
    import sys as _sys

    _spec = _util.spec_from_file_location(f"{__name__}._core", _os.environ["MIXKIT_CORE"])
    _core = _util.module_from_spec(_spec)
    _sys.modules[f"{__name__}._core"] = _core
    _spec.loader.exec_module(_core)
else:
    from . import _core
from ._backend import backends, warn_on_unsupported_gpus
from . import models, nn, ops
from .models import generate
from .serve import LLM, SamplingParams

warn_on_unsupported_gpus()

__version__ = _core.build_info()["version"]

__all__ = ["backends", "generate", "models", "nn", "ops", "LLM", "SamplingParams", "__version__"]
