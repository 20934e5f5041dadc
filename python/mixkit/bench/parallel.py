"""Tensor-parallel decode on N devices against its roofline, and the paper
numbers of bench/README.md.

    torchrun --nproc_per_node N -m mixkit.bench.parallel [--model mixtral-8x7b] [--layers L]
        [--batch 1,8] [--steps 32] [--dtype bf16] [--out FILE.json]
    python -m mixkit.bench.parallel --paper      # the README tables (no devices needed)

Each rank builds only its shard, with random weights, straight on its
device (meta init, tensor-parallel splits, to_empty, normal_): a model that
fits no single device still runs. `--layers` keeps the first L layers, for
a smaller machine. On GPUs the group is NCCL (RCCL on ROCm); on CPUs gloo
with the tiny configs, a smoke test of the wiring and not numbers.

Roofline of one decode step at batch B (memory bound; per rank, since the
ranks run in parallel):

    bytes  = decode_bytes_per_rank(...)        # the weights the step touches / N, replicated ones whole,
                                               # plus the visible KV cache of this rank's KV heads
    t_roof = bytes / copy_bandwidth            # measured in the same run (harness.copy_bandwidth_gbps)
           + collectives_per_step * t_allreduce   # 2 per layer, 1 for the embedding; t_allreduce measured
                                                  # in the same run on a (B, dim) message
    roofline_tokens_per_s = B / t_roof

The paper numbers use datasheet bandwidths and a latency per collective
instead (see `HARDWARE` and bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from mixkit.models.config import CONFIGS, ModelArgs

# Datasheet numbers. HBM bandwidth per GPU; link: NVLink per direction per
# GPU (A100 SXM: 600 GB/s both directions, H100 SXM: 900 GB/s); alpha_us:
# the latency of one small NCCL collective inside an NVLink/NVSwitch node, an
# assumption of the order nccl-tests reports for a few-KB message (not
# measured here).
HARDWARE = {
    "2xA100-80GB": dict(gpus=2, hbm_gbps=2039.0, link_gbps=300.0, alpha_us=10.0, mem_gb=80.0),
    "8xH100-80GB": dict(gpus=8, hbm_gbps=3350.0, link_gbps=450.0, alpha_us=15.0, mem_gb=80.0),
}


def _counts(args: ModelArgs) -> dict[str, int]:
    """Parameters per part: attention and FFN per layer, one expert's FFN, embedding, head."""
    d, hd = args.dim, args.head_dim
    attn = d * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * d
    ffn = 3 * d * args.hidden_dim
    return {"attn": attn, "ffn": ffn, "gate": d * args.moe_num_experts, "embed": args.vocab_size * d,
            "head": 0 if args.tie_embeddings else args.vocab_size * d}


def total_params(args: ModelArgs) -> int:
    c = _counts(args)
    per_layer = c["attn"] + (c["gate"] + args.moe_num_experts * c["ffn"] if args.moe_num_experts else c["ffn"])
    return args.n_layers * per_layer + c["embed"] + c["head"]


def experts_touched(args: ModelArgs, batch: int) -> float:
    """Expected distinct experts per layer for `batch` tokens routed uniformly at random."""
    e, k = args.moe_num_experts, args.moe_top_k
    return e * (1 - (1 - k / e) ** batch)


