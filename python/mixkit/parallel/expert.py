"""Expert parallelism for Mixtral's MoE layers, and its composition with FSDP2.

Rank r of an EP group of N holds experts [r E/N, (r+1) E/N) (their `w13`
and `w2` are DTensors sharded on dim 0 of the expert mesh, so checkpoints
and full state dicts see the whole expert stack). Every rank routes its own
tokens with the replicated router, then:

1. `moe_permute` groups the (token, slot) rows by global expert, so the rows
   for rank r's experts are one contiguous block;
2. the per-expert row counts are exchanged with one `all_to_all_single`,
   and their per-rank sums become the split sizes (the one host sync of the
   layer: all_to_all_single takes the sizes on the host);
3. the rows travel with the functional `all_to_all_single_autograd`, so
   autograd sends the gradients back the reverse way, are regrouped by
   local expert (a stable sort: within an expert, by source rank) and go
   through the two grouped GEMMs;
4. the outputs return with the reverse all-to-all and `moe_unpermute`
   combines each token's k rows with its router weights.

With FSDP2 on a 2-D (dp, ep) mesh (torchtitan's layout): the experts are
fully_shard-ed over the dp dimension and everything else (the router, the
attention, norms, embedding and head) over all dp x ep ranks, since those
see different tokens on every rank. Each rank's expert gradient sums the
contributions of every token of its ep group, so it is scaled by 1 / ep
before FSDP's average over dp: every gradient is then averaged over dp x ep.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models.model import MoE, Transformer
from .layout import ep_splits
from .tensor import mesh_rank_world, shard_parameters


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


def _all_to_all(x, out_splits, in_splits, group):
    """Rows of x to the ranks by in_splits, rows from them by out_splits; its
    backward is the reverse all-to-all of the gradient."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


class ExpertParallelMoE(MoE):
    """MoE whose `w13`/`w2` hold this rank's experts; see the module docstring."""
    ep_group = None
    ep_size = 1
    expert_grad_scale = 1.0  # fully_shard_ep: 1 / ep (see there)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights, expert_ids = ops.moe_route(router_logits, self.top_k, renormalize=self.renormalize)
        if self.keep_router_logits:
            self.router_logits = (router_logits, expert_ids)
        x_perm, offsets, row_map = ops.moe_permute(x, expert_ids, self.num_experts)
        n, group = self.ep_size, self.ep_group
        local = self.num_experts // n
        counts = offsets[1:] - offsets[:-1]  # rows per global expert, from this rank
        recv_counts = torch.empty_like(counts)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, counts, group=group)
        sizes = torch.cat([counts.view(n, local).sum(1), recv_counts.view(n, local).sum(1)]).tolist()
        send, recv = sizes[:n], sizes[n:]
        x_recv = _all_to_all(x_perm, recv, send, group)
        # Received rows come grouped by source rank, then local expert; the
        # grouped GEMM wants them by local expert.
        segment = torch.repeat_interleave(torch.arange(n * local, device=x.device), recv_counts)
        order = torch.argsort(segment % local, stable=True)
        local_offsets = F.pad(recv_counts.view(n, local).sum(0).cumsum(0), (1, 0))
        w13, w2 = _local(self.w13), _local(self.w2)
        if self.expert_grad_scale != 1.0 and torch.is_grad_enabled() and w13.requires_grad:
            w13.register_hook(lambda g: g * self.expert_grad_scale)
            w2.register_hook(lambda g: g * self.expert_grad_scale)
        h = ops.grouped_gemm(x_recv[order], w13, local_offsets, trans_b=True)
        gate, up = h.chunk(2, dim=-1)
        y_sorted = ops.grouped_gemm(F.silu(gate) * up, w2, local_offsets, trans_b=True)
        y_recv = y_sorted[torch.argsort(order)]
        y_rows = _all_to_all(y_recv, send, recv, group)
        return ops.moe_unpermute(y_rows, row_map, weights).view(shape)


