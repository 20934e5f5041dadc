"""The benchmark harness and the `mixkit` command run end to end on the CPU
and produce results that say what device they came from."""
import json
import subprocess
import sys

import pytest


def test_mixkit_bench_quick_writes_results(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mixkit", "bench", "--quick", "--device", "cpu", "--ops", "rms_norm,rope",
         "--no-compile", "--no-plot", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    meta, rows = result["meta"], result["rows"]
    for key in ("device_name", "torch", "date_utc", "commit", "build_info", "copy_gbps"):
        assert meta.get(key), key
    assert meta["copy_gbps"] > 0
    assert {r["impl"] for r in rows} >= {"mixkit", "eager"}
    assert not [r for r in rows if "error" in r]
    for r in rows:
        assert r["median_us"] > 0 and r["gbps"] > 0
        if r["impl"] == "mixkit":  # bf16 outputs against the eager bf16 reference
            assert r["max_abs_err"] <= 0.05, r
    assert out.with_suffix(".md").read_text().count("| mixkit |") == sum(r["impl"] == "mixkit" for r in rows)


def test_bench_rejects_unknown_op():
    proc = subprocess.run([sys.executable, "-m", "mixkit", "bench", "--ops", "nope", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ops" in proc.stderr


def test_mixkit_info():
    proc = subprocess.run([sys.executable, "-m", "mixkit", "info", "--device", "cpu"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["build_info"]["backends"][0] == "cpu"


# ---- flash attention cases ----------------------------------------------------------

FLASH_OPS = ["flash_attn_fwd_w4096", "flash_attn_fwd_causal", "flash_attn_fwd_bwd_w4096", "flash_attn_fwd_bwd_causal"]


def test_every_op_has_sizes_for_every_run_kind():
    from mixkit import bench

    for op in bench.CASES:
        table = bench.OP_TOKENS.get(op, bench.TOKENS)
        assert set(table) == set(bench.TOKENS) and all(table.values()), op
    assert bench.OP_TOKENS["flash_attn_fwd_causal"]["cuda", False] == (1024, 4096, 8192, 16384, 32768)


def test_flash_attn_flop_formula():
    from mixkit.bench import flash_attn as fa

    assert fa.visible_pairs(1024, None) == fa.visible_pairs(1024, 4096) == 1024 * 1025 // 2
    assert fa.visible_pairs(4096, 4096) == 4096 * 4097 // 2
    assert fa.visible_pairs(32768, 4096) == 4096 * 4097 // 2 + (32768 - 4096) * 4096
    fwd = 4 * fa.visible_pairs(32768, 4096) * 128 * 32 * 1
    assert fa.attention_flops(32768, 4096, backward=False) == fwd
    assert fa.attention_flops(32768, 4096, backward=True) == fwd * 7 // 2  # fwd + 2.5 x fwd


def test_flash_attn_cases_quick_cpu():
    import mixkit.ops

    if not hasattr(mixkit.ops, "flash_attn"):
        pytest.skip("mixkit.ops.flash_attn is not there yet (being written alongside this benchmark)")
    from mixkit import bench
    from mixkit.bench import flash_attn as fa

    _, rows = bench.run(device="cpu", quick=True, ops=FLASH_OPS, compile=False, log=None)
    assert not [r for r in rows if "error" in r], rows
    assert {r["op"] for r in rows} == set(FLASH_OPS)
    for op in FLASH_OPS:
        impls = {r["impl"] for r in rows if r["op"] == op}
        assert impls == ({"mixkit", "eager", "sdpa"} if op.endswith("causal") else {"mixkit", "eager"}), op
    for r in rows:
        assert r["tokens"] in fa.SEQLENS["cpu", True]
        window = None if r["op"].endswith("causal") else fa.CPU_WINDOW
        assert f"W={window or 'none'}" in r["shape"]
        assert window is None or window < r["tokens"]  # the CPU window really masks keys
        flops = fa.attention_flops(r["tokens"], window, backward="bwd" in r["op"])
        assert abs(r["tflops"] - flops / (r["median_us"] * 1e-6) / 1e12) <= 1e-9 * r["tflops"]
        assert r["pct_matmul"] > 0
        if r["impl"] == "mixkit":  # bf16 output (and dq, dk, dv) against the float32 reference rounded to bf16
            assert r["max_abs_err"] <= 0.1, r


VARIANT_OPS = ["flash_attn_fwd_sinks_w128", "flash_attn_fwd_bwd_sinks_w128", "flash_attn_fwd_softcap_hd256",
               "flash_attn_fwd_bwd_softcap_hd256"]
DECODE_VARIANT_OPS = ["decode_attn_sinks_w128_b8", "decode_attn_softcap_hd256_b8"]


def test_flash_attn_variant_cases_quick_cpu():
    """gpt-oss's sinks and Gemma 2's softcap at head dim 256: mixkit against
    the eager reference with the sink column and the cap (dsinks included in
    the fwd_bwd rows), FLOPs of the variant's own heads and head dim."""
    from mixkit import bench
    from mixkit.bench import flash_attn as fa

    _, rows = bench.run(device="cpu", quick=True, ops=VARIANT_OPS, compile=False, log=None)
    assert not [r for r in rows if "error" in r], rows
    assert {r["op"] for r in rows} == set(VARIANT_OPS)
    for r in rows:
        heads, _, head_dim, window, _, _ = fa.VARIANTS["sinks_w128" if "sinks" in r["op"] else "softcap_hd256"]
        window = min(window, fa.CPU_WINDOW) if window else None
        assert f"H={heads}" in r["shape"] and f"D={head_dim}" in r["shape"] and f"W={window or 'none'}" in r["shape"]
        flops = fa.attention_flops(r["tokens"], window, "bwd" in r["op"], heads, head_dim)
        assert abs(r["tflops"] - flops / (r["median_us"] * 1e-6) / 1e12) <= 1e-9 * r["tflops"]
        if r["impl"] == "mixkit":
            assert r["max_abs_err"] <= 0.1, r
    assert {r["impl"] for r in rows} == {"mixkit", "eager"}  # flex and FlashAttention are CUDA peers


def test_decode_variant_cases_quick_cpu():
    """Decode with gpt-oss's sinks and Gemma 2's softcap at head dim 256
    against the eager reference with the sink column and the cap."""
    from mixkit import bench

    _, rows = bench.run(device="cpu", quick=True, ops=DECODE_VARIANT_OPS, compile=False, log=None)
    assert not [r for r in rows if "error" in r], rows
    assert {r["op"] for r in rows} == {"decode_attn_sinks_w128", "decode_attn_softcap_hd256"}
    assert {r["impl"] for r in rows} == {"mixkit", "eager"}
    for r in rows:
        shape = r["shape"]
        assert ("D=64" in shape and "sinks=yes" in shape) or ("D=256" in shape and "softcap=50" in shape), shape
        if r["impl"] == "mixkit":
            assert r["max_abs_err"] <= 0.05, r
