"""Mixtral routing at Mixtral 8x7B shapes: the top-2 router, the permutation
of tokens by expert and the weighted un-permutation.

Peers: torch eager written as MoE layers write it (topk + softmax; a stable
argsort of the expert ids with bincount offsets; an index_add back to token
order) and torch.compile of the same functions. All are memory-bound: the
roofline is the bytes each op must move.
"""

from __future__ import annotations

import torch

from mixkit.bench.harness import Case, compiled, mixkit_op

EXPERTS, TOP_K, HIDDEN = 8, 2, 4096  # Mixtral 8x7B


def route_ref(logits: torch.Tensor, top_k: int = TOP_K):
    vals, ids = torch.topk(logits.float(), top_k, dim=-1)
    return torch.softmax(vals, dim=-1), ids.to(torch.int32)


def permute_ref(x: torch.Tensor, ids: torch.Tensor, num_experts: int = EXPERTS):
    """Returns what moe_permute returns: rows by expert, offsets, row_map."""
    flat = ids.flatten().long()
    order = torch.argsort(flat, stable=True)  # pair index of each permuted row
    x_perm = x[order // ids.shape[1]]
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
    row_map = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    return x_perm, offsets, row_map.to(torch.int32)


def unpermute_ref(y_rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor):
    """index_add of the weighted rows into token order, in float32."""
    top_k = weights.shape[1]
    scaled = y_rows.float() * weights.flatten()[order][:, None]
    out = torch.zeros((weights.shape[0], y_rows.shape[1]), dtype=torch.float32, device=y_rows.device)
    return out.index_add_(0, order // top_k, scaled).to(y_rows.dtype)


def _shape(tokens: int) -> str:
    return f"T={tokens} E={EXPERTS} k={TOP_K} H={HIDDEN}"


def _routed(device, tokens: int, dtype):
    logits = torch.randn(tokens, EXPERTS, device=device, dtype=dtype)
    weights, ids = route_ref(logits)
    x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
    return logits, weights, ids, x


def moe_route_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    logits, _, _, _ = _routed(device, tokens, dtype)
    op = mixkit_op("moe_route")
    impls = {"mixkit": lambda: op(logits, TOP_K), "eager": lambda: route_ref(logits)}
    if compile_mode:
        ref = compiled(route_ref, compile_mode)
        impls["compile"] = lambda: ref(logits)
    # read the logits, write float32 weights and int32 ids
    nbytes = logits.numel() * logits.element_size() + tokens * TOP_K * 8
    return Case("moe_route", _shape(tokens), dtype, nbytes, impls, tokens=tokens)


def moe_permute_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    _, _, ids, x = _routed(device, tokens, dtype)
    op = mixkit_op("moe_permute")
    impls = {"mixkit": lambda: op(x, ids, EXPERTS), "eager": lambda: permute_ref(x, ids)}
    if compile_mode:
        ref = compiled(permute_ref, compile_mode)
        impls["compile"] = lambda: ref(x, ids)
    # read x once and the ids; write k copies of each row, the row map and offsets
    rows = tokens * TOP_K
    nbytes = (x.numel() + rows * HIDDEN) * x.element_size() + rows * 8 + (EXPERTS + 1) * 8
    return Case("moe_permute", _shape(tokens), dtype, nbytes, impls, tokens=tokens)


def moe_unpermute_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    _, weights, ids, x = _routed(device, tokens, dtype)
    x_perm, _, row_map = permute_ref(x, ids)
    y_rows = torch.randn_like(x_perm)
    order = torch.argsort(row_map.long())  # the eager layer keeps its sort order from the permute step
    op = mixkit_op("moe_unpermute")
    impls = {"mixkit": lambda: op(y_rows, row_map, weights), "eager": lambda: unpermute_ref(y_rows, order, weights)}
    if compile_mode:
        ref = compiled(unpermute_ref, compile_mode)
        impls["compile"] = lambda: ref(y_rows, order, weights)
    # read the k rows per token, the row map and the weights; write one row per token
    rows = tokens * TOP_K
    nbytes = (y_rows.numel() + tokens * HIDDEN) * y_rows.element_size() + rows * 8
    return Case("moe_unpermute", _shape(tokens), dtype, nbytes, impls, tokens=tokens)
