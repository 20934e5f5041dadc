"""mixkit: hand-written CUDA/HIP kernels and models for Mistral-family LLMs.

`mixkit.ops` holds the differentiable ops (torch.library ops in the `mixkit`
namespace); `mixkit.backends()` lists the backends compiled into `_core`.
"""
from . import _core
from ._backend import backends
from . import nn, ops

__version__ = _core.build_info()["version"]

__all__ = ["backends", "nn", "ops", "__version__"]
