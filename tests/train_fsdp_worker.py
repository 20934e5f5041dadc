"""FSDP2 worker for tests/test_train_fsdp.py, launched by
`torchrun --nproc_per_node 2 tests/train_fsdp_worker.py OUT.json CKPT_DIR`
on the gloo backend: each rank trains on its share of each step's documents;
rank 0 writes the losses. Then it saves a checkpoint mid-run, rebuilds
everything, loads it and checks that the rest of the run repeats exactly."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from mixkit.models import Transformer
from mixkit.parallel import exit_rank
from mixkit.train import IGNORE_INDEX, Trainer, TrainConfig

STEPS, SAVE_AT, VOCAB = 5, 2, 128
# Per step, each rank's documents; the one-process reference packs all of them.
RANK_DOC_LENGTHS = [[17, 9], [12, 20, 5]]


def config(**kw) -> TrainConfig:
    base = dict(model_name="tiny-llama", model=dict(vocab_size=VOCAB, dim=64, head_dim=32, hidden_dim=96), lr=3e-3,
                warmup_steps=2, max_steps=10, precision="fp32", loss_chunk_size=16)
    return TrainConfig(**{**base, **kw})


def make_model(cfg: TrainConfig | None = None, seed: int = 0) -> Transformer:
    return Transformer((cfg or config()).model_args()).init_weights(seed)


def packed_batch(docs) -> dict:
    ids = torch.cat(docs)[None]
    labels = torch.full_like(ids, IGNORE_INDEX)
    cu = [0]
    for d in docs:
        labels[0, cu[-1]:cu[-1] + len(d) - 1] = d[1:]
        cu.append(cu[-1] + len(d))
    return {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "max_seqlen": max(len(d) for d in docs)}


def step_docs(step: int, rank: int):
    gen = torch.Generator().manual_seed(1000 * (step % 2) + rank)  # two batches, alternating: learnable
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in RANK_DOC_LENGTHS[rank]]


def main(out_path: str, ckpt_dir: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == len(RANK_DOC_LENGTHS)
    cfg = config(activation_checkpointing=True)  # AC inside the FSDP2 blocks: numerically a no-op
    trainer = Trainer(make_model(), cfg)
    assert trainer.fsdp
    losses = []
    for step in range(STEPS):
        if step == SAVE_AT:
            trainer.save(ckpt_dir)
        losses.append(trainer.train_step([packed_batch(step_docs(step, rank))])["loss"])
    del trainer
    torch.manual_seed(7)
    resumed = Trainer(make_model(seed=3), cfg)
    resumed.load(ckpt_dir)
    tail = [resumed.train_step([packed_batch(step_docs(step, rank))])["loss"] for step in range(SAVE_AT, STEPS)]
    # The GPU recipe's other paths, run through on two ranks: bf16 compute, MoE
    # with its load-balancing loss, activation checkpointing, 2 micro-batches.
    moe_cfg = config(model_name="tiny-mixtral", precision="bf16", activation_checkpointing=True, grad_accum=2)
    moe = Trainer(make_model(moe_cfg), moe_cfg)
    moe_losses = [moe.train_step([packed_batch(step_docs(step, rank))] * 2)["loss"] for step in range(3)]
    master_fp32 = all(p.dtype == torch.float32 for p in moe.params)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "resumed": tail, "moe_bf16": moe_losses, "master_fp32": master_fp32}, f)
    exit_rank(0)  # barrier, destroy_process_group, os._exit: see its docstring


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
