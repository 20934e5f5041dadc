"""Benchmark harness shared by every mixkit benchmark.

A benchmark is a list of `Case`s: one op at one shape and dtype, with the
minimum bytes it must move and one zero-argument callable per implementation
("mixkit", "eager", "compile", "liger", ...). `run_cases` times each callable,
checks its output against the "eager" one, and returns one dict row per
implementation. `write_results` saves the rows as JSON (with the metadata that
makes a number reproducible) plus a markdown table, and a plot when matplotlib
is installed.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

# 256 MiB is larger than any current L2 (H100 50 MB, H200 60 MB, B200 126 MB).
_FLUSH_BYTES = 256 << 20


@dataclasses.dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    reps: int
    method: str


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    bytes: int  # fewest bytes the op must move: each input read once, each output written once
    impls: dict[str, Callable[[], Any]]
    tokens: int | None = None
    flops: int | None = None  # for compute-bound ops; rows then carry TFLOP/s and % of matmul peak


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def time_fn(
    fn: Callable[[], Any],
    device: str | torch.device,
    *,
    budget_s: float = 0.2,
    min_reps: int = 5,
    max_reps: int = 1000,
    warmup: int = 3,
    flush_l2: bool = True,
    cuda_graph: bool = False,
) -> Timing:
    """Median and p20/p80 of `fn()` over as many reps as fit in `budget_s`."""
    if torch.device(device).type == "cuda":
        return _time_cuda(fn, budget_s, min_reps, max_reps, warmup, flush_l2, cuda_graph)
    return _time_host(fn, budget_s, min_reps, max_reps, warmup)


def _summarise(times_us: list[float], method: str) -> Timing:
    if len(times_us) == 1:
        t = times_us[0]
        return Timing(t, t, t, 1, method)
    q = statistics.quantiles(times_us, n=5, method="inclusive")
    return Timing(statistics.median(times_us), q[0], q[3], len(times_us), method)


def _reps_for(estimate_s: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    return max(min_reps, min(max_reps, int(budget_s / max(estimate_s, 1e-9))))


def _time_host(fn, budget_s, min_reps, max_reps, warmup) -> Timing:
    # No cache flush on the CPU: CPU numbers are smoke tests of the benchmark
    # wiring, not figures anyone should quote.
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    reps = _reps_for(time.perf_counter() - t0, budget_s, min_reps, max_reps)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return _summarise(times, "perf_counter")


@functools.cache
def _flush_buffer(device: str) -> torch.Tensor:
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return torch.empty(max(_FLUSH_BYTES, 4 * l2), dtype=torch.uint8, device=device)


def capture_cuda_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture `fn` in a CUDA graph: `(graph, outputs)`, where `outputs` are the
    tensors the captured call returned and each `graph.replay()` refills."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm up on a side stream, as torch's graph docs ask, so that lazy setup
    # (compilation, autotuning, library workspaces) is not captured.
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def cuda_graphed(fn: Callable[[], Any]) -> Callable[[], None]:
    """Capture `fn` in a CUDA graph and return its replay; removes host launch overhead."""
    return capture_cuda_graph(fn)[0].replay


def _time_cuda(fn, budget_s, min_reps, max_reps, warmup, flush_l2, cuda_graph) -> Timing:
    device = f"cuda:{torch.cuda.current_device()}"
    for _ in range(warmup):
        fn()
    if cuda_graph:
        fn = cuda_graphed(fn)
    flush = _flush_buffer(device) if flush_l2 else None

    def one_rep(start, end):
        # The flush runs before the start event, so it is not timed. It also
        # gives the host a head start of the flush's duration (~0.1 ms), which
        # hides launch overhead: these are device times. Host overhead is
        # measured separately (bench/host_overhead.py) or removed with cuda_graph.
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()

    torch.cuda.synchronize()
    probe = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    one_rep(*probe)
    torch.cuda.synchronize()
    reps = _reps_for(probe[0].elapsed_time(probe[1]) * 1e-3, budget_s, min_reps, max_reps)

    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
    for start, end in events:
        one_rep(start, end)
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) * 1e3 for start, end in events]
    method = "cuda-events" + ("+graph" if cuda_graph else "") + ("+l2flush" if flush_l2 else "")
    return _summarise(times, method)


# ---------------------------------------------------------------------------
# Ceilings, measured once per process and device
# ---------------------------------------------------------------------------


def _device_key(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def copy_bandwidth_gbps(device: str | torch.device) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    return _copy_bandwidth_gbps(_device_key(device))


@functools.cache
def _copy_bandwidth_gbps(device: str) -> float:
    # 1 GiB dwarfs any cache on a GPU; on a CPU 128 MiB is past the LLC and
    # keeps the quick run quick.
    nbytes = (1 << 30) if device.startswith("cuda") else (128 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(0x5A)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, flush_l2=False, budget_s=0.3)
    return 2 * nbytes / (t.median_us * 1e-6) / 1e9


def matmul_tflops(device: str | torch.device, dtype: torch.dtype | None = None) -> float:
    """Dense matmul peak (bf16 8192^3 on GPU, fp32 1024^3 on CPU unless
    `dtype` says otherwise), the ceiling for compute-bound ops."""
    key = _device_key(device)
    cuda = key.startswith("cuda")
    return _matmul_tflops(key, dtype or (torch.bfloat16 if cuda else torch.float32))


@functools.cache
def _matmul_tflops(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)  # random, not zeros: zeros run faster
    b = torch.randn(n, n, dtype=dtype, device=device)
    t = time_fn(lambda: a @ b, device, flush_l2=False, budget_s=0.5)
    return 2 * n**3 / (t.median_us * 1e-6) / 1e12


# ---------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------


def mixkit_op(name: str) -> Callable:
    """The public op, or a stand-in that raises, so a missing op becomes an error row."""
    try:
        import mixkit.ops

        return getattr(mixkit.ops, name)
    except (ImportError, AttributeError) as exc:
        err = exc

        def missing(*args, **kwargs):
            raise err

        return missing


def compile_mode_for(device: str | torch.device, quick: bool) -> str:
    # max-autotune-no-cudagraphs benchmarks Triton configs for every kernel it
    # generates: the peer's best mode, but slow to compile, so quick runs use
    # the default mode. No cudagraphs, so every peer pays the same launch cost.
    if torch.device(device).type == "cuda" and not quick:
        return "max-autotune-no-cudagraphs"
    return "default"


@functools.cache
def compiled(fn: Callable, mode: str = "default") -> Callable:
    """torch.compile of a reference, specialised to each shape it sees."""
    cfg = torch._dynamo.config
    # Dynamo's cache lives on the code object, and a benchmark feeds one
    # reference many shapes and dtypes. Past the recompile limit (8) it would
    # silently fall back to eager and the "compile" column would lie.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(fn, mode=mode, dynamic=False)


@functools.cache
def liger() -> dict[str, Any] | None:
    """Liger-Kernel's RMSNorm, fused add+RMSNorm and RoPE, or None if not importable."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:  # not installed, or its Triton import failed
        return None
    found = {
        "version": _dist_version("liger-kernel", "liger_kernel"),
        "rms_norm": lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps),
        "rope": liger_rotary_pos_emb,
    }
    for path in ("liger_kernel.ops", "liger_kernel.ops.fused_add_rms_norm"):
        try:
            fn = importlib.import_module(path).LigerFusedAddRMSNormFunction
        except (ImportError, AttributeError):
            continue
        found["rms_norm_residual"] = lambda x, r, w, eps, fn=fn: fn.apply(x, r, w, eps)
        break
    return found


