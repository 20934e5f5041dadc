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
    tokenizer = "byte"          # or a directory with tokenizer.json / tokenizer.model
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
from the newest complete checkpoint (checkpoint.py has the rule).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import ConfigError, TrainConfig, config_from_dict, tomllib


@dataclass
class DataConfig:
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 8
    out_dir: str = "runs/train"
    workers: int | None = None
    field: str = "text"  # the .jsonl key holding each document
    components: dict[str, dict[str, Any]] = dc_field(default_factory=dict)
    heldout: dict[str, list[str]] = dc_field(default_factory=dict)
    eval_seq_len: int | None = None
    stdlib_bytes: int = 2_000_000

    def __post_init__(self):
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


def load_run_config(path: str | None, overrides: Sequence[str] = ()) -> tuple[TrainConfig, DataConfig]:
    """(TrainConfig, DataConfig) from a run file and `key=value` overrides
    (`model.<field>=` for ModelArgs, `data.<field>=` for DataConfig)."""
    from .config import apply_overrides

    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    apply_overrides(values, overrides, tables=("model", "data"))
    data = values.pop("data")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"data: unknown key(s) {', '.join(map(repr, unknown))}; known: {sorted(known)}")
    return config_from_dict(values), DataConfig(**data)


# ---- pieces shared by train and quickstart ------------------------------------------

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

    def close(self) -> Path | None:
        self.bar.close()
        self.file.close()
        return plot_losses(self.history, self.run_dir / "loss.png")


def plot_losses(history: list[dict], path: Path) -> Path | None:
    """Loss (and held-out loss, where evaluated) against step; None without matplotlib."""
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
          resume: str = "auto") -> int:
    """Returns 0, or interrupt.EXIT_INTERRUPTED after a SIGINT / SIGTERM stop
    (checkpoint saved). resume: "auto" (the newest complete checkpoint in
    checkpoint_dir, if any), "never" or a checkpoint path; see checkpoint.py."""
    from .. import models
    from ..data import Component, MixtureLoader, tokenize_files, tokenize_texts
    from .checkpoint import resume as resume_from
    from .interrupt import EXIT_INTERRUPTED, GracefulStop
    from .trainer import Trainer

    tcfg, dcfg = load_run_config(config, overrides)
    if not tcfg.checkpoint_dir:  # checkpoints live in the run directory unless told otherwise
        tcfg = tcfg.replace(checkpoint_dir=dcfg.out_dir)
    rank, world, dev = _init_distributed(device)
    quiet = quiet or rank != 0
    run_dir = Path(dcfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"train": dataclasses.asdict(tcfg),
                                                     "data": dataclasses.asdict(dcfg)}, indent=2, default=str))
    tok = _tokenizer(dcfg.tokenizer)
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
                           eos_id=tok.eos_id, rank=rank, world_size=world)
    heldout = {name: [t for p in paths for t in _read(p, dcfg.field)] for name, paths in dcfg.heldout.items()}
    for name, comp in dcfg.components.items():
        if comp.get("stdlib") and name not in heldout:
            heldout[name] = _component_texts(name, comp, dcfg, "heldout")[:50]

    torch.manual_seed(tcfg.seed)
    model = models.Transformer(args).init_weights(tcfg.seed).to(dev)
    eval_fn = make_eval_fn(tok, heldout, dcfg.eval_seq_len or dcfg.seq_len) if heldout else None
    trainer = Trainer(model, tcfg, data=loader, eval_fn=eval_fn)
    resume_from(trainer, tcfg.checkpoint_dir, resume)
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
        print(f"wrote {run_dir / 'log.jsonl'}, {run_dir / 'model'}" + (f", {plot}" if plot else ""))
    return 0


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


def _read(path: str, field_name: str) -> list[str]:
    from ..data import read_documents

    return list(read_documents(path, field_name))


# ---- mixkit eval ------------------------------------------------------------------------

def evaluate_files(model_dir: str, data: Sequence[str], tokenizer: str | None = None, seq_len: int = 1024,
                   stride: int | None = None, device: str | None = None) -> dict:
    """Loss, perplexity and bits per UTF-8 byte of a checkpoint on .jsonl
    files, one component per file (named by its stem)."""
    from .. import models
    from ..evaluation import evaluate

    dev = _device(device)
    model = models.load(model_dir, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else None)
    tok = _tokenizer(tokenizer or model_dir)
    components = {Path(p).name.split(".")[0]: _read(p, "text") for p in data}
    results = evaluate(model, tok, components, seq_len, stride=stride)
    return {name: r.as_dict() for name, r in results.items()}


# ---- mixkit quickstart ------------------------------------------------------------------

QUICKSTART_MODEL = dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32, hidden_dim=512, vocab_size=258,
                        sliding_window=128, max_seq_len=1024)


def _capped(texts: list[str], max_bytes: int) -> list[str]:
    """Whole documents up to max_bytes of UTF-8 (at least part of the first)."""
    out, total = [], 0
    for t in texts:
        n = len(t.encode("utf-8"))
        if total + n > max_bytes:
            if not out:
                out.append(t.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))
            break
        out.append(t)
        total += n
    return out


def quickstart(steps: int | None = None, device: str | None = None, out_dir: str = "runs/quickstart",
               train_bytes: int = 3_000_000, heldout_bytes: int = 48_000, seed: int = 0, quiet: bool = False) -> dict:
    """Train a tiny Mistral-style model (sliding window 128, GQA 6/2) on the
    Python standard library's sources with a byte-level tokenizer; print the
    held-out bits per byte before and after and a generated sample. No
    download: the corpus is this machine's stdlib (like The Pile's GitHub
    component). A few minutes on 2 CPU cores; seconds on a GPU."""
    from .. import models
    from ..data import Component, MixtureLoader, stdlib_documents, tokenize_texts
    from ..tokenizer import ByteTokenizer
    from .trainer import Trainer

    dev = _device(device)
    steps = steps or (400 if dev.type == "cpu" else 2000)
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").unlink(missing_ok=True)  # a fresh run, not a resume
    tok = ByteTokenizer()
    t0 = time.time()
    train_texts = [d.text for d in stdlib_documents("train", max_bytes=train_bytes)]
    heldout = {"stdlib": _capped([d.text for d in stdlib_documents("heldout", max_bytes=None)], heldout_bytes)}
    docs = tokenize_texts(train_texts, tok, name="stdlib")
    print(f"corpus: {len(train_texts)} stdlib files, {docs.n_tokens:,} training tokens; held out: "
          f"{len(heldout['stdlib'])} files ({sum(len(t.encode()) for t in heldout['stdlib']):,} bytes)")

    seq_len, batch = 256, 8
    tcfg = TrainConfig(model_name="tiny-mistral", model=QUICKSTART_MODEL, lr=3e-3, warmup_steps=max(1, steps // 10),
                       max_steps=steps, weight_decay=0.1, precision="bf16" if dev.type == "cuda" else "fp32",
                       seed=seed, eval_every=max(1, steps // 3), loss_chunk_size=2048)
    torch.manual_seed(seed)
    model = models.Transformer(tcfg.model_args()).init_weights(seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    loader = MixtureLoader([Component("stdlib", docs, weight=1.0)], seq_len, batch, seed=seed, bos_id=tok.bos_id,
                           eos_id=tok.eos_id)
    eval_fn = make_eval_fn(tok, heldout, seq_len)
    trainer = Trainer(model, tcfg, data=loader, eval_fn=eval_fn)
    print(f"model: {n_params / 1e6:.2f}M parameters, window {QUICKSTART_MODEL['sliding_window']}, "
          f"GQA {QUICKSTART_MODEL['n_heads']}/{QUICKSTART_MODEL['n_kv_heads']}, on {dev}")
    before = eval_fn(trainer)["stdlib/bpb"]
    print(f"held-out bits per byte before training: {before:.3f}")
    trainer.log_fn = log = RunLog(run_dir, steps, quiet)
    trainer.fit()
    plot = log.close()
    after = eval_fn(trainer)["stdlib/bpb"]
    print(f"held-out bits per byte after {steps} steps: {after:.3f}  (8 bits = no compression)")

    prompt = "def "
    with trainer._compute_dtype_context():
        new = models.generate(model.eval(), tok.encode(prompt), 120, temperature=0.7, top_k=20, seed=seed)[0]
    print("sample:\n" + prompt + tok.decode(new))
    models.save(model, run_dir / "model")
    summary = {"steps": steps, "params": n_params, "bpb_before": before, "bpb_after": after,
               "seconds": time.time() - t0, "device": str(dev)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {run_dir}/log.jsonl, summary.json, model/" + (f", {plot.name}" if plot else "") +
          f"  ({summary['seconds']:.0f} s)")
    if not math.isfinite(after):
        raise RuntimeError("quickstart: the held-out loss is not finite")
    return summary
