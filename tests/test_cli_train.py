"""`mixkit quickstart`, `mixkit train --config` and `mixkit eval` end to end on
tiny settings (the pieces are tested in test_train.py, test_data.py and
test_evaluation.py; here, that the commands wire them together)."""
from __future__ import annotations

import json

import pytest

from mixkit.cli import main
from mixkit.train import ConfigError
from mixkit.train.run import load_run_config, quickstart

DOCS = ["def add(a, b):\n    return a + b\n" * 3, "class A:\n    pass\n" * 5, "import os\nprint(os.sep)\n" * 4] * 6


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _run_file(tmp_path, **extra):
    data = _jsonl(tmp_path / "code.jsonl", DOCS)
    val = _jsonl(tmp_path / "code_val.jsonl", DOCS[:2])
    text = f"""
model_name = "tiny-mistral"
max_steps = 4
warmup_steps = 1
eval_every = 2
precision = "fp32"
{"".join(f"{k} = {v}" + chr(10) for k, v in extra.items())}
[model]
vocab_size = 258
[data]
seq_len = 64
batch_size = 2
out_dir = "{tmp_path / 'run'}"
[data.components.code]
paths = ["{data}"]
weight = 1.0
[data.heldout]
code = ["{val}"]
"""
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    return cfg, val


def test_quickstart_trains_and_reports_bits_per_byte(tmp_path, capsys):
    summary = quickstart(steps=6, device="cpu", out_dir=str(tmp_path), train_bytes=150_000, heldout_bytes=4_000,
                         quiet=True)
    out = capsys.readouterr().out
    assert "bits per byte before training" in out and "sample:" in out
    assert summary["bpb_after"] < summary["bpb_before"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert (tmp_path / "model" / "config.json").exists()


def test_train_then_eval(tmp_path, capsys):
    cfg, val = _run_file(tmp_path)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and "code/bpb" in log[1] and all(r["loss"] > 0 for r in log)
    capsys.readouterr()
    assert main(["eval", "--model", str(run / "model"), "--data", str(val), "--tokenizer", "byte",
                 "--seq-len", "64", "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())["code_val"]
    assert result["bytes"] == sum(len(t.encode()) for t in DOCS[:2]) and result["bits_per_byte"] > 0


def test_ctrl_c_finishes_the_step_and_saves(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from mixkit.train import trainer as trainer_mod
    from mixkit.train.interrupt import EXIT_INTERRUPTED

    cfg, _ = _run_file(tmp_path)
    real = trainer_mod.Trainer.train_step

    def ctrl_c_during_step_3(self, batches):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batches)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", ctrl_c_during_step_3)
    # Python's own handler, as in a terminal (pytest run as a background job starts with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["train", "--config", str(cfg), "--quiet"]) == EXIT_INTERRUPTED
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    finally:
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / "run" / "step_00000003" / "COMPLETE").exists()
    assert "stopped by SIGINT after step 3" in capsys.readouterr().out


def test_run_file_errors(tmp_path):
    cfg, _ = _run_file(tmp_path, no_such_key=1)
    with pytest.raises(ConfigError, match="no_such_key"):
        load_run_config(str(cfg))
    cfg, _ = _run_file(tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        load_run_config(str(cfg), ["data.sequence_length=5"])
    assert main(["train", "--config", str(cfg), "--set", "data.components={}", "--quiet"]) == 2
    assert main(["train", "--config", str(cfg), "--set", "model.vocab_size=100", "--quiet"]) == 2


def test_torchrun_two_ranks_fsdp2(tmp_path):
    """`torchrun -m mixkit train` on two gloo ranks: FSDP2 shards the model,
    rank 0 writes the log and the gathered model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mixkit

    cfg, _ = _run_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mixkit",
           "train", "--config", str(cfg), "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(r["loss"] > 0 for r in log)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
