"""What the kernels cost, without a GPU: `mixkit bench --device emu`.

Runs the benchmark cases' mixkit op on the emulated GPU (a `-DMIXKIT_EMULATE=ON`
build of `_core`) with its cost counters on (csrc/cuda/emu_cost.h: global
bytes, 32-byte sectors per request, shared-memory wavefronts per request and
bank-conflict degrees, tensor-core instructions, barriers), adds each
kernel's static resources (tools/kernel_resources.py: registers, spills,
static shared memory, from ptxas and the gfx90a ISA) and turns them into:

- per launch: bytes against the case's minimal bytes, sectors per request
  against the ideal, wavefronts per request against the ideal, the share of
  wavefronts bank conflicts add, theoretical occupancy and the grid's waves on
  the device the path targets;
- per case: a **projection**, labelled as one: the lower-bound time of each
  launch, max(DRAM bytes / DRAM peak, shared wavefronts / shared-memory peak,
  issued tensor FLOPs / tensor peak) from the published figures of
  bench/emu_devices.py, summed over the case's launches, and the % of the
  op's roofline (its minimal bytes and FLOPs at the same peaks) that bound
  allows. Nothing here is a measurement, and these rows never mix with
  measured ones: results are written as `<date>_<host>_<commit>_emulated-<paths>`.

Which path runs is the build's warp width and the emulated device: warp 32 as
an A100 (capability 8.0, 108 SMs: the sm_80 kernels) and as an H100 (9.0, 132
SMs: the sm_90a kernels where they exist), warp 64 as one MI250X GCD (110 CUs:
the gfx90a kernels). The minimal bytes and FLOPs are the benchmark's own
(`Case.bytes`, `Case.flops`), at the GPU benchmark's shapes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import time
from pathlib import Path
from typing import Callable

import torch

from mixkit.bench import emu_devices
from mixkit.bench.emu_devices import Device

# The emulated device of each path: capability and SM/CU count, as the tests
# configure it (tests/conftest.py), so launchers make the GPU's choices.
PATHS = {
    "sm_80": dict(capability=80, sm_count=emu_devices.A100.units, warp=32, device=emu_devices.A100),
    "sm_90a": dict(capability=90, sm_count=emu_devices.H100.units, warp=32, device=emu_devices.H100),
    "gfx90a": dict(capability=90, sm_count=emu_devices.MI250X.units, warp=64, device=emu_devices.MI250X),
}


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------


def _core():
    from mixkit import _core

    return _core


def emulated_build() -> bool:
    return "emu" in _core().backends()


def warp_size() -> int:
    return int(_core().build_info()["warp_size"])


def paths_of_build() -> list[str]:
    return ["sm_80", "sm_90a"] if warp_size() == 32 else ["gfx90a"]


@contextlib.contextmanager
def emulated_device(path: str, blocks_per_sm: int = 0):
    """The emulated GPU configured as `path`'s device, ops routed to it."""
    from mixkit._backend import emulate

    p = PATHS[path]
    if p["warp"] != warp_size():
        raise ValueError(f"path {path} needs a warp-{p['warp']} emulated build; this one has warp {warp_size()}")
    _core().emu_configure(sm_count=p["sm_count"], capability=p["capability"], blocks_per_sm=blocks_per_sm)
    try:
        with emulate():
            yield
    finally:
        _core().emu_configure()


def count(fn: Callable[[], object], sample_y: int = 0, sample_z: int = 0, sample_x: int = 0) -> list[dict]:
    """The launches `fn` makes, with their counters (fn runs under emulate()).
    sample_y, sample_z > 0 run only the blocks with blockIdx.y < sample_y and
    blockIdx.z < sample_z, and launch_row scales their counts to the grid
    (the results fn computes are then wrong; the addresses are not).
    sample_x > 0 also runs only sample_x blocks along x from grid.x / 2, in
    the launches that sample_y cuts (grid.y > sample_y > 0): the per-block
    counters stand, the totals do not (launch_row leaves them out)."""
    core = _core()
    core.emu_cost_start(sample_y, sample_z, sample_x)
    try:
        fn()
    finally:
        launches = json.loads(core.emu_cost_stop())
    return launches


