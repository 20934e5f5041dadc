"""The `mixkit` command as a new user meets it: a mistake on the command line
or in a run file ends with exit code 2 and one line that names the option,
field, path or value, never a traceback; no run overwrites another run's
outputs; Ctrl-C exits quietly with 130; --help, README.md and
bench/README.md agree.

Commands run as child processes. Most are forked from a server process that
has imported mixkit once (multiprocessing's forkserver), which makes a
command cost milliseconds instead of torch's import; the entry point is the
same `mixkit.cli.main`, with the child's own stdout, stderr and exit code.
Ctrl-C, non-UTF-8 argv and torchrun go through real `python -m mixkit`
processes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mixkit
from mixkit import models
from mixkit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# ---- running the command --------------------------------------------------------------------------------------

_PRELOAD = ["mixkit", "mixkit.cli", "mixkit.train.run", "mixkit.train.ppo", "mixkit.train.trainer", "mixkit.data",
            "mixkit.evaluation", "mixkit.tokenizer", "mixkit.bench", "mixkit.bench.serve", "mixkit.serve.server",
            "test_cli"]
_server = None


def _forkserver():
    global _server
    if _server is None:
        _server = multiprocessing.get_context("forkserver")
        _server.set_forkserver_preload(_PRELOAD)
    return _server


def _child(argv: list[str], cwd: str, out: str, err: str, env: dict, block: list[str]) -> None:
    """What the `mixkit` console script does, in a forked child: stdout and
    stderr are files, an uncaught exception prints its traceback (exit 1)."""
    import io

    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    os.environ.update(env)
    for name in block:  # as if not installed: `import name` raises ModuleNotFoundError
        sys.modules[name] = None
    sys.argv = ["mixkit", *argv]
    sys.exit(main(argv))


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def error(self) -> str:
        """The command's one error line; fails unless that is all of stderr."""
        lines = self.err.strip().splitlines()
        assert "Traceback" not in self.err, self.err
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        assert lines[0].startswith("mixkit"), lines[0]
        return lines[0]


def run_cli(*argv: str, cwd: Path, env: dict | None = None, block: tuple[str, ...] = (), timeout: float = 300
            ) -> Result:
    fd_out, out = tempfile.mkstemp(suffix=".out")
    fd_err, err = tempfile.mkstemp(suffix=".err")
    os.close(fd_out)
    os.close(fd_err)
    try:
        proc = _forkserver().Process(target=_child, args=(list(argv), str(cwd), out, err, env or {}, list(block)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise AssertionError(f"mixkit {' '.join(argv)}: timed out after {timeout} s")
        return Result(proc.exitcode, Path(out).read_text(), Path(err).read_text())
    finally:
        os.unlink(out)
        os.unlink(err)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))


def _terminal_sigint() -> None:
    # a child inherits an ignored SIGINT from a background pytest; a terminal's command has the default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _python_mixkit(*argv, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixkit", *argv], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_terminal_sigint, **kw)


# ---- a tiny training run whose file lives in its own directory -------------------------------------------------

DOCS = ["def add(a, b):\n    return a + b\n" * 3, "class A:\n    pass\n" * 5, "import os\nprint(os.sep)\n" * 4] * 4


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


RUN = """\
model_name = "tiny-mistral"
max_steps = 2
warmup_steps = 1
precision = "fp32"
loss_chunk_size = 64
[model]
vocab_size = 258
dim = 64
n_layers = 1
n_heads = 2
head_dim = 32
hidden_dim = 64
[data]
seq_len = 32
batch_size = 2
out_dir = "run"
[data.components.code]
paths = ["code.jsonl"]
weight = 1.0
"""


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    """cfg/run.toml with paths relative to cfg/; the commands run from tmp_path."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    _jsonl(cfg / "code.jsonl", DOCS)
    (cfg / "run.toml").write_text(RUN)
    return cfg / "run.toml"


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content hash (directories as 'dir')."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _quickstart_like(d: Path) -> Path:
    """The outputs of a quick-start run: no checkpoints, a 2000-line log."""
    (d / "model").mkdir(parents=True)
    (d / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 2001)))
    (d / "model" / "model.safetensors").write_bytes(b"weights of another model")
    (d / "model" / "config.json").write_text("{}\n")
    (d / "summary.json").write_text('{"steps": 2000}\n')
    (d / "loss.png").write_bytes(b"png")
    return d


# ---- 1. no run overwrites another run's outputs ---------------------------------------------------------------

def test_train_never_overwrites_another_runs_outputs(tmp_path, run_file):
    other = _quickstart_like(tmp_path / "qs_copy")
    before = _snapshot(other)
    r = run_cli("train", "--config", str(run_file), "--set", "data.out_dir=qs_copy", "--quiet", cwd=tmp_path)
    assert r.rc == 2
    line = r.error()
    assert "qs_copy" in line and "log.jsonl" in line and "--overwrite" in line
    assert _snapshot(other) == before  # not a byte changed, nothing added

    # --overwrite asks for it: the old outputs go, none of them left describing another model
    r = run_cli("train", "--config", str(run_file), "--set", "data.out_dir=qs_copy", "--quiet", "--overwrite",
                cwd=tmp_path)
    assert r.rc == 0, r.err
    assert "removed" in r.out and not (other / "summary.json").exists()
    assert [json.loads(x)["step"] for x in (other / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert models.load(other / "model").args.dim == 64


def test_quickstart_and_ppo_never_overwrite_another_runs_outputs(tmp_path, run_file):
    other = _quickstart_like(tmp_path / "old")
    before = _snapshot(other)
    r = run_cli("quickstart", "--out", str(other), "--steps", "1", cwd=tmp_path)
    assert r.rc == 2 and str(other) in r.error() and "--overwrite" in r.error()
    ppo = tmp_path / "ppo.toml"
    ppo.write_text('policy = "p"\nprompts = "p.jsonl"\nout_dir = "old"\n[reward]\nhelpfulness = "rm"\n')
    r = run_cli("ppo", "--config", str(ppo), cwd=tmp_path)
    assert r.rc == 2 and "old" in r.error() and "--overwrite" in r.error()
    assert _snapshot(other) == before


def test_resuming_a_compatible_run_stays_as_it_was(tmp_path, run_file):
    run = tmp_path / "cfg" / "run"  # out_dir = "run" in cfg/run.toml: relative to the file, not the cwd
    assert run_cli("train", "--config", str(run_file), "--quiet", cwd=tmp_path).rc == 0
    assert (run / "model" / "tokenizer.json").exists() and not (tmp_path / "run").exists()
    r = run_cli("train", "--config", str(run_file), "--quiet", "--set", "max_steps=3", cwd=tmp_path)
    assert r.rc == 0 and "resuming from" in r.out, r.err
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    # another model in the same directory: stopped before a single file changes (config.json included)
    before = _snapshot(run)
    r = run_cli("train", "--config", str(run_file), "--quiet", "--set", "max_steps=4", "--set", "model.dim=32",
                cwd=tmp_path)
    assert r.rc == 2 and "model.dim is 64 in the checkpoint but 32 now" in r.error()
    assert _snapshot(run) == before


# ---- 2. the main install: bench without transformers, results as they come, the hf extra --------------------------

def test_bench_skips_a_missing_peer_and_keeps_its_results(tmp_path):
    r = run_cli("bench", "--quick", "--device", "cpu", "--ops", "rms_norm,hf_decode", "--no-compile", "--no-plot",
                "--out", "results/", cwd=tmp_path, block=("transformers",))
    assert r.rc == 0 and "Traceback" not in r.err, r.err
    assert "hf_decode" in r.out and "skipped" in r.out and "mixkit[hf]" in r.out
    (results,) = (tmp_path / "results").glob("*.json")
    data = json.loads(results.read_text())
    assert data["meta"]["complete"] is True
    assert any(row["op"] == "rms_norm" and "median_us" in row for row in data["rows"])
    assert [row["skipped"] for row in data["rows"] if row["op"] == "hf_decode"][0].startswith("mixkit.hf needs")


def test_bench_writes_results_as_they_come(tmp_path, monkeypatch):
    """Stopped by Ctrl-C in its second op, the run keeps the first op's rows."""
    from mixkit import bench

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setitem(bench.CASES, "rope", interrupted)
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "rms_norm,rope", "--no-compile", "--no-plot",
                 "--out", str(out)]) == 130
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is False and {r["op"] for r in data["rows"]} == {"rms_norm"}


def test_mixkit_hf_without_transformers_names_the_extra(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "mixkit.hf", raising=False)
    with pytest.raises(ImportError, match=r"transformers >= 5\.0\.0.*pip install 'mixkit\[hf\]'"):
        importlib.import_module("mixkit.hf")


def _extras() -> dict[str, list[str]]:
    """The optional dependencies: pyproject.toml's beside the tests, else the installed package's."""
    import importlib.metadata
    import re

    pyproject = ROOT / "pyproject.toml"
    if pyproject.exists():
        from mixkit.train.config import read_toml

        return read_toml(pyproject)["project"]["optional-dependencies"]
    extras: dict[str, list[str]] = {}
    for req in importlib.metadata.requires("mixkit") or []:
        m = re.search(r"""extra == ["'](\w+)["']""", req)
        if m:
            extras.setdefault(m.group(1), []).append(req.split(";")[0])
    return extras


def test_the_hf_extra_and_the_test_pins_agree_with_mixkit_hf():
    from packaging.requirements import Requirement

    from mixkit.hf import MIN_TRANSFORMERS

    extras = _extras()
    pins = {name: Requirement(r).specifier for name, reqs in extras.items() for r in reqs
            if Requirement(r).name == "transformers"}
    assert set(pins) >= {"hf", "test"}
    for name, spec in pins.items():  # the minimum, and nothing below it
        assert spec.contains(MIN_TRANSFORMERS) and not spec.contains("4.99"), (name, spec)


# ---- 3. the whole run file's types, before anything runs -------------------------------------------------------

@pytest.mark.parametrize("setting, field, expected", [
    ('max_steps = "4"', "max_steps", "an integer"),
    ("--set max_steps=abc", "max_steps", "an integer"),
    ('lr = "fast"', "lr", "a number"),
    ('[data] seq_len = "128"', "data.seq_len", "an integer"),
    ("[data] batch_size = 2.5", "data.batch_size", "an integer"),
    ("[model] dim = 100.5", "model.dim", "an integer"),
    ('[components] paths = "code.jsonl"', "data.components.code.paths", "a list of strings"),
    ("betas = [0.9]", "betas", "a list of 2 numbers"),
    ("--set data.shuffle_sequences=3", "data.shuffle_sequences", "true or false"),
])
def test_a_wrong_type_names_field_type_and_file(tmp_path, run_file, setting, field, expected):
    text = run_file.read_text()
    args = []
    if setting.startswith("--set"):
        args = ["--set", setting.split(" ", 1)[1]]
    elif setting.startswith("["):
        table, line = setting[1:].split("] ")
        header = "[data.components.code]" if table == "components" else f"[{table}]"
        key = line.split(" =")[0]
        lines = [x for x in text.splitlines() if not x.startswith(key + " =")]
        i = lines.index(header)
        text = "\n".join(lines[:i + 1] + [line] + lines[i + 1:]) + "\n"
    else:
        key = setting.split(" =")[0]
        text = setting + "\n" + "\n".join(x for x in text.splitlines() if not x.startswith(key + " =")) + "\n"
    run_file.write_text(text)
    r = run_cli("train", "--config", str(run_file), *args, cwd=tmp_path)
    assert r.rc == 2
    line = r.error()
    assert f": {field}: expected {expected}, got" in line
    assert (f"--set {args[1]}" if args else str(run_file)) in line
    assert not (tmp_path / "cfg" / "run").exists()  # nothing ran, nothing was written


