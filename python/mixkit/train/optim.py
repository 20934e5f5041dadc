"""AdamW with OLMo / Llama 2 settings and the learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two AdamW groups: weight decay on matrices (dim >= 2: projections,
    experts, router, untied head), none on norms, biases (1-D) and the token
    embedding (and a head tied to it), unless the config says otherwise."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embeddings:
            (decay if cfg.decay_embeddings else no_decay).append(p)
        elif p.dim() < 2:
            (decay if cfg.decay_norms_and_biases else no_decay).append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(betas, eps, decoupled weight decay), fused on CUDA, foreach elsewhere."""
    cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=cuda or None, foreach=None if cuda else True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based), a pure function of the
    step so that a resumed run matches: linear warmup from lr / warmup_steps
    to lr over warmup_steps, then cosine or linear decay to min_lr_ratio * lr
    at max_steps, constant after."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.decay == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak - (peak - floor) * progress
