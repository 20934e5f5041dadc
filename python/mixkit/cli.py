"""The `mixkit` command: `quickstart`, `train`, `ppo`, `eval`, `generate`, `bench` and `info`.

Every option's value is checked by its argparse type (the public ones here
serve other modules' subcommands too: `mixkit serve`, `mixkit bench serve`)
as the command line is read, before anything runs; a user's mistake there or later (a run file, a
checkpoint directory) ends the command with one line,
`mixkit <command>: error: ...`, and exit code 2, never a traceback. Ctrl-C
exits quietly with 130 (while training, `mixkit train` first saves a
checkpoint and exits with 75: train/interrupt.py), a closed output pipe with
141. Each type carries `bad`, values it must reject, so that
tests/test_cli.py checks every option of every command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

EXIT_USAGE = 2
EXIT_CTRL_C = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as for a command whose reader closed the pipe


# ---- option types ---------------------------------------------------------------------------------------------

def option_type(name: str, bad: Callable[[Path], list[str]] | list[str]):
    """Decorate a parser of option values: `name` is how argparse names it,
    `bad(tmp)` values it must reject (tmp: an empty scratch directory)."""
    def wrap(parse):
        parse.__name__ = name
        parse.bad = bad if callable(bad) else (lambda _tmp: list(bad))
        return parse
    return wrap


def integer(low: int | None = None, high: int | None = None):
    span = (f" in [{low}, {high}]" if high is not None else f" >= {low}") if low is not None else ""
    bad = ["abc", "1.5"] + ([str(low - 1)] if low is not None else []) + ([str(high + 1)] if high is not None else [])

    @option_type("integer", bad)
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer{span}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer{span}, got {value}")
        return value
    return parse


def integers(low: int):
    """A comma-separated list of integers >= low."""
    one = integer(low)

    @option_type("integers", ["a,b", str(low - 1), "1,,2", ""])
    def parse(text: str) -> list[int]:
        try:
            return [one(x) for x in text.split(",")]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {low}, got {text!r}") from None
    return parse


def number(low: float, high: float | None = None, low_open: bool = False):
    """A finite float in [low, high] ((low, high] with low_open)."""
    span = f"in ({low:g}, {high:g}]" if low_open else f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
    bad = ["abc", "nan", "inf", str(low) if low_open else str(low - 1)] + ([str(high + 1)] if high is not None else [])

    @option_type("number", bad)
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {text}")
        return value
    return parse


def _cuda_bad(_tmp: Path) -> list[str]:
    import torch

    return ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"])


@option_type("device", _cuda_bad)
def device(text: str) -> str:
    import torch

    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None and torch.version.hip is None else "built with CUDA"
        raise argparse.ArgumentTypeError(f"cuda: torch {torch.__version__} ({build}) sees no CUDA GPU")
    return text


@option_type("text", ["\udcff\udcfe"])  # bytes 0xff 0xfe as Python decodes a non-UTF-8 argv
def utf8_text(text: str) -> str:
    """Any text that is valid UTF-8 (on Linux, argv bytes that are not come as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00 if 0xDC80 <= ord(text[exc.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"code point U+{ord(text[exc.start]):04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text ({what} at character {exc.start})") from None
    return text


def _missing(tmp: Path) -> str:
    return str(tmp / "does-not-exist")


def _a_file(tmp: Path) -> str:
    (tmp / "a-file").write_text("x\n")
    return str(tmp / "a-file")


@option_type("file", lambda tmp: [_missing(tmp), str(tmp)])
def existing_file(text: str) -> str:
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a directory, not a file")
    return text


@option_type("directory", lambda tmp: [_missing(tmp), _a_file(tmp)])
def existing_dir(text: str) -> str:
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a file, not a directory")
    return text


def _tiny_models() -> list[str]:
    from mixkit import models

    return [n for n in models.CONFIGS if n.startswith("tiny-")]


@option_type("model", lambda tmp: [_missing(tmp), "tiny-nope", _a_file(tmp)])
def _model(text: str) -> str:
    if Path(text).is_dir() or text in _tiny_models():
        return text
    what = "a file, not a checkpoint directory" if Path(text).exists() else "no such checkpoint directory"
    raise argparse.ArgumentTypeError(f"{text}: {what}, and not one of the tiny random models "
                                     f"({', '.join(_tiny_models())})")


def _empty_dir(tmp: Path) -> str:
    (tmp / "empty").mkdir(exist_ok=True)
    return str(tmp / "empty")


@option_type("tokenizer", lambda tmp: [_missing(tmp), _empty_dir(tmp)])
def _tokenizer(text: str) -> str:
    if text == "byte":
        return text
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory (expected 'byte' or a tokenizer directory)")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no tokenizer.json or tokenizer.model in it")
    return text


@option_type("vocabulary", ["abc", "257", "0"])
def _vocabulary(text: str) -> str | int:
    if text == "byte":
        return text
    if not text.isdigit() or int(text) < 258:
        raise argparse.ArgumentTypeError(f"expected a BPE vocabulary size >= 258 or 'byte', got {text!r}")
    return int(text)


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def _check_writable_under(text: str) -> None:
    base = _nearest_existing(Path(text))
    if not base.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: cannot be created, {base} is a file")
    if not os.access(base, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be created, {base} is not writable")


@option_type("output file", lambda tmp: [str(tmp), _a_file(tmp) + "/out.json"])
def output_file(text: str) -> str:
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a directory, not a file")
    _check_writable_under(text)
    return text


@option_type("output path", lambda tmp: [_a_file(tmp) + "/results/"])
def output_path(text: str) -> str:
    _check_writable_under(text)
    return text


@option_type("output directory", lambda tmp: [_a_file(tmp), _a_file(tmp) + "/run"])
def output_dir(text: str) -> str:
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a file, not a directory")
    _check_writable_under(text)
    return text


@option_type("resume", lambda tmp: ["sometimes", _missing(tmp), _a_file(tmp)])
def _resume(text: str) -> str:
    if text in ("auto", "never") or Path(text).is_dir():
        return text
    raise argparse.ArgumentTypeError(f"expected auto, never or a checkpoint directory, got {text!r}"
                                     + (" (a file)" if Path(text).exists() else " (no such directory)"))


@option_type("KEY=VALUE", ["novalue", "=3"])
def _override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def names(what: str, known: Callable[[], list[str]], bad: list[str]):
    """A non-empty comma-separated list of names, each one of known() (called
    when parsing, so the lists it imports load only when the option is used)."""
    @option_type(what, bad)
    def parse(text: str) -> list[str]:
        choices = list(known())
        given = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in given if n not in choices]
        if unknown or not given:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)} in {text!r}; known: "
                                             f"{', '.join(choices)}")
        return given
    return parse


