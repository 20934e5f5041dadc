"""RoPE on q and k together, half-split layout, at Mistral 7B shapes.

Peers: the eager reference below (float32 angles from integer positions, as
CONVENTIONS.md requires), torch.compile of it, and Liger-Kernel's RoPE when
installed (CUDA only).
"""

from __future__ import annotations

import torch

from mixkit.bench.harness import Case, compiled, liger_for, mixkit_op

N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128  # Mistral 7B
THETA = 10000.0  # Mistral 7B v0.1
CONTEXT = 16384


def _angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    return positions.to(torch.float32)[..., None] * inv_freq  # (S, D/2) or (B, S, D/2)


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = THETA):
    """q (B, S, Hq, D), k (B, S, Hkv, D); rotates x[:D/2] against x[D/2:]."""
    angles = _angles(positions, q.shape[-1], theta)
    cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]  # broadcast over heads

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def _liger_rope(lg, q, k, positions, theta):
    # Liger takes HF's (B, H, S, D) layout and cos/sin tables of width D. The
    # tables are built here, untimed: HF builds them once per forward and
    # shares them across layers. Liger rotates in place, so it gets copies.
    angles = _angles(positions, q.shape[-1], theta).reshape(1, len(positions), -1)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)  # HF casts the tables to q's dtype
    q, k = q.clone().transpose(1, 2), k.clone().transpose(1, 2)

    def run():
        qo, ko = lg["rope"](q, k, cos, sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    return run


def rope_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    q = torch.randn(1, tokens, N_Q_HEADS, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(1, tokens, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    # The last `tokens` positions of a 16384-token context: decode steps sit at
    # large positions, where the error column would show low-precision angles.
    pos = torch.arange(CONTEXT - tokens, CONTEXT, device=device)
    op, lg = mixkit_op("rope"), liger_for(device)
    impls = {"mixkit": lambda: op(q, k, pos, theta=THETA), "eager": lambda: rope_ref(q, k, pos, THETA)}
    if compile_mode:
        ref = compiled(rope_ref, compile_mode)
        impls["compile"] = lambda: ref(q, k, pos, THETA)
    if lg:
        impls["liger"] = _liger_rope(lg, q, k, pos, THETA)
    # read q, k and positions, write q_out and k_out; cos/sin are computed, not read
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + pos.numel() * pos.element_size()
    shape = f"T={tokens} Hq={N_Q_HEADS} Hkv={N_KV_HEADS} D={HEAD_DIM}"
    return Case("rope", shape, dtype, nbytes, impls, tokens=tokens)

