"""Tensor parallelism for inference (Megatron-style) over a 1-D DeviceMesh.

Per block, q/k/v and gate/up are split by output and `wo`/`w2` by input, so
each rank computes whole heads (query and KV heads: a GQA group never spans
ranks) and a slice of the FFN width, and one all-reduce after `wo` and one
after `w2` (after the MoE layer for Mixtral, whose experts are split by FFN
width) restore the residual stream. The embedding is split by vocabulary
(each rank looks up the ids it holds, zeros elsewhere, one all-reduce) and
so is the head (local logits, one all-gather). Each rank's rolling KV cache
holds only its own KV heads.

Collectives are torch.distributed functional collectives on the mesh's
process group: NCCL on NVIDIA GPUs, RCCL on ROCm, gloo on the CPU. The
collectives carry no gradient, so a tensor-parallel model is for inference:
its parameters get requires_grad=False.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from ..models.model import Attention, MoE, Transformer
from .layout import Split, tp_splits


def mesh_rank_world(mesh, op: str, dims: int = 1) -> tuple[int, int]:
    """(this rank's coordinate, size) on a 1-D DeviceMesh, or a ValueError."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"{op}: mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != dims:
        hint = " (pass one of its dimensions, mesh[name])" if dims == 1 else ""
        raise ValueError(f"{op}: needs a {dims}-D DeviceMesh, got a {mesh.ndim}-D mesh of shape "
                         f"{tuple(mesh.shape)}{hint}")
    return mesh.get_local_rank(), mesh.size()


def shard_parameters(model: nn.Module, splits: dict[str, Split]) -> None:
    """Replace each split parameter by this rank's part (tied parameters stay tied)."""
    done: dict[int, nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in done:
                mod._parameters[pname] = done[id(p)]
                continue
            split = splits.get(f"{mod_name}.{pname}" if mod_name else pname)
            if split is not None:
                done[id(p)] = mod._parameters[pname] = nn.Parameter(split.shard(p.data), requires_grad=p.requires_grad)


def _all_reduce(x, group):
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


class RowParallelLinear(nn.Linear):
    """nn.Linear whose weight holds this rank's input columns: partial sums,
    one all-reduce, the (replicated) bias added once."""
    tp_group = None

    def forward(self, x):
        y = _all_reduce(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding holding rows [vocab_start, vocab_start + rows): ids
    outside give zeros here, and the all-reduce fills them from their rank."""
    tp_group = None
    vocab_start = 0

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return _all_reduce(x.masked_fill(outside.unsqueeze(-1), 0), self.tp_group)


class VocabParallelHead(nn.Linear):
    """The LM head holding this rank's vocabulary rows: local logits, then an
    all-gather along the vocabulary, so every rank samples from the same logits."""
    tp_group = None

    def forward(self, x):
        y = F.linear(x, self.weight)
        return funcol.wait_tensor(funcol.all_gather_single(y.contiguous(), y.dim() - 1, self.tp_group))


class TensorParallelMoE(MoE):
    """Mixtral's MoE with every expert's FFN width split: the router runs
    replicated, each rank's grouped GEMMs give partial sums, one all-reduce."""
    tp_group = None

    def forward(self, x):
        return _all_reduce(super().forward(x), self.tp_group)


def _swap(module: nn.Module, cls, **attrs):
    module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)


def convert_modules(model: Transformer, mesh) -> None:
    """Switch the modules of a model whose parameters are already sharded
    (shard_parameters with tp_splits) to their tensor-parallel forms."""
    rank, world = mesh.get_local_rank(), mesh.size()
    group = mesh.get_group()
    args = model.args
    vocab_rows = args.vocab_size // world
    _swap(model.tok_embeddings, VocabParallelEmbedding, tp_group=group, vocab_start=rank * vocab_rows,
          num_embeddings=vocab_rows)
    _swap(model.output, VocabParallelHead, tp_group=group, out_features=vocab_rows)
    for layer in model.layers:
        attn: Attention = layer.attention
        attn.n_heads, attn.n_kv_heads = args.n_heads // world, args.n_kv_heads // world
        _swap(attn.wo, RowParallelLinear, tp_group=group, in_features=attn.wo.weight.shape[1])
        attn.wqkv.out_features = attn.wqkv.weight.shape[0]
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            _swap(ff, TensorParallelMoE, tp_group=group)
        else:
            ff.w13.out_features = ff.w13.weight.shape[0]
            _swap(ff.w2, RowParallelLinear, tp_group=group, in_features=ff.w2.weight.shape[1])
    model.tp_mesh = mesh


def tensor_parallel(model: Transformer, mesh) -> Transformer:
    """Shard `model` in place over the 1-D DeviceMesh `mesh` (every rank
    calls it with the same full model, e.g. built from the same seed) and
    return it. For inference: parameters get requires_grad=False.

    Raises ValueError, on every rank and before any communication, for a mesh
    that is not 1-D or counts that do not divide by the mesh size (the message
    names both). To load a checkpoint without materialising the full model on
    any rank, use `mixkit.models.load(path, mesh=mesh)`.
    """
    rank, world = mesh_rank_world(mesh, "tensor_parallel")
    if not isinstance(model, Transformer):
        raise ValueError(f"tensor_parallel: expects a mixkit.models.Transformer, got {type(model).__name__}")
    if getattr(model, "tp_mesh", None) is not None:
        raise ValueError("tensor_parallel: the model is already tensor-parallel")
    if model.cache_capacity is not None:
        raise ValueError("tensor_parallel: clear the model's KV caches first (clear_caches)")
    shard_parameters(model, tp_splits(model.args, rank, world))
    model.requires_grad_(False)
    convert_modules(model, mesh)
    return model