def _bench_ops() -> list[str]:
    from mixkit.bench import CASES
    from mixkit.bench.emu_cost import EXTRA_CASES

    return [*CASES, *EXTRA_CASES]


_ops = names("ops", _bench_ops, ["nope", "rms_norm,nope"])


@option_type("device", _cuda_bad)
def bench_device(text: str) -> str:
    """`device`, or emu: the emulated GPU (bench/emu_cost.py)."""
    if text == "emu":
        return text
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or emu, got {text!r}")
    return device(text)


# ---- commands -------------------------------------------------------------------------------------------------

class UsageError(Exception):
    """A user's mistake found while a command runs: one line, exit code 2."""


def _bench(args: argparse.Namespace) -> int:
    from mixkit import bench
    from mixkit.bench import harness

    if args.device == "emu":
        return _bench_emulated(args)
    unknown = [op for op in args.ops or [] if op not in bench.CASES]
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: counted on the emulated GPU only (--device emu), not timed")
    written: dict[str, Path] = {}

    def save(meta: dict, rows: list[dict], complete: bool = False) -> list[Path]:
        # after every case, so that a crash or Ctrl-C keeps what was measured
        if "path" not in written:
            out = Path(args.out)
            written["path"] = out / f"{harness.result_name(meta)}.json" if out.is_dir() or args.out.endswith("/") \
                else out
        return harness.write_results(written["path"], {**meta, "complete": complete}, rows,
                                     plot=complete and not args.no_plot)

    meta, rows = bench.run(device=args.device, quick=args.quick, ops=args.ops, compile=not args.no_compile,
                           cuda_graph=args.graph, progress=save if args.out else None)
    print()
    print(harness.render_table(rows))
    if args.out:
        for path in save(meta, rows, complete=True):
            print(f"wrote {path}")
    # A failing mixkit op fails the command, so CI and scripts notice. A
    # failing or missing peer (torch.compile without a C++ compiler, no
    # transformers) is only shown.
    return 1 if any("error" in r and r["impl"] == "mixkit" for r in rows) else 0


