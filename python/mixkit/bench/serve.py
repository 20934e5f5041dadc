"""`mixkit bench serve`: `mixkit serve` under N concurrent streaming clients
against Hugging Face transformers on the same weights, in the same run.

Per model and N (1, 8, 32, 64 by default), N clients each send R requests
one after another (closed loop) over HTTP, streaming; prompts cycle through
a fixed mix of lengths and every request generates exactly OUT tokens
(ignore_eos). Reported per N: output tokens/s over the wall time, TTFT and
inter-token latency at p50/p99 as the clients saw them, and the peak KV
pages in use (the server's /metrics, sampled every 50 ms). At the end, where
the engine's step time went (its /metrics phase counters), and the same
requests offline through `mixkit.LLM` (no HTTP), whose gap to the served
rate is the HTTP and streaming cost.

Peers on the same weights, float32: transformers' continuous batching
(`generate_batch`, when the installed version has it) given all N x R
requests at once (its offline API: TTFT there includes queueing behind
earlier requests), and static-batch `generate`, N requests a batch,
left-padded, R batches in a row (a request's TTFT is its batch's first
step).

Models: the quick-start model (`--model`, default runs/quickstart/model if
present, else a model of the quick start's shape with random weights and a
BPE trained in seconds on this machine's Python sources: the same compute)
and a tiny Mixtral (random weights, byte-level tokenizer).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


# ---- models ----------------------------------------------------------------------------

def quickstart_shaped(out: Path) -> Path:
    """A model of the quick start's shape (4 layers, dim 192, window 128, GQA
    6/2, vocabulary 2048) with random weights and a BPE trained on a slice of
    the standard library's sources."""
    from mixkit.data.stdlib_corpus import stdlib_documents
    from mixkit.models import ModelArgs, Transformer, save
    from mixkit.tokenizer import train_bpe

    tok = train_bpe([d.text for d in stdlib_documents("train", max_bytes=1_000_000)], 2048)
    args = ModelArgs(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, hidden_dim=512, vocab_size=tok.vocab_size,
                     sliding_window=128, max_seq_len=2048)
    save(Transformer(args).init_weights(0, std=0.05), out)
    tok.save(out)
    return out


def tiny_mixtral(out: Path) -> Path:
    from mixkit.models import CONFIGS, Transformer, save
    from mixkit.tokenizer import ByteTokenizer

    args = CONFIGS["tiny-mixtral"].replace(vocab_size=258, max_seq_len=2048)
    save(Transformer(args).init_weights(0, std=0.05), out)
    ByteTokenizer().save(out)
    return out


# ---- the served engine ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, max_batch: int, kv_pages: int | None):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mixkit", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--served-model-name", "bench", "--max-batch", str(max_batch), "--dtype", "float32", "--device", "cpu"]
        if kv_pages:
            cmd += ["--kv-pages", str(kv_pages)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mixkit serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mixkit serve did not start")

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _metric(text: str, name: str) -> dict:
    """{labels: value} of one metric in Prometheus text."""
    out = {}
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


async def _client(url, requests, out_tokens, stats, t_start):
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        for prompt in requests:
            # logprobs: one event per token, even while the text of a partial
            # UTF-8 character is held back, so the gaps are per token
            body = {"model": "bench", "prompt": prompt, "max_tokens": out_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "logprobs": 0}
            sent = time.perf_counter()
            times = []
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        times.append(time.perf_counter())
            stats["ttft"].append(times[0] - sent)
            stats["itl"] += [(b - a) for a, b in zip(times, times[1:])]
            stats["tokens"] += out_tokens


async def _drive(server: Server, per_client: list[list[list[int]]], out_tokens: int) -> dict:
    stats = {"ttft": [], "itl": [], "tokens": 0}
    _, total = _pages(server)
    peak = [0]
    done = asyncio.Event()

    async def watch():
        while not done.is_set():
            free, _ = await asyncio.get_running_loop().run_in_executor(None, _pages, server)
            peak[0] = max(peak[0], total - free)
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(server.url, reqs, out_tokens, stats, t0) for reqs in per_client))
    wall = time.perf_counter() - t0
    done.set()
    await watcher
    return {"wall_s": wall, "tokens_per_s": stats["tokens"] / wall, "ttft_p50_ms": 1e3 * _pct(stats["ttft"], 50),
            "ttft_p99_ms": 1e3 * _pct(stats["ttft"], 99), "itl_p50_ms": 1e3 * _pct(stats["itl"], 50),
            "itl_p99_ms": 1e3 * _pct(stats["itl"], 99), "peak_kv_pages": peak[0], "kv_pages_total": total}