def test_every_wrong_field_gets_its_line(tmp_path, run_file):
    run_file.write_text('max_steps = "4"\nlr = "fast"\n' + run_file.read_text().replace(
        "max_steps = 2\n", "").replace("batch_size = 2", "batch_size = 2.5"))
    r = run_cli("train", "--config", str(run_file), cwd=tmp_path)
    lines = r.err.strip().splitlines()
    assert r.rc == 2 and "Traceback" not in r.err and len(lines) == 3
    assert [x.split(": ")[3] for x in lines] == ["data.batch_size", "max_steps", "lr"]


def test_ppo_run_file_types(tmp_path):
    ppo = tmp_path / "ppo.toml"
    ppo.write_text('policy = "p"\nprompts = "p.jsonl"\n[reward]\nhelpfulness = "rm"\n[ppo]\nbatch_size = "8"\n')
    r = run_cli("ppo", "--config", str(ppo), cwd=tmp_path)
    assert r.rc == 2 and f"{ppo}: ppo.batch_size: expected an integer, got \"8\"" in r.error()


@pytest.mark.parametrize("content, what", [(b"max_steps = \n", "not valid TOML"),
                                           (b"model_name = \"caf\xe9\"\n", "not UTF-8 text (byte 0xe9")])
def test_toml_syntax_and_encoding_errors_name_the_file(tmp_path, content, what):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(content)
    for command in ("train", "ppo"):
        r = run_cli(command, "--config", str(bad), cwd=tmp_path)
        assert r.rc == 2 and f"{bad}: {what}" in r.error()


# ---- 4. --device cuda without a GPU, 5. Ctrl-C ------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
def test_device_cuda_without_a_gpu_is_one_line_in_every_command(tmp_path):
    commands = [name for name, a in _subcommands().items() if any("--device" in x.option_strings for x in a._actions)]
    assert {"quickstart", "train", "eval", "generate", "ppo", "bench", "info"} <= set(commands)
    for name in commands:
        r = run_cli(*name.split(), "--device", "cuda", cwd=tmp_path)
        assert r.rc == 2 and "--device" in r.error() and "sees no CUDA GPU" in r.error()


def test_bench_device_emu_needs_an_emulated_build(tmp_path):
    # The test suite's own _core is the CPU (or GPU) build: the counters of
    # --device emu are not in it, nor are the emulated-only ops timed.
    r = run_cli("bench", "--device", "emu", "--ops", "rms_norm", cwd=tmp_path)
    assert r.rc == 2 and "--device emu needs an emulated build" in r.error() and "Traceback" not in r.err
    r = run_cli("bench", "--device", "cpu", "--ops", "paged_kv_append", cwd=tmp_path)
    assert r.rc == 2 and "paged_kv_append: counted on the emulated GPU only" in r.error()
    r = run_cli("bench", "--device", "tpu", cwd=tmp_path)
    assert r.rc == 2 and "expected cpu, cuda or emu, got 'tpu'" in r.error()


def _wait_for_output(proc: subprocess.Popen, stream, text: bytes, timeout: float = 120) -> bytes:
    os.set_blocking(stream.fileno(), False)
    seen, end = b"", time.monotonic() + timeout
    while text not in seen:
        assert proc.poll() is None and time.monotonic() < end, (seen, proc.returncode)
        seen += stream.read() or b""
        time.sleep(0.01)
    return seen


def test_ctrl_c_while_generating_exits_quietly_with_130(tmp_path):
    proc = _python_mixkit("generate", "--device", "cpu", "--max-new-tokens", "1000000", "--temperature", "1",
                          cwd=tmp_path)
    shown = _wait_for_output(proc, proc.stdout, b"Hello")
    time.sleep(0.5)  # well into the loop
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    assert [x for x in err.decode().splitlines() if x.strip() and not x.startswith("note:")] == []
    assert (shown + out).startswith(b"Hello") and len(shown + out) > len(b"Hello")  # what was printed stays


