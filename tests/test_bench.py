"""The benchmark harness and the `mixkit` command run end to end on the CPU
and produce results that say what device they came from."""
import json
import subprocess
import sys


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
