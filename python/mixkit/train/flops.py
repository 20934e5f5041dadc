"""Model FLOPs for throughput and MFU.

Training FLOPs of a batch = 6 * N_active * tokens + 12 * L * (H * D) * pairs:
- 6 N per token for the matmuls with weights (2 forward, 4 backward), where
  N_active counts the matmul weights (and biases): not the input embedding
  table (a lookup) nor the norm weights (elementwise), the output head even
  when tied, and for MoE only top_k of the E experts (the router fully);
- attention scores and values: 2 matmuls of 2 * D FLOPs per (query, key) pair
  and head in the forward, doubled in the backward, so 12 * H * D per visible
  pair per layer; `pairs` counts the visible (query, key) pairs, causal,
  with the sliding window and per packed document (CONVENTIONS.md), not S^2.
MFU = achieved model FLOP/s / peak (per device, configured).
"""
from __future__ import annotations

import time

import torch

from ..models.config import ModelArgs


def active_params(args: ModelArgs) -> int:
    """Parameters multiplied per token (see the module docstring)."""
    hd = args.head_dim
    attn = args.dim * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * args.dim
    if args.bias:
        attn += (args.n_heads + 2 * args.n_kv_heads) * hd + args.dim
    dense = 3 * args.dim * args.hidden_dim + (2 * args.hidden_dim + args.dim if args.bias else 0)
    f = args.expert_dim
    expert = 3 * args.dim * f + (2 * f + args.dim if args.moe_expert_bias else 0)
    moe = args.moe_top_k * expert + args.moe_num_experts * args.dim + (args.moe_num_experts if args.moe_router_bias
                                                                       else 0)
    ffn = sum(moe if args.is_moe(i) else dense for i in range(args.n_layers))
    return args.n_layers * attn + ffn + args.dim * args.vocab_size


def visible_pairs(length: int, window: int | None) -> int:
    """Causal (query, key) pairs of one sequence, keys per query capped at window."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def batch_flops(args: ModelArgs, doc_lengths: list[int]) -> float:
    """Training FLOPs (forward + backward) of one packed batch of documents."""
    tokens = sum(doc_lengths)
    # Each layer's own window: sliding and full layers see different pairs.
    pairs = sum(visible_pairs(n, w) for w in args.windows for n in doc_lengths)
    return 6.0 * active_params(args) * tokens + 12.0 * args.n_heads * args.head_dim * pairs


def measure_matmul_peak(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                        n: int = 8192, iters: int = 10) -> float:
    """Measured `torch.matmul` FLOP/s at n^3 (CONVENTIONS.md's ceiling), for
    peak_flops where the datasheet number is unknown (use n ~ 1024 on a CPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    sync()
    return 2.0 * n ** 3 * iters / (time.perf_counter() - start)