def _bench_emulated(args: argparse.Namespace) -> int:
    """`mixkit bench --device emu`: counters and projections on the emulated GPU (bench/emu_cost.py)."""
    from mixkit.bench import emu_cost

    if not emu_cost.emulated_build():
        raise UsageError("--device emu needs an emulated build of mixkit._core (-DMIXKIT_EMULATE=ON; "
                         "MIXKIT_CORE=path/to/_core*.so selects one)")
    written: dict[str, Path] = {}

    def save(meta: dict, results: list[dict]) -> None:
        # after every case: a report at the benchmark shapes takes hours
        if "path" not in written:
            out = Path(args.out)
            written["path"] = out / f"{emu_cost.result_name(meta)}.json" if out.is_dir() or args.out.endswith("/") \
                else out
        emu_cost.write(written["path"], meta, results)

    meta, results = emu_cost.run(ops=args.ops, resources=args.resources, on_result=save if args.out else None)
    print()
    print(emu_cost.render_markdown(meta, results))
    if args.out:
        print(f"wrote {written['path']} and {written['path'].with_suffix('.md')}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from mixkit.bench import harness

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = harness.collect_metadata(device)
    meta["mixkit_path"] = str(Path(__file__).resolve().parent)
    meta["cuda_available"] = torch.cuda.is_available()
    print(json.dumps(meta, indent=2, default=str))
    return 0


def _context_note(margs, prompt: int, new: int, option: str) -> str | None:
    """Past the model's max_seq_len: UsageError for a model whose attention
    is not windowed, else a note on what the rolling cache does."""
    total = prompt + new
    if total <= margs.max_seq_len:
        return None
    what = f"the prompt ({prompt} tokens) plus {option} {new} is {total} tokens," if new else f"{option} {prompt} is"
    if margs.sliding_window is None:
        raise UsageError(f"{what} past the model's max_seq_len {margs.max_seq_len} (it has no sliding window)")
    return (f"note: {what} past the model's max_seq_len {margs.max_seq_len}; its sliding window of "
            f"{margs.sliding_window} tokens keeps each token's attention on the last {margs.sliding_window}, so "
            f"this runs (positions past {margs.max_seq_len} were not seen in training)")


def _generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from mixkit import models
    from mixkit.tokenizer import ByteTokenizer, encode_chat, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tp or world
    if world > 1 and tp == 1:
        raise UsageError(f"--tp 1 under torchrun with {world} processes: each would print the same text; pass "
                         f"--tp {world} (or leave --tp out) to split the model over them, or run without torchrun")
    mesh = None
    if tp > 1:  # tensor parallel under torchrun: every rank loads only its shard
        from mixkit.parallel import tensor_parallel, tp_mesh_from_env
        mesh, device = tp_mesh_from_env(tp, device)
    checkpoint = args.checkpoint or (args.model if Path(args.model).is_dir() else None)
    if checkpoint:
        source = args.tokenizer or checkpoint
        try:
            tokenizer = ByteTokenizer() if source == "byte" else load_tokenizer(source)
        except FileNotFoundError:
            raise UsageError(f"{source} has no tokenizer.json or tokenizer.model; pass --tokenizer DIR (or "
                             "--tokenizer byte)") from None
        model = models.load(checkpoint, device=device, mesh=mesh)
        cfg = Path(checkpoint) / "config.json"
        eos = json.loads(cfg.read_text()).get("eos_token_id") if cfg.exists() else tokenizer.eos_id
        stop = [eos] if isinstance(eos, int) else list(eos or [])
    else:
        model = models.Transformer(models.CONFIGS[args.model]).init_weights(args.seed, std=0.1).to(device).eval()
        if mesh is not None:
            tensor_parallel(model, mesh)
        tokenizer = ByteTokenizer() if args.tokenizer in (None, "byte") else load_tokenizer(args.tokenizer)
        stop = []
    if args.chat:
        ids = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}])[0]
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    if max(ids) >= model.args.vocab_size:
        raise UsageError(f"the prompt has token id {max(ids)}, but the model's vocabulary has "
                         f"{model.args.vocab_size} ids: is --tokenizer the model's?")
    note = _context_note(model.args, len(ids), args.max_new_tokens, "--max-new-tokens")
    if note:
        print(note, file=sys.stderr)
    new: list[int] = []
    shown = ""

    def on_token(_row: int, token: int) -> None:  # stream: print the text decoded so far, minus what is shown
        nonlocal shown
        new.append(token)
        text = tokenizer.decode(new)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text

    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    try:
        models.generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, stop=stop, seed=args.seed, on_token=on_token)
    finally:
        print()  # end the streamed line, also on Ctrl-C or an error
    seconds = time.perf_counter() - start
    print(f"{len(new)} tokens in {seconds:.2f} s, {len(new) / seconds:.1f} tokens/s (prefill included)",
          file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from mixkit.train.run import train

    return train(args.config, args.set or [], device=args.device, quiet=args.quiet, resume=args.resume,
                 overwrite=args.overwrite)


def _eval(args: argparse.Namespace) -> int:
    from mixkit.train.run import evaluate_files

    results = evaluate_files(args.model, args.data, tokenizer=args.tokenizer, seq_len=args.seq_len,
                             stride=args.stride, device=args.device,
                             note=lambda margs, n: _context_note(margs, n, 0, "--seq-len"))
    print(f"{'component':<24} {'tokens':>10} {'bytes':>10} {'loss':>8} {'ppl':>10} {'bits/byte':>10}")
    for name, r in results.items():
        print(f"{name:<24} {r['tokens']:>10} {r['bytes']:>10} {r['loss']:>8.4f} {r['perplexity']:>10.3f} "
              f"{r['bits_per_byte']:>10.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _ppo(args: argparse.Namespace) -> int:
    from mixkit.train.ppo import demo, run_ppo

    if args.demo:
        if args.config or args.set or args.overwrite:
            raise UsageError("--demo runs on its own; it takes no --config, --set or --overwrite")
        demo()
        return 0
    if not args.config:
        raise UsageError("give --config FILE, or --demo")
    return run_ppo(args.config, args.set or [], device=args.device, overwrite=args.overwrite)


def _quickstart(args: argparse.Namespace) -> int:
    from mixkit.train.run import quickstart

    quickstart(steps=args.steps, device=args.device, out_dir=args.out, quiet=args.quiet, tokenizer=args.tokenizer,
               precision=args.precision, overwrite=args.overwrite)
    return 0


# ---- the parser ---------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not unset and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """mixkit's argument parser: defaults in --help, one-line errors (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One line, not argparse's usage block: the message and where to look."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DESCRIPTION = "mixkit: CUDA/HIP kernels, models, training and evaluation for Mistral-family LLMs."
EPILOG = "`mixkit COMMAND --help` shows a command's options and their defaults."


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mixkit", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser,
                                title="commands")
    device_help = "cpu or cuda (default: cuda if torch sees a GPU, else cpu)"

    q = sub.add_parser("quickstart", help="train a BPE and a small Mistral-style model on the stdlib sources (no "
                                          "download); held-out bits per byte against gzip -9 and xz -9e, a sample")
    q.add_argument("--steps", type=integer(1), metavar="N", help="training steps (default on the CPU, about 4.5 minutes on 2 "
                   "cores: 2000 with bf16, 900 with fp32; 3000 on a GPU)")
    q.add_argument("--precision", choices=["bf16", "fp32"], help="bf16: bf16 compute over float32 master weights "
                   "(default on a GPU and on a CPU with native bf16: AVX512-BF16 or AMX); fp32 otherwise")
    q.add_argument("--tokenizer", type=_vocabulary, metavar="N|byte", help="BPE vocabulary size (>= 258), or 'byte' (default: a "
                   "2048-token BPE)")
    q.add_argument("--device", type=device, metavar="{cpu,cuda}", help=device_help)
    q.add_argument("--out", type=output_dir, metavar="DIR", default="runs/quickstart", help="run directory")
    q.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out "
                   "(without it, such a directory stops the command)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_quickstart)

    t = sub.add_parser("train", help="train from a run file (TrainConfig TOML plus a [data] table)")
    t.add_argument("--config", type=existing_file, metavar="FILE", required=True,
                   help="run file (.toml): TrainConfig keys, [model] and [data] tables (README: Training); "
                        "relative paths in it are relative to the file")
    t.add_argument("--set", action="append", type=_override, metavar="KEY=VALUE",
                   help="override a key (model.<field>=, data.<field>= for the tables); repeatable; a relative "
                        "path given here is relative to the current directory")
    t.add_argument("--device", type=device, metavar="{cpu,cuda}", help=device_help)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", type=_resume, default="auto", metavar="auto|never|PATH",
                   help="auto (default): continue from the newest complete checkpoint in checkpoint_dir, if any; "
                        "never: start over (removes the run's checkpoints and outputs); PATH: continue from that "
                        "checkpoint, removing the run's checkpoints past it. SIGINT / SIGTERM save a checkpoint "
                        "and exit with code 75")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a data.out_dir that holds another run's outputs, replacing them and its "
                        "checkpoints (without it, such a directory stops the command before anything is written)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on .jsonl files")
    e.add_argument("--model", type=existing_dir, metavar="DIR", required=True,
                   help="checkpoint directory (Hugging Face or Mistral native)")
    e.add_argument("--data", type=existing_file, metavar="FILE", nargs="+", required=True,
                   help=".jsonl / .jsonl.gz / .jsonl.zst files ({\"text\": ...} per line), one component each")
    e.add_argument("--tokenizer", type=_tokenizer, metavar="DIR|byte",
                   help="'byte' or a directory with tokenizer.json/tokenizer.model (default: --model)")
    e.add_argument("--seq-len", type=integer(2), metavar="N", help="tokens per evaluation window (default: the model's "
                   "max_seq_len, at most 1024)")
    e.add_argument("--stride", type=integer(1), metavar="N", help="scored tokens per window after the first (default seq_len / 2)")
    e.add_argument("--device", type=device, metavar="{cpu,cuda}", help=device_help)
    e.add_argument("--json", type=output_file, metavar="FILE", help="also write the results to this file")
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="generate text with a checkpoint directory or a tiny random model")
    g.add_argument("--model", type=_model, metavar="DIR|NAME", default="tiny-mistral",
                   help="checkpoint directory (Hugging Face or Mistral native), or a tiny random model: "
                        + ", ".join(_tiny_models()))
    g.add_argument("--checkpoint", type=existing_dir, metavar="DIR", help="same as --model DIR")
    g.add_argument("--tokenizer", type=_tokenizer, metavar="DIR|byte", help="'byte' or a directory with tokenizer.json/tokenizer.model "
                   "(default: the model directory's; byte for a tiny model)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a Mistral/Llama chat turn ([INST] ... [/INST])")
    g.add_argument("--prompt", type=utf8_text, metavar="TEXT", default="Hello", help="prompt text (UTF-8)")
    g.add_argument("--max-new-tokens", type=integer(1), metavar="N", default=32, help="tokens to generate at most")
    g.add_argument("--temperature", type=number(0.0), metavar="T", default=0.0, help="sampling temperature; 0: greedy")
    g.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), metavar="P", default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches this")
    g.add_argument("--top-k", type=integer(1), metavar="K", help="sample from the k most likely tokens (default: all)")
    g.add_argument("--seed", type=integer(), metavar="N", default=0, help="sampling seed (and a tiny model's weights)")
    g.add_argument("--device", type=device, metavar="{cpu,cuda}", help=device_help)
    g.add_argument("--tp", type=integer(1), metavar="N", help="tensor-parallel ranks, under torchrun --nproc_per_node N "
                   "(gloo on the CPU, NCCL on GPUs); default: torchrun's process count, else 1")
    g.set_defaults(func=_generate)

    p = sub.add_parser("ppo", help="Llama 2-Chat's PPO from a run file (policy, reward models, prompts .jsonl), "
                                   "or --demo: a tiny policy raising a rule-based reward on the CPU")
    p.add_argument("--config", type=existing_file, metavar="FILE", help="run file (.toml): policy, prompts, [reward], [ppo] "
                   "(README: RLHF); relative paths in it are relative to the file")
    p.add_argument("--set", action="append", type=_override, metavar="KEY=VALUE",
                   help="override a key (ppo.<field>=, reward.<key>= for the tables); repeatable")
    p.add_argument("--device", type=device, metavar="{cpu,cuda}", help=device_help)
    p.add_argument("--overwrite", action="store_true", help="start over in an out_dir that holds another run's "
                   "outputs and no checkpoint, replacing them")
    p.add_argument("--demo", action="store_true", help="self-contained CPU demonstration (about 20 s on 2 cores)")
    p.set_defaults(func=_ppo)

    b = sub.add_parser("bench", help="time mixkit ops against torch eager, torch.compile and Liger")
    b.add_argument("--quick", action="store_true", help="fewer token counts and shorter timing")
    b.add_argument("--device", type=bench_device, metavar="{cpu,cuda,emu}",
                   help=device_help + "; emu: memory, bank-conflict and occupancy counters and a projection on the "
                   "emulated GPU (an emulated build of _core), no timing")
    b.add_argument("--ops", type=_ops, metavar="OP,...", help="comma-separated op names (default: all; a wrong name lists them)")
    b.add_argument("--resources", type=existing_file, metavar="JSON", help="with --device emu: kernel registers and "
                   "shared memory from tools/kernel_resources.py (adds occupancy and waves)")
    b.add_argument("--out", type=output_path, metavar="PATH", help="results JSON path, with a .md table (and a .png) beside it; "
                   "a directory gets <date>_<device>_<commit>.json. Written after every case")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    b.add_argument("--graph", action="store_true", help="time CUDA-graph replays (removes launch overhead; cuda only)")
    b.add_argument("--no-plot", action="store_true", help="no .png even if matplotlib is installed")
    b.set_defaults(func=_bench)

    from mixkit.serve.server import add_parser as add_serve
    add_serve(sub)

    i = sub.add_parser("info", help="print build info, torch and device versions (JSON)")
    i.add_argument("--device", type=device, metavar="{cpu,cuda}", help=device_help)
    i.set_defaults(func=_info)
    return parser


