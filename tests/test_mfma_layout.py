"""The MFMA lane/register layouts and the HIP grouped GEMM's index math, on the CPU.

There is no AMD GPU here, so the layout functions of csrc/cuda/mfma.cuh and
the tile plan of csrc/cuda/grouped_gemm_mfma.cuh (the constexpr functions the
kernel calls) are compiled as plain host C++ with the system compiler, print
their tables, and are checked against an independent model of
v_mfma_f32_32x32x8{bf16_1k,f16}.

The model is written from AMD's element-to-register description (AMD Matrix
Instruction Calculator, CDNA2, `-d`; the MI200 ISA's MFMA section):
  A[i][k] -> lane 32*floor(k/4) + i, element k%4
  B[k][j] -> lane 32*floor(k/4) + j, element k%4
  D[i][j] -> lane (32*floor(i/4)) % 64 + j, register 4*floor(i/8) + i%4
while the C++ functions go the other way, (lane, register) -> (row, col).

The kernel replay runs the kernel's staging, LDS addressing, fragment reads,
MFMA (the model) and epilogue over whole grids with empty experts, m-tails,
n-tails, k-tails and rows after offsets[E], and compares with A @ B per
expert. Inputs are small integers, so every product and sum is exact and the
comparisons are exact; the final bf16/fp16 rounding is not modelled.
LDS is refilled with NaN before each slice's stores, so a fragment read of
anything the same slice did not write shows up as NaN.

The weight-gradient replay does the same for grouped_wgrad_kernel (a grid of
K tiles x N tiles x experts, the reduction over each expert's rows) against
A_e^T dY_e, in both output layouts, and checks that every global read stays
inside its matrix. Planted bugs (a wrong table, a dropped bound) must make it
fail, so the replay is shown to be able to see them.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

SRC = Path(os.environ.get("MIXKIT_SOURCE_DIR", Path(__file__).resolve().parents[1])) / "csrc"

HOST_PROGRAM = r"""
#include <cstdio>
#include <iostream>
#include <vector>
#include "cuda/grouped_gemm_mfma.cuh"

using namespace mixkit::mfma;
using namespace mixkit::mfma::gg;

// The functions are usable in constant expressions (D[13][1] is register 5 of lane 33).
static_assert(d_row(33, 5) == 13 && d_col(33, 5) == 1 && a_k(40, 3) == 7 && pair_k(63, 1, 2) == 14, "constexpr");

