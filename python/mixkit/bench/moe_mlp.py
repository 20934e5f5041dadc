"""The Mixtral sparse MoE layer (router, top-2, expert SwiGLU MLPs, weighted
sum) forward, and forward + backward, at Mixtral 8x7B shapes on the GPU.

FLOPs count the active expert math only, 2 * T * k * 3 * H * F per forward
(the router's 2 * T * H * E is under 0.1%); fwd+bwd counts 3x that. Rows carry
TFLOP/s and % of the measured bf16 matmul peak (harness.matmul_tflops).

Peers: "eager", the mistral-inference loop (`for e: where(ids == e)`, one
torch.matmul per expert and projection; its host syncs make it uncapturable);
"grouped_mm", the same layer on torch._grouped_mm where this torch has it; and
"dense", one torch.matmul chain with the same FLOPs (T * k rows through
one expert), the ceiling a perfectly balanced grouped GEMM could reach. On the
CPU the shapes shrink (H=64, F=96) so a sweep runs in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixkit._backend import gpu_kernels
from mixkit.bench.harness import Case, mixkit_op

EXPERTS, TOP_K = 8, 2
GPU_DIMS = (4096, 14336)  # Mixtral 8x7B hidden, ffn
CPU_DIMS = (64, 96)


def moe_loop(x, router_weight, w13, w2, top_k: int = TOP_K):
    """mistral-inference: topk, softmax over the selected, a loop over experts."""
    vals, ids = torch.topk(torch.matmul(x, router_weight.t()).float(), top_k, dim=-1)
    weights = torch.softmax(vals, dim=-1)
    ffn = w2.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == e)
        h = torch.matmul(x[tok], w13[e].t())
        out = torch.matmul(F.silu(h[:, :ffn]) * h[:, ffn:], w2[e].t())
        y.index_add_(0, tok, weights[tok, slot, None] * out.float())
    return y.to(x.dtype)


def moe_grouped_mm(x, router_weight, w13, w2, top_k: int = TOP_K):
    """The same layer on torch._grouped_mm (bf16, sizes multiple of 16)."""
    vals, ids = torch.topk(torch.matmul(x, router_weight.t()).float(), top_k, dim=-1)
    weights = torch.softmax(vals, dim=-1)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    ends = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    rows = x[order // top_k]
    ffn = w2.shape[2]
    h = torch._grouped_mm(rows, w13.transpose(1, 2), offs=ends)
    out = torch._grouped_mm(F.silu(h[:, :ffn]) * h[:, ffn:], w2.transpose(1, 2), offs=ends)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    y.index_add_(0, order // top_k, out.float() * weights.flatten()[order, None])
    return y.to(x.dtype)


def _inputs(device, tokens, dtype, requires_grad=False):
    # GPU shapes wherever the GPU kernels run (a GPU, or the emulated GPU).
    hidden, ffn = GPU_DIMS if gpu_kernels(torch.device(device)) else CPU_DIMS
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    rw = torch.randn(EXPERTS, hidden, device=device, dtype=dtype) / hidden ** 0.5
    w13 = torch.randn(EXPERTS, 2 * ffn, hidden, device=device, dtype=dtype) / hidden ** 0.5
    w2 = torch.randn(EXPERTS, hidden, ffn, device=device, dtype=dtype) / ffn ** 0.5
    params = [t.requires_grad_(requires_grad) for t in (x, rw, w13, w2)]
    return params, hidden, ffn


def _case(device, tokens, dtype, backward: bool) -> Case:
    params, hidden, ffn = _inputs(device, tokens, dtype, requires_grad=backward)
    x, rw, w13, w2 = params
    op = mixkit_op("moe_mlp")
    # The dense peer: T * k rows through one expert's weights, same FLOPs.
    rows = x.detach().repeat(TOP_K, 1).requires_grad_(backward)

    def dense():
        h = torch.matmul(rows, w13[0].t())
        return torch.matmul(F.silu(h[:, :ffn]) * h[:, ffn:], w2[0].t())

    layers = {"mixkit": lambda: op(x, rw, w13, w2, top_k=TOP_K), "eager": lambda: moe_loop(x, rw, w13, w2)}
    if hasattr(torch, "_grouped_mm") and x.is_cuda:
        layers["grouped_mm"] = lambda: moe_grouped_mm(x, rw, w13, w2)

    def timed(fn, keep_output=True):
        if not backward:
            return (lambda: fn()) if keep_output else (lambda: (fn(), None)[1])

        def step():
            out = fn()
            out.float().square().mean().backward()
            for p in (*params, rows):
                p.grad = None
            return None  # gradients differ per peer layout; timing only

        return step

    impls = {name: timed(fn) for name, fn in layers.items()}
    impls["dense"] = timed(dense, keep_output=False)  # different math: time only
    flops = 2 * tokens * TOP_K * 3 * hidden * ffn * (3 if backward else 1)
    weight_bytes = (w13.numel() + w2.numel()) * w13.element_size()
    nbytes = weight_bytes + 2 * x.numel() * x.element_size()
    shape = f"T={tokens} E={EXPERTS} k={TOP_K} H={hidden} F={ffn}"
    return Case("moe_mlp_fwd_bwd" if backward else "moe_mlp", shape, dtype, nbytes, impls, tokens=tokens,
                flops=flops)


def moe_mlp_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, backward=False)


def moe_mlp_fwd_bwd_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, backward=True)
