"""A training run of each newer family through `mixkit train` (the run file
names the family's tiny config), and FSDP2 on two gloo ranks against one
process for the MoE families (their router, aux loss and expert biases
included).

`mixkit train` writes a Hugging Face directory of the family; transformers'
AutoModelForCausalLM reads it back and gives the trained model's logits
(float32, 5e-5: the two implementations' summation orders; the family
tests in test_model_families.py explain the budget).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from mixkit.cli import main
from mixkit.models import load
from mixkit.train import Trainer, TrainConfig

from test_cli_train import DOCS, _jsonl

FAMILIES = ["olmo2", "olmoe", "qwen3-moe", "ministral", "gemma2", "gemma3", "gpt-oss"]
MOE_COEF = {"olmoe": 0.01, "gpt-oss": 0.01, "qwen3-moe": 0.02}  # OLMoE's 0.01; others: tiny configs' / default


def _run_file(tmp_path, family):
    data = _jsonl(tmp_path / "code.jsonl", DOCS)
    text = f"""
model_name = "tiny-{family}"
max_steps = 2
warmup_steps = 1
precision = "fp32"
[model]
vocab_size = 258
[data]
seq_len = 48
batch_size = 2
out_dir = "{tmp_path / 'run'}"
[data.components.code]
paths = ["{data}"]
weight = 1.0
"""
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_mixkit_train_runs_each_family(family, tmp_path, capsys):
    assert main(["train", "--config", str(_run_file(tmp_path, family)), "--quiet"]) == 0
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    if family in MOE_COEF:
        assert all(r["aux_loss"] > 0 for r in log), log
    else:
        assert "aux_loss" not in log[0]
    model = load(run / "model")
    assert model.args.family == {"qwen3-moe": "qwen3_moe", "gpt-oss": "gpt_oss", "gemma3": "gemma3_text"}.get(
        family, family)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "model", attn_implementation="eager").eval()
    if getattr(hf.config, "_experts_implementation", None) is not None:
        hf.set_experts_implementation("eager")
    tokens = torch.randint(0, 258, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=5e-5, rtol=0)


def test_family_aux_loss_coefficient():
    """The run's weight of the load-balancing loss: the family's (OLMoE
    0.01, read from its config's router_aux_loss_coef), unless the run file
    sets one."""
    assert TrainConfig(model_name="tiny-olmoe").aux_loss_coef() == 0.01
    assert TrainConfig(model_name="tiny-mixtral").aux_loss_coef() == 0.02
    assert TrainConfig(model_name="tiny-olmoe", moe_aux_loss_coef=0.0).aux_loss_coef() == 0.0
    cfg = TrainConfig(model_name="tiny-olmoe", precision="fp32", loss_chunk_size=16)
    args = cfg.model_args()
    from mixkit.models import Transformer
    model = Transformer(args).init_weights(0, std=0.1)
    trainer = Trainer(model, cfg)
    assert trainer.aux_coef == 0.01
    ids = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    labels[0, -1] = -100
    m = trainer.train_step([{"input_ids": ids, "labels": labels}])
    assert m["aux_loss"] > 0


def test_fsdp2_two_ranks_match_one_process_for_new_families(tmp_path):
    """OLMoE, gpt-oss and Gemma 2 on two gloo ranks (torchrun) against one process
    that takes the two ranks' batches as two micro-batches: the same
    losses and aux losses (rtol 1e-5, test_train_fsdp.py's bound and reason)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch.distributed as dist
    import mixkit
    import train_fsdp_families_worker as worker
    from train_fsdp_worker import make_model, packed_batch

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    here = Path(__file__).parent
    out = tmp_path / "losses.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), str(here),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(here / "train_fsdp_families_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for name in worker.FAMILIES:
        cfg = worker.family_config(name).replace(grad_accum=2)
        trainer = Trainer(make_model(cfg), cfg)
        ref = []
        for step in range(worker.STEPS):
            m = trainer.train_step([packed_batch(worker.step_docs(step, r)) for r in (0, 1)])
            ref.append((m["loss"], m.get("aux_loss", 0.0)))
        torch.testing.assert_close(torch.tensor(result[name]), torch.tensor(ref), rtol=1e-5, atol=0, msg=name)
