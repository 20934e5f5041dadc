"""FSDP2 worker for tests/test_train_families.py, launched by
`torchrun --nproc_per_node 2 tests/train_fsdp_families_worker.py OUT.json`
on the gloo backend: the MoE families (OLMoE: no renormalisation, q/k norms;
gpt-oss: router and expert biases, sinks, the clamped SwiGLU) and Gemma 2
(tied embeddings, sandwich (1 + w) norms, softcaps) train 3 steps, each rank
on its share of the documents; rank 0 writes the losses."""
from __future__ import annotations

import json
import sys

import torch.distributed as dist

from mixkit.parallel import exit_rank
from mixkit.train import Trainer
from train_fsdp_worker import config, make_model, packed_batch

FAMILIES = ("tiny-olmoe", "tiny-gpt-oss", "tiny-gemma2")
STEPS = 3
# Equal token counts per rank, so that each rank's aux loss weighs the same
# in FSDP's gradient average as in one process's token-weighted mean over
# micro-batches.
RANK_DOC_LENGTHS = [[17, 9], [12, 9, 5]]


def step_docs(step: int, rank: int):
    import torch
    gen = torch.Generator().manual_seed(1000 * (step % 2) + rank)
    return [torch.randint(0, 128, (n,), generator=gen) for n in RANK_DOC_LENGTHS[rank]]


def family_config(name):
    return config(model_name=name, model=dict(vocab_size=128, dim=64, head_dim=32, hidden_dim=96))


def main(out_path: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    losses = {}
    for name in FAMILIES:
        cfg = family_config(name)
        trainer = Trainer(make_model(cfg), cfg)
        assert trainer.fsdp
        losses[name] = [trainer.train_step([packed_batch(step_docs(step, rank))]) for step in range(STEPS)]
        losses[name] = [(m["loss"], m.get("aux_loss", 0.0)) for m in losses[name]]  # Gemma 2: no aux loss
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(losses, f)
    exit_rank(0)  # barrier, destroy_process_group, os._exit: see its docstring


if __name__ == "__main__":
    main(sys.argv[1])
