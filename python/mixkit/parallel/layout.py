"""Which part of each parameter a rank holds, in one place for sharding a
built model and for loading a checkpoint shard by shard.

A `Split` cuts one dimension of a parameter into segments and gives rank r
the r-th equal part of every segment, concatenated. Fused parameters need
the segments: `wqkv` holds the q, k and v rows one after another, and TP rank
r must hold its q heads, then its k heads, then its v heads, so that the
attention code reads `[q | k | v]` on every rank as it does on one. A
parameter without a Split is replicated.

The checkpoint loader maps each stored tensor to a region of a (global)
parameter; `Split.pieces` turns that region into the source slices this rank
must read and where they land in its local parameter, so a rank reads only
the bytes of its shard.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.config import ModelArgs


@dataclass(frozen=True)
class Split:
    dim: int
    segments: tuple[int, ...]  # boundaries along dim: (0, s1, ..., size)
    rank: int
    world: int

    def parts(self):
        """(global start, global stop, local start) of this rank's part of each segment."""
        local = 0
        for s0, s1 in zip(self.segments[:-1], self.segments[1:]):
            n = (s1 - s0) // self.world
            yield s0 + self.rank * n, s0 + (self.rank + 1) * n, local
            local += n

    def local_size(self) -> int:
        return (self.segments[-1] - self.segments[0]) // self.world

    def shard(self, full):
        """This rank's part of the full tensor (a copy on real devices, a meta tensor on meta)."""
        import torch

        chunks = [full.narrow(self.dim, g0, g1 - g0) for g0, g1, _ in self.parts()]
        return (chunks[0] if len(chunks) == 1 else torch.cat(chunks, self.dim)).clone()

    def pieces(self, index, shape):
        """For a stored tensor that fills `param[index]` of the global
        parameter of `shape`: [(source index into the stored tensor, local
        index into this rank's parameter)], empty if this rank holds none of it.

        index: None (the whole parameter), a slice of dim 0, an int of dim 0
        (the stored tensor lacks that dim) or a tuple of those.
        """
        idx = () if index is None else index if isinstance(index, tuple) else (index,)
        spans = []  # per indexed dim: (start, stop, is_int)
        for d, ix in enumerate(idx):
            if isinstance(ix, int):
                spans.append((ix, ix + 1, True))
            else:
                spans.append((ix.start or 0, shape[d] if ix.stop is None else ix.stop, False))
        d = self.dim
        a, b, is_int = spans[d] if d < len(spans) else (0, shape[d], False)
        src_dim = d - sum(1 for s in spans[:d] if s[2])  # int indices drop their dims from the stored tensor
        head = list(idx) + [slice(None)] * max(0, d + 1 - len(idx))
        out = []
        for g0, g1, l0 in self.parts():
            x0, x1 = max(a, g0), min(b, g1)
            if x0 >= x1:
                continue
            dst = list(head)
            dst[d] = l0 + x0 - g0 if is_int else slice(l0 + x0 - g0, l0 + x1 - g0)
            src = () if is_int else (slice(None),) * src_dim + (slice(x0 - a, x1 - a),)
            out.append((src, tuple(dst)))
        return out


def check_tp(args: ModelArgs, world: int) -> None:
    """ValueError unless every sharded count divides by the tensor-parallel size."""
    if args.n_kv_heads % world or args.n_heads % world:
        raise ValueError(f"tensor_parallel: n_heads {args.n_heads} and n_kv_heads {args.n_kv_heads} must both be "
                         f"divisible by the tensor-parallel size {world} (each rank holds whole query and KV heads, "
                         "so a GQA group stays on one rank)")
    if args.hidden_dim % world or args.expert_dim % world:
        raise ValueError(f"tensor_parallel: hidden_dim {args.hidden_dim} (and the experts' {args.expert_dim}) must "
                         f"be divisible by the tensor-parallel size {world}")
    if args.qk_norm == "proj":
        raise ValueError("tensor_parallel: qk_norm 'proj' (OLMo 2, OLMoE) normalises across all heads, which "
                         "the head-split layout does not reduce over; not supported")
    if args.moe_expert_bias:
        raise ValueError("tensor_parallel: expert biases (gpt-oss) are not split by the layout; not supported")
    if args.vocab_size % world:
        raise ValueError(f"tensor_parallel: vocab_size {args.vocab_size} must be divisible by the tensor-parallel "
                         f"size {world} (embedding and head are split by vocabulary)")


def check_ep(args: ModelArgs, world: int) -> None:
    if not args.moe_num_experts:
        raise ValueError("expert_parallel: the model has no MoE layers (moe_num_experts is 0)")
    if args.moe_num_experts % world:
        raise ValueError(f"expert_parallel: moe_num_experts {args.moe_num_experts} must be divisible by the "
                         f"expert-parallel size {world}")
    if args.moe_expert_bias or args.moe_activation != "silu":
        raise ValueError("expert_parallel: expert biases and gpt-oss's clamped SwiGLU are not in the "
                         "expert-parallel layer yet")


def tp_splits(args: ModelArgs, rank: int, world: int) -> dict[str, Split]:
    """Megatron-style tensor parallelism: q/k/v and gate/up by output (whole
    heads), wo and w2 by input, embedding and head by vocabulary. Norms, the
    router and the row-parallel biases are replicated."""
    check_tp(args, world)
    h, hkv, f = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    s = lambda dim, *segs: Split(dim, segs, rank, world)  # noqa: E731
    out = {"tok_embeddings.weight": s(0, 0, args.vocab_size), "output.weight": s(0, 0, args.vocab_size)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out[p + "attention.wqkv.weight"] = out[p + "attention.wqkv.bias"] = s(0, 0, h, h + hkv, h + 2 * hkv)
        out[p + "attention.wo.weight"] = s(1, 0, h)
        out[p + "attention.sinks"] = s(0, 0, args.n_heads)  # gpt-oss: one per query head, with its head
        ff = p + "feed_forward."
        if args.is_moe(i):  # each expert's FFN width split; the router replicated
            fe = args.expert_dim
            out[ff + "w13"] = s(1, 0, fe, 2 * fe)
            out[ff + "w2"] = s(2, 0, fe)
        else:
            out[ff + "w13.weight"] = out[ff + "w13.bias"] = s(0, 0, f, 2 * f)
            out[ff + "w2.weight"] = s(1, 0, f)
    return out


def ep_splits(args: ModelArgs, rank: int, world: int) -> dict[str, Split]:
    """Expert parallelism: rank r holds experts [r E/N, (r+1) E/N)."""
    check_ep(args, world)
    out = {}
    for i in range(args.n_layers):
        ff = f"layers.{i}.feed_forward."
        out[ff + "w13"] = out[ff + "w2"] = Split(0, (0, args.moe_num_experts), rank, world)
    return out
