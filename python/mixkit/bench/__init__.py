"""mixkit benchmarks: `run()` times the selected ops against their peers.

Each op maps to a function `(device, tokens, dtype, compile_mode) -> Case`
(see harness.Case). A new kernel adds its module here and one line to CASES.
Ops whose sizes are not the shared TOKENS counts (attention's sequence
lengths) name their own table, keyed the same way, in OP_TOKENS.
"""

from __future__ import annotations

import torch

from mixkit.bench import decode, flash_attn, harness, hf, moe_mlp, moe_route, norms, rope

CASES = {
    "rms_norm": norms.rms_norm_case,
    "rms_norm_residual": norms.rms_norm_residual_case,
    "rms_norm_bwd": norms.rms_norm_bwd_case,
    "layer_norm": norms.layer_norm_case,
    "rope": rope.rope_case,
    "moe_route": moe_route.moe_route_case,
    "moe_permute": moe_route.moe_permute_case,
    "moe_unpermute": moe_route.moe_unpermute_case,
    "moe_mlp": moe_mlp.moe_mlp_case,
    "moe_mlp_fwd_bwd": moe_mlp.moe_mlp_fwd_bwd_case,
    "kv_cache_append": decode.kv_cache_append_case,
    "decode_attn_b1": decode.decode_attn_b1_case,
    "decode_attn_b8": decode.decode_attn_b8_case,
    "decode_attn_b32": decode.decode_attn_b32_case,
    "decode_attn_b128": decode.decode_attn_b128_case,
    "decode_attn_nowin_b1": decode.decode_attn_nowin_b1_case,
    "decode_attn_nowin_b8": decode.decode_attn_nowin_b8_case,
    "decode_attn_nowin_b32": decode.decode_attn_nowin_b32_case,
    "decode_attn_sinks_w128_b8": decode.decode_attn_sinks_w128_b8_case,
    "decode_attn_softcap_hd256_b8": decode.decode_attn_softcap_hd256_b8_case,
    "flash_attn_fwd_w4096": flash_attn.flash_attn_fwd_w4096_case,
    "flash_attn_fwd_causal": flash_attn.flash_attn_fwd_causal_case,
    "flash_attn_fwd_bwd_w4096": flash_attn.flash_attn_fwd_bwd_w4096_case,
    "flash_attn_fwd_bwd_causal": flash_attn.flash_attn_fwd_bwd_causal_case,
    "flash_attn_fwd_sinks_w128": flash_attn.flash_attn_fwd_sinks_w128_case,
    "flash_attn_fwd_bwd_sinks_w128": flash_attn.flash_attn_fwd_bwd_sinks_w128_case,
    "flash_attn_fwd_softcap_hd256": flash_attn.flash_attn_fwd_softcap_hd256_case,
    "flash_attn_fwd_bwd_softcap_hd256": flash_attn.flash_attn_fwd_bwd_softcap_hd256_case,
    "hf_forward": hf.hf_forward_case,
    "hf_fwd_bwd": hf.hf_fwd_bwd_case,
    "hf_decode": hf.hf_decode_case,
}

# Token counts at Mistral 7B widths. On the CPU the full sweep stops at 1024
# and the quick one is small enough to finish, compiles included, in under a
# minute on 2 cores.
TOKENS = {
    ("cuda", False): (1, 16, 128, 1024, 4096, 16384),
    ("cuda", True): (1, 1024, 4096, 16384),
    ("cpu", False): (1, 16, 256, 1024),
    ("cpu", True): (1, 64),
}
# Per-op replacements for TOKENS: flash attention sweeps sequence lengths
# 1k..32k on the GPU (flash_attn.SEQLENS); decode sweeps seen lengths
# 1k, 4k and 32k (decode.SEEN).
OP_TOKENS = {op: flash_attn.SEQLENS for op in CASES if op.startswith("flash_attn")}
OP_TOKENS.update({op: decode.SEEN for op in CASES if op.startswith("decode_attn")})
OP_TOKENS.update({op: hf.SEQLENS for op in CASES if op.startswith("hf_")})
DTYPES = {
    ("cuda", False): (torch.bfloat16,),
    ("cuda", True): (torch.bfloat16,),
    ("cpu", False): (torch.float32, torch.bfloat16),
    ("cpu", True): (torch.bfloat16,),
}


# Ops that need an optional peer, and the module that brings it: without it
# their rows are skipped with a note instead of stopping the run.
OPTIONAL = {op: "mixkit.hf" for op in CASES if op.startswith("hf_")}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def unavailable(op: str) -> str | None:
    """Why `op` cannot run here (its optional peer does not import), or None."""
    import importlib

    if op not in OPTIONAL:
        return None
    try:
        importlib.import_module(OPTIONAL[op])
    except ImportError as exc:
        return str(exc)
    return None


def run(device: str | None = None, quick: bool = False, ops: list[str] | None = None,
        compile: bool = True, cuda_graph: bool = False, log=print, progress=None) -> tuple[dict, list[dict]]:
    """Benchmark `ops` (default: all of CASES); returns (metadata, rows).
    progress(meta, rows): called after every case with the rows so far (the
    command line writes its results file there, so a crash keeps them). An
    op whose optional peer is missing gets one `skipped` row; one whose case
    cannot be built at some size, an `error` row; the run goes on."""
    device = device or default_device()
    kind = torch.device(device).type
    ops = ops or list(CASES)
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {', '.join(CASES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device cuda asked for, but torch {torch.__version__} sees no CUDA GPU")
    if cuda_graph and kind != "cuda":
        raise ValueError("CUDA-graph timing needs --device cuda")

    torch.manual_seed(0)
    compile_mode = harness.compile_mode_for(device, quick) if compile else None
    meta = harness.collect_metadata(device)
    meta.update(copy_gbps=harness.copy_bandwidth_gbps(device), compile_mode=compile_mode,
                quick=quick, ops=ops)
    if log:
        log(f"{meta['device_name']}: copy ceiling {meta['copy_gbps']:.1f} GB/s (read + write)")

    def cases():
        for op in ops:
            why = unavailable(op)
            if why:
                yield {"op": op, "shape": "", "dtype": "", "impl": "", "skipped": why}
                continue
            for dtype in DTYPES[kind, quick]:
                for t in OP_TOKENS.get(op, TOKENS)[kind, quick]:
                    try:
                        yield CASES[op](device, t, dtype, compile_mode)
                    except Exception as exc:  # one case that cannot be built must not sink the run
                        yield harness.error_row(op, f"T={t}", dtype, "", exc)

    rows = harness.run_cases(cases(), device, budget_s=0.05 if quick else 0.2, cuda_graph=cuda_graph, log=log,
                             on_rows=(lambda rows: progress(meta, rows)) if progress else None)
    meta["timing"] = next((r["method"] for r in rows if "method" in r), None)
    return meta, rows