def probe(name: str, variant: int = 0) -> list[dict]:
    """The counters of one of the hand-calculable probe kernels (cost_probes.cpp)."""
    return json.loads(_core().emu_cost_probe(name, variant))


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------

def short_name(kernel: str) -> str:
    """'void mixkit::(anonymous namespace)::rope_kernel<mixkit::bf16, 8, false, long>(mixkit::RopeArgs)'
    -> 'rope_kernel<bf16, 8, false, long>'; the namespace says the path
    ('sm80::fwd::flash_fwd_kernel<128, bf16>')."""
    name = re.sub(r"^void ", "", kernel).replace("(anonymous namespace)::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut].replace("mixkit::", "")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _scaled(counts: dict, k: float) -> dict:
    return {key: (v * k if isinstance(v, (int, float)) else {d: n * k for d, n in v.items()})
            for key, v in counts.items()}


def sites_by_line(sites: list[dict]) -> list[dict]:
    """The per-instruction counts summed per source line (unrolled loops
    issue one line from many instructions)."""
    out: dict[tuple, dict] = {}
    for site in sites:
        key = (site["where"].split(" (")[0], site["space"], site["class"])
        agg = out.setdefault(key, {"where": key[0], "space": key[1], "class": key[2], "counts": {}})
        for name, v in site["counts"].items():
            if isinstance(v, dict):
                d = agg["counts"].setdefault(name, {})
                for deg, n in v.items():
                    d[deg] = d.get(deg, 0) + n
            else:
                agg["counts"][name] = agg["counts"].get(name, 0) + v
    return list(out.values())


def _sampled_dram_scale(launch: dict, k: float, shared_y: bool) -> float:
    """The factor from the distinct sectors of the blocks run to the grid's.
    Rows of the grid (blockIdx.y) that read disjoint data scale with k. With
    shared_y, some data is read by every row (the grouped GEMMs' activations,
    for every N tile): the sectors several sampled rows touched count once,
    the rest scale with the rows."""
    by_y, any_y = launch.get("unique_sectors_by_y", []), launch.get("unique_sectors_any_y", 0)
    if not shared_y or len(by_y) < 2 or not any_y:
        return k
    m = len(by_y)
    shared = (sum(by_y) - any_y) / (m - 1)
    # k = grid blocks / blocks run; the rows scale by grid.y / m, the rest (x, z) by k / (grid.y / m).
    y_scale = launch["grid"][1] / m
    other = k / y_scale
    return other * (shared + (any_y - shared) * y_scale) / any_y


def launch_row(launch: dict, path: str, resources: dict | None, shared_y: bool = False,
               sample: tuple = (0, 0)) -> dict:
    """One launch's counters, ratios, static resources, occupancy and waves.
    A sampled launch (blocks_run < blocks) has its counts scaled to the grid
    (distinct sectors: _sampled_dram_scale). With sample_x (some blocks along
    x run, see count) the ratios stand but the grid's totals are not known:
    its distinct sectors, re-read and projection are left out (None)."""
    dev: Device = PATHS[path]["device"]
    threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
    blocks = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
    k = blocks / launch["blocks_run"] if launch["blocks_run"] else 1.0
    kd = _sampled_dram_scale(launch, k, shared_y) if k > 1 else 1.0
    g = {cls: _scaled(c, k) for cls, c in launch["global"].items()}
    s = {cls: _scaled(c, k) for cls, c in launch["shared"].items()}
    launch = dict(launch, unique_load_sectors=launch["unique_load_sectors"] * kd,
                  unique_store_sectors=launch["unique_store_sectors"] * kd, barriers=launch["barriers"] * k,
                  instructions={n: _scaled(v, k) for n, v in launch["instructions"].items()})
    loads = [g["load"], g["cp.async"], g["atomic"]]
    req = sum(c["requests"] for c in (*loads, g["store"]))
    sectors = sum(c["sectors"] for c in (*loads, g["store"]))
    ideal = sum(c["ideal"] for c in (*loads, g["store"]))
    row = {
        "kernel": short_name(launch["kernel"]), "kernel_full": launch["kernel"], "path": path, "device": dev.name,
        "grid": launch["grid"], "block": launch["block"], "threads": threads, "blocks": blocks,
        "dynamic_smem": launch["dynamic_smem"], "blocks_run": launch["blocks_run"], "sampled": k > 1,
        "load_bytes": sum(c["bytes"] for c in loads), "store_bytes": g["store"]["bytes"],
        "requested_bytes": 32 * sectors,
        "dram_bytes": 32 * (launch["unique_load_sectors"] + launch["unique_store_sectors"]),
        # How often each loaded byte is fetched from the cache hierarchy: K/V
        # tiles in attention (once per query block and GQA head), weight
        # tiles in the grouped GEMMs (once per M tile), ~1 elsewhere.
        "reread": _ratio(32 * sum(c["sectors"] for c in loads), 32 * launch["unique_load_sectors"]),
        "global_requests": req, "sectors_per_request": _ratio(sectors, req),
        "ideal_sectors_per_request": _ratio(ideal, req), "sectors_vs_ideal": _ratio(sectors, ideal),
        "barriers_per_block": _ratio(launch["barriers"], blocks),
        "tensor_instructions": sum(v["count"] for v in launch["instructions"].values() if v["flops"]),
        "tensor_flops": sum(v["flops"] for v in launch["instructions"].values()),
        "shared": {},
        "sites": sites_by_line(launch.get("sites", [])),
    }
    wf = wi = 0
    for cls, c in s.items():
        if not c["requests"]:
            continue
        wf += c["wavefronts"]
        wi += c["ideal"]
        row["shared"][cls] = {
            "requests": c["requests"], "wavefronts": c["wavefronts"], "ideal": c["ideal"],
            "wavefronts_per_request": c["wavefronts"] / c["requests"],
            "conflict_share": 1 - c["ideal"] / c["wavefronts"] if c["wavefronts"] else 0.0,
            "max_degree": max((int(d) for d, n in c["degrees"].items() if n), default=0), "degrees": c["degrees"],
        }
    row["shared_wavefronts"] = wf
    row["shared_ideal"] = wi
    row["conflict_share"] = 1 - wi / wf if wf else 0.0
    sample_x = sample[2] if len(sample) > 2 else 0
    row["sampled_x"] = bool(sample_x) and launch["grid"][0] > sample_x and launch["grid"][1] > sample[0] > 0
    if row["sampled_x"]:
        row["dram_bytes"] = row["reread"] = None
    return add_resources(row, resources)


def add_resources(row: dict, resources: dict | None) -> dict:
    """`row` (a launch_row) with its kernel's static resources from
    tools/kernel_resources.py, its theoretical occupancy and its grid's waves
    on the path's device; unchanged when the table has no row for it."""
    dev: Device = PATHS[row["path"]]["device"]
    res = (resources or {}).get(row["path"], {}).get(row["kernel_full"])
    if res:
        static = res.get("smem_static", res.get("lds_static", 0))
        regs = res.get("registers", res.get("vgprs", 0))  # gfx90a: the unified file's total
        occ = emu_devices.occupancy(dev, row["threads"], regs=regs, smem=static + row["dynamic_smem"])
        row.update(registers=regs, agprs=res.get("agprs"), static_smem=static,
                   spill_bytes=res.get("spill_stores", 0) + res.get("spill_loads", 0),
                   vgpr_spills=res.get("vgpr_spills"),
                   stack=res.get("stack", res.get("scratch", 0)), blocks_per_unit=occ["blocks"],
                   occupancy=occ["occupancy"], occupancy_limit=occ["limited_by"])
        row.update(emu_devices.waves(dev, row["blocks"], occ["blocks"]))
    return row


def case_row(case, path: str, launches: list[dict], dtype: str) -> dict:
    """A case's totals over its launches and the projection on its path's device."""
    dev: Device = PATHS[path]["device"]
    tot = {k: sum(r[k] for r in launches) for k in ("requested_bytes", "shared_wavefronts",
                                                    "shared_ideal", "tensor_flops", "global_requests")}
    roof = dev.roofline_s(case.bytes, case.flops, dtype)
    row = {"op": case.op, "shape": case.shape, "dtype": dtype, "path": path, "device": dev.name,
           "min_bytes": case.bytes, "flops": case.flops, "launches": len(launches)}
    if any(r.get("sampled_x") for r in launches):
        # Blocks along x ran in part (the middle of the sequence): the
        # per-launch ratios stand, the case's totals and projection do not.
        for r in launches:
            r["projected_us"] = r["bound_by"] = None
        return {**row, "dram_vs_min": None, "requested_vs_min": None, "tensor_flops_vs_min": None,
                "conflict_share": 1 - tot["shared_ideal"] / tot["shared_wavefronts"] if tot["shared_wavefronts"]
                else 0.0, "projected_us": None, "roofline_us": roof * 1e6, "projected_pct_roofline": None,
                "sampled_x": True, **tot, "dram_bytes": None}
    tot["dram_bytes"] = sum(r["dram_bytes"] for r in launches)
    bound = 0.0
    for r in launches:
        p = dev.projection(r["dram_bytes"], r["shared_wavefronts"], r["tensor_flops"], dtype)
        r["projected_us"] = p["bound_s"] * 1e6
        r["bound_by"] = p["bound_by"]
        bound += p["bound_s"]
    return {
        **row,
        "dram_vs_min": _ratio(tot["dram_bytes"], case.bytes),
        "requested_vs_min": _ratio(tot["requested_bytes"], case.bytes),
        "tensor_flops_vs_min": _ratio(tot["tensor_flops"], case.flops) if case.flops else None,
        "conflict_share": 1 - tot["shared_ideal"] / tot["shared_wavefronts"] if tot["shared_wavefronts"] else 0.0,
        "projected_us": bound * 1e6, "roofline_us": roof * 1e6,
        "projected_pct_roofline": 100 * roof / bound if bound else None,
        **tot,
    }


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

# The benchmark's ops and the GPU sizes the emulated report runs: the GPU
# sweep's sizes (bench.TOKENS / OP_TOKENS) that the emulator finishes in
# seconds to minutes; the rest of the sweep changes the grid, not what one
# block does. `sample` (y, z) runs only blocks with blockIdx.y < y and
# blockIdx.z < z and scales their counts (0: all): one GQA group of heads of
# attention (grid.y = heads, 32 of 8 KV heads), one (KV head, sequence) of
# decode, two N tiles of the grouped GEMMs (grid.y; `shared_y`: the rows
# share the activations, see _sampled_dram_scale). `occupancy` names the
# kernel whose resident blocks a launcher asks for (decode picks its split
# count from it): with resources given, the emulated device answers what the
# real one would.
REPORT = {
    "rms_norm": dict(tokens=(1, 1024)),
    "rms_norm_residual": dict(tokens=(1, 1024)),
    "rms_norm_bwd": dict(tokens=(1024,)),
    "layer_norm": dict(tokens=(1024,)),
    "rope": dict(tokens=(1, 1024)),
    "moe_route": dict(tokens=(1024,)),
    "moe_permute": dict(tokens=(1024,)),
    "moe_unpermute": dict(tokens=(1024,)),
    "kv_cache_append": dict(tokens=(1, 1024)),
    "decode_attn_b1": dict(tokens=(1024, 32768), sample=(1, 1), occupancy="decode_attn_kernel<mixkit::bf16, 128, 4>"),
    "decode_attn_b32": dict(tokens=(4096,), sample=(1, 1), occupancy="decode_attn_kernel<mixkit::bf16, 128, 4>"),
    "decode_attn_nowin_b8": dict(tokens=(4096,), sample=(1, 1), occupancy="decode_attn_kernel<mixkit::bf16, 128, 4>"),
    "flash_attn_fwd_causal": dict(tokens=(1024,), sample=(4, 0)),
    "flash_attn_fwd_bwd_causal": dict(tokens=(1024,), sample=(4, 0)),
    # The windowed kernels at the benchmark's first S, where W = 4096 cuts no
    # key (the same visible pairs as causal, through the window's code).
    # At S = 16384 the window cuts keys; the middle blocks along x (query
    # blocks of the forward, key blocks of dkdv) are past both ends of the
    # sequence, where every block visits the W / tile tiles of a full window:
    # their per-block counters, not the grid's totals (count's sample_x).
    "flash_attn_fwd_bwd_w4096": dict(tokens=(1024, 16384), sample=(4, 0), sample_at={16384: (1, 0, 2)}),
    # gpt-oss-20b's sliding layers: head dim 64 (on gfx90a the atomic dQ
    # path and its dq_convert_kernel), one GQA group of 8 of its 64 heads.
    "flash_attn_fwd_bwd_sinks_w128": dict(tokens=(1024,), sample=(8, 0)),
    # The whole grid at S = 8192 is 20 minutes of emulation a path: the
    # middle query blocks of one GQA group, as above.
    "flash_attn_fwd_w4096": dict(tokens=(16384,), sample=(4, 0, 2)),
    "moe_mlp": dict(tokens=(16, 1024), sample=(2, 0), shared_y=True),
    # Two M tiles (grid.x) of the forward's and dgrad's GEMMs, two of the
    # wgrad's: per-block counters (the whole backward at T = 1024 is most of
    # an hour a path).
    "moe_mlp_fwd_bwd": dict(tokens=(1024,), sample=(2, 0, 2), shared_y=True),
}
# Cases whose callable keeps state across calls (the backward of a saved
# forward): called once before counting, so the count is the timed call's.
WARM_FIRST = {"rms_norm_bwd"}


# ---------------------------------------------------------------------------
# Cases of ops the benchmark does not time (the serving engine's paged KV
# cache): Mistral 7B heads, 16-token pages, one sequence.
# ---------------------------------------------------------------------------

N_Q_HEADS, N_KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def paged_kv_append_case(device, tokens: int, dtype, compile_mode) -> "Case":
    from mixkit.bench.harness import Case, mixkit_op

    k = torch.randn(tokens, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    pages = tokens // PAGE + 1
    kp = torch.zeros(pages, PAGE, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    vp = torch.zeros_like(kp)
    slots = torch.arange(tokens, dtype=torch.int32, device=device)
    op = mixkit_op("paged_kv_append")
    # read k, v and the slots, write them into the pools
    nbytes = 2 * 2 * k.numel() * k.element_size() + slots.numel() * 4
    return Case("paged_kv_append", f"T={tokens} page={PAGE} Hkv={N_KV_HEADS} D={HEAD_DIM}", dtype, nbytes,
                {"mixkit": lambda: op(k, v, kp, vp, slots)}, tokens=tokens)


def paged_prefill_attn_case(device, tokens: int, dtype, compile_mode, context: int = 4096) -> "Case":
    """A `tokens`-query chunk at the end of a `context`-token sequence (window 4096)."""
    from mixkit.bench.harness import Case, mixkit_op

    q = torch.randn(tokens, N_Q_HEADS, HEAD_DIM, device=device, dtype=dtype)
    pages = -(-context // PAGE)
    kp = torch.randn(pages, PAGE, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    vp = torch.randn_like(kp)
    table = torch.arange(pages, dtype=torch.int32, device=device)[None]
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    seqlens = torch.tensor([context], dtype=torch.int32, device=device)
    op = mixkit_op("paged_prefill_attn")
    window = 4096
    # read q and the visible keys and values (the last min(context, tokens + window - 1)), write out
    keys = min(context, tokens + window - 1)
    nbytes = (2 * q.numel() + 2 * keys * N_KV_HEADS * HEAD_DIM) * q.element_size()
    # The kernel runs on CUDA cores, for which the projection has no term:
    # no FLOPs here, so its roofline is the bytes alone.
    return Case("paged_prefill_attn", f"chunk={tokens} context={context} W={window} H={N_Q_HEADS} "
                f"Hkv={N_KV_HEADS} D={HEAD_DIM} page={PAGE}", dtype, nbytes,
                {"mixkit": lambda: op(q, kp, vp, table, cu, seqlens, tokens, window=window)}, tokens=tokens)


def flash_attn_fwd_bwd_deterministic_case(device, tokens: int, dtype, compile_mode) -> "Case":
    """flash_attn_fwd_bwd_causal (its shapes, bytes and FLOPs) with
    deterministic=True: dQ by its own kernel (dq_kernel), no atomic adds."""
    from mixkit import ops
    from mixkit.bench import flash_attn
    from mixkit.bench.harness import Case

    base = flash_attn.flash_attn_fwd_bwd_causal_case(device, tokens, dtype, compile_mode)
    q = torch.randn(flash_attn.BATCH, tokens, flash_attn.N_Q_HEADS, flash_attn.HEAD_DIM, device=device,
                    dtype=dtype, requires_grad=True)
    k, v = (torch.randn(flash_attn.BATCH, tokens, flash_attn.N_KV_HEADS, flash_attn.HEAD_DIM, device=device,
                        dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def run():
        return torch.autograd.grad(ops.flash_attn(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
    return Case("flash_attn_fwd_bwd_deterministic", base.shape, dtype, base.bytes, {"mixkit": run},
                tokens=tokens, flops=base.flops)


def grouped_bias_grad_case(device, tokens: int, dtype, compile_mode) -> "Case":
    """The expert biases' gradient (models with expert biases: gpt-oss) at
    Mixtral's routing of `tokens` tokens: per-expert sums of the T * k rows
    of the down projection's output gradient (hidden 4096)."""
    import mixkit.ops  # noqa: F401  (registers torch.ops.mixkit)
    from mixkit.bench.harness import Case
    from mixkit.bench.moe_mlp import EXPERTS, TOP_K

    rows, hidden = tokens * TOP_K, 4096
    g = torch.randn(rows, hidden, device=device, dtype=dtype)
    counts = torch.bincount(torch.randint(0, EXPERTS, (rows,)), minlength=EXPERTS)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])  # (E + 1,) int64
    op = torch.ops.mixkit.grouped_bias_grad  # the backward of moe_mlp's biases, not a public op
    nbytes = g.numel() * g.element_size() + EXPERTS * hidden * g.element_size()
    return Case("grouped_bias_grad", f"T={tokens} E={EXPERTS} k={TOP_K} H={hidden}", dtype, nbytes,
                {"mixkit": lambda: op(g, offsets, EXPERTS)}, tokens=tokens)


EXTRA_CASES = {"paged_kv_append": paged_kv_append_case, "paged_prefill_attn": paged_prefill_attn_case,
               "flash_attn_fwd_bwd_deterministic": flash_attn_fwd_bwd_deterministic_case,
               "grouped_bias_grad": grouped_bias_grad_case}
REPORT.update({"paged_kv_append": dict(tokens=(512,)), "paged_prefill_attn": dict(tokens=(64, 512), sample=(1, 0, 2), sample_at={64: (1, 0)}),
               "flash_attn_fwd_bwd_deterministic": dict(tokens=(1024,), sample=(4, 0)),
               "grouped_bias_grad": dict(tokens=(1024,))})


def resident_blocks(kernel: str, threads: int, path: str, resources: dict | None) -> int:
    """Theoretical blocks per SM/CU of the kernel whose name contains `kernel` (0: unknown)."""
    for name, res in (resources or {}).get(path, {}).items():
        if kernel in name:
            smem = res.get("smem_static", res.get("lds_static", 0))
            regs = res.get("registers", res.get("vgprs", 0))
            return emu_devices.occupancy(PATHS[path]["device"], threads, regs=regs, smem=smem)["blocks"]
    return 0


def run_case(op: str, tokens: int, path: str, dtype=torch.bfloat16, resources: dict | None = None,
             case_fn=None) -> dict:
    """Counts one benchmark case's mixkit op on `path`; `case_fn` replaces
    bench.CASES[op] (the cases of ops the benchmark does not time)."""
    from mixkit.bench import CASES

    spec = REPORT.get(op, {})
    sample = spec.get("sample_at", {}).get(tokens, spec.get("sample", (0, 0)))
    # decode launches 128 threads a block (csrc/cuda/decode.cu kThreads).
    per_sm = resident_blocks(spec["occupancy"], 128, path, resources) if "occupancy" in spec else 0
    with emulated_device(path, blocks_per_sm=per_sm):
        case = (case_fn or CASES[op])("cpu", tokens, dtype, None)
        fn = case.impls["mixkit"]
        if op in WARM_FIRST:
            fn()
        t0 = time.perf_counter()
        launches = count(fn, *sample)
        wall = time.perf_counter() - t0
    dname = str(dtype).removeprefix("torch.")
    rows = [launch_row(l, path, resources, shared_y=spec.get("shared_y", False), sample=sample)
            for l in launches]
    return {"case": case_row(case, path, rows, dname), "launches": rows, "emulated_s": wall,
            "sample": list(sample), "blocks_per_sm": per_sm or None}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _f(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def render_markdown(meta: dict, results: list[dict]) -> str:
    lines = [f"# mixkit on the emulated GPU: counters and a projection ({', '.join(meta['paths'])})", "",
             "Counted on the emulated GPU (no GPU ran); `projected` columns are lower bounds from published "
             "peaks (python/mixkit/bench/emu_devices.py), not measurements. `re-read`: the bytes a launch loads "
             "through the caches over the distinct bytes it loads (K/V tiles once per query block and GQA head in "
             "attention, weight tiles once per M tile in the grouped GEMMs).", ""]
    lines += [f"- {k}: {meta[k]}" for k in ("date_utc", "commit", "build", "resources") if meta.get(k)]
    lines += ["", "## Per case", "",
              "| op | shape | path | launches | DRAM / min bytes | requested / min | conflict share | "
              "tensor FLOPs / min | projected us | roofline us | projected % of roofline |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["case"]
        launches = f"{c['launches']} (middle blocks)" if c.get("sampled_x") else c["launches"]
        lines.append(f"| {c['op']} | {c['shape']} | {c['path']} | {launches} | {_f(c['dram_vs_min'], '.3f')} | "
                     f"{_f(c['requested_vs_min'], '.3f')} | {_f(c['conflict_share'], '.3f')} | "
                     f"{_f(c['tensor_flops_vs_min'], '.3f')} | {_f(c['projected_us'], '.2f')} | "
                     f"{_f(c['roofline_us'], '.2f')} | {_f(c['projected_pct_roofline'], '.1f')} |")
    lines += ["", "## Per launch", "",
              "| op | path | kernel | grid x block | sectors/req (ideal) | re-read | shared wavefronts/req by kind "
              "(ideal) | max conflict | tensor instr | barriers/block | regs | spills | smem/block | occupancy | waves "
              "(last fill) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for l in r["launches"]:
            shared = "; ".join(f"{k} {v['wavefronts_per_request']:.2f} ({v['ideal'] / v['requests']:.2f})"
                               for k, v in l["shared"].items())
            worst = max((v["max_degree"] for v in l["shared"].values()), default=0)
            grid = "x".join(map(str, l["grid"])) + " x " + "x".join(map(str, l["block"]))
            if l.get("sampled_x"):
                grid += f" ({l['blocks_run']} blocks run)"
            occ = (f"{l['blocks_per_unit']} blk ({100 * l['occupancy']:.0f}%, {l['occupancy_limit']})"
                   if "occupancy" in l else "")
            wav = f"{l['waves']:.2f} ({l['last_wave_fill']:.2f})" if "waves" in l else ""
            smem = l.get("static_smem", 0) + l["dynamic_smem"] if "static_smem" in l else l["dynamic_smem"]
            lines.append(
                f"| {r['case']['op']} | {l['path']} | `{l['kernel']}` | {grid} | "
                f"{_f(l['sectors_per_request'], '.2f')} ({_f(l['ideal_sectors_per_request'], '.2f')}) | "
                f"{_f(l['reread'], '.2f')} | {shared} | "
                f"{worst or ''} | {l['tensor_instructions'] or ''} | {_f(l['barriers_per_block'], '.1f')} | "
                f"{l.get('registers', '')} | {l.get('spill_bytes', '')} | {smem} | {occ} | {wav} |")
    return "\n".join(lines) + "\n"


def projection_table(results: list[dict]) -> str:
    """The README's table: per case, % of roofline measured on a GPU (empty
    until one runs) beside the emulator's projection on each device."""
    cols = [p for p in PATHS if any(r["case"]["path"] == p for r in results)]
    by_case: dict[tuple, dict] = {}
    for r in results:
        c = r["case"]
        by_case.setdefault((c["op"], c["shape"]), {})[c["path"]] = c
    names = {p: f"{PATHS[p]['device'].name} ({p})" for p in cols}
    lines = ["| op | shape | measured on GPU | " + " | ".join(f"projected on the emulator, {names[p]}" for p in cols)
             + " |", "|---|---|---|" + "---|" * len(cols)]
    for (op, shape), row in by_case.items():
        cells = [f"{row[p]['projected_pct_roofline']:.0f} %" if p in row and row[p]["projected_pct_roofline"]
                 else "" for p in cols]
        if not any(cells):  # counted on some blocks only (sample_x): no projection
            continue
        lines.append(f"| {op} | {shape} | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def result_name(meta: dict) -> str:
    """`<date>_<host>_<commit>_emulated-<paths>`: bench/results/'s naming
    (harness.result_name, the host that emulated as the device)."""
    from mixkit.bench import harness

    return f"{harness.result_name(meta)}_emulated-{'-'.join(meta['paths'])}"


def write(out: str | Path, meta: dict, results: list[dict]) -> list[Path]:
    from mixkit.bench import harness

    out = Path(out)
    if out.is_dir() or str(out).endswith("/"):
        out = out / f"{result_name(meta)}.json"
    return harness.write_json_and_markdown(out, meta, results, render_markdown(meta, results))


def run(ops: list[str] | None = None, paths: list[str] | None = None, resources: str | None = None,
        log=print, on_result: Callable[[dict, list[dict]], object] | None = None) -> tuple[dict, list[dict]]:
    """Counts every case of `ops` on every path of the build; `on_result(meta,
    results)` after each case (the CLI saves as it goes: a report takes hours)."""
    from mixkit.bench import CASES, harness

    if not emulated_build():
        raise ValueError("--device emu needs an emulated build of mixkit._core (-DMIXKIT_EMULATE=ON; "
                         "MIXKIT_CORE=path/to/_core*.so selects one)")
    ops = ops or list(REPORT) + list(EXTRA_CASES)
    unknown = [op for op in ops if op not in CASES and op not in EXTRA_CASES]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {', '.join(CASES)}")
    paths = paths or paths_of_build()
    res = json.loads(Path(resources).read_text()) if resources else None
    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_name": harness._device_name(torch.device("cpu")), "commit": harness._git_commit(), "build": _core().build_info(), "paths": paths,
            "resources": resources, "kind": "emulated: counters and projections, no GPU measurement"}
    results = []
    torch.manual_seed(0)
    for path in paths:
        for op in ops:
            if path not in REPORT.get(op, {}).get("paths", (path,)):
                continue
            for tokens in REPORT.get(op, {}).get("tokens", (1024,)):
                r = run_case(op, tokens, path, resources=res, case_fn=EXTRA_CASES.get(op))
                results.append(r)
                if log:
                    c = r["case"]
                    log(f"{path:7} {op:<24} {c['shape']:<44} DRAM/min {_f(c['dram_vs_min'], '6.3f')} "
                        f"conflicts {_f(c['conflict_share'], '5.3f')} projected {_f(c['projected_pct_roofline'], '5.1f')}"
                        f"% of roofline  ({r['emulated_s']:.1f} s emulated)")
                if on_result:
                    on_result(meta, results)
    return meta, results