def _say_error(command: str, message: str) -> None:
    for line in message.splitlines() or [""]:
        print(f"mixkit {command}: error: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "?"
    try:
        try:
            if argv[:2] == ["bench", "serve"]:  # the serving benchmark has its own options
                from mixkit.bench.serve import main as bench_serve
                command = "bench serve"
                return bench_serve(argv[2:])
            if argv[:2] == ["bench", "models"]:  # so has the model-level one (python -m mixkit.bench.models)
                from mixkit.bench.models import main as bench_models
                command = "bench models"
                return bench_models(argv[2:])
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, or a bad option (its one line is printed): a code, for callers of main
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        command = args.command
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # after the terminal's ^C; what was printed stays
        return EXIT_CTRL_C
    except BrokenPipeError:  # the reader went away (`mixkit generate | head`): stop as a pipeline expects
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return EXIT_BROKEN_PIPE
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as exc:
        # A user's mistake, or bad input reaching the library (its message
        # names the argument): a run file's ConfigError has one line per
        # problem, anything else is shown by its first line.
        config = sys.modules.get("mixkit.train.config")  # not loaded: not a ConfigError
        text = str(exc).strip() or type(exc).__name__
        if not isinstance(exc, UsageError) and not (config and isinstance(exc, config.ConfigError)):
            text = text.splitlines()[0]
        _say_error(command, text)
    return EXIT_USAGE


def exit_process(code: int):
    """How `mixkit` and `python -m mixkit` end: sys.exit, or under torchrun
    (WORLD_SIZE > 1) mixkit.parallel.exit_rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mixkit.parallel import exit_rank
        exit_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
