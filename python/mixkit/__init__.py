"""mixkit: hand-written CUDA/HIP kernels and models for Mistral-family LLMs.

`mixkit.ops` holds the differentiable ops (torch.library ops in the `mixkit`
namespace); `mixkit.backends()` lists the backends compiled into `_core`.
"""
# torch first: wheels take libgomp from the one torch has loaded, so mixkit and
# torch share one OpenMP runtime.
import torch as _torch  # noqa: F401

from . import _core
from ._backend import backends, warn_on_unsupported_gpus
from . import models, nn, ops
from .models import generate

warn_on_unsupported_gpus()

__version__ = _core.build_info()["version"]

__all__ = ["backends", "generate", "models", "nn", "ops", "__version__"]
