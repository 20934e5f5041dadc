"""Crash-safe run checkpoints and the one resume rule.

A checkpoint is a directory `<checkpoint_dir>/step_00000120/` holding a
torch.distributed.checkpoint of the Trainer's state (every rank's shards plus
`.metadata`), `run.json` (what it was saved from: the step, the world size,
the model and data-mixture settings, why it was saved) and an empty
`COMPLETE` marker. It is written as `step_00000120.partial/`; rank 0 adds
run.json and the marker once every rank's files are on disk (DCP fsyncs
them), then renames the directory. A save cut short by `kill -9`, a crash or
a full disk therefore leaves a `.partial` directory (or, on a filesystem
without atomic renames, a step directory without the marker): resuming skips
it with a warning and takes the one before.

Resume rule (`mixkit train --resume auto`, the default): continue from the
newest complete checkpoint in checkpoint_dir, however it was saved
(periodic, Ctrl-C, SIGTERM or at the end of the run). `never` starts over and
removes the old checkpoints; a path resumes from that checkpoint and drops
the directory's checkpoints past its step (they belong to the abandoned
continuation, as do log rows past it). A checkpoint whose model or data
mixture differs from the run's configuration raises ConfigError. One saved
by another number of ranks is resharded by torch.distributed.checkpoint,
and a MixtureLoader continues at the first global batch not yet consumed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from .config import ConfigError

PREFIX = "step_"
PARTIAL = ".partial"
MARKER = "COMPLETE"
META = "run.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict


def _step_of(name: str) -> int | None:
    digits = name[len(PREFIX):].removesuffix(PARTIAL)
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def scan(directory: str | Path) -> tuple[list[Checkpoint], list[Path]]:
    """(complete checkpoints, oldest first; partial ones) in directory."""
    directory = Path(directory)
    complete, partial = [], []
    if not directory.is_dir():
        return complete, partial
    for p in directory.iterdir():
        step = _step_of(p.name)
        if step is None or not p.is_dir():
            continue
        meta = None
        if not p.name.endswith(PARTIAL) and (p / MARKER).exists():
            try:
                meta = json.loads((p / META).read_text())
            except (OSError, ValueError):
                meta = None
        if meta is None:
            partial.append(p)
        else:
            complete.append(Checkpoint(p, step, meta))
    complete.sort(key=lambda c: c.step)
    partial.sort(key=lambda p: _step_of(p.name))
    return complete, partial


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A complete checkpoint directory given by the user (--resume PATH)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint directory")
    if not (p / MARKER).exists() or not (p / META).exists():
        raise ConfigError(f"--resume {path}: not a complete checkpoint (no {MARKER} marker or {META}: it was cut "
                          "short, or is not a mixkit run checkpoint)")
    meta = json.loads((p / META).read_text())
    return Checkpoint(p, int(meta["step"]), meta)


# ---- what a checkpoint was saved from -----------------------------------------------------------------------------

def run_meta(trainer) -> dict[str, Any]:
    """The settings a checkpoint must agree with to be resumed: the model's
    shape, the world size and the data mixture (the loader's state, less its
    position)."""
    meta: dict[str, Any] = {"step": trainer.step, "world_size": trainer.world,
                            "model": json.loads(json.dumps(dataclasses.asdict(trainer.model.args)))}
    if trainer.data is not None and hasattr(trainer.data, "state_dict"):
        state = json.loads(json.dumps(trainer.data.state_dict(), default=str))
        state.pop("step", None)
        state.pop("world_size", None)
        meta["data"] = state
    # settings the caller adds (mixkit train: the tokenizer spec)
    meta["run"] = json.loads(json.dumps(getattr(trainer, "run_settings", {}), default=str))
    return meta


def check_compatible(ckpt: Checkpoint, trainer) -> None:
    """ConfigError naming what differs when `ckpt` cannot continue this run."""
    mine = run_meta(trainer)
    saved = ckpt.meta
    problems = []
    for key in sorted(set(mine["model"]) | set(saved.get("model", {}))):
        a, b = saved.get("model", {}).get(key), mine["model"].get(key)
        if a != b:
            problems.append(f"model.{key} is {a!r} in the checkpoint but {b!r} now")
    if "data" in mine and "data" in saved:
        for key in sorted(set(mine["data"]) | set(saved["data"])):
            a, b = saved["data"].get(key), mine["data"].get(key)
            same = (a is not None and b is not None and len(a) == len(b)
                    and all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b))) if key == "probs" else a == b
            if not same:
                what = "mixture weights" if key == "probs" else f"data {key}"
                problems.append(f"the {what} {'are' if key == 'probs' else 'is'} {a!r} in the checkpoint "
                                f"but {b!r} now")
    for key in sorted(set(mine["run"]) & set(saved.get("run", {}))):
        if saved["run"][key] != mine["run"][key]:
            problems.append(f"{key} is {saved['run'][key]!r} in the checkpoint but {mine['run'][key]!r} now")
    if saved.get("world_size") != mine["world_size"] and "data" in mine and not _movable(trainer.data):
        problems.append(f"it was saved by {saved.get('world_size')} ranks but this run has {mine['world_size']}, "
                        f"and {type(trainer.data).__name__} cannot carry its position across world sizes")
    if problems:
        raise ConfigError(f"cannot resume from {ckpt.path}: " + "; ".join(problems) +
                          ". Restore the old settings, or pass --resume never to start over (this removes the "
                          "run's checkpoints)")


def _movable(data) -> bool:
    """Whether the loader's position is `step` batches of `batch_size` per rank
    of `world_size` ranks (MixtureLoader's), which another world size can
    continue from."""
    state = data.state_dict()
    return all(k in state for k in ("step", "world_size", "batch_size")) and hasattr(data, "load_state_dict")


def _load_resharded(trainer, ckpt: Checkpoint) -> str:
    """Load a checkpoint saved by another number of ranks: DCP reshards the
    model and optimizer state; every rank takes rank 0's RNG and data state,
    and the data continues at the first global batch not yet consumed.
    Returns what happened, to be said."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    import torch.distributed.checkpoint as dcp

    state = trainer.state_dict()
    state["rank0"] = state.pop(f"rank{trainer.rank}")
    dcp.load(state, checkpoint_id=str(ckpt.path))
    set_state_dict(trainer.module, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    trainer.step, trainer.skipped = int(state["step"]), int(state["skipped"])
    trainer._data_iter = None
    saved_world = ckpt.meta["world_size"]
    note = (f"the checkpoint was saved by {saved_world} rank(s) and this run has {trainer.world}: "
            "torch.distributed.checkpoint resharded the model and optimizer state")
    data = state["rank0"].get("data")
    if data is not None:
        # MixtureLoader: rank r's batch at loader step s is global batch s * world + r
        consumed = int(data["step"]) * int(data["world_size"])
        step = -(-consumed // trainer.world)
        trainer.data.load_state_dict({**data, "step": step, "world_size": trainer.world})
        skipped = (step * trainer.world - consumed) * int(data["batch_size"])
        note += (f"; the data continues after the {consumed * int(data['batch_size'])} sequences consumed"
                 + (f" (skipping {skipped} to start a whole batch)" if skipped else ""))
    return note


# ---- saving ------------------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _barrier(trainer) -> None:
    if trainer.distributed and trainer.world > 1:
        dist.barrier()


@contextmanager
def _quiet_single_process():
    # DCP warns on every call outside torch.distributed that it assumes one process; so do we.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class CheckpointManager:
    """Writes `step_*` checkpoints into `directory` crash-safely and keeps
    the newest `keep_last` (0: all). Every rank calls save()."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.last_saved_step: int | None = None

    def save(self, trainer, reason: str) -> Path:
        step = trainer.step
        final = self.directory / f"{PREFIX}{step:08d}"
        tmp = self.directory / f"{final.name}{PARTIAL}"
        if trainer.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # a save of this step cut short earlier
        _barrier(trainer)
        with _quiet_single_process():
            trainer.save(str(tmp))
        if trainer.rank == 0:
            meta = run_meta(trainer)
            meta.update(reason=reason, time=time.time())
            _write_synced(tmp / META, json.dumps(meta, indent=1) + "\n")
            _write_synced(tmp / MARKER, "")
            _fsync_dir(tmp)
            if final.exists():  # the same step saved before (a resume from an older checkpoint)
                _remove(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
        # No rank goes on (or exits: torchrun stops the others when one exits)
        # before the checkpoint is complete.
        _barrier(trainer)
        self.last_saved_step = step
        if trainer.rank == 0:
            self.prune()
        return final

    def prune(self) -> list[Path]:
        """Remove partial checkpoints and all but the newest keep_last complete ones."""
        complete, partial = scan(self.directory)
        doomed = list(partial)
        if self.keep_last > 0:
            doomed += [c.path for c in complete[:-self.keep_last]]
        for p in doomed:
            _remove(p)
        return doomed


# ---- resuming ----------------------------------------------------------------------------------------------------

def _broadcast(trainer, value):
    if trainer.distributed and trainer.world > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resume(trainer, directory: str | Path, mode: str = "auto", say: Callable[[str], None] = print,
           warn: Callable[[str], None] = _stderr) -> Checkpoint | None:
    """Apply the resume rule to `trainer` (every rank calls this; rank 0
    decides and prints). mode: "auto", "never" or a checkpoint path. Returns
    the checkpoint resumed from, or None for a fresh start."""
    directory = Path(directory)
    lead = trainer.rank == 0
    say = say if lead else (lambda _msg: None)
    warn = warn if lead else (lambda _msg: None)
    chosen: Checkpoint | None = None
    if mode == "never":
        complete, partial = scan(directory) if lead else ([], [])
        if lead and (complete or partial):
            for p in [c.path for c in complete] + partial:
                _remove(p)
            say(f"starting fresh (--resume never): removed {len(complete) + len(partial)} earlier checkpoint(s) "
                f"from {directory}")
        _barrier(trainer)
        return None
    if mode == "auto":
        if lead:
            complete, partial = scan(directory)
            chosen = complete[-1] if complete else None
            for p in partial:
                instead = f"resuming from {chosen.path.name}" if chosen else "no complete checkpoint before it"
                warn(f"warning: skipping partial checkpoint {p} (no {MARKER} marker: its save was cut short by a "
                     f"crash, kill -9 or a full disk); {instead}")
        chosen = _broadcast(trainer, chosen)
    else:
        chosen = read_checkpoint(mode)
        check_compatible(chosen, trainer)  # before anything is removed
        if lead:  # checkpoints past the chosen one belong to the continuation being abandoned
            later = [c.path for c in scan(directory)[0] if c.step > chosen.step and c.path.resolve() !=
                     chosen.path.resolve()]
            for p in later:
                _remove(p)
            if later:
                say(f"removed {len(later)} checkpoint(s) past step {chosen.step} from {directory}")
        _barrier(trainer)
    if chosen is None:
        say(f"starting fresh: no checkpoint in {directory}")
        return None
    check_compatible(chosen, trainer)
    note = None
    with _quiet_single_process():
        if chosen.meta.get("world_size", trainer.world) == trainer.world:
            trainer.load(str(chosen.path))
        else:
            note = _load_resharded(trainer, chosen)
    manager = getattr(trainer, "checkpoints", None)
    if manager is not None and chosen.path.parent.resolve() == manager.directory.resolve():
        manager.last_saved_step = trainer.step
    reason = chosen.meta.get("reason", "")
    say(f"resuming from {chosen.path} (step {trainer.step}" + (f", saved {_REASONS.get(reason, reason)}" if reason
                                                               else "") + ")")
    if note:
        say(note)
    return chosen


_REASONS = {"periodic": "by checkpoint_every", "SIGINT": "on Ctrl-C (SIGINT)", "SIGTERM": "on SIGTERM",
            "end": "at the end of the run"}


def truncate_log(path: str | Path, step: int) -> list[dict]:
    """The rows of a log.jsonl with `step` <= step, one per step (the last
    written wins), rewriting the file (atomically) when anything is dropped:
    rows past a resumed checkpoint, or a line cut short by a crash."""
    path = Path(path)
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows[row["step"]] = row
    kept = [rows[s] for s in sorted(rows)]
    if len(kept) != len(lines) or [r["step"] for r in kept] != [json.loads(x).get("step") for x in lines]:
        tmp = path.with_name(path.name + ".tmp")
        _write_synced(tmp, "".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept
