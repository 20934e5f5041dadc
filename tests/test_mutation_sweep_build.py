"""tools/mutation_sweep.py: what a mutant rebuilds, which tests it runs and
what the report says (CPU only, no build)."""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutation_sweep as ms  # noqa: E402


def test_survivor_tests_run_under_the_files_selection():
    for f, names in ms.SURVIVOR_TESTS.items():
        tests = ms.file_tests(f)
        k = tests.index("-k")
        assert tests[k:] == ms.tiles.KERNELS[f].tests[-2:]
        for n in names:
            assert f"{ms.SURVIVORS}::{n}" in tests[:k]
            assert f"def {n}(" in (ROOT / ms.SURVIVORS).read_text()
    assert ms.file_tests("cuda/norm.cu") == ms.tiles.KERNELS["cuda/norm.cu"].tests


def test_only_instantiations_no_mapped_test_calls_keep_the_unmutated_code():
    gen = Path("build/CMakeFiles/mixkit_emu.dir/gen")
    unused = ms.unused_instance(ms.file_tests("cuda/flash_attn_bwd_sm80.cuh"))  # "... and not float16"
    for d in ms.tiles.HEAD_DIMS:
        assert not unused(gen / f"flash_attn_bwd_sm80_hd{d}_bf16.cpp.o")
        assert unused(gen / f"flash_attn_bwd_sm80_hd{d}_f16.cpp.o")
    assert 256 not in ms.tiles.HEAD_DIMS and unused(gen / "flash_attn_bwd_sm80_hd256_bf16.cpp.o")
    assert not unused(Path("build/CMakeFiles/mixkit_emu.dir/csrc/cuda/flash_attn.cu.o"))
    every_dtype = ms.unused_instance(("tests/test_moe_mlp.py", "-k", "emu"))
    assert not every_dtype(gen / "grouped_gemm_sm90_f16.cpp.o")
    assert every_dtype(gen / "flash_attn_fwd_sm90_hd256_f16.cpp.o")


def test_a_mutant_rebuilds_only_the_reachable_objects(tmp_path, monkeypatch):
    b = ms.Build.__new__(ms.Build)
    b.src, b.out, b.mutated, b.rebuilt = tmp_path / "src", tmp_path / "out", None, []
    header = b.src / "csrc/cuda/k.cuh"
    header.parent.mkdir(parents=True)
    header.write_text("a;\n  __syncthreads();\nb;")
    os.utime(header, ns=(10**18, 10**18))
    b.out.mkdir()
    used, unused = b.out / "used.o", b.out / "unused.o"
    for o in (used, unused):
        o.write_text("")
    monkeypatch.setattr(b, "_dependents", lambda rel: [used, unused])
    m = ms.Mutant("cuda/k.cuh", 2, "barrier", "  __syncthreads();", "  ;")
    b.apply(m, unused=lambda o: o == unused)
    # ninja must not see the file change (its mtime is kept); the reachable
    # object is gone, so ninja rebuilds it, and only it.
    assert header.read_text() == "a;\n  ;\nb;" and header.stat().st_mtime_ns == 10**18
    assert not used.exists() and unused.exists()
    b.restore()
    assert header.read_text() == "a;\n  __syncthreads();\nb;" and header.stat().st_mtime_ns == 10**18
    assert not used.exists() and unused.exists()


def test_report_gives_scores_by_kind_and_the_emulator_of_each_result(tmp_path, monkeypatch):
    f = "cuda/rope.cu"
    barrier = next(m for m in ms.mutants(f) if m.kind == "barrier")
    others = [m for m in ms.mutants(f) if m.kind != "barrier"][:3]
    rows = [dict(ms._record(barrier), outcome="caught", racecheck=True, emulator="e1"),
            dict(ms._record(others[0]), outcome="caught", racecheck=False, emulator="e0"),
            dict(ms._record(others[1]), outcome="survived", racecheck=True, emulator="e1"),
            dict(ms._record(others[2]), outcome="compile-error", racecheck=True, emulator="e1")]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(ms, "RESULTS", results)
    text = ms.report()
    line = next(l for l in text.splitlines() if l.startswith(f"| {f} "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "1 / 0 / 0" and cells[2] == "1 / 0 / 1" and cells[3] == "1"
    assert cells[5] == "3 of 4" and cells[6] == "67 % of 3"
    assert "`e1`: 3 mutants, race checker on" in text and "`e0`: 1 mutants, race checker off" in text
    assert f"`{f}:{others[1].line}`" in text  # the survivor is listed


def test_results_from_before_the_race_checker_are_run_again():
    assert ms._racecheck()
    assert not ms._settled(dict(outcome="caught", emulator="x"))
    assert ms._settled(dict(outcome="caught", emulator="x", racecheck=True))
    assert ms._settled(dict(outcome="equivalent"))
    assert not ms._settled(dict(outcome="survived", emulator="old", racecheck=True))
