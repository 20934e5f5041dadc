"""Training runs from the command line: `mixkit train`, `mixkit eval` and
`mixkit quickstart`.

A run file is TrainConfig's TOML (train/config.py) plus a `[data]` table:

    model_name = "tiny-mistral"
    max_steps = 300
    warmup_steps = 30
    eval_every = 100
    [model]
    vocab_size = 258            # the byte tokenizer's 256 bytes + BOS + EOS
    [data]
    tokenizer = "byte"          # or a directory with tokenizer.json / tokenizer.model,
                                # or {train_bpe = 2048}: a byte-level BPE trained on the training files
    seq_len = 256
    batch_size = 8
    out_dir = "runs/example"
    [data.components.code]      # Pile-style components: paths + weight or epochs
    paths = ["code.jsonl.zst"]
    weight = 1.0
    [data.heldout]              # component -> held-out .jsonl files, scored in bits per byte
    code = ["code_val.jsonl"]

A component may say `stdlib = true` instead of paths: the Python standard
library's sources on this machine (the quick start's corpus). The run
directory gets `log.jsonl` (one line per step), `loss.png` (matplotlib, when
installed), checkpoints `step_*` (every `checkpoint_every` steps, on SIGINT or
SIGTERM, and at the end; the newest `keep_last` are kept) and the final model
as a Hugging Face directory (`model/`). Rerunning the same command continues
from the newest complete checkpoint (checkpoint.py has the rule); a
directory holding another run's outputs stops the command before anything
is written (`claim_run_dir`). Relative paths in the file are relative to
the file's directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import ConfigError, TrainConfig, config_from_dict
from .run_tokenizer import save_model_tokenizer


@dataclass
class DataConfig:
    tokenizer: Any = "byte"  # "byte", a tokenizer directory or {train_bpe = N} (train/run_tokenizer.py)
    seq_len: int = 256
    batch_size: int = 8
    out_dir: str = "runs/train"
    workers: int | None = None
    field: str = "text"  # the .jsonl key holding each document
    components: dict[str, dict[str, Any]] = dc_field(default_factory=dict)
    heldout: dict[str, list[str]] = dc_field(default_factory=dict)
    eval_seq_len: int | None = None
    stdlib_bytes: int = 2_000_000
    shuffle_sequences: bool = False  # batches of packed sequences from all over an epoch (data/packing.py)

    def __post_init__(self):
        from .run_tokenizer import check_tokenizer_spec

        check_tokenizer_spec(self.tokenizer)
        if self.seq_len < 2 or self.batch_size < 1:
            raise ConfigError("data: seq_len must be >= 2 and batch_size >= 1")
        if not self.components:
            raise ConfigError("data: no components; add a [data.components.<name>] table with paths or stdlib = true")
        for name, comp in self.components.items():
            unknown = set(comp) - {"paths", "stdlib", "weight", "epochs"}
            if unknown:
                raise ConfigError(f"data.components.{name}: unknown key(s) {sorted(unknown)}; "
                                  "known: paths, stdlib, weight, epochs")
            if bool(comp.get("paths")) == bool(comp.get("stdlib")):
                raise ConfigError(f"data.components.{name}: give either paths or stdlib = true")
            if ("weight" in comp) == ("epochs" in comp):
                raise ConfigError(f"data.components.{name}: give exactly one of weight and epochs")
            if not comp.get("weight", comp.get("epochs")) > 0:
                raise ConfigError(f"data.components.{name}: weight or epochs must be > 0, got "
                                  f"{comp.get('weight', comp.get('epochs'))}")


COMPONENT_TYPES = {"paths": list[str], "stdlib": bool, "weight": float, "epochs": float}


def load_run_config(path: str | None, overrides: Sequence[str] = ()) -> tuple[TrainConfig, DataConfig]:
    """(TrainConfig, DataConfig) from a run file and `key=value` overrides
    (`model.<field>=` for ModelArgs, `data.<field>=` for DataConfig). Every
    key's type is checked before anything else, one ConfigError line per bad
    key naming the file or flag it came from. Relative paths in the file are
    relative to the file's directory; in an override, to the current one."""
    import typing

    from .config import load_settings, train_config_errors, type_errors

    values, sources = load_settings(path, overrides, ("model", "data"))
    data = values.pop("data")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(data) - known)
    errors = [f"{sources('data.' + unknown[0])}: data: unknown key(s) {', '.join(map(repr, unknown))}; known: "
              f"{sorted(known)}"] if unknown else []
    errors += type_errors(data, typing.get_type_hints(DataConfig), sources, "data.")
    for table in ("components", "heldout"):
        if isinstance(data.get(table), dict):
            for name, value in data[table].items():
                if not isinstance(value, dict if table == "components" else list):
                    errors.append(f"{sources(f'data.{table}.{name}')}: data.{table}.{name}: expected "
                                  f"{'a table' if table == 'components' else 'a list of strings'}, got "
                                  f"{json.dumps(value, default=str)}")
                elif table == "components":
                    errors += type_errors(value, COMPONENT_TYPES, sources, f"data.components.{name}.")
    errors += train_config_errors(values, sources)
    if errors:
        raise ConfigError("\n".join(errors))
    if isinstance(data.get("tokenizer"), str) and data["tokenizer"] != "byte":
        data["tokenizer"] = sources.resolve("data.tokenizer", data["tokenizer"])
    if "out_dir" in data:
        data["out_dir"] = sources.resolve("data.out_dir", data["out_dir"])
    for name, comp in data.get("components", {}).items():
        if "paths" in comp:
            comp["paths"] = [sources.resolve(f"data.components.{name}.paths", p) for p in comp["paths"]]
    for name, paths in data.get("heldout", {}).items():
        data["heldout"][name] = [sources.resolve(f"data.heldout.{name}", p) for p in paths]
    if values.get("checkpoint_dir"):
        values["checkpoint_dir"] = sources.resolve("checkpoint_dir", values["checkpoint_dir"])
    return config_from_dict(values, sources), DataConfig(**data)


