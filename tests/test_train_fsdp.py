"""FSDP2 training on two CPU ranks (gloo, torchrun) against one process.

Each rank trains on its share of every step's documents; the reference is
one process training on all of them packed into one row. The losses agree
to rtol 1e-5: both runs do the same float32 math, but the gradients are
summed in another order (per rank, then a float32 reduce-scatter, against
one sum) and the matmuls have other shapes, so the weights differ by float32
rounding after the first update, and AdamW's g / sqrt(v) passes such
differences on at full relative size rather than damping them. Measured:
identical losses for three steps, 1.1e-7 relative at step four (one ulp);
the bound leaves room for longer BLAS reductions elsewhere. Resume from a
torch.distributed.checkpoint saved mid-run is exact (==). The worker also
runs tiny-mixtral in bf16 with activation checkpointing and accumulation on
two ranks (finite losses, float32 master weights).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mixkit
import train_fsdp_worker as worker
from mixkit.train import Trainer

HERE = Path(__file__).parent


def _gloo_unavailable() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    return None


@pytest.mark.skipif(_gloo_unavailable() is not None, reason=str(_gloo_unavailable()))
def test_fsdp2_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "losses.json"
    # The workers import the mixkit this test imported (a source tree with its
    # built _core, or an installed wheel), not whatever python/ holds.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "train_fsdp_worker.py"), str(out), str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())

    trainer = Trainer(worker.make_model(), worker.config())
    reference = [trainer.train_step([worker.packed_batch(worker.step_docs(s, 0) + worker.step_docs(s, 1))])["loss"]
                 for s in range(worker.STEPS)]
    torch.testing.assert_close(result["losses"], reference, rtol=1e-5, atol=0)
    assert reference[-1] < reference[0]
    assert result["resumed"] == result["losses"][worker.SAVE_AT:]
    assert result["master_fp32"] and all(math.isfinite(x) for x in result["moe_bf16"])
