"""`mixkit train` survives interruption: SIGINT, SIGTERM, kill -9 during a
checkpoint write, two interruptions, and SIGTERM to one rank or to torchrun
with two gloo ranks. Each interrupted run, rerun with the same command, must end with the
uninterrupted run's weights and per-step losses bit for bit (CPU), with every
step in log.jsonl exactly once. The subprocesses start in their own process
group, as a job under a shell or a scheduler does, so that signals reach them.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mixkit
from mixkit.cli import main
from mixkit.train import ConfigError
from mixkit.train.checkpoint import MARKER, scan, truncate_log
from mixkit.train.interrupt import EXIT_INTERRUPTED, GracefulStop
from mixkit.train.run import train

STEPS = 20
WORDS = "def class return import self value print for while if else None True lambda yield".split()


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 150))) for _ in range(60)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _run_file(tmp: Path, name: str = "run", **extra) -> Path:
    """A tiny Mistral (2 layers, dim 64) on a 60-document corpus; fp32 on the CPU."""
    data = tmp / "code.jsonl"
    if not data.exists():
        _corpus(data)
    settings = {"max_steps": STEPS, "checkpoint_every": 5, **extra}
    text = f"""
model_name = "tiny-mistral"
warmup_steps = 2
precision = "fp32"
loss_chunk_size = 256
{"".join(f"{k} = {v}" + chr(10) for k, v in settings.items())}
[model]
vocab_size = 258
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
head_dim = 16
hidden_dim = 128
[data]
seq_len = 128
batch_size = 4
out_dir = "{tmp / name}"
[data.components.code]
paths = ["{data}"]
weight = 1.0
"""
    cfg = tmp / f"{name}.toml"
    cfg.write_text(text)
    return cfg


def _env() -> dict:
    # The subprocesses import the mixkit this test imported; one thread makes
    # each step slow enough to be caught mid-run and leaves the other core free.
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))


def _sigint_as_in_a_terminal() -> None:
    # A child inherits an ignored SIGINT (pytest run as a background job),
    # and mixkit leaves an ignored signal ignored; a terminal's command has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)


def _train_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mixkit", "train", "--config", str(cfg), "--device", "cpu", "--quiet", *extra]


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def _logged_step(log: Path) -> int:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
    return max(steps, default=0)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _interrupt(cmd: list[str], log: Path, step: int, sig: int) -> str:
    """Start the run, send `sig` to its process group once step `step` is
    logged; it must stop cleanly. Returns its stdout."""
    proc = _launch(cmd)
    _wait_for(lambda: _logged_step(log) >= step, proc, f"step {step}")
    os.killpg(proc.pid, sig)
    rc, out, err = _finish(proc)
    assert rc == EXIT_INTERRUPTED, f"rc {rc} after {signal.Signals(sig).name} at step {step}:\n{out}\n{err[-3000:]}"
    return out


def _result(run_dir: Path) -> tuple[list[int], list[float], dict]:
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows], load_file(run_dir / "model" / "model.safetensors")


def _result_steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "log.jsonl").read_text().splitlines()]


def _assert_same_run(run_dir: Path, reference: tuple, context: str) -> None:
    steps, losses, weights = _result(run_dir)
    ref_steps, ref_losses, ref_weights = reference
    assert steps == ref_steps, f"{context}: logged steps {steps}"
    assert losses == ref_losses, f"{context}: per-step losses differ"
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        assert torch.equal(weights[k], ref_weights[k]), f"{context}: {k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    rc, out, err = _finish(_launch(_train_cmd(_run_file(tmp))))
    assert rc == 0, out + err
    result = _result(tmp / "run")
    assert result[0] == list(range(1, STEPS + 1))
    return result


def _stopped_after(out: str, name: str) -> int:
    return int(out.split(f"stopped by {name} after step ")[1].split(":")[0])


@pytest.mark.slow
def test_sigint_then_sigterm_then_rerun_matches_uninterrupted_run(tmp_path, reference):
    """Ctrl-C at a random step, rerun; SIGTERM (a preempted job) at a later
    random step, rerun: the weights and the losses are the uninterrupted
    run's. Two launches fewer than testing each signal on its own."""
    cfg = _run_file(tmp_path)
    run = tmp_path / "run"
    first = random.randint(2, STEPS // 4)
    out = _interrupt(_train_cmd(cfg), run / "log.jsonl", first, signal.SIGINT)
    stopped = _stopped_after(out, "SIGINT")
    assert stopped < STEPS and (run / f"step_{stopped:08d}" / MARKER).exists()
    assert _result_steps(run) == list(range(1, stopped + 1))

    second = random.randint(stopped + 2, max(stopped + 2, 2 * STEPS // 3))
    out = _interrupt(_train_cmd(cfg), run / "log.jsonl", second, signal.SIGTERM)
    assert f"resuming from {run / f'step_{stopped:08d}'} (step {stopped}" in out
    stopped_again = _stopped_after(out, "SIGTERM")
    assert _result_steps(run) == list(range(1, stopped_again + 1))

    rc, out, err = _finish(_launch(_train_cmd(cfg)))
    assert rc == 0, out + err
    assert f"resuming from {run / f'step_{stopped_again:08d}'} (step {stopped_again}" in out
    _assert_same_run(run, reference, f"SIGINT at step {first} (stopped after {stopped}), SIGTERM at step {second} "
                                     f"(stopped after {stopped_again})")


# Runs `mixkit train`, stalling inside the third checkpoint save (step 15)
# once every rank's shards are written but before the completion marker, so
# that the test can kill -9 it there.
_STALL_IN_SAVE = """
import sys, time
from pathlib import Path
from mixkit.train.trainer import Trainer
from mixkit.cli import main
real = Trainer.save
def save(self, path):
    real(self, path)
    if self.step == 15:
        Path(sys.argv[1]).touch()
        time.sleep(600)
Trainer.save = save
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write(tmp_path, reference):
    cfg = _run_file(tmp_path)
    run = tmp_path / "run"
    ready = tmp_path / "stalled"
    proc = _launch([sys.executable, "-c", _STALL_IN_SAVE, str(ready)] + _train_cmd(cfg)[3:])
    _wait_for(ready.exists, proc, "the step-15 save")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    partial = run / "step_00000015.partial"
    assert partial.is_dir() and (partial / ".metadata").exists() and not (run / "step_00000015").exists()
    rc, out, err = _finish(_launch(_train_cmd(cfg)))
    assert rc == 0, out + err
    assert f"skipping partial checkpoint {partial}" in err
    assert f"resuming from {run / 'step_00000010'} (step 10" in out
    assert not partial.exists()  # removed by the next complete save
    _assert_same_run(run, reference, "kill -9 in the step-15 save")


def _worker_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of that rank (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    raise AssertionError(f"no rank-{rank} worker under {launcher}")


def _two_ranks_stopped(run: Path, steps: int) -> int:
    """Both ranks stopped after the same step: one complete checkpoint holding
    both shards, nothing partial, each step logged once. Returns the step."""
    complete, partial = scan(run)
    assert complete and not partial
    stopped = complete[-1].step
    assert stopped < steps and complete[-1].meta["reason"] in ("SIGTERM", "periodic")
    assert sorted(p.name for p in complete[-1].path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert _result_steps(run) == list(range(1, stopped + 1))
    return stopped


@pytest.mark.slow
def test_torchrun_two_ranks_stop_together(tmp_path):
    """Two gloo ranks under torchrun. SIGTERM to rank 1 alone: both ranks
    stop after the same step and save (no deadlock); rerun; SIGTERM to the
    launcher (what a scheduler sends), which passes it on; rerun: the run
    ends like the uninterrupted two-rank run. Then one process resumes the
    finished run from its two-rank checkpoint."""
    steps = 12

    def cmd(cfg):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "mixkit", "train", "--config", str(cfg), "--device", "cpu", "--quiet"]

    rc, out, err = _finish(_launch(cmd(_run_file(tmp_path, "ref", max_steps=steps, checkpoint_every=4))))
    assert rc == 0, out[-3000:] + err[-3000:]
    reference = _result(tmp_path / "ref")
    assert reference[0] == list(range(1, steps + 1))

    cfg = _run_file(tmp_path, "run", max_steps=steps, checkpoint_every=4)
    run = tmp_path / "run"
    proc = _launch(cmd(cfg))
    first = random.randint(2, steps // 3)
    _wait_for(lambda: _logged_step(run / "log.jsonl") >= first, proc, f"step {first}")
    os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
    _finish(proc)  # torchrun exits with its own code once its workers have
    stopped = _two_ranks_stopped(run, steps)

    proc = _launch(cmd(cfg))
    second = random.randint(stopped + 2, max(stopped + 2, 2 * steps // 3))
    _wait_for(lambda: _logged_step(run / "log.jsonl") >= second, proc, f"step {second}")
    proc.send_signal(signal.SIGTERM)  # the launcher only
    _finish(proc)
    stopped_again = _two_ranks_stopped(run, steps)
    assert stopped_again > stopped

    rc, out, err = _finish(_launch(cmd(cfg)))
    assert rc == 0, out[-3000:] + err[-3000:]
    assert f"(step {stopped_again}" in out
    _assert_same_run(run, reference, f"SIGTERM to rank 1 at step {first} (stopped after {stopped}), to torchrun at "
                                     f"step {second} (stopped after {stopped_again})")
    # DCP reshards the two-rank checkpoint for one process; no step is left
    # to take, and the model it writes again is the two ranks' bit for bit.
    rc, out, err = _finish(_launch(_train_cmd(cfg)))
    assert rc == 0, out + err
    assert "saved by 2 rank(s) and this run has 1: torch.distributed.checkpoint resharded" in out
    _assert_same_run(run, reference, "one process resuming the finished two-rank run")


# ---- in-process: the rule's edges ----------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    # These tiny steps are far faster on one thread, above all on a shared, loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quick(tmp_path: Path, **extra) -> Path:
    return _run_file(tmp_path, **{"max_steps": 4, "checkpoint_every": 0, **extra})


def test_incompatible_config_raises(tmp_path, capsys, one_thread):
    cfg = _quick(tmp_path)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    with pytest.raises(ConfigError, match=r"model.n_layers is 2 in the checkpoint but 3 now.*--resume never"):
        train(str(cfg), ["model.n_layers=3"], quiet=True)
    with pytest.raises(ConfigError, match="data seq_len is 128 in the checkpoint but 64 now"):
        train(str(cfg), ["data.seq_len=64"], quiet=True)
    with pytest.raises(ConfigError, match="the mixture weights are"):
        train(str(cfg), ["data.components={code = {paths = [\"%s\"], weight = 1.0}, more = {paths = [\"%s\"], "
                         "weight = 1.0}}" % (tmp_path / "code.jsonl", tmp_path / "code.jsonl")], quiet=True)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--quiet", "--set", "model.dim=32"]) == 2
    assert "cannot resume from" in capsys.readouterr().err
    # max_steps may grow: the finished run continues from its end checkpoint
    assert main(["train", "--config", str(cfg), "--quiet", "--set", "max_steps=5"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert _result(tmp_path / "run")[0] == [1, 2, 3, 4, 5]


def test_keep_last_and_resume_never(tmp_path, capsys, one_thread):
    cfg = _quick(tmp_path, max_steps=7, checkpoint_every=1, keep_last=2)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    complete, partial = scan(tmp_path / "run")
    assert [c.step for c in complete] == [6, 7] and not partial
    assert {c.meta["reason"] for c in complete} == {"periodic"}
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--quiet", "--resume", "never", "--set", "max_steps=3"]) == 0
    assert "starting fresh (--resume never): removed 2 earlier checkpoint(s)" in capsys.readouterr().out
    assert [c.step for c in scan(tmp_path / "run")[0]] == [2, 3]
    assert _result(tmp_path / "run")[0] == [1, 2, 3]


def test_resume_from_a_path(tmp_path, capsys, one_thread):
    """--resume PATH continues from an older checkpoint: later checkpoints
    and log rows are dropped, and the steps after it come out the same."""
    cfg = _quick(tmp_path, checkpoint_every=1, keep_last=0)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    first = _result(tmp_path / "run")
    capsys.readouterr()
    step_2 = str(tmp_path / "run" / "step_00000002")
    assert main(["train", "--config", str(cfg), "--quiet", "--resume", step_2, "--set", "model.hidden_dim=96"]) == 2
    assert len(scan(tmp_path / "run")[0]) == 4  # an incompatible PATH removes nothing
    assert main(["train", "--config", str(cfg), "--quiet", "--resume", step_2]) == 0
    assert "removed 2 checkpoint(s) past step 2" in capsys.readouterr().out
    steps, losses, weights = _result(tmp_path / "run")
    assert steps == [1, 2, 3, 4] and losses == first[1]
    assert all(torch.equal(weights[k], first[2][k]) for k in weights)
    assert main(["train", "--config", str(cfg), "--quiet", "--resume", str(tmp_path / "nowhere")]) == 2


def test_checkpoint_without_marker_is_skipped(tmp_path, capsys, one_thread):
    """A step directory without COMPLETE (a save cut short on a filesystem
    without atomic renames) is passed over with a warning."""
    cfg = _quick(tmp_path, max_steps=2, checkpoint_every=1, keep_last=0)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    (tmp_path / "run" / "step_00000002" / MARKER).unlink()
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"skipping partial checkpoint {tmp_path / 'run' / 'step_00000002'}" in err
    assert "resuming from" in out and "step_00000001 (step 1" in out
    assert _result(tmp_path / "run")[0] == [1, 2]


def test_log_keeps_each_step_once(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 2, 3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # a row cut short
    kept = truncate_log(log, 3)
    assert [r["step"] for r in kept] == [1, 2, 3]
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    assert truncate_log(log, 0) == [] and log.read_text() == ""


@pytest.fixture
def terminal_sigint():
    """Python's own SIGINT handler for the test, as in a terminal."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_second_signal_exits_at_once(monkeypatch, terminal_sigint):
    from mixkit.train import interrupt

    exits = []
    monkeypatch.setattr(interrupt.os, "_exit", lambda code: exits.append(code))
    with GracefulStop(under_torchrun=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM and not exits
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    # under torchrun a repeat within a second is one request arriving twice (from the scheduler and torchrun)
    exits.clear()
    with GracefulStop(under_torchrun=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == signal.SIGINT and not exits
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_signal_stays_ignored(terminal_sigint):
    """nohup, or a background job's SIGINT: what the process was started to
    ignore, GracefulStop leaves ignored (as Python does); SIGTERM still stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with GracefulStop(under_torchrun=False) as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_checkpoint_every_needs_a_directory():
    """Trainer used as a library: checkpoint_every without checkpoint_dir used
    to save nothing, silently (mixkit train defaults the directory to the run's)."""
    from mixkit.models import Transformer
    from mixkit.train import Trainer, TrainConfig

    cfg = TrainConfig(model_name="tiny-llama", model=dict(vocab_size=64, dim=32, head_dim=16, hidden_dim=48, n_layers=1),
                      max_steps=2, warmup_steps=1, precision="fp32", checkpoint_every=1)
    trainer = Trainer(Transformer(cfg.model_args()).init_weights(0), cfg, data=iter([]))
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint_dir"):
        trainer.fit()
    with pytest.raises(ConfigError, match="keep_last"):
        TrainConfig(keep_last=-1)