def test_a_closed_pipe_stops_quietly(tmp_path):
    """`mixkit generate | head -c 5`: the reader goes away mid-stream."""
    proc = _python_mixkit("generate", "--device", "cpu", "--max-new-tokens", "400", "--temperature", "1",
                          cwd=tmp_path)
    _wait_for_output(proc, proc.stdout, b"Hello")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_ctrl_c_during_start_up_exits_quietly_with_130(tmp_path, run_file):
    """Ctrl-C to the whole process group (as a terminal sends it) while
    `mixkit train` tokenizes its files in worker processes."""
    cfg = run_file.parent
    for i in range(2):  # two files: two tokenizer workers
        _jsonl(cfg / f"big{i}.jsonl", ["x = 1\n" * 20000] * 40)
    run_file.write_text(run_file.read_text().replace('paths = ["code.jsonl"]', 'paths = ["big0.jsonl", "big1.jsonl"]'))
    proc = _python_mixkit("train", "--config", str(run_file), cwd=tmp_path, start_new_session=True)
    _wait_for_output(proc, proc.stderr, b"tokenize")
    time.sleep(1.0)  # past the workers' start (a Ctrl-C during it is lost: data/token_files.py)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-3000:]
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()[-3000:]
    assert not (cfg / "run" / "log.jsonl").exists()