template <class F> void table(const char* name, int n0, int n1, int n2, int n3, F f, bool& first) {
  std::printf("%s\"%s\": [", first ? "" : ",\n", name);
  first = false;
  bool f0 = true;
  for (int a = 0; a < n0; ++a) for (int b = 0; b < n1; ++b) for (int c = 0; c < n2; ++c) for (int d = 0; d < n3; ++d) {
    std::printf("%s%d", f0 ? "" : ",", f(a, b, c, d));
    f0 = false;
  }
  std::printf("]");
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "find_tile") {
    // stdin: "experts rows slots off_0 .. off_E" per case; stdout: per slot "ok expert row0 row1".
    int experts;
    long long rows, slots;
    while (std::cin >> experts >> rows >> slots) {
      std::vector<int64_t> off(experts + 1);
      for (auto& o : off) std::cin >> o;
      for (long long s = 0; s < slots; ++s) {
        int e = -1;
        int64_t r0 = 0, r1 = 0;
        const bool ok = find_tile(off.data(), experts, rows, s, e, r0, r1);
        std::printf("%d %d %lld %lld\n", int(ok), ok ? e : -1, (long long)r0, (long long)r1);
      }
    }
    return 0;
  }
  bool first = true;
  std::printf("{");
  std::printf("\"consts\": [%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d]", kWave, kM, kN, kK, kOperandElems, kAccRegs,
              kBM, kBN, kBK, kThreads, kChunks, kPairK);
  first = false;
  table("a_row", 64, 4, 1, 1, [](int l, int e, int, int) { return a_row(l, e); }, first);
  table("a_k", 64, 4, 1, 1, [](int l, int e, int, int) { return a_k(l, e); }, first);
  table("b_k", 64, 4, 1, 1, [](int l, int e, int, int) { return b_k(l, e); }, first);
  table("b_col", 64, 4, 1, 1, [](int l, int e, int, int) { return b_col(l, e); }, first);
  table("d_row", 64, 16, 1, 1, [](int l, int r, int, int) { return d_row(l, r); }, first);
  table("d_col", 64, 16, 1, 1, [](int l, int r, int, int) { return d_col(l, r); }, first);
  table("pair_k", 64, 2, 4, 1, [](int l, int s, int e, int) { return pair_k(l, s, e); }, first);
  table("pair_elem", 2, 4, 1, 1, [](int s, int e, int, int) { return pair_elem(s, e); }, first);
  table("stage_k_row", kThreads, kChunks, 1, 1, [](int t, int i, int, int) { return stage_k_row(t, i); }, first);
  table("stage_k_col", kThreads, kChunks, 1, 1, [](int t, int i, int, int) { return stage_k_col(t, i); }, first);
  table("stage_n_row", kThreads, kChunks, 1, 1, [](int t, int i, int, int) { return stage_n_row(t, i); }, first);
  table("stage_n_col", kThreads, kChunks, 1, 1, [](int t, int i, int, int) { return stage_n_col(t, i); }, first);
  table("lds_k", kBM, kBK, 1, 1, [](int r, int k, int, int) { return lds_k(r, k); }, first);
  table("lds_n", kBK, kBN, 1, 1, [](int k, int n, int, int) { return lds_n(k, n); }, first);
  table("frag_k", kBK / kPairK, 64, 1, 1, [](int c, int l, int, int) { return frag_k(c, l); }, first);
  table("frag_row", kThreads / 64, kTilesM, 64, 1, [](int w, int t, int l, int) { return frag_row(w, t, l); }, first);
  table("frag_col", kThreads / 64, kTilesN, 64, 1, [](int w, int u, int l, int) { return frag_col(w, u, l); }, first);
  table("out_row", kThreads / 64, kTilesM, 64, 16,
        [](int w, int t, int l, int r) { return out_row(w, t, l, r); }, first);
  table("out_col", kThreads / 64, kTilesN, 64, 16,
        [](int w, int u, int l, int r) { return out_col(w, u, l, r); }, first);
  table("swiglu_frag_col", kThreads / 64, kTilesN, 64, 1,
        [](int w, int u, int l, int) { return swiglu_frag_col(w, u, l); }, first);
  table("swiglu_out_col", kThreads / 64, 64, 16, 1, [](int w, int l, int r, int) { return swiglu_out_col(w, l, r); },
        first);
  // swiglu_w13_row(r, n0, ffn) for n0 = 64 * a, ffn = 8 + 64 * b (a, b < 4).
  table("swiglu_w13_row", 4, 4, kBN, 1,
        [](int a, int b, int r, int) { return int(swiglu_w13_row(r, 64 * a, 8 + 64 * b)); }, first);
  table("wgrad_frag_x", kThreads / 64, kTilesM, kBK / kPairK, 64 * 8,
        [](int w, int t, int kc, int le) { return wgrad_frag_x(w, t, kc, le / 8, le % 8 / 4, le % 4); }, first);
  table("wgrad_frag_y", kThreads / 64, kTilesN, kBK / kPairK, 64 * 8,
        [](int w, int u, int kc, int le) { return wgrad_frag_y(w, u, kc, le / 8, le % 8 / 4, le % 4); }, first);
  // wgrad_p0 / wgrad_q0 (trans_b, K tile, N tile) for tiles < 4.
  table("wgrad_p0", 2, 4, 4, 1, [](int tb, int kt, int nt, int) { return int(wgrad_p0(tb, kt, nt)); }, first);
  table("wgrad_q0", 2, 4, 4, 1, [](int tb, int kt, int nt, int) { return int(wgrad_q0(tb, kt, nt)); }, first);
  std::printf(", \"swiglu_cols\": %d", kSwigluCols);
  std::printf(", \"lds_sizes\": [%d, %d, %d]}\n", kBM * kLdK, kBN * kLdK, kBK * kLdN);
  return 0;
}
"""


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name) and "hipcc" not in name and "nvcc" not in name:
            return shutil.which(name)
    return None


# The attention replays' host programs print their tables with this (after
# a first JSON member): table(name, n0, n1, n2, f) is f over the 3-D index
# space, flattened.
TABLE_HELPER = r"""
template <class F> void table(const char* name, int n0, int n1, int n2, F f) {
  std::printf(",\n\"%s\": [", name);
  bool first = true;
  for (int a = 0; a < n0; ++a) for (int b = 0; b < n1; ++b) for (int c = 0; c < n2; ++c) {
    std::printf("%s%d", first ? "" : ",", f(a, b, c));
    first = false;
  }
  std::printf("]");
}
"""


def build_host_program(tmp_path_factory, program: str, header: str, name: str) -> Path:
    """Compile a host C++ program that includes csrc/cuda/<header> (skipping
    cleanly without a compiler or the sources); returns the executable.
    Shared by the MFMA test files: each prints its kernel's tables."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler to build the layout tables")
    if not (SRC / "cuda" / header).is_file():
        pytest.skip(f"mixkit sources not found at {SRC} (set MIXKIT_SOURCE_DIR)")
    d = tmp_path_factory.mktemp(name)
    (d / "host.cpp").write_text(program)
    exe = d / "host"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{SRC}", str(d / "host.cpp"), "-o",
                    str(exe)], check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    exe = build_host_program(tmp_path_factory, HOST_PROGRAM, "mfma.cuh", "mfma_host")
    out = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    shapes = {"a_row": (64, 4), "a_k": (64, 4), "b_k": (64, 4), "b_col": (64, 4), "d_row": (64, 16),
              "d_col": (64, 16), "pair_k": (64, 2, 4), "pair_elem": (2, 4)}
    c = dict(zip(["wave", "m", "n", "k", "elems", "acc", "BM", "BN", "BK", "threads", "chunks", "pair_k"],
                 out["consts"]))
    waves = c["threads"] // 64
    shapes.update({"stage_k_row": (c["threads"], c["chunks"]), "stage_k_col": (c["threads"], c["chunks"]),
                   "stage_n_row": (c["threads"], c["chunks"]), "stage_n_col": (c["threads"], c["chunks"]),
                   "lds_k": (c["BM"], c["BK"]), "lds_n": (c["BK"], c["BN"]), "frag_k": (c["BK"] // c["pair_k"], 64),
                   "frag_row": (waves, 2, 64), "frag_col": (waves, 2, 64), "out_row": (waves, 2, 64, 16),
                   "out_col": (waves, 2, 64, 16), "swiglu_frag_col": (waves, 2, 64),
                   "swiglu_out_col": (waves, 64, 16), "swiglu_w13_row": (4, 4, c["BN"]),
                   "wgrad_frag_x": (waves, 2, c["BK"] // c["pair_k"], 64, 2, 4),
                   "wgrad_frag_y": (waves, 2, c["BK"] // c["pair_k"], 64, 2, 4),
                   "wgrad_p0": (2, 4, 4), "wgrad_q0": (2, 4, 4)})
    tables = {k: np.array(out[k]).reshape(s) for k, s in shapes.items()}
    tables["consts"] = c
    tables["lds_sizes"] = out["lds_sizes"]
    tables["swiglu_cols"] = out["swiglu_cols"]
    tables["exe"] = exe
    return tables


# ---- the instruction model, from the element -> register description ---------------

def a_lane_elem(i, k):
    return 32 * (k // 4) + i, k % 4


def b_lane_elem(k, j):
    return 32 * (k // 4) + j, k % 4


def d_lane_reg(i, j):
    return (32 * (i // 4)) % 64 + j, 4 * (i // 8) + i % 4


_I, _K = np.meshgrid(np.arange(32), np.arange(8), indexing="ij")  # A index grid (32 x 8)
_KB, _J = np.meshgrid(np.arange(8), np.arange(32), indexing="ij")  # B index grid (8 x 32)
_DI, _DJ = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
_A_LE = a_lane_elem(_I, _K)
_B_LE = b_lane_elem(_KB, _J)
_D_LR = d_lane_reg(_DI, _DJ)


def mfma_32x32x8(a_regs, b_regs, c_regs):
    """One wavefront's v_mfma_f32_32x32x8: a_regs, b_regs (64, 4), c_regs (64, 16) -> d_regs (64, 16)."""
    A = a_regs[_A_LE]          # A[i][k] = a_regs[lane(i, k), elem(i, k)]
    B = b_regs[_B_LE]
    C = c_regs[_D_LR]
    D = A @ B + C
    d_regs = np.full((64, 16), np.nan)
    d_regs[_D_LR] = D
    return d_regs


# ---- layouts -----------------------------------------------------------------------

def test_model_layouts_are_bijections():
    for lane_elem, n_elem in ((_A_LE, 4), (_B_LE, 4), (_D_LR, 16)):
        flat = lane_elem[0] * n_elem + lane_elem[1]
        assert sorted(flat.ravel().tolist()) == list(range(64 * n_elem))


def test_operand_tables_match_model(host):
    for lane in range(64):
        for e in range(4):
            assert a_lane_elem(host["a_row"][lane, e], host["a_k"][lane, e]) == (lane, e)
            assert b_lane_elem(host["b_k"][lane, e], host["b_col"][lane, e]) == (lane, e)
        for r in range(16):
            assert d_lane_reg(host["d_row"][lane, r], host["d_col"][lane, r]) == (lane, r)


def test_tile_gemm_through_layout_functions(host):
    rng = np.random.default_rng(0)
    for _ in range(8):
        A = rng.integers(-8, 9, (32, 8)).astype(np.float64)
        B = rng.integers(-8, 9, (8, 32)).astype(np.float64)
        C = rng.integers(-50, 51, (32, 32)).astype(np.float64)
        a = A[host["a_row"], host["a_k"]]
        b = B[host["b_k"], host["b_col"]]
        c = C[host["d_row"], host["d_col"]]
        d = mfma_32x32x8(a, b, c)
        D = np.full((32, 32), np.nan)
        D[host["d_row"], host["d_col"]] = d
        np.testing.assert_array_equal(D, A @ B + C)


def test_pair_k_covers_a_16_wide_chunk(host):
    """Two instructions fed from one 8-value read per lane compute a k = 16 product."""
    pk, pe = host["pair_k"], host["pair_elem"]
    for lane in range(64):
        ks = sorted(pk[lane].ravel().tolist())
        assert ks == list(range(8 * (lane // 32), 8 * (lane // 32) + 8))  # one contiguous 16-byte read
        for s in range(2):
            for e in range(4):
                assert pk[lane, s, e] == pk[lane, 0, 0] + pe[s, e]
    rng = np.random.default_rng(1)
    A = rng.integers(-8, 9, (32, 16)).astype(np.float64)
    B = rng.integers(-8, 9, (16, 32)).astype(np.float64)
    acc = np.zeros((64, 16))
    for s in range(2):
        a = A[host["a_row"], pk[:, s, :]]  # element e of lane l: row a_row, physical k pair_k
        b = B[pk[:, s, :], host["b_col"]]
        acc = mfma_32x32x8(a, b, acc)
    D = np.full((32, 32), np.nan)
    D[host["d_row"], host["d_col"]] = acc
    np.testing.assert_array_equal(D, A @ B)


def test_tile_plan_covers_tiles(host):
    c = host["consts"]
    assert c["BM"] * c["BK"] * 2 + c["BN"] * c["BK"] * 2 <= 64 * 1024
    # Each staged tile element is written by exactly one (thread, chunk, j).
    for rows, cols, rtab, ctab, lds in ((c["BM"], c["BK"], "stage_k_row", "stage_k_col", "lds_k"),
                                        (c["BK"], c["BN"], "stage_n_row", "stage_n_col", "lds_n")):
        seen = np.zeros((rows, cols), int)
        for j in range(8):
            np.add.at(seen, (host[rtab], host[ctab] + j), 1)
        assert (seen == 1).all()
        off = host[lds]
        assert len(np.unique(off)) == off.size  # distinct LDS slots
        assert (off[:, 1:] - off[:, :-1] == 1).all()  # 8-element chunks are contiguous
        assert (off[host[rtab], host[ctab]] % 8 == 0).all()  # 16-byte aligned chunk stores
    size_k, _, size_n = host["lds_sizes"]
    assert host["lds_k"].max() < size_k and host["lds_n"].max() < size_n
    # 16-byte fragment reads are aligned.
    waves = c["threads"] // 64
    for w in range(waves):
        for t in range(2):
            for kc in range(host["frag_k"].shape[0]):
                assert (host["lds_k"][host["frag_row"][w, t], host["frag_k"][kc]] % 8 == 0).all()
    # The four wave tiles tile the 128x128 output exactly once.
    seen = np.zeros((c["BM"], c["BN"]), int)
    for w in range(waves):
        for t in range(2):
            for u in range(2):
                np.add.at(seen, (host["out_row"][w, t], host["out_col"][w, u]), 1)
    assert (seen == 1).all()


# ---- find_tile and a replay of the whole kernel ---------------------------------------

def _find_tiles(host, offsets, rows, slots):
    inp = f"{len(offsets) - 1} {rows} {slots} " + " ".join(map(str, offsets)) + "\n"
    out = subprocess.run([str(host["exe"]), "find_tile"], input=inp, check=True, capture_output=True, text=True).stdout
    return [tuple(int(v) for v in line.split()) for line in out.splitlines()]


LAYOUTS = [
    # (rows per expert, bad-id rows after offsets[E], K, N)
    ([0, 130, 0, 1, 257, 0], 5, 40, 136),     # empty experts, m-tails, k-tail, n-tail
    ([128], 0, 32, 128),                      # exact tiles, nothing after offsets[E]
    ([3, 0, 0], 200, 8, 8),                   # mostly bad-id rows; minimal K, N
    ([61, 67], 0, 72, 264),
]


def _expected_tiles(counts, bad, bm):
    offs = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    rows = int(offs[-1]) + bad
    slots = (rows + bm - 1) // bm + len(counts) + 1
    exp = []
    for e, n in enumerate(counts):
        for t in range((n + bm - 1) // bm):
            r0 = offs[e] + t * bm
            exp.append((1, e, r0, min(r0 + bm, offs[e + 1])))
    s = 0
    while len(exp) < slots:
        r0 = offs[-1] + s * bm
        exp.append((0, -1, r0, min(r0 + bm, rows)))
        s += 1
    return offs, rows, slots, exp


@pytest.mark.parametrize("counts,bad,K,N", LAYOUTS)
def test_find_tile(host, counts, bad, K, N):
    offs, rows, slots, exp = _expected_tiles(counts, bad, host["consts"]["BM"])
    assert _find_tiles(host, offs.tolist(), rows, slots) == exp
    # Every row is covered by exactly one GEMM slot or one zeroing slot.
    cover = np.zeros(rows, int)
    for ok, e, r0, r1 in exp:
        cover[r0:max(r0, r1)] += 1
    assert (cover == 1).all()


def _silu_mul(gate, up):
    return gate / (1.0 + np.exp(-gate)) * up


def _replay(host, A, Bw, offs, rows, trans_b, swiglu=False):
    """grouped_gemm_kernel's grid, transliterated.

    Bw is (E, K, N), (E, N, K) with trans_b, or w13 (E, 2F, K) with swiglu.
    Returns C (rows, N), or (act (rows, F), h (rows, 2F)) with swiglu.
    """
    c = host["consts"]
    BM, BN, BK, T, CH = c["BM"], c["BN"], c["BK"], c["threads"], c["chunks"]
    out_cols = host["swiglu_cols"] if swiglu else BN
    K = A.shape[1]
    N = Bw.shape[1] // 2 if swiglu else Bw.shape[1] if trans_b else Bw.shape[2]
    E = len(offs) - 1
    C = np.full((rows, N), np.nan)  # unwritten outputs stay NaN
    H = np.full((rows, 2 * N), np.nan)
    slots = (rows + BM - 1) // BM + E + 1
    tiles = _find_tiles(host, list(offs), rows, slots)
    size_k, size_bk, size_bn = host["lds_sizes"]
    waves = T // 64
    for x in range(slots):
        ok, expert, row0, row1 = tiles[x]
        for y in range((N + out_cols - 1) // out_cols):
            n0 = y * out_cols
            if not ok:
                chunks = min(N - n0, out_cols) // 8
                for i in range((row1 - row0) * chunks if row1 > row0 else 0):
                    r, col = row0 + i // chunks, n0 + (i % chunks) * 8
                    C[r, col:col + 8] = 0.0
                    H[r, col:col + 8] = H[r, N + col:N + col + 8] = 0.0
                continue
            B = Bw[expert]
            if swiglu:
                assert n0 % 64 == 0 and (N - 8) % 64 == 0 and n0 < 256 and N < 264, "outside the printed table"
                w13_row = host["swiglu_w13_row"][n0 // 64, (N - 8) // 64]
            acc = np.zeros((waves, 2, 2, 64, 16))
            for kt in range((K + BK - 1) // BK):
                k0 = kt * BK
                As = np.full(size_k, np.nan)
                Bs = np.full(size_bk if trans_b else size_bn, np.nan)
                for tid in range(T):
                    for i in range(CH):
                        r, kc = host["stage_k_row"][tid, i], host["stage_k_col"][tid, i]
                        row, kk = row0 + r, k0 + kc
                        chunk = A[row, kk:kk + 8] if row < row1 and kk < K else np.zeros(8)
                        base = host["lds_k"][r, kc]
                        As[base:base + 8] = chunk
                        if trans_b:
                            n = n0 + (r % out_cols if swiglu else r)
                            wrow = w13_row[r] if swiglu else n
                            chunk = B[wrow, kk:kk + 8] if n < N and kk < K else np.zeros(8)
                            Bs[base:base + 8] = chunk
                        else:
                            r, nc = host["stage_n_row"][tid, i], host["stage_n_col"][tid, i]
                            kk, n = k0 + r, n0 + nc
                            chunk = B[kk, n:n + 8] if kk < K and n < N else np.zeros(8)
                            base = host["lds_n"][r, nc]
                            Bs[base:base + 8] = chunk
                for kc in range(BK // c["pair_k"]):
                    k = host["frag_k"][kc]  # (64,)
                    for w in range(waves):
                        a = [As[host["lds_k"][host["frag_row"][w, t], k][:, None] + np.arange(8)] for t in range(2)]
                        cols = [host["swiglu_frag_col" if swiglu else "frag_col"][w, u] for u in range(2)]
                        if trans_b:
                            b = [Bs[host["lds_k"][cols[u], k][:, None] + np.arange(8)] for u in range(2)]
                        else:
                            b = [Bs[host["lds_n"][k[:, None] + np.arange(8), cols[u][:, None]]] for u in range(2)]
                        for s in range(2):
                            sel = host["pair_elem"][s]
                            for t in range(2):
                                for u in range(2):
                                    acc[w, t, u] = mfma_32x32x8(a[t][:, sel], b[u][:, sel], acc[w, t, u])
            for w in range(waves):
                for t in range(2):
                    row = row0 + host["out_row"][w, t]
                    if swiglu:
                        col = n0 + host["swiglu_out_col"][w]
                        m = (row < row1) & (col < N)
                        gate, up = acc[w, t, 0][m], acc[w, t, 1][m]
                        C[row[m], col[m]] = _silu_mul(gate, up)
                        H[row[m], col[m]] = gate
                        H[row[m], N + col[m]] = up
                        continue
                    for u in range(2):
                        col = n0 + host["out_col"][w, u]
                        m = (row < row1) & (col < N)
                        C[row[m], col[m]] = acc[w, t, u][m]
    return (C, H) if swiglu else C


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("counts,bad,K,N", LAYOUTS)
def test_kernel_replay(host, counts, bad, K, N, trans_b):
    rng = np.random.default_rng(len(counts) * 1000 + K + N)
    offs, rows, _, _ = _expected_tiles(counts, bad, host["consts"]["BM"])
    E = len(counts)
    A = rng.integers(-3, 4, (rows, K)).astype(np.float64)
    W = rng.integers(-3, 4, (E, K, N)).astype(np.float64)
    Bw = np.ascontiguousarray(W.transpose(0, 2, 1)) if trans_b else W
    got = _replay(host, A, Bw, offs.tolist(), rows, trans_b)
    want = np.zeros((rows, N))
    for e in range(E):
        want[offs[e]:offs[e + 1]] = A[offs[e]:offs[e + 1]] @ W[e]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("counts,bad,K,F", [([0, 130, 0, 1], 5, 40, 72), ([61, 67], 3, 24, 200), ([2], 0, 8, 8)])
def test_kernel_replay_swiglu(host, counts, bad, K, F):
    rng = np.random.default_rng(K + F)
    offs, rows, _, _ = _expected_tiles(counts, bad, host["consts"]["BM"])
    E = len(counts)
    x = rng.integers(-3, 4, (rows, K)).astype(np.float64)
    w13 = rng.integers(-3, 4, (E, 2 * F, K)).astype(np.float64)
    act, h = _replay(host, x, w13, offs.tolist(), rows, trans_b=True, swiglu=True)
    want_h = np.zeros((rows, 2 * F))
    for e in range(E):
        want_h[offs[e]:offs[e + 1]] = x[offs[e]:offs[e + 1]] @ w13[e].T
    want_act = _silu_mul(want_h[:, :F], want_h[:, F:])
    want_act[offs[-1]:] = 0.0
    np.testing.assert_array_equal(h, want_h)
    np.testing.assert_array_equal(act, want_act)


# ---- the weight gradient: grouped_wgrad_kernel ------------------------------------------

def test_wgrad_tables(host):
    """The fragment gathers are the forward's pieces composed, and each wave reads its tile once."""
    c = host["consts"]
    BK, BM = c["BK"], c["BM"]
    fx, fy, lds_n = host["wgrad_frag_x"], host["wgrad_frag_y"], host["lds_n"]
    ld = lds_n[1, 0] - lds_n[0, 0]  # row stride of the [rows][columns] staging tile
    assert (lds_n == np.arange(BK)[:, None] * ld + np.arange(c["BN"])).all()
    for w in range(c["threads"] // 64):
        for tab, origin in ((fx, host["frag_row"]), (fy, host["frag_col"])):
            for t in range(2):
                for kc in range(BK // c["pair_k"]):
                    row = host["frag_k"][kc][:, None, None] + host["pair_elem"][None]  # (64, 2, 4)
                    np.testing.assert_array_equal(tab[w, t, kc], lds_n[row, origin[w, t][:, None, None]])
            # Over (t, kc, lane, step, element) a wave reads rows 0..BK-1 of its 64 columns exactly once.
            seen = np.zeros((BK, c["BN"]), int)
            np.add.at(seen, (tab[w] // ld, tab[w] % ld), 1)
            cols = origin[w].ravel()
            assert (seen[:, np.unique(cols)] == 1).all() and seen.sum() == BK * 64
    # Workgroup (K tile, N tile): out tile origin (p0, q0), swapped with trans_b.
    kt, nt = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(host["wgrad_p0"][0], kt * BM)
    np.testing.assert_array_equal(host["wgrad_q0"][0], nt * c["BN"])
    np.testing.assert_array_equal(host["wgrad_p0"][1], nt * BM)
    np.testing.assert_array_equal(host["wgrad_q0"][1], kt * c["BN"])


def _wgrad_replay(host, A, dY, offs, trans_b, tables=None, bugs=()):
    """grouped_wgrad_kernel's grid, transliterated. Returns dB (E, K, N), or (E, N, K) with trans_b.

    `tables` overrides host tables and `bugs` drops a bound, for the planted-bug tests.
    Raises IndexError on a global read outside A or dY (or past the end of a row).
    """
    tab = dict(host, **(tables or {}))
    c = host["consts"]
    BM, BN, BK, waves = c["BM"], c["BN"], c["BK"], c["threads"] // 64
    K, N, E = A.shape[1], dY.shape[1], len(offs) - 1
    X, Y, P, Q = (dY, A, N, K) if trans_b else (A, dY, K, N)
    out = np.full((E, P, Q), np.nan)
    writes = np.zeros((E, P, Q), int)
    size_n = host["lds_sizes"][2]
    sr, sc = tab["stage_n_row"], tab["stage_n_col"]  # (threads, chunks)
    dst = tab["lds_n"][sr, sc][..., None] + np.arange(8)
    kcs = BK // c["pair_k"]

    def stage(M, cols, r0, end, col0, bound):
        rows = r0 + sr
        ok = np.ones(sr.shape, bool)
        if "no_row_bound" not in bugs:
            ok &= rows < end
        if "no_col_bound" not in bugs:
            ok &= col0 + sc < bound
        if (rows[ok] >= M.shape[0]).any() or (col0 + sc[ok] + 8 > cols).any():
            raise IndexError("global read outside the matrix")
        lds = np.full(size_n, np.nan)  # anything not staged this step reads as NaN
        vals = np.zeros(sr.shape + (8,))
        vals[ok] = M[rows[ok][:, None], (col0 + sc[ok])[:, None] + np.arange(8)]
        lds[dst] = vals
        return lds

    for bx in range((K + BM - 1) // BM):
        for by in range((N + BN - 1) // BN):
            p0, q0 = tab["wgrad_p0"][int(trans_b), bx, by], tab["wgrad_q0"][int(trans_b), bx, by]
            for e in range(E):
                begin, end = offs[e], offs[e + 1]
                acc = np.zeros((waves, 2, 2, 64, 16))
                for st in range((end - begin + BK - 1) // BK):
                    r0 = begin + st * BK
                    Xs = stage(X, P, r0, end, p0, P)
                    Ys = stage(Y, Q, r0, end, q0, Q)
                    for w in range(waves):
                        for kc in range(kcs):
                            x = [Xs[tab["wgrad_frag_x"][w, t, kc]] for t in range(2)]  # (64, 2 steps, 4)
                            y = [Ys[tab["wgrad_frag_y"][w, u, kc]] for u in range(2)]
                            for s in range(2):
                                for t in range(2):
                                    for u in range(2):
                                        acc[w, t, u] = mfma_32x32x8(x[t][:, s], y[u][:, s], acc[w, t, u])
                for w in range(waves):
                    for t in range(2):
                        for u in range(2):
                            p = p0 + tab["out_row"][w, t]
                            q = q0 + tab["out_col"][w, u]
                            m = (p < P) & (q < Q)
                            out[e, p[m], q[m]] = acc[w, t, u][m]
                            np.add.at(writes[e], (p[m], q[m]), 1)
    assert (writes <= 1).all(), "an output written twice"
    return out


WGRAD_LAYOUTS = [
    # (rows per expert, rows after offsets[E] (no expert: not summed), K, N)
    ([0, 70, 0, 1, 33], 5, 40, 136),   # empty experts, row tails, K tail, N tail (second N tile 8 wide)
    ([32], 0, 128, 128),               # exact tiles
    ([0, 0], 3, 8, 8),                 # every expert empty: all zeros
    ([0], 0, 8, 16),                   # rows == 0
    ([61, 67], 2, 264, 72),            # 3 K tiles x 1 N tile: the trans_b grid swap matters
]


def _wgrad_case(host, counts, bad, K, N, seed):
    rng = np.random.default_rng(seed)
    offs, rows, _, _ = _expected_tiles(counts, bad, host["consts"]["BM"])
    A = rng.integers(-3, 4, (rows, K)).astype(np.float64)
    dY = rng.integers(-3, 4, (rows, N)).astype(np.float64)
    want = np.stack([A[offs[e]:offs[e + 1]].T @ dY[offs[e]:offs[e + 1]] for e in range(len(counts))])
    return A, dY, offs.tolist(), want


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("counts,bad,K,N", WGRAD_LAYOUTS)
def test_wgrad_replay(host, counts, bad, K, N, trans_b):
    A, dY, offs, want = _wgrad_case(host, counts, bad, K, N, seed=len(counts) * 1000 + K + N)
    got = _wgrad_replay(host, A, dY, offs, trans_b)
    np.testing.assert_array_equal(got, want.transpose(0, 2, 1) if trans_b else want)


def test_wgrad_replay_random_layouts(host):
    """Random expert sizes (a third empty) with K, N in multiples of 8 around the tile edges."""
    rng = np.random.default_rng(8)
    for i in range(4):
        E = int(rng.integers(1, 6))
        counts = [0 if rng.random() < 1 / 3 else int(rng.integers(1, 100)) for _ in range(E)]
        K, N = (int(v) * 8 for v in rng.integers(1, 35, 2))
        A, dY, offs, want = _wgrad_case(host, counts, int(rng.integers(0, 9)), K, N, seed=100 + i)
        for trans_b in (False, True):
            got = _wgrad_replay(host, A, dY, offs, trans_b)
            np.testing.assert_array_equal(got, want.transpose(0, 2, 1) if trans_b else want,
                                          err_msg=f"counts={counts} K={K} N={N} trans_b={trans_b}")


def _swap_steps(t):
    return t[..., ::-1, :]  # step axis of a (.., 64, 2, 4) fragment table


# Each planted bug must be caught, in the way named:
# name -> (tables override, dropped bounds, layout, trans_b, "mismatch" or "IndexError").
WGRAD_BUGS = {
    # dY's fragment gathered with A's column index.
    "y_reads_x_columns": (lambda h: {"wgrad_frag_y": h["wgrad_frag_x"]}, (), WGRAD_LAYOUTS[0], False, "mismatch"),
    # The two instructions of a pair fed different physical rows of X and of Y.
    "y_steps_swapped": (lambda h: {"wgrad_frag_y": _swap_steps(h["wgrad_frag_y"])}, (), WGRAD_LAYOUTS[1], True,
                        "mismatch"),
    # Accumulator registers stored with rows and columns exchanged.
    "acc_transposed": (lambda h: {"out_row": h["out_col"], "out_col": h["out_row"]}, (), WGRAD_LAYOUTS[1], False,
                       "mismatch"),
    # trans_b transposes the tile grid but not the operands.
    "no_grid_swap": (lambda h: {"wgrad_p0": h["wgrad_p0"][[0, 0]], "wgrad_q0": h["wgrad_q0"][[0, 0]]}, (),
                     WGRAD_LAYOUTS[4], True, "mismatch"),
    # Rows past the expert's end staged: expert 0's last step sums expert 1's first rows (29 rows after
    # offsets[E] keep expert 1's own overrun inside the tensor).
    "no_row_bound": (lambda h: {}, ("no_row_bound",), ([61, 67], 29, 40, 16), False, "mismatch"),
    # ... and with nothing after the last expert, its tail step reads past the tensor.
    "no_row_bound_end": (lambda h: {}, ("no_row_bound",), ([61, 67], 0, 40, 16), True, "IndexError"),
    # The K / N tail not masked: reads past the end of a row.
    "no_col_bound": (lambda h: {}, ("no_col_bound",), WGRAD_LAYOUTS[0], False, "IndexError"),
}


@pytest.mark.parametrize("bug", sorted(WGRAD_BUGS))
def test_wgrad_replay_catches_planted_bug(host, bug):
    tables, bugs, layout, trans_b, how = WGRAD_BUGS[bug]
    A, dY, offs, want = _wgrad_case(host, *layout, seed=7)
    want = want.transpose(0, 2, 1) if trans_b else want
    if how == "IndexError":
        with pytest.raises(IndexError):
            _wgrad_replay(host, A, dY, offs, trans_b, tables(host), bugs)
    else:
        got = _wgrad_replay(host, A, dY, offs, trans_b, tables(host), bugs)
        assert not np.array_equal(got, want, equal_nan=True), f"planted bug {bug} went unnoticed"


def test_wgrad_k_pairing_is_free(host):
    """Control for y_steps_swapped: swapping the steps of both operands alike changes nothing."""
    A, dY, offs, want = _wgrad_case(host, *WGRAD_LAYOUTS[1], seed=7)
    tables = {k: _swap_steps(host[k]) for k in ("wgrad_frag_x", "wgrad_frag_y")}
    np.testing.assert_array_equal(_wgrad_replay(host, A, dY, offs, True, tables), want.transpose(0, 2, 1))
