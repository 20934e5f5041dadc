"""Per-call host overhead of each layer of a mixkit op, on the CPU.

    python bench/host_overhead.py [--json out.json] [--seconds 0.3]

The tensor is tiny ((1, 64) float32), so the kernel costs next to nothing and
each number is the price of one layer of Python, binding or dispatcher. Read
the rows as a stack: `_core` direct < the op's Python implementation <
torch.ops dispatcher < public function < public function with autograd. The
torch.library no-ops show what each registration style costs by itself
(upstream figures, pytorch issue 177109: custom_op ~10.7 us, Library.define
~6.3 us, direct ~1.4 us). On a GPU the same overhead is paid per launch unless
the call is captured in a CUDA graph.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import timeit
from typing import Callable

import torch

import mixkit.ops
from mixkit import _core
from mixkit._backend import DTYPE_CODES, launch_args
from mixkit.bench.harness import collect_metadata
from mixkit.ops import norm as norm_impl

EPS = 1e-6

# No-op ops, one per registration style, same schema. Each returns one
# preallocated tensor, so none pays for allocating a result.
_OUT = torch.empty(1)
_noop_lib = torch.library.Library("mixkit_overhead", "DEF")
_noop_lib.define("noop_define(Tensor x) -> Tensor")
_noop_lib.impl("noop_define", lambda x: _OUT, "CPU")

# The same with an autograd formula, as mixkit's ops have: register_autograd
# installs a Python kernel at the Autograd key that runs on every call,
# requires_grad or not (inference_mode skips it).
_noop_lib.define("noop_define_autograd(Tensor x) -> Tensor")
_noop_lib.impl("noop_define_autograd", lambda x: _OUT, "CPU")
torch.library.register_autograd("mixkit_overhead::noop_define_autograd", lambda ctx, grad: None)


@torch.library.custom_op("mixkit_overhead::noop_custom_op", mutates_args=())
def _noop_custom_op(x: torch.Tensor) -> torch.Tensor:
    return _OUT


def paths() -> dict[str, Callable[[], object]]:
    x = torch.randn(1, 64)
    w = torch.randn(64)
    y, rstd = torch.empty_like(x), torch.empty(1)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    backend, device, stream = launch_args(x.device)
    dtype = DTYPE_CODES[x.dtype]
    # Raw pointers keep nothing alive: `keep` holds the tensors for as long as
    # the lambdas live (a freed rstd here once corrupted the heap).
    keep = (x, w, y, rstd)
    xp, wp, yp, rp = (t.data_ptr() for t in keep)
    rms_op = torch.ops.mixkit.rms_norm
    ns = torch.ops.mixkit_overhead
    noop_define, noop_autograd, noop_custom = ns.noop_define, ns.noop_define_autograd, ns.noop_custom_op
    return {
        "empty Python function": lambda: None,
        "torch.empty_like(x)": lambda: torch.empty_like(x),
        "torch.add(x, x, out=y)": lambda: torch.add(x, x, out=y),
        "_core._dlpack_probe(x) (1 tensor via DLPack)": lambda: _core._dlpack_probe(x),
        "_core.norm_fwd (pointers, preallocated)": lambda keep=keep: _core.norm_fwd(
            backend, device, stream, dtype, False, xp, 0, wp, yp, 0, 0, rp, 1, 64, EPS),
        "ops.norm._rms_norm (checks, alloc, _core)": lambda: norm_impl._rms_norm(x, w, EPS),
        "torch.ops.mixkit.rms_norm (dispatcher)": lambda: rms_op(x, w, EPS),
        "mixkit.ops.rms_norm (public)": lambda: mixkit.ops.rms_norm(x, w, EPS),
        "mixkit.ops.rms_norm, requires_grad (autograd)": lambda: mixkit.ops.rms_norm(xg, wg, EPS),
        # Timed inside one inference_mode block (see main), which skips the
        # Autograd key and with it the Python autograd kernel.
        "mixkit.ops.rms_norm under inference_mode": lambda: mixkit.ops.rms_norm(x, w, EPS),
        "no-op via Library.define/impl": lambda: noop_define(x),
        "no-op via Library.define + register_autograd": lambda: noop_autograd(x),
        "no-op via torch.library.custom_op": lambda: noop_custom(x),
    }


def measure(fn, seconds: float, repeats: int = 9) -> tuple[float, float]:
    """(median, min) microseconds per call over `repeats` loops of ~seconds/repeats each."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()  # calls per loop so that one loop takes >= 0.2 s
    number = max(1, int(number * seconds / repeats / 0.2))
    per_call = [t / number * 1e6 for t in timer.repeat(repeat=repeats, number=number)]
    return statistics.median(per_call), min(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows and metadata here")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per path (default 0.3)")
    args = parser.parse_args()

    rows = []
    for name, fn in paths().items():
        with torch.inference_mode() if "inference_mode" in name else contextlib.nullcontext():
            fn()  # first call outside timing: lazy registration, caches
            median, best = measure(fn, args.seconds)
        rows.append({"path": name, "median_us": median, "min_us": best})

    meta = collect_metadata("cpu")
    print(f"host overhead per call, (1, 64) float32 on {meta['device_name']}, "
          f"torch {meta['torch']}, {meta['threads']} threads")
    print(f"| {'path':<46} | median us | min us |\n|{'-' * 48}|----------:|-------:|")
    for r in rows:
        print(f"| {r['path']:<46} | {r['median_us']:9.2f} | {r['min_us']:6.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
