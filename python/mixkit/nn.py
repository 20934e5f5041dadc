"""nn.Module wrappers over mixkit.ops, for model code."""
from __future__ import annotations

import torch

from . import ops


class RMSNorm(torch.nn.Module):
    """RMSNorm with a learned weight. `forward(x, residual)` runs the fused
    residual variant and returns `(y, h)` with `h = x + residual`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.rms_norm_residual(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(torch.nn.Module):
    """OLMo's non-parametric LayerNorm: no weight, no bias."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