def test_ctrl_c_while_the_console_script_imports_exits_quietly_with_130(tmp_path):
    """Ctrl-C while `mixkit` (the console script: python/mixkit_command.py)
    is still importing torch, before any of mixkit.cli runs."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from mixkit_command import main; sys.exit(main())",
                             "info"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_terminal_sigint)
    maps, end = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text():  # inside `import torch`
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err and out == b"", err.decode()


# ---- 6. sampling settings, on the command line and in the library ---------------------------------------------

@pytest.mark.parametrize("option, value", [("--top-p", "0"), ("--top-k", "0"), ("--temperature", "-1"),
                                           ("--top-p", "2"), ("--max-new-tokens", "-3"), ("--tp", "0"),
                                           ("--temperature", "nan")])
def test_sampling_options_are_checked(tmp_path, option, value):
    r = run_cli("generate", option, value, cwd=tmp_path)
    assert r.rc == 2 and f"argument {option}:" in r.error() and value in r.error()


def test_generate_and_sample_check_their_arguments():
    from mixkit.models import generate, sample

    model = models.Transformer(models.CONFIGS["tiny-mistral"]).init_weights(0)
    logits = torch.randn(2, 256)
    for kwargs, match in [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k"),
                          ({"top_k": 2.5}, "top_k"), ({"temperature": -1.0}, "temperature"),
                          ({"temperature": float("nan")}, "temperature"), ({"top_k": True}, "top_k")]:
        with pytest.raises(ValueError, match=match):
            sample(logits, **{"temperature": 1.0, **kwargs})
        with pytest.raises(ValueError, match=f"generate: {match}"):
            generate(model, [1, 2], 4, **{"temperature": 1.0, **kwargs})
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], -3)
    assert generate(model, [1, 2], 0) == [[]]
    assert sample(logits, 1.0, top_p=1e-9).tolist() == logits.argmax(-1).tolist()  # the top token alone


# ---- 7. past the model's positions -----------------------------------------------------------------------------

def _model_dir(tmp_path: Path, name: str, config: str, tokenizer: bool = True) -> Path:
    from mixkit.tokenizer import ByteTokenizer
    from mixkit.train.run_tokenizer import save_model_tokenizer

    d = tmp_path / name
    models.save(models.Transformer(models.CONFIGS[config].replace(vocab_size=258)).init_weights(0), d)
    if tokenizer:
        save_model_tokenizer(ByteTokenizer(), d)
    return d


def test_context_overflow_is_an_error_or_a_note(tmp_path):
    llama = _model_dir(tmp_path, "llama", "tiny-llama")  # 512 positions, no window
    r = run_cli("generate", "--model", str(llama), "--prompt", "x" * 600, "--max-new-tokens", "4", cwd=tmp_path)
    assert r.rc == 2 and "--max-new-tokens 4 is 604 tokens, past the model's max_seq_len 512" in r.error()
    mistral = _model_dir(tmp_path, "mistral", "tiny-mistral")  # 512 positions, window 16: the rolling cache
    r = run_cli("generate", "--model", str(mistral), "--prompt", "x" * 600, "--max-new-tokens", "4", cwd=tmp_path)
    assert r.rc == 0 and "note:" in r.err and "sliding window of 16" in r.err, r.err
    data = _jsonl(tmp_path / "val.jsonl", DOCS[:3])
    r = run_cli("eval", "--model", str(llama), "--data", str(data), "--seq-len", "1024", cwd=tmp_path)
    assert r.rc == 2 and "--seq-len 1024 is past the model's max_seq_len 512" in r.error()
    r = run_cli("eval", "--model", str(llama), "--data", str(data), cwd=tmp_path)  # default: 512 here, not 1024
    assert r.rc == 0 and "val" in r.out, r.err
    r = run_cli("eval", "--model", str(mistral), "--data", str(data), "--seq-len", "1024", cwd=tmp_path)
    assert r.rc == 0 and "note:" in r.err, r.err


# ---- 8. every model directory carries its tokenizer; generate --tokenizer ---------------------------------------

def test_generate_tokenizer_option(tmp_path):
    bare = _model_dir(tmp_path, "bare", "tiny-llama", tokenizer=False)
    r = run_cli("generate", "--model", str(bare), cwd=tmp_path)
    assert r.rc == 2 and str(bare) in r.error() and "--tokenizer" in r.error()
    r = run_cli("generate", "--model", str(bare), "--tokenizer", "byte", "--max-new-tokens", "3", cwd=tmp_path)
    assert r.rc == 0 and r.out.startswith("Hello"), r.err


def test_ppo_and_reward_model_directories_carry_the_tokenizer(tmp_path):
    from mixkit.tokenizer import ByteTokenizer, load_tokenizer
    from mixkit.train import RewardModel
    from mixkit.train.reward import save_reward_model

    policy = _model_dir(tmp_path, "policy", "tiny-llama", tokenizer=False)
    save_reward_model(RewardModel(models.load(policy)), tmp_path / "rm", tokenizer=ByteTokenizer())
    assert load_tokenizer(tmp_path / "rm").encode("ab") == ByteTokenizer().encode("ab")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(4)))
    (tmp_path / "ppo.toml").write_text('policy = "policy"\ntokenizer = "byte"\nprompts = "prompts.jsonl"\n'
                                       'out_dir = "out"\n[reward]\nhelpfulness = "rm"\n[ppo]\nbatch_size = 2\n'
                                       'mini_batch_size = 1\nmax_new_tokens = 2\niterations = 1\nprecision = "fp32"\n')
    r = run_cli("ppo", "--config", str(tmp_path / "ppo.toml"), cwd=tmp_path)
    assert r.rc == 0, r.err
    assert (tmp_path / "out" / "model" / "tokenizer.json").exists()
    r = run_cli("generate", "--model", str(tmp_path / "out" / "model"), "--max-new-tokens", "2", cwd=tmp_path)
    assert r.rc == 0 and r.out.startswith("Hello"), r.err


# ---- 9. the smaller items --------------------------------------------------------------------------------------

def test_quickstart_steps_zero_is_refused(tmp_path):
    r = run_cli("quickstart", "--steps", "0", "--out", "qs", cwd=tmp_path)
    assert r.rc == 2 and "argument --steps: expected an integer >= 1, got 0" in r.error()
    assert not (tmp_path / "qs").exists()


def test_non_utf8_prompt_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mixkit", "generate", "--prompt", b"caf\xe9"], cwd=tmp_path,
                          env=_env(), capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--prompt: not valid UTF-8 text (byte 0xe9 at character 3)" in err


def test_resume_stops_when_the_data_changed_or_nothing_is_left(tmp_path, run_file):
    run = tmp_path / "cfg" / "run"
    assert run_cli("train", "--config", str(run_file), "--quiet", cwd=tmp_path).rc == 0
    before = _snapshot(run)
    r = run_cli("train", "--config", str(run_file), "--quiet", "--set", "max_steps=1", cwd=tmp_path)
    assert r.rc == 2 and "at step 2, past max_steps = 1: nothing to train" in r.error()
    _jsonl(tmp_path / "cfg" / "code.jsonl", DOCS + ["def more():\n    pass\n"])
    r = run_cli("train", "--config", str(run_file), "--quiet", "--set", "max_steps=3", cwd=tmp_path)
    assert r.rc == 2 and "the training data of component code is '12 documents" in r.error()
    # the token cache follows the file; the run's own files stay as they were
    assert {k: v for k, v in _snapshot(run).items() if not k.startswith("tokens")} == \
        {k: v for k, v in before.items() if not k.startswith("tokens")}


def test_generate_under_torchrun_without_tp(tmp_path):
    """WORLD_SIZE > 1 is torchrun: --tp 1 would print everything once per process."""
    r = run_cli("generate", "--tp", "1", cwd=tmp_path, env={"WORLD_SIZE": "2"})
    assert r.rc == 2 and "--tp 1 under torchrun with 2 processes" in r.error()


def test_torchrun_generate_splits_the_model_and_prints_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mixkit",
           "generate", "--model", "tiny-olmo", "--max-new-tokens", "4", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Hello") == 1, proc.stdout


@pytest.mark.parametrize("code", [0, 3])
def test_a_rank_ends_with_its_output_and_code(tmp_path, code):
    """mixkit.parallel.exit_rank leaves through os._exit: what the rank wrote to
    its (block-buffered) pipes must still arrive, and its exit code."""
    script = (f"import sys, torch.distributed as dist\n"
              f"from mixkit.parallel import exit_rank\n"
              f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
              f"print('no newline yet', end='')\n"
              f"sys.stderr.write('on stderr')\n"
              f"exit_rank({code})\n")
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}  # buffered, as pipes are by default
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code and proc.stdout == "no newline yet", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.endswith("on stderr")


def test_model_path_is_named(tmp_path):
    data = _jsonl(tmp_path / "x.jsonl", DOCS[:1])
    for command in (["generate", "--model", "nope_dir"], ["eval", "--model", "nope_dir", "--data", str(data)]):
        r = run_cli(*command, cwd=tmp_path)
        assert r.rc == 2 and "--model: nope_dir: no such" in r.error()


# ---- every option of every command, from argparse itself ------------------------------------------------------

def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its words ("train", "bench serve")."""
    from mixkit.bench.models import build_parser as bench_models_parser
    from mixkit.bench.serve import build_parser as bench_serve_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {**sub.choices, "bench serve": bench_serve_parser(), "bench models": bench_models_parser()}