def _pages(server) -> tuple[int, int]:
    text = server.metrics()
    free = sum(_metric(text, "mixkit_kv_pages_free").values())
    total = sum(_metric(text, "mixkit_kv_pages_total").values())
    return int(free), int(total)


# ---- peers -----------------------------------------------------------------------------------

def hf_continuous(hf, prompts, out_tokens, max_batch, pages) -> dict | None:
    """generate_batch sized like the served engine (pages of 16, the same
    page count, 512 tokens a step, max_batch requests); its default sizing
    probes memory for seconds at every call, and its warm-up captures CUDA
    graphs, which a CPU has none of."""
    import logging

    from transformers import GenerationConfig

    if not hasattr(hf, "generate_batch"):
        return None
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    cfg = GenerationConfig(max_new_tokens=out_tokens, min_new_tokens=out_tokens, do_sample=False, eos_token_id=None)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=pages, max_batch_tokens=512,
                                  max_requests_per_batch=max_batch)
    kw = dict(continuous_batching_config=cb, warmup=False)
    hf.generate_batch([prompts[0][:4]], cfg, **kw)  # first-call set-up out of the timing
    t0 = time.perf_counter()
    outs = hf.generate_batch(prompts, cfg, record_timestamps=True, **kw)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    ttft = [o.timestamps[0] - o.created_time for o in outs.values() if o.timestamps]
    itl = [b - a for o in outs.values() if o.timestamps for a, b in zip(o.timestamps, o.timestamps[1:])]
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * _pct(ttft, 50),
            "ttft_p99_ms": 1e3 * _pct(ttft, 99), "itl_p50_ms": 1e3 * _pct(itl, 50), "itl_p99_ms": 1e3 * _pct(itl, 99)}