def liger_for(device: str | torch.device) -> dict[str, Any] | None:
    return liger() if torch.device(device).type == "cuda" else None


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


# ---------------------------------------------------------------------------
# Running cases
# ---------------------------------------------------------------------------


def _max_abs_err(out: Any, ref: Any) -> float:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    errs = [
        (o.float() - r.float()).abs().max().item()
        for o, r in zip(outs, refs)
        if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor) and o.numel()
    ]
    return max(errs) if errs else float("nan")


def error_row(op: str, shape: str, dtype: torch.dtype | str, impl: str, exc: BaseException) -> dict:
    return {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "impl": impl,
            "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}


def run_cases(
    cases: Iterable[Case | dict],
    device: str | torch.device,
    *,
    budget_s: float = 0.2,
    cuda_graph: bool = False,
    log: Callable[[str], None] | None = print,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Time every implementation of every case; one row per implementation.
    A dict among the cases is a row already made (a skipped op, a case that
    could not be built), passed through. on_rows(rows so far) after each."""
    copy_gbps = copy_bandwidth_gbps(device)
    rows: list[dict] = []
    for case in cases:  # a generator, so only one case's inputs are alive at a time
        if case is None:  # a size the case declined (too large for memory)
            continue
        if isinstance(case, dict):
            rows.append(case)
            if log:
                log(_one_line(case))
            if on_rows:
                on_rows(rows)
            continue
        ref = None
        case_rows = []
        # "eager" runs first so that every other output can be checked against it.
        for impl in sorted(case.impls, key=lambda name: name != "eager"):
            fn = case.impls[impl]
            row = {
                "op": case.op, "shape": case.shape, "tokens": case.tokens,
                "dtype": str(case.dtype).removeprefix("torch."), "impl": impl, "bytes": case.bytes,
            }
            try:
                out = fn()  # first call outside timing: compiles, autotunes
                if impl == "eager":
                    ref = out
                # Compare now: some peers (Liger RoPE) work in place, and later calls overwrite `out`.
                row["max_abs_err"] = None if ref is None or impl == "eager" else _max_abs_err(out, ref)
                del out
                t = time_fn(fn, device, budget_s=budget_s, cuda_graph=cuda_graph)
            except Exception as exc:  # one broken peer must not sink the whole run
                case_rows.append({**row, "error": error_row(case.op, "", "", impl, exc)["error"]})
                continue
            row.update(median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, reps=t.reps, method=t.method)
            row["gbps"] = case.bytes / (t.median_us * 1e-6) / 1e9
            row["pct_copy"] = 100 * row["gbps"] / copy_gbps
            if case.flops:
                row["tflops"] = case.flops / (t.median_us * 1e-6) / 1e12
                row["pct_matmul"] = 100 * row["tflops"] / matmul_tflops(device)
            case_rows.append(row)
        case_rows.sort(key=lambda r: list(case.impls).index(r["impl"]))
        mine = next((r for r in case_rows if r["impl"] == "mixkit" and "median_us" in r), None)
        for row in case_rows:
            if mine is not None and row is not mine and "median_us" in row:
                row["mixkit_speedup"] = row["median_us"] / mine["median_us"]
            if log:
                log(_one_line(row))
        rows.extend(case_rows)
        if on_rows:
            on_rows(rows)
    return rows


def _one_line(row: dict) -> str:
    if "skipped" in row:
        return f"{row['op']:<18} skipped: {row['skipped']}"
    head = f"{row['op']:<18} {row['shape']:<26} {row['dtype']:<8} {row['impl']:<8}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    line = f"{head} {row['median_us']:10.1f} us {row['gbps']:8.1f} GB/s {row['pct_copy']:5.1f}% copy"
    if "tflops" in row:  # compute-bound ops: the roofline is the matmul peak
        line += f" {row['tflops']:7.3g} TFLOP/s {row['pct_matmul']:5.1f}% matmul"
    return line


# ---------------------------------------------------------------------------
# Metadata and output
# ---------------------------------------------------------------------------


def _run(cmd: list[str], cwd: str | Path | None = None) -> str | None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _git_commit() -> str | None:
    """Commit of the checkout mixkit runs from: $MIXKIT_COMMIT, the package's repo, or a cwd checkout."""
    if os.environ.get("MIXKIT_COMMIT"):
        return os.environ["MIXKIT_COMMIT"]
    places = [Path(__file__).resolve().parent]  # inside the mixkit package
    if (Path.cwd() / "python" / "mixkit").is_dir():
        places.append(Path.cwd())
    for place in places:
        commit = _run(["git", "rev-parse", "--short=12", "HEAD"], cwd=place)
        if commit:
            dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=place)
            return commit + ("-dirty" if dirty else "")
    return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_info() -> dict | str | None:
    try:
        from mixkit import _core

        return _core.build_info()
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {exc}"


def collect_metadata(device: str | torch.device) -> dict:
    device = torch.device(_device_key(device))
    try:
        import mixkit

        version = getattr(mixkit, "__version__", None)
    except ImportError:
        version = None
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "driver": None,
        "python": platform.python_version(),
        "mixkit_version": version,
        "commit": _git_commit() or (f"mixkit-{version}" if version else None),
        "build_info": build_info(),
        "triton": _dist_version("triton", "pytorch-triton"),
        "liger_kernel": (liger_for(device) or {}).get("version"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(sm_count=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", None),
                    capability=f"{props.major}.{props.minor}")
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        meta["driver"] = smi.splitlines()[0] if smi else None
    else:
        meta["threads"] = torch.get_num_threads()
    return meta


def result_name(meta: dict) -> str:
    """`<date>_<device-slug>_<commit>`, the naming used in bench/results/."""
    date = meta["date_utc"][:10]
    slug = "".join(c if c.isalnum() else "-" for c in meta["device_name"].lower())
    slug = "-".join(filter(None, slug.split("-")))[:40]
    return f"{date}_{slug}_{meta['commit'] or 'nocommit'}"


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def render_table(rows: list[dict]) -> str:
    """Markdown table; speedup = peer time / mixkit time, so > 1 means mixkit is faster."""
    header = ["op", "shape", "dtype", "impl", "median us", "p20-p80 us", "GB/s", "% copy", "TFLOP/s",
              "% matmul", "mixkit speedup (x)", "max abs err"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r or "skipped" in r:
            note = f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            cells = [r["op"], r["shape"], r["dtype"], r["impl"], note.replace("|", "/")]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [r["op"], r["shape"], r["dtype"], r["impl"], _fmt(r["median_us"], ".1f"),
                     f"{r['p20_us']:.1f}-{r['p80_us']:.1f}", _fmt(r["gbps"], ".1f"),
                     _fmt(r["pct_copy"], ".1f"), _fmt(r.get("tflops"), ".3g"), _fmt(r.get("pct_matmul"), ".1f"),
                     _fmt(r.get("mixkit_speedup"), ".2f"),
                     _fmt(r.get("max_abs_err"), ".2e")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(meta: dict, rows: list[dict]) -> str:
    keys = ["date_utc", "device_name", "driver", "torch", "cuda", "triton", "liger_kernel",
            "commit", "copy_gbps", "compile_mode", "timing"]
    head = "\n".join(f"- {k}: {meta.get(k)}" for k in keys if meta.get(k) is not None)
    return f"# mixkit benchmark, {meta['device_name']}\n\n{head}\n\n{render_table(rows)}\n"


def write_json_and_markdown(path: str | Path, meta: dict, rows: list[dict], markdown: str,
                            suffix: str = "") -> list[Path]:
    """`path` (JSON {"meta", "rows"}) and the same stem with .md; a directory
    gets `<date>_<device>_<commit><suffix>.json` inside it."""
    path = Path(path)
    if path.is_dir() or str(path).endswith("/"):
        path = path / f"{result_name(meta)}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    md = path.with_suffix(".md")
    for target, text in ((path, json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n"),
                         (md, markdown)):
        tmp = target.with_name(target.name + ".tmp")  # rewritten after every case: never half a file
        tmp.write_text(text)
        os.replace(tmp, target)
    return [path, md]


def write_results(path: str | Path, meta: dict, rows: list[dict], plot: bool = True) -> list[Path]:
    """Write `path` (JSON) and the same stem with .md, and .png when matplotlib is there."""
    written = write_json_and_markdown(path, meta, rows, render_markdown(meta, rows))
    path = written[0]
    if plot and (png := plot_results(path.with_suffix(".png"), meta, rows)):
        written.append(png)
    return written


def plot_results(path: Path, meta: dict, rows: list[dict]) -> Path | None:
    """GB/s against tokens, one panel per (op, dtype); skipped silently without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "gbps" in r and r.get("tokens")]
    panels = sorted({(r["op"], r["dtype"]) for r in ok})
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (op, dtype) in zip(axes.flat, panels):
        for impl in dict.fromkeys(r["impl"] for r in ok if r["op"] == op):
            pts = sorted((r["tokens"], r["gbps"]) for r in ok
                         if r["op"] == op and r["dtype"] == dtype and r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        if meta.get("copy_gbps"):
            ax.axhline(meta["copy_gbps"], color="grey", linestyle="--", label="copy")
        ax.set(xscale="log", xlabel="tokens", ylabel="GB/s", title=f"{op} {dtype}")
        ax.legend(fontsize="small")
    fig.suptitle(f"{meta['device_name']}  {meta.get('commit') or ''}", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
