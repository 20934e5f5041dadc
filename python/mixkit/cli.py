"""The `mixkit` command: `mixkit bench ...`, `mixkit generate ...` and `mixkit info`."""

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


def _generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from mixkit import models

    from mixkit.tokenizer import ByteTokenizer, encode_chat, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stop: list[int] = []
    checkpoint = args.checkpoint or (args.model if Path(args.model).is_dir() else None)
    if checkpoint:
        ckpt = Path(checkpoint)
        try:
            tokenizer = load_tokenizer(ckpt)
        except FileNotFoundError as exc:
            print(f"mixkit generate: error: {exc}", file=sys.stderr)
            return 2
        model = models.load(ckpt, device=device)
        cfg = ckpt / "config.json"
        eos = json.loads(cfg.read_text()).get("eos_token_id") if cfg.exists() else tokenizer.eos_id
        stop = [eos] if isinstance(eos, int) else list(eos or [])
    else:
        if args.model not in models.CONFIGS or not args.model.startswith("tiny-"):
            tiny = ", ".join(n for n in models.CONFIGS if n.startswith("tiny-"))
            print(f"mixkit generate: error: --model must be a checkpoint directory or one of {tiny}",
                  file=sys.stderr)
            return 2
        model = models.Transformer(models.CONFIGS[args.model]).init_weights(args.seed, std=0.1).to(device).eval()
        tokenizer = ByteTokenizer()
    if args.chat:
        try:
            ids = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}])[0]
        except ValueError as exc:
            print(f"mixkit generate: error: {exc}", file=sys.stderr)
            return 2
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        print("mixkit generate: error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
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
    except ValueError as exc:
        print(f"\nmixkit generate: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print()
    print(f"{len(new)} tokens in {seconds:.2f} s, {len(new) / seconds:.1f} tokens/s (prefill included)",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from mixkit.bench import CASES

    parser = argparse.ArgumentParser(prog="mixkit", description="mixkit kernels: benchmarks, generation and build info")
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

    g = sub.add_parser("generate", help="generate text with a tiny random model or a checkpoint directory")
    g.add_argument("--model", default="tiny-mistral",
                   help="checkpoint directory (HF or Mistral native, with tokenizer.json or tokenizer.model), or an "
                        "embedded tiny random model name (default tiny-mistral)")
    g.add_argument("--checkpoint", help="same as --model DIR")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a Mistral/Llama chat turn ([INST] ... [/INST])")
    g.add_argument("--prompt", default="Hello", help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    g.set_defaults(func=_generate)

    i = sub.add_parser("info", help="print build info, torch and device versions")
    i.add_argument("--device", choices=["cpu", "cuda"])
    i.set_defaults(func=_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