# ---- pieces shared by train, quickstart and ppo -------------------------------------

# What a run writes into its directory, besides checkpoints and the caches
# (tokens/, tokenizer/) that are checked against their settings before reuse.
RUN_OUTPUTS = ("config.json", "log.jsonl", "loss.png", "summary.json", "model")


def run_outputs(run_dir: Path) -> list[str]:
    """The outputs of an earlier run in run_dir (directories with a trailing /)."""
    found = [name + ("/" if (run_dir / name).is_dir() else "") for name in RUN_OUTPUTS if (run_dir / name).exists()]
    found += sorted(p.name + "/" for p in run_dir.glob("rank[0-9]*") if p.is_dir())  # other ranks' logs
    return found


def claim_run_dir(run_dir: Path, option: str, *, resumable: bool = False, overwrite: bool = False,
                  config: dict | None = None) -> list[str]:
    """Make sure a run does not overwrite another run's outputs. Returns the
    outputs it removed. Nothing happens when run_dir holds no outputs, or
    when the run continues from a checkpoint (resumable: the resume rule
    then checks that the checkpoint is this run's), or when its config.json
    equals `config` (the same run, restarted before its first checkpoint).
    With overwrite the outputs are removed; otherwise ConfigError names
    them and `option`, the setting that chose the directory."""
    import shutil

    found = run_outputs(run_dir) if run_dir.is_dir() else []
    if not found or resumable:
        return []
    if overwrite:
        for name in found:
            path = run_dir / name.rstrip("/")
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return found
    if config is not None and _same_config(run_dir / "config.json", config):
        return []
    raise ConfigError(f"{option} {run_dir} holds another run's outputs ({', '.join(found)}) and no checkpoint "
                      "of it to resume; pass --overwrite to replace them, or choose another directory")


def _same_config(path: Path, config: dict) -> bool:
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(config, default=str))
    except (OSError, ValueError):
        return False


def _config_record(tcfg: TrainConfig, dcfg: "DataConfig") -> dict:
    """What a run directory's config.json holds."""
    return {"train": dataclasses.asdict(tcfg), "data": dataclasses.asdict(dcfg)}


def _tokenizer(spec: str):
    from ..tokenizer import ByteTokenizer, load_tokenizer

    return ByteTokenizer() if spec == "byte" else load_tokenizer(spec)


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


class RunLog:
    """log.jsonl, the progress bar and the loss plot of one run directory."""

    def __init__(self, run_dir: Path, total_steps: int, quiet: bool = False, start_step: int = 0):
        """start_step: the step the run resumes at; rows past it are dropped."""
        from tqdm import tqdm

        from .checkpoint import truncate_log

        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = truncate_log(run_dir / "log.jsonl", start_step)
        self.file = open(run_dir / "log.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=quiet,
                        dynamic_ncols=True)

    def __call__(self, metrics: dict) -> None:
        row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        row["time"] = time.time()
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.history.append(row)
        shown = {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.2e}", "gnorm": f"{row['grad_norm']:.2f}",
                 "tok/s": f"{row.get('tokens_per_s', 0):.0f}"}
        if row.get("mfu") is not None:
            shown["mfu"] = f"{100 * row['mfu']:.1f}%"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self, levels: dict[str, float] | None = None) -> Path | None:
        self.bar.close()
        self.file.close()
        return plot_losses(self.history, self.run_dir / "loss.png", levels)


