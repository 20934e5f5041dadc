"""tools/mutation_sweep.py's mutants, annotations, report and command line
(CPU only: the sweep itself builds and runs the emulated GPU, for hours)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutation_sweep as ms  # noqa: E402


def test_mutants_of_a_kernel_file():
    ms_ = ms.mutants("cuda/flash_attn_fwd_sm90.cuh")
    kinds = {m.kind for m in ms_}
    assert kinds == {"barrier", "flip", "bound", "swap"}
    barriers = [m for m in ms_ if m.kind == "barrier"]
    # Every synchronisation statement of the kernel, and nothing in comments.
    text = (ROOT / "csrc/cuda/flash_attn_fwd_sm90.cuh").read_text().split("\n")
    for name in ("__syncthreads", "cp_async_wait", "fence_proxy_async", "wgmma_fence", "wgmma_wait"):
        lines = [i + 1 for i, l in enumerate(text) if f"{name}" in l.split("//")[0] and "void" not in l]
        assert lines and lines == sorted(m.line for m in barriers if name in m.note), name
    for m in ms_:
        assert m.before != m.after and m.before == text[m.line - 1]
    assert len({m.key for m in ms_}) == len(ms_), "mutant keys are unique"
    flip = next(m for m in ms_ if m.kind == "flip" and "nb < n_end" in m.before)
    assert "nb <= n_end" in flip.after
    bound = next(m for m in ms_ if m.kind == "bound" and "nb < n_end" in m.before)
    assert "nb < (n_end) - 1" in bound.after


def test_template_brackets_and_shifts_are_not_comparisons():
    for m in ms.mutants("cuda/flash_attn_bwd_sm80.cuh"):
        if m.kind in ("flip", "bound"):
            assert "template" not in m.before and "static_assert" not in m.before
            assert "<<" not in m.note and ">>" not in m.note


def test_annotations_name_lines_and_kinds(tmp_path, monkeypatch):
    src = tmp_path / "csrc/cuda"
    src.mkdir(parents=True)
    (src / "k.cu").write_text("\n".join([
        "void f() {",
        "  // mutant-equivalent(barrier): nothing reads the tile",
        "  // before the next barrier.",
        "  __syncthreads();",
        "  if (i < n) x = 1;  // mutant-equivalent(flip, bound): i < n and i <= n agree here",
        "}"]))
    monkeypatch.setattr(ms, "ROOT", tmp_path)
    ann = ms.annotations("cuda/k.cu")
    assert ann[4] == ({"barrier"}, "nothing reads the tile before the next barrier.")
    assert ann[5][0] == {"flip", "bound"}
    assert {m.kind for m in ms.mutants("cuda/k.cu")} == {"barrier", "flip", "bound"}


def test_command_line_errors_are_one_line():
    for args in (["--kinds", "nope"], ["--files", "no_such.cu"]):
        r = subprocess.run([sys.executable, str(ROOT / "tools/mutation_sweep.py"), *args, "--list"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "tools/mutation_sweep.py"), "--list", "--files", "rope.cu",
                        "--kinds", "barrier"], capture_output=True, text=True)
    assert r.returncode == 0 and "removed __syncthreads()" in r.stdout


@pytest.mark.parametrize("kernel", sorted(ms.tiles.KERNELS))
def test_every_kernel_file_has_mutants_or_is_dispatch_only(kernel):
    assert ms.mutants(kernel) or kernel == "cuda/flash_attn.cu"