def _bad_inputs(tmp: Path):
    """(command, option, value) for every value-taking option: each value its type must reject, and a
    value outside its choices."""
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:  # --help, flags
                continue
            assert action.choices or hasattr(action.type, "bad"), \
                f"mixkit {name} {action.option_strings[0]}: give it a checked type from mixkit.cli (or choices)"
            values = list(action.type.bad(tmp)) if hasattr(action.type, "bad") else []
            values += ["bogus"] if action.choices else []
            for value in values:
                yield name, action.option_strings[0], value


def test_every_option_rejects_bad_values_in_one_line(tmp_path):
    cases = list(_bad_inputs(tmp_path))
    assert len(cases) > 60
    for command, option, value in cases:
        r = run_cli(*command.split(), option, value, cwd=tmp_path)
        assert r.rc == 2, (command, option, value, r.out, r.err)
        line = r.error()
        assert line.startswith(f"mixkit {command}: error: argument {option}"), line
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if value.isprintable() and value not in ("nan", "inf"):
            assert value.rstrip("/") in line or value in line, line
        elif not shown.isprintable():
            assert "not valid UTF-8" in line, line


def test_required_options_and_commands(tmp_path):
    data = _jsonl(tmp_path / "x.jsonl", DOCS[:1])
    for argv, text in [((), "required: COMMAND"), (("nope",), "invalid choice: 'nope'"),
                       (("train",), "required: --config"), (("eval", "--data", str(data)), "required: --model"),
                       (("ppo",), "give --config FILE, or --demo")]:
        r = run_cli(*argv, cwd=tmp_path)
        assert r.rc == 2 and text in r.error(), (argv, r.err)