def plot_losses(history: list[dict], path: Path, levels: dict[str, float] | None = None) -> Path | None:
    """Loss (and held-out loss, where evaluated) against step; None without
    matplotlib. levels: {label: loss} drawn as horizontal lines (the
    quickstart's gzip level, in the held-out loss's nats per token)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in history if not r.get("skipped")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["loss"] for r in history if not r.get("skipped")], label="train loss")
    evals = [(r["step"], r[k]) for r in history for k in r if k.endswith("/loss")]
    if evals:
        ax.plot(*zip(*evals), "o", label="held-out loss")
    for (label, value), style in zip((levels or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, linestyle=style, color="gray", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_eval_fn(tokenizer, heldout: dict[str, list[str]], seq_len: int):
    """Trainer eval hook: held-out loss and bits per byte per component."""
    from ..evaluation import evaluate

    def eval_fn(trainer) -> dict:
        if trainer.fsdp:  # the root's embedding and head are gathered only by the wrapped forward
            return {}
        with trainer._compute_dtype_context():
            results = evaluate(trainer.model, tokenizer, heldout, seq_len)
        out = {}
        for name, r in results.items():
            out[f"{name}/loss"] = r.loss
            out[f"{name}/bpb"] = r.bits_per_byte
        return out

    return eval_fn


def _component_texts(name: str, comp: dict, dcfg: DataConfig, split: str) -> list[str]:
    from ..data import read_documents, stdlib_documents

    if comp.get("stdlib"):
        return [d.text for d in stdlib_documents(split, max_bytes=dcfg.stdlib_bytes)]
    texts = []
    for p in comp["paths"]:
        texts.extend(read_documents(p, dcfg.field))
    return texts


# ---- mixkit train -------------------------------------------------------------------

def train(config: str | None, overrides: Sequence[str] = (), device: str | None = None, quiet: bool = False,
          resume: str = "auto", overwrite: bool = False) -> int:
    """Returns 0, or interrupt.EXIT_INTERRUPTED after a SIGINT / SIGTERM stop
    (checkpoint saved). resume: "auto" (the newest complete checkpoint in
    checkpoint_dir, if any), "never" or a checkpoint path; see checkpoint.py.
    A data.out_dir holding another run's outputs raises ConfigError before
    anything is written, unless overwrite (or resume "never") replaces them."""
    tcfg, dcfg = load_run_config(config, overrides)
    if overwrite and resume not in ("auto", "never"):
        raise ConfigError(f"--overwrite starts the run over; it cannot be combined with --resume {resume}")
    if not tcfg.checkpoint_dir:  # checkpoints live in the run directory unless told otherwise
        tcfg = tcfg.replace(checkpoint_dir=dcfg.out_dir)
    with distributed(device) as (rank, world, dev):
        return _train(tcfg, dcfg, rank, world, dev, quiet, "never" if overwrite else resume)


def _train(tcfg: TrainConfig, dcfg: DataConfig, rank: int, world: int, dev: torch.device, quiet: bool,
           resume: str) -> int:
    from .. import models
    from ..data import Component, MixtureLoader, tokenize_files, tokenize_texts
    from .checkpoint import read_checkpoint, resume as resume_from, scan
    from .interrupt import EXIT_INTERRUPTED, GracefulStop
    from .trainer import Trainer

    quiet = quiet or rank != 0
    run_dir = Path(dcfg.out_dir)
    # Before anything is written: whose directory is this? Every rank looks
    # (so that all stop together); rank 0 alone removes.
    if resume == "auto":
        complete = scan(tcfg.checkpoint_dir)[0]
        at = complete[-1].step if complete else None  # the step the run continues from
    else:
        at = None if resume == "never" else read_checkpoint(resume).step
    if at is not None and at > tcfg.max_steps:
        raise ConfigError(f"the checkpoint to resume from is at step {at}, past max_steps = {tcfg.max_steps}: "
                          "nothing to train. Raise max_steps, pick an earlier checkpoint with --resume PATH, or "
                          "start over with --overwrite")
    record = _config_record(tcfg, dcfg)
    if resume != "never" or rank == 0:
        removed = claim_run_dir(run_dir, "data.out_dir", resumable=at is not None, overwrite=resume == "never",
                                config=record)
        if removed:
            print(f"starting over: removed {', '.join(removed)} from {run_dir}")
    _barrier(world)
    tok = _run_tokenizer(dcfg, run_dir)
    args = tcfg.model_args()
    if tok.vocab_size > args.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but model vocab_size is {args.vocab_size}; "
                          f"set model.vocab_size = {tok.vocab_size}")
    components = []
    for name, comp in dcfg.components.items():
        if comp.get("stdlib"):
            docs = tokenize_texts(_component_texts(name, comp, dcfg, "train"), tok, name=name)
        else:  # memory-mapped token shards, reused by later runs and kept on a crash
            docs = tokenize_files(comp["paths"], tok, run_dir / "tokens", field=dcfg.field, workers=dcfg.workers,
                                  progress=not quiet)
        components.append(Component(name, docs, weight=comp.get("weight"), epochs=comp.get("epochs")))
    loader = MixtureLoader(components, dcfg.seq_len, dcfg.batch_size, seed=tcfg.seed, bos_id=tok.bos_id,
                           eos_id=tok.eos_id, rank=rank, world_size=world,
                           shuffle_sequences=dcfg.shuffle_sequences)
    heldout = {name: [t for p in paths for t in _read(p, dcfg.field)] for name, paths in dcfg.heldout.items()}
    for name, comp in dcfg.components.items():
        if comp.get("stdlib") and name not in heldout:
            heldout[name] = _component_texts(name, comp, dcfg, "heldout")[:50]

    torch.manual_seed(tcfg.seed)
    model = models.Transformer(args).init_weights(tcfg.seed).to(dev)
    eval_fn = make_eval_fn(tok, heldout, dcfg.eval_seq_len or dcfg.seq_len) if heldout else None
    trainer = Trainer(model, tcfg, data=loader, eval_fn=eval_fn)
    # checked on resume, as are the model and the mixture: a training file changed since is an error
    trainer.run_settings = {"data.tokenizer": dcfg.tokenizer, **{
        f"the training data of component {c.name}": f"{len(c.documents)} documents, {c.documents.n_tokens} tokens"
        for c in components}}
    resume_from(trainer, tcfg.checkpoint_dir, resume)  # raises, writing nothing, if the checkpoint is another run's
    if trainer.step == tcfg.max_steps and rank == 0:
        print(f"the run is complete (step {trainer.step} of max_steps {tcfg.max_steps}): exporting its model again")
    if rank == 0:  # this run's directory from here on
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(record, indent=2, default=str))
        if isinstance(dcfg.tokenizer, dict):
            _save_trained_tokenizer(tok, dcfg, run_dir)
    log = RunLog(run_dir if rank == 0 else run_dir / f"rank{rank}", tcfg.max_steps, quiet, start_step=trainer.step)
    trainer.log_fn = log
    stop = GracefulStop()
    trainer.should_stop = stop.agreed
    with stop:  # SIGINT / SIGTERM: finish the step, save, exit; a second one exits at once
        trainer.fit()
        saved = trainer.checkpoints.last_saved_step == trainer.step
        if stop.stopped_by and trainer.step < tcfg.max_steps:
            path = trainer.checkpoints.directory / f"step_{trainer.step:08d}"
            if not saved:
                path = trainer.checkpoints.save(trainer, stop.stop_name)
            log.close()
            if rank == 0:
                print(f"\nstopped by {stop.stop_name} after step {trainer.step}: saved {path}; "
                      "rerun the same command to continue", flush=True)
            return EXIT_INTERRUPTED
        if not saved:  # rerunning a finished run resumes here and only exports the model again
            trainer.checkpoints.save(trainer, "end")
    plot = log.close()
    weights = trainer.model_state_dict()  # gathered from the shards under FSDP2 (every rank takes part)
    if rank == 0:
        full = models.Transformer(args)
        full.load_state_dict(weights)
        models.save(full, run_dir / "model")
        save_model_tokenizer(tok, run_dir / "model")
        print(f"wrote {run_dir / 'log.jsonl'}, {run_dir / 'model'}" + (f", {plot}" if plot else ""))
    return 0


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _tokenizer_made_from(dcfg: DataConfig) -> dict:
    return {"tokenizer": dcfg.tokenizer, "components": dcfg.components, "field": dcfg.field,
            "stdlib_bytes": dcfg.stdlib_bytes}


def _run_tokenizer(dcfg: DataConfig, run_dir: Path):
    """The run's tokenizer. A trained BPE is kept in run_dir/tokenizer with
    the settings it came from (`_save_trained_tokenizer`, once the directory
    is known to be this run's), so that a resumed run uses the very same
    vocabulary; it is trained again only when they change."""
    from ..tokenizer import load_tokenizer
    from .run_tokenizer import build_tokenizer

    spec = dcfg.tokenizer
    if isinstance(spec, str):
        return build_tokenizer(spec, lambda: ())
    cache = run_dir / "tokenizer"
    stamp = cache / "trained_from.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(_tokenizer_made_from(dcfg))):
        return load_tokenizer(cache)

    def training_texts():  # training documents only: never [data.heldout] or the stdlib's held-out split
        for name, comp in dcfg.components.items():
            if comp.get("stdlib"):
                yield from _component_texts(name, comp, dcfg, "train")
            else:
                for p in comp["paths"]:
                    yield from _read(p, dcfg.field)

    return build_tokenizer(spec, training_texts)


def _save_trained_tokenizer(tok, dcfg: DataConfig, run_dir: Path) -> None:
    """Keep a trained BPE in run_dir/tokenizer with the settings it came from (once)."""
    from ..tokenizer import save_tokenizer

    cache = run_dir / "tokenizer"
    stamp = cache / "trained_from.json"
    made_from = json.loads(json.dumps(_tokenizer_made_from(dcfg)))
    if stamp.is_file() and json.loads(stamp.read_text()) == made_from:
        return
    save_tokenizer(tok, cache)
    stamp.write_text(json.dumps(made_from, indent=2) + "\n")


def _init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the
    process group (NCCL on GPUs, gloo on CPUs); the Trainer then shards the
    model with FSDP2."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = _device(device)
    if world == 1:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


@contextlib.contextmanager
def distributed(device: str | None):
    """`with distributed(device) as (rank, world, dev)`: _init_distributed, and
    on the way out, if it joined the process group, a barrier (no rank closes
    its connections while another is still in a collective, e.g. rank 0
    gathering the model; gloo aborts the process then) and
    destroy_process_group. After an exception there is no barrier: the other
    ranks may never reach it."""
    import torch.distributed as dist

    already = dist.is_available() and dist.is_initialized()
    rank, world, dev = _init_distributed(device)
    joined = not already and world > 1  # _init_distributed made the process group
    finished = False
    try:
        yield rank, world, dev
        finished = True
    finally:
        if joined:
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _read(path: str, field_name: str) -> list[str]:
    from ..data import read_documents

    return list(read_documents(path, field_name))


# ---- mixkit eval ------------------------------------------------------------------------

def evaluate_files(model_dir: str, data: Sequence[str], tokenizer: str | None = None, seq_len: int | None = None,
                   stride: int | None = None, device: str | None = None, note=None) -> dict:
    """Loss, perplexity and bits per UTF-8 byte of a checkpoint on .jsonl
    files, one component per file (named by its stem). seq_len: default the
    model's max_seq_len, at most 1024. note(model_args, seq_len): called
    before scoring (`mixkit eval` raises past max_seq_len without a sliding
    window, else prints a note); returns text to print to stderr, or None."""
    import sys

    from .. import models
    from ..evaluation import evaluate

    dev = _device(device)
    model = models.load(model_dir, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else None)
    try:
        tok = _tokenizer(tokenizer or model_dir)
    except FileNotFoundError:
        if tokenizer is not None:
            raise
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json or tokenizer.model; pass --tokenizer DIR (or "
                                "byte)") from None
    seq_len = seq_len or min(1024, model.args.max_seq_len)
    text = note(model.args, seq_len) if note is not None else None
    if text:
        print(text, file=sys.stderr)
    components = {Path(p).name.split(".")[0]: _read(p, "text") for p in data}
    results = evaluate(model, tok, components, seq_len, stride=stride)
    return {name: r.as_dict() for name, r in results.items()}


# ---- mixkit quickstart ------------------------------------------------------------------

def quickstart(*args, **kwargs) -> dict:
    """`mixkit quickstart` (train/quickstart.py)."""
    from .quickstart import quickstart as run_quickstart

    return run_quickstart(*args, **kwargs)


def quickstart_config(device: str = "cpu") -> tuple[TrainConfig, DataConfig]:
    """The quickstart's model, batch and schedule (train/quickstart.py)."""
    from .quickstart import quickstart_config as config

    return config(device)