def _ep_mesh(mesh, op):
    """The 1-D expert mesh: `mesh` itself, or mesh["ep"] of a 2-D (dp, ep) mesh."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(mesh, DeviceMesh) and mesh.ndim == 2:
        if "ep" not in (mesh.mesh_dim_names or ()):
            raise ValueError(f"{op}: a 2-D mesh needs a dimension named 'ep' (e.g. mesh_dim_names=('dp', 'ep')), "
                             f"got names {mesh.mesh_dim_names}")
        return mesh["ep"]
    mesh_rank_world(mesh, op)
    return mesh


def convert_modules(model: Transformer, ep_mesh) -> Transformer:
    """Switch the MoE layers of a model whose expert weights are already this
    rank's (shard_parameters with ep_splits) to ExpertParallelMoE, the expert
    weights to DTensors sharded over `ep_mesh`."""
    from torch.distributed.tensor import DTensor, Shard

    for layer in model.layers:
        moe = layer.feed_forward
        moe.__class__ = ExpertParallelMoE
        moe.ep_group, moe.ep_size = ep_mesh.get_group(), ep_mesh.size()
        for name in ("w13", "w2"):
            p = getattr(moe, name)
            setattr(moe, name, nn.Parameter(DTensor.from_local(p.data, ep_mesh, [Shard(0)], run_check=False),
                                            requires_grad=p.requires_grad))
    model.ep_mesh = ep_mesh
    return model


def expert_parallel(model: Transformer, mesh) -> Transformer:
    """Split the experts of every MoE layer of `model` over the expert mesh
    (a 1-D DeviceMesh, or a 2-D one with an 'ep' dimension), in place; every
    rank calls it with the same full model. Differentiable. Raises
    ValueError on every rank, before any communication, for a bad mesh or
    an expert count that does not divide by the mesh size."""
    ep_mesh = _ep_mesh(mesh, "expert_parallel")
    if not isinstance(model, Transformer):
        raise ValueError(f"expert_parallel: expects a mixkit.models.Transformer, got {type(model).__name__}")
    if getattr(model, "ep_mesh", None) is not None:
        raise ValueError("expert_parallel: the model is already expert-parallel")
    shard_parameters(model, ep_splits(model.args, ep_mesh.get_local_rank(), ep_mesh.size()))
    return convert_modules(model, ep_mesh)


def fully_shard_ep(root: nn.Module, model: Transformer, mesh, precision: str = "bf16") -> nn.Module:
    """FSDP2 over an expert-parallel model on the 2-D (dp, ep) `mesh` (the
    one passed to expert_parallel): experts over dp, the rest over all
    ranks; `root` is the module whose forward the trainer calls (the model
    or a loss wrapper holding it). bf16 or float32 compute, float32
    gradient reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if getattr(model, "ep_mesh", None) is None:
        raise ValueError("fully_shard_ep: call expert_parallel(model, mesh) first")
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != ("dp", "ep"):
        raise ValueError(f"fully_shard_ep: needs a 2-D mesh named ('dp', 'ep'), got shape {tuple(mesh.shape)} "
                         f"and names {mesh.mesh_dim_names}")
    everyone = init_device_mesh(mesh.device_type, (mesh.size(),))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        moe = block.feed_forward
        fully_shard(moe.gate, mesh=everyone, mp_policy=mp)
        fully_shard(moe, mesh=mesh["dp"], mp_policy=mp)
        # FSDP divides the expert gradients by dp; they need dp x ep. Not
        # set_gradient_divide_factor: that is a PREMUL_SUM reduction, which
        # gloo lacks. 1 / ep is exact for powers of two.
        moe.expert_grad_scale = 1.0 / mesh["ep"].size()
        fully_shard(block, mesh=everyone, mp_policy=mp)
    fully_shard(root, mesh=everyone, mp_policy=mp)
    return root


def shard_for_training(root: nn.Module, model: Transformer, ep: int, precision: str = "bf16") -> nn.Module:
    """The trainer's EP x FSDP2 setup over all ranks: a (world / ep, ep) mesh
    named ('dp', 'ep'), expert_parallel over 'ep', fully_shard_ep. ValueError
    (on every rank, before any communication) unless ep divides the rank
    count and the expert count."""
    from torch.distributed.device_mesh import init_device_mesh

    from .layout import check_ep

    world = dist.get_world_size()
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1 or world % ep:
        raise ValueError(f"ep = {ep!r} must be a positive divisor of the number of ranks {world}")
    check_ep(model.args, ep)
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    expert_parallel(model, mesh)
    return fully_shard_ep(root, model, mesh, precision)
