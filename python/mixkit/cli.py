"""The `mixkit` command: `quickstart`, `train`, `ppo`, `eval`, `generate`, `bench` and `info`."""

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
    mesh = None
    if args.tp > 1:  # tensor parallel under torchrun: every rank loads only its shard
        from mixkit.parallel import tensor_parallel, tp_mesh_from_env
        try:
            mesh, device = tp_mesh_from_env(args.tp, device)
        except ValueError as exc:
            print(f"mixkit generate: error: {exc}", file=sys.stderr)
            return 2
    stop: list[int] = []
    checkpoint = args.checkpoint or (args.model if Path(args.model).is_dir() else None)
    if checkpoint:
        ckpt = Path(checkpoint)
        try:
            tokenizer = load_tokenizer(ckpt)
        except FileNotFoundError as exc:
            print(f"mixkit generate: error: {exc}", file=sys.stderr)
            return 2
        try:
            model = models.load(ckpt, device=device, mesh=mesh)
        except ValueError as exc:  # a checkpoint error, or head counts that --tp does not divide
            print(f"mixkit generate: error: {exc}", file=sys.stderr)
            return 2
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
        if mesh is not None:
            try:
                tensor_parallel(model, mesh)
            except ValueError as exc:
                print(f"mixkit generate: error: {exc}", file=sys.stderr)
                return 2
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


def _train(args: argparse.Namespace) -> int:
    from mixkit.train import ConfigError
    from mixkit.train.run import train

    try:
        return train(args.config, args.set or [], device=args.device, quiet=args.quiet, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"mixkit train: error: {exc}", file=sys.stderr)
        return 2


def _eval(args: argparse.Namespace) -> int:
    from mixkit.train.run import evaluate_files

    try:
        results = evaluate_files(args.model, args.data, tokenizer=args.tokenizer, seq_len=args.seq_len,
                                 stride=args.stride, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"mixkit eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'component':<24} {'tokens':>10} {'bytes':>10} {'loss':>8} {'ppl':>10} {'bits/byte':>10}")
    for name, r in results.items():
        print(f"{name:<24} {r['tokens']:>10} {r['bytes']:>10} {r['loss']:>8.4f} {r['perplexity']:>10.3f} "
              f"{r['bits_per_byte']:>10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _ppo(args: argparse.Namespace) -> int:
    from mixkit.train import ConfigError
    from mixkit.train.ppo import demo, run_ppo

    if args.demo:
        demo()
        return 0
    if not args.config:
        print("mixkit ppo: error: give --config FILE or --demo", file=sys.stderr)
        return 2
    try:
        return run_ppo(args.config, args.set or [], device=args.device)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"mixkit ppo: error: {exc}", file=sys.stderr)
        return 2


def _quickstart(args: argparse.Namespace) -> int:
    from mixkit.train.run import quickstart

    if args.tokenizer not in (None, "byte") and not args.tokenizer.isdigit():
        print(f"mixkit quickstart: error: --tokenizer is a BPE vocabulary size or 'byte', got {args.tokenizer!r}",
              file=sys.stderr)
        return 2
    tokenizer = int(args.tokenizer) if args.tokenizer not in (None, "byte") else args.tokenizer
    try:
        quickstart(steps=args.steps, device=args.device, out_dir=args.out, quiet=args.quiet, tokenizer=tokenizer,
                   precision=args.precision)
    except ValueError as exc:  # a BPE vocabulary below 258
        print(f"mixkit quickstart: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "serve"]:  # the serving benchmark has its own options
        from mixkit.bench.serve import main as bench_serve
        return bench_serve(argv[2:])
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
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks; run under "
                   "torchrun --nproc_per_node N with --tp N (gloo on the CPU, NCCL on GPUs)")
    g.set_defaults(func=_generate)

    q = sub.add_parser("quickstart", help="train a BPE and a small Mistral-style model on the stdlib sources (no "
                                          "download); held-out bits per byte against gzip -9 and xz -9e, a sample")
    q.add_argument("--steps", type=int, help="default on the CPU (about 4.5 minutes on 2 cores): 2000 with bf16, 900 "
                   "with fp32; 3000 on a GPU")
    q.add_argument("--precision", choices=["bf16", "fp32"], help="bf16: bf16 compute over float32 master weights "
                   "(default on a GPU and on a CPU with native bf16: AVX512-BF16 or AMX); fp32 otherwise")
    q.add_argument("--tokenizer", help="BPE vocabulary size, or 'byte' (default: a 2048-token BPE)")
    q.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    q.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_quickstart)

    t = sub.add_parser("train", help="train from a run file (TrainConfig TOML plus a [data] table)")
    t.add_argument("--config", help="run file (.toml); see mixkit/train/run.py for its keys")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key (model.<field>=, data.<field>= for the tables); repeatable")
    t.add_argument("--device", choices=["cpu", "cuda"])
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto (default): continue from the newest complete checkpoint in checkpoint_dir, if any; "
                        "never: start over (removes the run's checkpoints); PATH: continue from that checkpoint. "
                        "SIGINT / SIGTERM save a checkpoint and exit with code 75")
    t.set_defaults(func=_train)

    p = sub.add_parser("ppo", help="Llama 2-Chat's PPO from a run file (policy, reward models, prompts .jsonl), "
                                   "or --demo: a tiny policy raising a rule-based reward on the CPU")
    p.add_argument("--config", help="run file (.toml); see mixkit/train/ppo.py load_ppo_run for its keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key (ppo.<field>=, reward.<key>= for the tables); repeatable")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--demo", action="store_true", help="self-contained CPU demonstration (a few minutes)")
    p.set_defaults(func=_ppo)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on .jsonl files")
    e.add_argument("--model", required=True, help="checkpoint directory (Hugging Face or Mistral native)")
    e.add_argument("--data", nargs="+", required=True, help=".jsonl / .jsonl.gz / .jsonl.zst files, one component each")
    e.add_argument("--tokenizer", help="'byte' or a directory with tokenizer.json/tokenizer.model (default: --model)")
    e.add_argument("--seq-len", type=int, default=1024)
    e.add_argument("--stride", type=int, help="scored tokens per window after the first (default seq_len / 2)")
    e.add_argument("--device", choices=["cpu", "cuda"])
    e.add_argument("--json", help="also write the results here")
    e.set_defaults(func=_eval)

    from mixkit.serve.server import add_parser as add_serve
    add_serve(sub)

    i = sub.add_parser("info", help="print build info, torch and device versions")
    i.add_argument("--device", choices=["cpu", "cuda"])
    i.set_defaults(func=_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