def hf_static(hf, per_client, out_tokens, pad_id) -> dict:
    """N requests a batch (one from each client), left-padded, rounds in a row."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstStep(LogitsProcessor):
        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    rounds = max(len(r) for r in per_client)
    ttft, itl, tokens = [], [], 0
    t0 = time.perf_counter()
    for i in range(rounds):
        batch = [reqs[i] for reqs in per_client if i < len(reqs)]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        hook = FirstStep()
        hook.times = []
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                              do_sample=False, logits_processor=LogitsProcessorList([hook]), pad_token_id=pad_id)
        tokens += (out.shape[1] - width) * len(batch)
        ttft += [hook.times[0] - start] * len(batch)
        itl += [b - a for a, b in zip(hook.times, hook.times[1:])] * len(batch)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * _pct(ttft, 50),
            "ttft_p99_ms": 1e3 * _pct(ttft, 99), "itl_p50_ms": 1e3 * _pct(itl, 50), "itl_p99_ms": 1e3 * _pct(itl, 99)}


def mixkit_offline(model_dir, prompts, out_tokens, max_batch) -> dict:
    from mixkit.serve import LLM, SamplingParams

    llm = LLM(str(model_dir), device="cpu", dtype=torch.float32, max_batch=max_batch)
    p = SamplingParams(max_tokens=out_tokens, temperature=0, ignore_eos=True)
    llm.generate([prompts[0][:4]], p.replace(max_tokens=2))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, p)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": sum(len(o.token_ids) for o in outs) / wall}


# ---- KV memory of one long request -----------------------------------------------------------

def kv_memory(config: str = "mistral-7b-v0.1", lengths=(4096, 16384, 32768, 131072), page_size: int = 16,
              chunk: int = 512, prompt: int = 2048) -> list[dict]:
    """Peak KV bytes of one request of each length on a named config (bf16),
    with window-aware freeing and with every page kept: the block manager
    itself, driven through chunked prefill of `prompt` tokens and then one
    token a step (no model runs; pages are what it would allocate)."""
    from mixkit.models import CONFIGS
    from mixkit.serve.blocks import BlockManager

    args = CONFIGS[config]
    page_bytes = page_size * 2 * args.n_kv_heads * args.head_dim * 2  # K and V, bf16, one layer
    rows = []
    for n in lengths:
        peak = {}
        for label, window in (("freeing", args.sliding_window), ("kept", None)):
            bm = BlockManager(n // page_size + 2, page_size, [window])
            top, at = 0, 0
            while at < n:
                step = min(chunk, prompt - at) if at < prompt else 1
                assert bm.allocate("r", at, at + step)
                at += step
                top = max(top, bm.num_pages - bm.num_free()[0])  # the only request: its pages
            peak[label] = top
        rows.append({"config": config, "tokens": n, "pages_freeing": peak["freeing"], "pages_kept": peak["kept"],
                     "gib_freeing": peak["freeing"] * page_bytes * args.n_layers / 2 ** 30,
                     "gib_kept": peak["kept"] * page_bytes * args.n_layers / 2 ** 30})
    return rows


def render_kv(rows) -> str:
    lines = ["| tokens | pages per layer, freeing / kept | KV GiB (all layers, bf16), freeing / kept |",
             "|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['pages_freeing']} / {r['pages_kept']} | "
                     f"{r['gib_freeing']:.2f} / {r['gib_kept']:.2f} |")
    return "\n".join(lines)


# ---- the run ---------------------------------------------------------------------------------

def workload(tokenizer, n_clients, per_client, lengths, seed=0) -> list[list[list[int]]]:
    """per_client[c][r]: prompt token ids; lengths cycle over the mix."""
    from mixkit.data.stdlib_corpus import stdlib_documents

    ids = tokenizer.encode("".join(d.text for d in stdlib_documents("heldout", max_bytes=400_000)))
    out, at, k = [], 0, 0
    for _ in range(n_clients):
        reqs = []
        for _ in range(per_client):
            n = lengths[k % len(lengths)]
            k += 1
            reqs.append(ids[at:at + n])
            at = (at + n) % max(1, len(ids) - max(lengths))
        out.append(reqs)
    return out


def run(models: dict, clients, per_client, lengths, out_tokens, peers=True, max_batch=64, log=print) -> dict:
    from mixkit.bench.harness import collect_metadata
    from mixkit.tokenizer import load_tokenizer

    meta = collect_metadata("cpu")
    meta.update(load_average=os.getloadavg(), clients=list(clients), requests_per_client=per_client,
                prompt_lengths=list(lengths), output_tokens=out_tokens)
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        peers = False
    results = {"meta": meta, "rows": [], "overhead": {}}
    for name, model_dir in models.items():
        tok = load_tokenizer(model_dir)
        hf = None
        if peers:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        server = Server(model_dir, max_batch, None)
        try:
            for n in clients:
                per = workload(tok, n, per_client, lengths)
                flat = [p for reqs in per for p in reqs]
                row = {"model": name, "clients": n, "impl": "mixkit serve"}
                row.update(asyncio.run(_drive(server, per, out_tokens)))
                results["rows"].append(row)
                log(_fmt(row))
                row = {"model": name, "clients": n, "impl": "mixkit LLM (no HTTP)"}
                row.update(mixkit_offline(model_dir, flat, out_tokens, max_batch))
                results["rows"].append(row)
                log(_fmt(row))
                if hf is not None:
                    cb = hf_continuous(hf, flat, out_tokens, max_batch, _pages(server)[1])
                    if cb is not None:
                        row = {"model": name, "clients": n, "impl": "HF generate_batch (all at t=0)", **cb}
                        results["rows"].append(row)
                        log(_fmt(row))
                    row = {"model": name, "clients": n, "impl": "HF generate (static batches)",
                           **hf_static(hf, per, out_tokens, tok.pad_id if tok.pad_id is not None else 0)}
                    results["rows"].append(row)
                    log(_fmt(row))
            text = server.metrics()
            steps = _metric(text, "mixkit_steps_total").get("", 0)
            phases = {re.search(r'"(.*)"', k).group(1): v for k, v in _metric(text, "mixkit_step_seconds_total").items()}
            results["overhead"][name] = {"steps": steps,
                                         "ms_per_step": {k: 1e3 * v / max(steps, 1) for k, v in phases.items()}}
        finally:
            server.stop()
    meta["load_average_end"] = os.getloadavg()
    return results


def _fmt(r) -> str:
    cols = [f"{r['model']:<12}", f"N={r['clients']:<3}", f"{r['impl']:<30}", f"{r['tokens_per_s']:8.1f} tok/s"]
    if "ttft_p50_ms" in r:
        cols.append(f"TTFT p50/p99 {r['ttft_p50_ms']:7.0f}/{r['ttft_p99_ms']:7.0f} ms")
        cols.append(f"ITL p50/p99 {r['itl_p50_ms']:6.1f}/{r['itl_p99_ms']:6.1f} ms")
    if "peak_kv_pages" in r:
        cols.append(f"peak KV pages {r['peak_kv_pages']}/{r['kv_pages_total']}")
    return "  ".join(cols)


def render(results) -> str:
    lines = ["| model | N | implementation | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | peak KV pages |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        ttft = f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}" if "ttft_p50_ms" in r else ""
        itl = f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}" if "itl_p50_ms" in r else ""
        pages = f"{r['peak_kv_pages']} / {r['kv_pages_total']}" if "peak_kv_pages" in r else ""
        lines.append(f"| {r['model']} | {r['clients']} | {r['impl']} | {r['tokens_per_s']:.1f} | {ttft} | {itl} | {pages} |")
    for name, o in results["overhead"].items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in o["ms_per_step"].items())
        lines.append(f"\n{name}: {o['steps']:.0f} engine steps, ms per step: {parts}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from mixkit.cli import Parser, existing_dir, integer, integers, output_file

    p = Parser(prog="mixkit bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=existing_dir, metavar="DIR", help="model directory (default runs/quickstart/model "
                   "if present, else a model of the quick start's shape with random weights)")
    p.add_argument("--no-mixtral", action="store_true", help="skip the tiny Mixtral")
    p.add_argument("--clients", type=integers(1), default="1,8,32,64", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=integer(1), default=2, help="requests per client")
    p.add_argument("--prompt-lengths", type=integers(1), default="32,128,512",
                   help="prompt lengths in tokens, comma-separated, cycled")
    p.add_argument("--output-tokens", type=integer(1), default=32, help="tokens each request generates")
    p.add_argument("--no-peers", action="store_true", help="skip transformers")
    p.add_argument("--quick", action="store_true", help="N = 1, 8; prompts 16,64; 8 output tokens")
    p.add_argument("--out", type=output_file, metavar="FILE", help="write the results as JSON, and a .md table beside it")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    clients, lengths = args.clients, args.prompt_lengths
    if args.quick:
        clients, lengths, args.output_tokens, args.requests = [1, 8], [16, 64], 8, 1
    tmp = Path(tempfile.mkdtemp(prefix="mixkit-bench-serve-"))
    models = {}
    if args.model:
        models["quickstart"] = Path(args.model)
    elif Path("runs/quickstart/model").is_dir():
        models["quickstart"] = Path("runs/quickstart/model")
    else:
        print("building a model of the quick start's shape (random weights, BPE trained here) ...", flush=True)
        models["quickstart-shape"] = quickstart_shaped(tmp / "quickstart")
    if not args.no_mixtral:
        models["tiny-mixtral"] = tiny_mixtral(tmp / "mixtral")
    results = run(models, clients, args.requests, lengths, args.output_tokens, peers=not args.no_peers)
    results["kv_memory"] = kv_memory()
    table = render(results) + "\n\nKV memory of one Mistral 7B request (window 4096, pages of 16, chunks of 512):\n\n" \
        + render_kv(results["kv_memory"])
    print()
    print(table)
    print(f"\nload average {results['meta']['load_average']} -> {results['meta']['load_average_end']} "
          f"({os.cpu_count()} CPUs)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