def decode_bytes_per_rank(args: ModelArgs, tp: int, batch: int = 1, seen: int = 0, elt: int = 2) -> float:
    """Bytes one tensor-parallel rank reads in one decode step of `batch`
    tokens: every weight the step touches, split over tp ranks (the router
    replicated), the embedding rows of the batch, and the visible KV cache."""
    c = _counts(args)
    ffn = (experts_touched(args, batch) * c["ffn"] / tp + c["gate"]) if args.moe_num_experts else c["ffn"] / tp
    weights = args.n_layers * (c["attn"] / tp + ffn) + (c["head"] or c["embed"]) / tp + batch * args.dim
    visible = min(seen, args.sliding_window) if args.sliding_window else seen
    kv = args.n_layers * 2 * batch * visible * (args.n_kv_heads // tp) * args.head_dim
    return (weights + kv) * elt


def tp_comm_bytes_per_token_layer(args: ModelArgs, tp: int, elt: int = 2) -> float:
    """Bytes each rank sends per token per layer under TP: two ring all-reduces
    of a dim-vector, each sending 2 (N - 1) / N of the message."""
    return 2 * 2 * (tp - 1) / tp * args.dim * elt


def ep_comm_bytes_per_token_layer(args: ModelArgs, ep: int, elt: int = 2) -> float:
    """Bytes sent per token per MoE layer under EP with uniform routing: each
    of the top_k copies of the token leaves its rank with probability
    (N - 1) / N on the way to its expert (dispatch) and again on the way back
    (combine). Training's backward sends as much again."""
    return 2 * args.moe_top_k * (ep - 1) / ep * args.dim * elt


def ep_decode_bytes_busiest_rank(args: ModelArgs, ep: int, elt: int = 2) -> float:
    """Batch-1 decode under EP (attention, embedding and head replicated): the
    expected bytes of the busiest rank, whose experts may hold both of the
    token's choices (top-2)."""
    c = _counts(args)
    e, local = args.moe_num_experts, args.moe_num_experts // ep
    if args.moe_top_k != 2:
        raise ValueError("ep_decode_bytes_busiest_rank: written for top-2 routing")
    same = ep * math.comb(local, 2) / math.comb(e, 2)  # both choices on one rank
    experts = same * 2 + (1 - same) * 1
    return (args.n_layers * (c["attn"] + c["gate"] + experts * c["ffn"]) + (c["head"] or c["embed"])) * elt


@dataclass
class PaperRow:
    model: str
    hardware: str
    scheme: str
    gb_per_gpu: float
    roofline_tok_s: float
    with_latency_tok_s: float


def paper_rows() -> list[PaperRow]:
    rows = []
    for name in ("mixtral-8x7b", "llama-2-70b"):
        args = CONFIGS[name]
        for hw, spec in HARDWARE.items():
            n = spec["gpus"]
            hbm = spec["hbm_gbps"] * 1e9
            t_bw = decode_bytes_per_rank(args, n) / hbm
            collectives = 2 * args.n_layers + 2  # per layer 2 all-reduces; embedding all-reduce, head all-gather
            t_lat = collectives * spec["alpha_us"] * 1e-6
            gb = 2 * total_params(args) / n / 1e9
            rows.append(PaperRow(name, hw, f"TP={n}", gb, 1 / t_bw, 1 / (t_bw + t_lat)))
            if args.moe_num_experts:
                t_bw = ep_decode_bytes_busiest_rank(args, n) / hbm
                t_lat = (2 * args.n_layers + 1 * args.n_layers) * spec["alpha_us"] * 1e-6  # 2 a2a + count a2a
                c = _counts(args)
                gb = 2 * (total_params(args) - args.n_layers * (args.moe_num_experts - args.moe_num_experts // n)
                          * c["ffn"]) / 1e9
                rows.append(PaperRow(name, hw, f"EP={n}", gb, 1 / t_bw, 1 / (t_bw + t_lat)))
    return rows


def paper_markdown() -> str:
    out = ["| model | shape | N | TP bytes/token/layer/GPU | TP per token (all layers) | "
           "EP bytes/token/layer | EP per token (all layers) |", "|---|---|---|---|---|---|---|"]
    for name in ("mixtral-8x7b", "llama-2-70b"):
        a = CONFIGS[name]
        shape = f"dim {a.dim}, {a.n_layers} layers" + (f", {a.moe_num_experts} experts top-{a.moe_top_k}"
                                                       if a.moe_num_experts else "")
        for n in (2, 8):
            tp = tp_comm_bytes_per_token_layer(a, n)
            ep = ep_comm_bytes_per_token_layer(a, n) if a.moe_num_experts else None
            out.append(f"| {name} | {shape} | {n} | {tp / 1024:.1f} KiB | {tp * a.n_layers / 2**20:.2f} MiB | "
                       + (f"{ep / 1024:.1f} KiB | {ep * a.n_layers / 2**20:.2f} MiB |" if ep else "dense: none | — |"))
    out += ["", "| model | hardware | scheme | weights per GPU | roofline tokens/s (B=1) | "
            "with collective latency |", "|---|---|---|---|---|---|"]
    for r in paper_rows():
        out.append(f"| {r.model} | {r.hardware} | {r.scheme} | {r.gb_per_gpu:.1f} GB | {r.roofline_tok_s:.0f} | "
                   f"{r.with_latency_tok_s:.0f} |")
    return "\n".join(out)


# ---- measured ---------------------------------------------------------------------------------------------------

def build_sharded(args: ModelArgs, mesh, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A tensor-parallel Transformer with random weights, built shard by shard on `device`."""
    from mixkit.models import Transformer
    from mixkit.parallel.layout import tp_splits
    from mixkit.parallel.tensor import convert_modules, shard_parameters

    rank, world = mesh.get_local_rank(), mesh.size()
    with torch.device("meta"):
        model = Transformer(args)
    shard_parameters(model, tp_splits(args, rank, world))
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.requires_grad_(False)
    convert_modules(model, mesh)
    return model.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, device) -> list[float]:
    """Seconds per call over a fixed number of calls (every rank runs the same
    count, so the collectives inside stay matched)."""
    import torch.distributed as dist

    times = []
    for _ in range(steps):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(args: ModelArgs, mesh, device: torch.device, dtype: torch.dtype, batches=(1,), steps: int = 16,
            context: int = 64) -> list[dict]:
    """Decode tokens/s per batch size, with the roofline from bandwidth and
    all-reduce latency measured here on this rank's device and group."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from mixkit.bench import harness

    world = mesh.size()
    group = mesh.get_group()
    model = build_sharded(args, mesh, device, dtype)
    copy_gbps = harness.copy_bandwidth_gbps(device)
    rows = []
    for batch in batches:
        msg = torch.zeros(batch, args.dim, dtype=dtype, device=device)
        t_ar = statistics.median(_timed(lambda: funcol.wait_tensor(funcol.all_reduce(msg, "sum", group)),
                                        steps, device))
        model.setup_caches(batch, context + steps + 8)
        prompt = torch.randint(0, args.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(prompt.to(device), start_pos=0)[:, -1]
        state = {"token": logits.argmax(-1), "seen": torch.full((batch,), context, dtype=torch.int32, device=device)}

        def step():
            with torch.no_grad():
                out = model.decode_step(state["token"], state["seen"])
            state["token"], state["seen"] = out.argmax(-1), state["seen"] + 1

        for _ in range(2):  # warm-up
            step()
        t = statistics.median(_timed(step, steps, device))
        model.clear_caches()
        nbytes = decode_bytes_per_rank(args, world, batch, context + steps // 2, torch.finfo(dtype).bits // 8)
        collectives = 2 * args.n_layers + 2
        t_roof = nbytes / (copy_gbps * 1e9) + collectives * t_ar
        rows.append({"batch": batch, "ranks": world, "step_us": t * 1e6, "tokens_per_s": batch / t,
                     "roofline_tokens_per_s": batch / t_roof, "roofline_pct": 100 * t_roof / t,
                     "bytes_per_rank": nbytes, "copy_gbps": copy_gbps, "allreduce_us": t_ar * 1e6})
        dist.barrier()
    return rows


def free_bytes(device: torch.device) -> int:
    """Memory one rank can use: the GPU's free memory, or on a CPU the
    machine's available memory shared by the ranks on it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return avail // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def fit_error(name: str, args: ModelArgs, world: int, dtype: torch.dtype, free: int) -> str | None:
    """Why this rank's shard of the model will not fit in `free` bytes (with
    a tenth to spare for activations and the cache), naming the --layers
    that would; None when it fits."""
    elt = torch.finfo(dtype).bits // 8
    need = 1.1 * total_params(args) * elt / world
    if need <= free:
        return None
    per_layer = 1.1 * (total_params(args) - total_params(args.replace(n_layers=0))) * elt / world / args.n_layers
    fits = int((free - need + per_layer * args.n_layers) // per_layer)
    hint = f"--layers {fits} would fit" if fits >= 1 else "not even one layer fits"
    return (f"{name} needs about {need / 1e9:.0f} GB per rank ({world} ranks, {str(dtype).removeprefix('torch.')}) "
            f"and this rank has {free / 1e9:.0f} GB free: {hint}, or use more ranks")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixkit.bench.parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", action="store_true", help="print the README's paper tables and exit")
    p.add_argument("--model", help="named config (default mixtral-8x7b on GPUs, tiny-olmo on the CPU)")
    p.add_argument("--layers", type=int, help="keep the first L layers")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on GPUs, fp32 on the CPU")
    p.add_argument("--out", help="write the rows and metadata as JSON")
    a = p.parse_args(argv)
    if a.paper:
        print(paper_markdown())
        return 0

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mixkit.bench import harness

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    name = a.model or ("mixtral-8x7b" if cuda else "tiny-olmo")
    args = CONFIGS.get(name)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if cuda else "fp32")]
    problem = f"--model {name}: not one of {', '.join(CONFIGS)}" if args is None else None
    if args is not None and a.layers:
        args = args.replace(n_layers=a.layers)
    problem = problem or fit_error(name, args, world, dtype, free_bytes(device))
    if problem:  # before building anything: a model that does not fit must not swap the machine to a halt
        if rank == 0:
            print(f"{p.prog}: error: {problem}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    mesh = init_device_mesh(device.type, (world,))
    rows = measure(args, mesh, device, dtype, [int(b) for b in a.batch.split(",")], a.steps)
    if rank == 0:
        print(f"{name} ({args.n_layers} layers, {dtype}) decode on {world} x "
              f"{harness.collect_metadata(device).get('device_name', device)}, tensor parallel")
        print(f"{'B':>4} {'step us':>10} {'tok/s':>10} {'roofline tok/s':>15} {'% roofline':>11} "
              f"{'GB/rank':>8} {'copy GB/s':>10} {'all-reduce us':>14}")
        for r in rows:
            print(f"{r['batch']:>4} {r['step_us']:>10.1f} {r['tokens_per_s']:>10.1f} {r['roofline_tokens_per_s']:>15.1f} "
                  f"{r['roofline_pct']:>10.1f}% {r['bytes_per_rank'] / 1e9:>8.2f} {r['copy_gbps']:>10.0f} "
                  f"{r['allreduce_us']:>14.1f}")
        if a.out:
            meta = harness.collect_metadata(device)
            meta.update(ranks=world, model=name, layers=args.n_layers)
            with open(a.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from mixkit.parallel import exit_rank
    exit_rank(main())  # a torchrun rank: see exit_rank