# ---- 10. help, README.md and bench/README.md agree -------------------------------------------------------------

def test_help_shows_every_option_and_its_default():
    from mixkit.cli import _HelpFormatter

    parsers = _subcommands()
    for name, parser in parsers.items():
        formatter = _HelpFormatter(parser.prog)
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert text.strip(), f"mixkit {name} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:
                assert "default" in text, f"mixkit {name} {action.option_strings[0]}: its help hides the default"
    top = build_parser().format_help()
    assert all(name.split()[0] in top for name in parsers)
    assert "removing the run's checkpoints past it" in " ".join(parsers["train"].format_help().split())
    assert "about 20 s" in " ".join(parsers["ppo"].format_help().split())


def _readme(name: str) -> str:
    path = ROOT / name
    if not path.exists():
        pytest.skip(f"{name} is not beside the tests (a copy of tests/ run against an installed wheel)")
    return path.read_text()


def _commands_in(text: str) -> list[list[str]]:
    """Every `mixkit ...` command line in the text's shell blocks."""
    import re
    import shlex

    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|\|", line.split(" # ")[0]):
                if not re.search(r"(^|\s)mixkit\s+[a-z]", part):
                    continue
                words = shlex.split(part, comments=True)
                words = words[words.index("mixkit") + 1:]
                two = " ".join(words[:2])
                found.append([two, *words[2:]] if two in ("bench serve", "bench models") else words)
    return found


def test_readmes_use_only_options_that_exist():
    parsers = _subcommands()
    for name in ("README.md", "bench/README.md"):
        commands = _commands_in(_readme(name))
        assert commands, name
        for words in commands:
            assert words[0] in parsers, f"{name}: mixkit {words[0]}"
            known = {s for a in parsers[words[0]]._actions for s in a.option_strings}
            for w in words[1:]:
                if w.startswith("--"):
                    assert w.split("=")[0] in known, f"{name}: mixkit {' '.join(words)}: no option {w}"
    documented = {w[0] for name in ("README.md", "bench/README.md") for w in _commands_in(_readme(name))}
    assert documented == set(parsers), f"the READMEs show no example of {set(parsers) - documented}"


def test_readme_run_file_and_jsonl_record_are_valid(tmp_path):
    import re

    from mixkit.train.run import load_run_config

    text = _readme("README.md")
    (toml,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    (tmp_path / "run.toml").write_text(toml)
    tcfg, dcfg = load_run_config(str(tmp_path / "run.toml"))
    assert dcfg.components and tcfg.max_steps > 0
    records = re.findall(r"```json\n(.*?)```", text, re.S)
    assert records and all("text" in json.loads(line) for r in records for line in r.splitlines())


def test_readmes_cite_files_that_exist():
    import re

    for name in ("README.md", "bench/README.md"):
        text = _readme(name)
        cited = re.findall(r"`((?:python|tests|bench|tools|csrc)/[\w./-]+)`", text) + re.findall(r"[\w./-]*\w\.md\b", text)
        for path in cited:
            assert (ROOT / path).exists() or (ROOT / Path(name).parent / path).exists(), f"{name} cites {path}"


def test_bench_parallel_checks_memory_before_building():
    """bench/README.md's GPU example on a CPU: stopped with the --layers that fit, before a byte is allocated."""
    from mixkit.bench.parallel import fit_error

    mixtral = models.CONFIGS["mixtral-8x7b"]
    problem = fit_error("mixtral-8x7b", mixtral, 2, torch.float32, 20 * 10**9)
    assert problem.startswith("mixtral-8x7b needs about 103 GB per rank (2 ranks, float32)")
    layers = int(problem.split("--layers ")[1].split()[0])
    assert fit_error("m", mixtral.replace(n_layers=layers), 2, torch.float32, 20 * 10**9) is None
    assert fit_error("m", mixtral.replace(n_layers=layers + 1), 2, torch.float32, 20 * 10**9) is not None
    assert fit_error("tiny-olmo", models.CONFIGS["tiny-olmo"], 2, torch.float32, 20 * 10**9) is None
