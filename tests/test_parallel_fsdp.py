"""Expert parallelism under FSDP2 on a 2 x 2 (data x expert) mesh of four
CPU ranks (gloo, torchrun), through the Trainer, against one process
training on all four ranks' documents packed into one row.

The four processes cost about 25 s on a 2-core machine (mostly four torch
imports), which the CI budget allows, so the test uses the real 2 x 2 mesh:
experts split over ep and their shards over dp, everything else sharded over
all four ranks. After one step the weights equal the single-process ones to
1e-6 (float32 sums in another order: per-rank partial gradients, reduced
after; AdamW's first step divides g by |g|, so it passes rounding on at full
relative size); the losses of three steps agree to rtol 1e-5 as in
test_train_fsdp.py. A run resumed from a torch.distributed.checkpoint saved
mid-run repeats the rest exactly, so the sharded experts are saved and
restored per shard. With activation checkpointing (each block, all-to-alls
included, recomputed in the backward) the losses stay the same.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mixkit
import parallel_fsdp_worker as worker
import train_fsdp_worker as base
from mixkit.train import Trainer

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available in this torch build")
def test_expert_parallel_with_fsdp2_on_a_2x2_mesh_matches_one_process(tmp_path):
    out = tmp_path / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(worker.RANKS),
           str(HERE / "parallel_fsdp_worker.py"), str(out), str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    got = torch.load(out, weights_only=False)

    cfg = worker.config().replace(ep=1)
    trainer = Trainer(base.make_model(cfg), cfg)
    losses, norms = [], []
    for step in range(worker.STEPS):
        docs = [d for rank in range(worker.RANKS) for d in worker.step_docs(step, rank)]
        metrics = trainer.train_step([base.packed_batch(docs)])
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
        if step == 0:
            want = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert got["local_experts"] == 1  # 4 experts: 2 per ep rank, split again over dp
    assert sorted(got["weights"]) == sorted(want)
    for k in want:
        torch.testing.assert_close(got["weights"][k], want[k], atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=0)
    # the gradient norm spans the experts (on the dp x ep mesh) and the rest: both scaled right
    torch.testing.assert_close(got["norms"], norms, rtol=1e-5, atol=0)
    assert got["resumed"] == got["losses"][worker.SAVE_AT:]
    torch.testing.assert_close(got["ac_losses"], got["losses"][:2], rtol=1e-6, atol=0)
    torch.testing.assert_close(got["ac_norms"], got["norms"][:2], rtol=1e-6, atol=0)
