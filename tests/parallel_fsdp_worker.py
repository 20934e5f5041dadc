"""Worker for tests/test_parallel_fsdp.py: expert parallelism composed with
FSDP2 through the Trainer (TrainConfig ep = 2) on a 2 x 2 (dp, ep) mesh of
four gloo ranks, launched as
`torchrun --nproc_per_node 4 tests/parallel_fsdp_worker.py OUT.pt CKPT_DIR`.
Each rank trains on its own documents; rank 0 saves the losses, the full
weights after the first step (gathered from the shards), and the losses of
a run resumed from a torch.distributed.checkpoint saved mid-run."""
from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import train_fsdp_worker as base
from mixkit.parallel import exit_rank
from mixkit.train import Trainer

STEPS, SAVE_AT, RANKS = 3, 1, 4
RANK_DOC_LENGTHS = [[17, 9], [12, 20, 5], [8, 14], [23]]


def config():
    # The load-balancing loss is per rank (over its own tokens, averaged over
    # ranks, as in data-parallel training), which one process over all the
    # tokens does not reproduce; the comparison leaves it out.
    return base.config(model_name="tiny-mixtral", ep=2, moe_aux_loss_coef=0.0)


def step_docs(step: int, rank: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randint(0, base.VOCAB, (n,), generator=gen) for n in RANK_DOC_LENGTHS[rank]]


def main(out_path: str, ckpt_dir: str):
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank = dist.get_rank()
    assert dist.get_world_size() == RANKS
    cfg = config()
    trainer = Trainer(base.make_model(cfg), cfg)
    losses, norms, weights = [], [], None
    for step in range(STEPS):
        if step == SAVE_AT:
            trainer.save(ckpt_dir)
        metrics = trainer.train_step([base.packed_batch(step_docs(step, rank))])
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
        if step == 0:
            weights = trainer.model_state_dict()
    local_experts = trainer.model.layers[0].feed_forward.w13.to_local().shape[0]
    resumed = Trainer(base.make_model(cfg, seed=3), cfg)
    resumed.load(ckpt_dir)
    tail = [resumed.train_step([base.packed_batch(step_docs(step, rank))])["loss"] for step in range(SAVE_AT, STEPS)]
    # Activation checkpointing recomputes each block, its all-to-alls included, in the backward: same losses.
    ac_cfg = cfg.replace(activation_checkpointing=True)
    ac = Trainer(base.make_model(ac_cfg), ac_cfg)
    ac_metrics = [ac.train_step([base.packed_batch(step_docs(step, rank))]) for step in range(2)]
    if rank == 0:
        torch.save({"losses": losses, "norms": norms, "weights": weights, "resumed": tail,
                    "local_experts": local_experts, "ac_losses": [m["loss"] for m in ac_metrics],
                    "ac_norms": [m["grad_norm"] for m in ac_metrics]}, out_path)
    exit_rank(0)  # barrier, destroy_process_group, os._exit: see its docstring


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
