"""The `mixkit` command: `mixkit bench ...` and `mixkit info`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    from mixkit import bench
    from mixkit.bench import harness

    ops = args.ops.split(",") if args.ops else None
    try:
        meta, rows = bench.run(device=args.device, quick=args.quick, ops=ops,
                               compile=not args.no_compile, cuda_graph=args.graph)
    except ValueError as exc:  # unknown op, no GPU, --graph on cpu
        print(f"mixkit bench: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(harness.render_table(rows))
    if args.out:
        out = Path(args.out)
        if out.is_dir() or args.out.endswith("/"):
            out = out / f"{harness.result_name(meta)}.json"
        for path in harness.write_results(out, meta, rows, plot=not args.no_plot):
            print(f"wrote {path}")
    # A failing mixkit op fails the command, so CI and scripts notice. A
    # failing peer (say, torch.compile without a C++ compiler) is only shown.
    return 1 if any("error" in r and r["impl"] == "mixkit" for r in rows) else 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from mixkit.bench import harness

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = harness.collect_metadata(device)
    meta["mixkit_path"] = str(Path(__file__).resolve().parent)
    meta["cuda_available"] = torch.cuda.is_available()
    print(json.dumps(meta, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    from mixkit.bench import CASES

    parser = argparse.ArgumentParser(prog="mixkit", description="mixkit kernels: benchmarks and build info")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time mixkit ops against torch eager, torch.compile and Liger")
    b.add_argument("--quick", action="store_true", help="fewer token counts and shorter timing")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    b.add_argument("--ops", help=f"comma-separated, from {','.join(CASES)} (default all)")
    b.add_argument("--out", help="results JSON path, with a .md table beside it; "
                   "a directory gets <date>_<device>_<commit>.json")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    b.add_argument("--graph", action="store_true", help="time CUDA-graph replays (removes launch overhead)")
    b.add_argument("--no-plot", action="store_true", help="no .png even if matplotlib is installed")
    b.set_defaults(func=_bench)

    i = sub.add_parser("info", help="print build info, torch and device versions")
    i.add_argument("--device", choices=["cpu", "cuda"])
    i.set_defaults(func=_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
