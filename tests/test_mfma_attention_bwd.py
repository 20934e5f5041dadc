"""The HIP flash-attention backward's index math, replayed on the CPU.

There is no AMD GPU here. csrc/cuda/flash_attn_bwd_mfma.cuh keeps every
lane/register -> (query, key, head-dim) mapping, the staging plan, the LDS
offsets, the masks and the block ranges in constexpr functions (namespace
mixkit::mfma::fab). They are compiled as plain host C++ and print their tables;
a Python transliteration of delta_kernel, dkdv_kernel (with and without the
atomic dQ), dq_kernel and dq_convert_kernel drives the model of
v_mfma_f32_32x32x8 from tests/test_mfma_layout.py (written from AMD's
element -> register description) over whole grids. dQ, dK and dV are compared
with dense float64 gradients written from the mask rules of
common/flash_attn.h, not from the kernels.

What the replay models: the kernels' loops and grid strides, every LDS write
and read at the header's offsets (LDS starts as NaN, so reading anything the
staging did not write shows up), the 16-byte, 8-byte and 16-bit reads as the
kernels issue them, the P/dS registers used as B operands, the dS round trip
through LDS, the atomic adds into dq_accum at the kernel's addresses, the
masks, the query/key block ranges and which rows are written.
What it does not: hardware scheduling (barriers are assumed to order the
stages), exp2 vs exp, and, in the exact tests, any 16-bit rounding (float64
throughout, tolerance 1e-9). test_rounded_replay emulates the rounding of P
and dS to bf16/f16 (round to nearest even), the f16 P factor 2^15, and the
rounding of the outputs, against the same dense reference with a tolerance
derived from the 16-bit epsilon.

Planted-bug tests re-run the replay with one deliberate mistake each and
require a mismatch, so the replay cannot pass vacuously.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_mfma_layout import TABLE_HELPER, build_host_program, mfma_32x32x8

SRC = Path(os.environ.get("MIXKIT_SOURCE_DIR", Path(__file__).resolve().parents[1])) / "csrc"

HOST_PROGRAM = r"""
#include <cstdio>
#include <iostream>
#include <string>
#include "cuda/flash_attn_bwd_mfma.cuh"

using namespace mixkit::mfma;
using namespace mixkit::mfma::fab;

""" + TABLE_HELPER + r"""
void dump(int d) {
  std::printf("{\"consts\": [%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d]", kKvThreads, kKvWaves, kBN, kBM,
              kQThreads, kQWaves, kQBM, kQBN, kSteps, lds_tile_size(d, kBN), lds_tile_size(d, kBM),
              lds_tile_size(d, kQBN), lds_ds_size(), stage_chunks(d, kBN, kKvThreads),
              stage_chunks(d, kBM, kKvThreads), stage_chunks(d, kQBN, kQThreads));
  table("frag_d", d / 16, 64, 1, [](int kc, int l, int) { return frag_d(kc, l); });
  table("frag_a_row", 64, 1, 1, [](int l, int, int) { return frag_a_row(l); });
  table("frag_b_row", 64, 1, 1, [](int l, int, int) { return frag_b_row(l); });
  table("acc_row", 64, 16, 1, [](int l, int r, int) { return acc_row(l, r); });
  table("acc_col", 64, 16, 1, [](int l, int r, int) { return acc_col(l, r); });
  table("x_reg", 4, 4, 1, [](int st, int e, int) { return x_reg(st, e); });
  table("xa_row", d / 32, 64, 4, [](int t, int l, int e) { return xa_row(t, l, e); });
  table("xa_k", 4, 64, 4, [](int st, int l, int e) { return xa_k(st, l, e); });
  table("g_d", d / 32, 64, 16, [](int t, int l, int r) { return g_d(t, l, r); });
  table("g_col", 64, 16, 1, [](int l, int r, int) { return g_col(l, r); });
  table("dqa_q", 64, 4, 1, [](int l, int e, int) { return dqa_q(l, e); });
  table("dqa_key", 4, 64, 4, [](int st, int l, int e) { return dqa_key(st, l, e); });
  table("dqb_key", 4, 64, 4, [](int st, int l, int e) { return dqb_key(st, l, e); });
  table("dqb_d", d / 32, 64, 4, [](int t, int l, int e) { return dqb_d(t, l, e); });
  table("lds_row", kBN, d, 1, [d](int r, int c, int) { return lds_row(d, r, c); });
  table("lds_ds", kKvWaves, kBM, 32, [](int w, int q, int k) { return lds_ds(w, q, k); });
  const int cfg[3][2] = {{kBN, kKvThreads}, {kBM, kKvThreads}, {kQBN, kQThreads}};
  const char* rn[3] = {"stage_row_kv", "stage_row_q", "stage_row_dq"};
  const char* cn[3] = {"stage_col_kv", "stage_col_q", "stage_col_dq"};
  for (int i = 0; i < 3; ++i) {
    const int rows = cfg[i][0], th = cfg[i][1], ch = stage_chunks(d, rows, th);
    table(rn[i], th, ch, 1, [d, th](int t, int c, int) { return stage_row(d, th, t, c); });
    table(cn[i], th, ch, 1, [d, th](int t, int c, int) { return stage_col(d, th, t, c); });
  }
  std::printf("}");
}

int main(int argc, char** argv) {
  if (argc > 1) {
    // stdin: one "a b c d e f g" per line; stdout: the function's result.
    const std::string op = argv[1];
    long long x0, x1, x2, x3, x5;
    int c4, x6;
    while (std::cin >> x0 >> x1 >> x2 >> x3 >> c4 >> x5 >> x6) {
      if (op == "query_blocks" || op == "key_blocks") {
        const Range r = op == "query_blocks" ? query_blocks(x0, int(x1), x2, x3, c4 != 0, x5, x6)
                                             : key_blocks(x0, int(x1), x2, x3, c4 != 0, x5, x6);
        std::printf("%lld %lld\n", (long long)r.first, (long long)r.end);
      } else if (op == "visible") {  // i j sq sk causal window _
        std::printf("%d\n", int(visible(x0, x1, x2, x3, c4 != 0, x5)));
      } else {  // block_full: m0 n0 sq sk causal window bm(=bn)
        std::printf("%d\n", int(block_full(x0, x6, x1, x6, x2, x3, c4 != 0, x5)));
      }
    }
    return 0;
  }
  std::printf("{\"p_log2_f16\": %d, \"atomic_dq\": [%d, %d], \"64\": ", p_log2(true), int(kAtomicDq<64>),
              int(kAtomicDq<128>));
  dump(64);
  std::printf(",\n\"128\": ");
  dump(128);
  std::printf("}\n");
  return 0;
}
"""

CONSTS = ["kv_threads", "kv_waves", "BN", "BM", "q_threads", "q_waves", "QBM", "QBN", "steps", "lds_kv", "lds_q",
          "lds_dq", "lds_ds", "ch_kv", "ch_q", "ch_dq"]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    exe = build_host_program(tmp_path_factory, HOST_PROGRAM, "flash_attn_bwd_mfma.cuh", "mfma_attn_bwd_host")
    raw = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    plans = {"exe": exe, "p_log2_f16": raw["p_log2_f16"], "atomic_dq": dict(zip((64, 128), raw["atomic_dq"]))}
    for D in (64, 128):
        out = raw[str(D)]
        c = dict(zip(CONSTS, out["consts"]))
        shapes = {"frag_d": (D // 16, 64), "frag_a_row": (64,), "frag_b_row": (64,), "acc_row": (64, 16),
                  "acc_col": (64, 16), "x_reg": (4, 4), "xa_row": (D // 32, 64, 4), "xa_k": (4, 64, 4),
                  "g_d": (D // 32, 64, 16), "g_col": (64, 16), "dqa_q": (64, 4), "dqa_key": (4, 64, 4),
                  "dqb_key": (4, 64, 4), "dqb_d": (D // 32, 64, 4), "lds_row": (c["BN"], D),
                  "lds_ds": (c["kv_waves"], c["BM"], 32),
                  "stage_row_kv": (c["kv_threads"], c["ch_kv"]), "stage_col_kv": (c["kv_threads"], c["ch_kv"]),
                  "stage_row_q": (c["kv_threads"], c["ch_q"]), "stage_col_q": (c["kv_threads"], c["ch_q"]),
                  "stage_row_dq": (c["q_threads"], c["ch_dq"]), "stage_col_dq": (c["q_threads"], c["ch_dq"])}
        t = {k: np.array(out[k]).reshape(s) for k, s in shapes.items()}
        t["c"] = c
        t["D"] = D
        plans[D] = t
    return plans


def _run_host(host, op, rows):
    inp = "".join(" ".join(str(int(x)) for x in r) + "\n" for r in rows)
    out = subprocess.run([str(host["exe"]), op], input=inp, check=True, capture_output=True, text=True).stdout
    return [tuple(int(v) for v in line.split()) for line in out.splitlines()]


# ---- transliterations of the header's mask and range functions (checked against it below) ----

def _visible(i, j, sq, sk, causal, window, bug=None):
    pos = i + sk - sq
    v = (i < sq) & (j < sk)
    if causal:
        v = v & ((j < pos) if bug == "causal_off_by_one" else (j <= pos))
    if window:
        v = v & (j > pos - window)
    return v


def _block_full(m0, bm, n0, bn, sq, sk, causal, window):
    off = sk - sq
    return (m0 + bm <= sq and n0 + bn <= sk and (not causal or n0 + bn - 1 <= m0 + off)
            and (window == 0 or n0 > m0 + bm - 1 + off - window))


def _query_blocks(n0, bn, sq, sk, causal, window, bm):
    off = sk - sq
    jmax = min(n0 + bn, sk) - 1
    lo = max(n0 - off if causal else 0, 0)
    hi = min(jmax - off + window if window > 0 else sq, sq)
    if jmax < n0 or hi <= lo:
        return 0, 0
    return lo // bm, (hi + bm - 1) // bm


def _key_blocks(m0, bm, sq, sk, causal, window, bn):
    off = sk - sq
    imax = min(m0 + bm, sq) - 1
    hi = min(imax + off + 1 if causal else sk, sk)
    lo = max(m0 + off - window + 1 if window > 0 else 0, 0)
    if imax < m0 or hi <= lo:
        return 0, 0
    return lo // bn, (hi + bn - 1) // bn


def _grid():
    for sq in (0, 1, 5, 33, 70):
        for sk in (0, 1, 7, 32, 65):
            for causal, window in ((False, 0), (True, 0), (True, 1), (True, 5), (True, 40), (True, 1 << 32)):
                yield sq, sk, causal, window


# ---- the plan ----------------------------------------------------------------------------

@pytest.mark.parametrize("D", [64, 128])
def test_plan_tables(host, D):
    t = host[D]
    c = t["c"]
    assert (c["kv_threads"], c["BN"], c["BM"], c["q_threads"], c["QBM"], c["QBN"]) == (128, 64, 32, 256, 128, 32)
    # LDS within 64 KiB (dkdv with the dS tiles), 16-bit elements plus two float stat arrays.
    assert 2 * (2 * c["lds_kv"] + 2 * c["lds_q"] + c["lds_ds"]) + 2 * 4 * c["BM"] <= 64 * 1024
    # Staging writes each element of each tile once, 16-byte aligned.
    for cfg, rows in (("kv", c["BN"]), ("q", c["BM"]), ("dq", c["QBN"])):
        r, col = t[f"stage_row_{cfg}"], t[f"stage_col_{cfg}"]
        seen = np.zeros((rows, D), int)
        for j in range(8):
            np.add.at(seen, (r, col + j), 1)
        assert (seen == 1).all(), cfg
        assert (t["lds_row"][r, col] % 8 == 0).all()
    off = t["lds_row"]
    assert len(np.unique(off)) == off.size and (off[:, 1:] - off[:, :-1] == 1).all()
    ds = t["lds_ds"]
    assert len(np.unique(ds)) == ds.size and ds.min() >= 0 and ds.max() < c["lds_ds"]
    # 16-byte fragment reads: aligned, inside the row.
    for kc in range(D // 16):
        assert (t["frag_d"][kc] % 8 == 0).all() and (t["frag_d"][kc] + 8 <= D).all()
    # 8-byte dS reads: 4 consecutive keys from element 0, aligned.
    for st in range(4):
        assert (t["dqa_key"][st] == t["dqa_key"][st][:, :1] + np.arange(4)).all()
        assert (ds[0][t["dqa_q"][:, 0], t["dqa_key"][st][:, 0]] % 4 == 0).all()
    # 8-byte output stores: registers 4g .. 4g + 3 are consecutive d; every (d, column) once.
    g = t["g_d"].reshape(D // 32, 64, 4, 4)
    assert (g[..., 1:] - g[..., :-1] == 1).all() and (g[..., 0] % 4 == 0).all()
    assert (t["g_col"] == t["g_col"][:, :1]).all()
    seen = np.zeros((D, 32), int)
    for tt in range(D // 32):
        np.add.at(seen, (t["g_d"][tt], np.broadcast_to(t["g_col"], (64, 16))), 1)
    assert (seen == 1).all()
    # Each lane owns one column of the S (S^T) accumulator; the B column of the
    # dq kernel's Q fragments is that column (one lse, one delta a lane).
    assert (t["acc_col"] == t["acc_col"][:, :1]).all() and (t["acc_col"][:, 0] == t["frag_b_row"]).all()


@pytest.mark.parametrize("D", [64, 128])
def test_p_registers_are_the_b_operand(host, D):
    """Register x_reg(st, e) of lane l holds the summation index that A element e of lane l uses in step st."""
    t = host[D]
    for st in range(4):
        reg = t["x_reg"][st]
        assert (t["acc_row"][:, reg] == t["xa_k"][st]).all()


def test_masks_and_ranges_match_header(host):
    grid = list(_grid())
    rows_v, want_v, rows_f, want_f = [], [], [], []
    for sq, sk, causal, window in grid:
        for i in range(0, sq + 2, 3):
            for j in range(0, sk + 2, 2):
                rows_v.append((i, j, sq, sk, int(causal), window, 0))
                want_v.append(int(_visible(i, j, sq, sk, causal, window)))
        for m0 in range(0, sq + 1, 4):
            for n0 in range(0, sk + 1, 4):
                rows_f.append((m0, n0, sq, sk, int(causal), window, 8))
                want_f.append(int(_block_full(m0, 8, n0, 8, sq, sk, causal, window)))
    assert [r[0] for r in _run_host(host, "visible", rows_v)] == want_v
    assert [r[0] for r in _run_host(host, "block_full", rows_f)] == want_f
    # block_full implies every pair visible (the element mask may be skipped).
    for (m0, n0, sq, sk, causal, window, bm), f in zip(rows_f, want_f):
        if f:
            ii, jj = np.meshgrid(np.arange(m0, m0 + bm), np.arange(n0, n0 + bm), indexing="ij")
            assert _visible(ii, jj, sq, sk, causal, window).all()
    # Ranges: the header's equal the transliteration and cover every visible pair.
    for op, fn in (("query_blocks", _query_blocks), ("key_blocks", _key_blocks)):
        rows = []
        for sq, sk, causal, window in grid:
            for x0 in range(0, max(sq, sk) + 1, 8):
                for bn, bm in ((32, 32), (64, 32), (128, 32)):
                    rows.append((x0, bn, sq, sk, int(causal), window, bm))
        got = _run_host(host, op, rows)
        for r, g in zip(rows, got):
            x0, b1, sq, sk, causal, window, b2 = r
            assert g == fn(x0, b1, sq, sk, bool(causal), window, b2), (op, r)
            ii, jj = np.meshgrid(np.arange(sq), np.arange(sk), indexing="ij")
            vis = _visible(ii, jj, sq, sk, bool(causal), window)
            if op == "query_blocks":  # blocks of b2 queries seeing keys [x0, x0 + b1)
                need = np.nonzero(vis[:, x0:x0 + b1].any(1))[0] // b2
            else:  # blocks of b2 keys seen by queries [x0, x0 + b1)
                need = np.nonzero(vis[x0:x0 + b1].any(0))[0] // b2
            if need.size:
                assert g[0] <= need.min() and need.max() < g[1], (op, r, g)
                assert g[0] == need.min() and g[1] == need.max() + 1  # tight: no wasted blocks
            else:
                assert g[1] <= g[0]


# ---- the replay -------------------------------------------------------------------------------

def _span(cu, b, fixed_len, total):
    if cu is None:
        return 0, fixed_len
    s = min(max(int(cu[b]), 0), total)
    e = min(max(int(cu[b + 1]), s), total)
    return s, e - s


def _identity(x):
    return x


def _round_bf16(x):
    """float64 -> float32 -> bf16, round to nearest even (dtype.h's from_f32<bf16>), back to float64."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def _round_f16(x):
    return np.asarray(np.asarray(x, np.float32), np.float16).astype(np.float64)


ROUND = {"exact": _identity, "bf16": _round_bf16, "f16": _round_f16}


def _stage(t, tile, src, row0, n, cfg):
    """stage<D, ROWS, THREADS>: rows row0.. of src (n valid rows) into the flat LDS tile, zeros past n."""
    r, col = t[f"stage_row_{cfg}"].ravel(), t[f"stage_col_{cfg}"].ravel()
    row = row0 + r
    ok = row < n
    vals = np.zeros((r.size, 8))
    vals[ok] = src[row[ok][:, None], col[ok][:, None] + np.arange(8)]
    tile[t["lds_row"][r[:, None], col[:, None] + np.arange(8)]] = vals


def _replay(host, D, q, k, v, o, do, lse, cu_q, cu_k, sq_max, sk_max, causal, window, scale, deterministic,
            dtype="exact", grid_x=None, bug=None):
    """flash_bwd's launches, transliterated. q/o/do (Tq, H, D), k/v (Tk, Hkv, D) packed (fixed length:
    cu = None, batch 1), lse (H, Tq). Returns dq, dk, dv; NaN where nothing was written."""
    t = host[D]
    c = t["c"]
    rnd = ROUND[dtype]
    p_log2 = host["p_log2_f16"] if dtype == "f16" else 0
    Tq, H, _ = q.shape
    Tk, Hkv, _ = k.shape
    group = H // Hkv
    B = 1 if cu_q is None else len(cu_q) - 1
    window = min(window, 1 << 32)
    dq = np.full(q.shape, np.nan)
    dk = np.full(k.shape, np.nan)
    dv = np.full(v.shape, np.nan)
    delta = np.full((H, Tq), np.nan)
    dq_accum = np.zeros(Tq * H * D)  # zero-filled by the caller
    ar8 = np.arange(8)
    BN, BM, QBM, QBN = c["BN"], c["BM"], c["QBM"], c["QBN"]
    lr = t["lds_row"]
    pitch = D + 8  # lds_row(D, r, c) = r * pitch + c, checked in test_plan_tables via the table itself
    assert (lr == np.arange(BN)[:, None] * pitch + np.arange(D)).all()
    acc_row, acc_col, x_reg = t["acc_row"], t["acc_col"], t["x_reg"]
    if bug == "p_reg_step":
        x_reg = np.roll(x_reg, 1, axis=0)

    def mma(a, b_, acc):
        return mfma_32x32x8(a, b_, acc)

    # 1. delta_kernel
    for b in range(B):
        qs, sq = _span(cu_q, b, sq_max, Tq)
        for h in range(H):
            delta[h, qs:qs + sq] = (o[qs:qs + sq, h] * do[qs:qs + sq, h]).sum(-1)

    # 2. dkdv_kernel; the atomic dQ inside it where the launcher picks it (kAtomicDq<D>)
    atomic = not deterministic and Tq > 0 and bool(host["atomic_dq"][D])
    gx = grid_x if grid_x is not None else max((sk_max + BN - 1) // BN, 1)
    for b in range(B):
        qs, sq = _span(cu_q, b, sq_max, Tq)
        ks, sk = _span(cu_k, b, sk_max, Tk)
        acc_row0 = qs if (cu_q is not None and bug != "dq_accum_fixed_rows") else b * sq_max
        for hk in range(Hkv):
            K, V = k[ks:ks + sk, hk], v[ks:ks + sk, hk]
            for x in range(gx):
                for n0 in range(x * BN, sk, gx * BN):
                    first, end = _query_blocks(n0, BN, sq, sk, causal, window, BM)
                    if bug == "qblock_late":
                        first += 1
                    Ks = np.full(c["lds_kv"], np.nan)
                    Vs = np.full(c["lds_kv"], np.nan)
                    _stage(t, Ks, K, n0, sk, "kv")
                    _stage(t, Vs, V, n0, sk, "kv")
                    dkacc = np.zeros((2, D // 32, 64, 16))
                    dvacc = np.zeros((2, D // 32, 64, 16))
                    for hh in range(group):
                        h = hk * group + hh
                        Q, dO = q[qs:qs + sq, h], do[qs:qs + sq, h]
                        for mb in range(first, end):
                            m0 = mb * BM
                            Qs = np.full(c["lds_q"], np.nan)
                            dOs = np.full(c["lds_q"], np.nan)
                            _stage(t, Qs, Q, m0, sq, "q")
                            _stage(t, dOs, dO, m0, sq, "q")
                            i = m0 + np.arange(BM)
                            okr = i < sq
                            l_raw = lse[h, qs + np.minimum(i, sq - 1)]
                            if bug == "lse_inf_kept":
                                lse_s = np.where(okr, l_raw, np.inf)
                            else:
                                lse_s = np.where(okr, np.where(l_raw == -np.inf, np.inf, l_raw), np.inf)
                            delta_s = np.where(okr, delta[h, qs + np.minimum(i, sq - 1)], 0.0)
                            dSs = np.full(c["lds_ds"], np.nan)
                            for w in range(2):
                                nw = n0 + w * 32
                                s = np.zeros((64, 16))
                                dp = np.zeros((64, 16))
                                ar, br = t["frag_a_row"], w * 32 + t["frag_b_row"]
                                for kc in range(D // 16):
                                    dd = t["frag_d"][kc]
                                    qf = Qs[lr[ar[:, None], dd[:, None] + ar8]]
                                    kf = Ks[lr[br[:, None], dd[:, None] + ar8]]
                                    of = dOs[lr[ar[:, None], dd[:, None] + ar8]]
                                    vf = Vs[lr[br[:, None], dd[:, None] + ar8]]
                                    for st in range(2):
                                        s = mma(qf[:, 4 * st:4 * st + 4], kf[:, 4 * st:4 * st + 4], s)
                                        dp = mma(of[:, 4 * st:4 * st + 4], vf[:, 4 * st:4 * st + 4], dp)
                                full = _block_full(m0, BM, nw, 32, sq, sk, causal, window)
                                if not full or bug == "causal_off_by_one":
                                    vis = _visible(m0 + acc_row, nw + acc_col, sq, sk, causal, window, bug)
                                    s = np.where(vis, s, -np.inf)
                                with np.errstate(invalid="ignore", over="ignore"):
                                    p = np.exp(scale * s - lse_s[acc_row]) * 2.0 ** p_log2
                                    dsv = p * 2.0 ** -p_log2 * (dp - (0 if bug == "ds_no_delta" else delta_s[acc_row]))
                                for st in range(4):
                                    pb = rnd(p[:, x_reg[st]])
                                    db = rnd(dsv[:, x_reg[st]])
                                    for tt in range(D // 32):
                                        at = lr[t["xa_k"][st], t["xa_row"][tt]]
                                        dvacc[w, tt] = mma(dOs[at], pb, dvacc[w, tt])
                                        dkacc[w, tt] = mma(Qs[at], db, dkacc[w, tt])
                                if atomic:
                                    dSs[t["lds_ds"][w][acc_row, acc_col]] = rnd(dsv)
                                    left = sq - m0 - acc_row[:, 0]
                                    lane_base = ((acc_row0 + m0 + acc_row[:, 0]) * H + h) * D + acc_col[:, 0]
                                    kb = 0 if bug == "dq_key_no_wave_offset" else w * 32
                                    for tt in range(D // 32):
                                        acc = np.zeros((64, 16))
                                        for st in range(4):
                                            a0 = t["lds_ds"][w][t["dqa_q"][:, 0], t["dqa_key"][st][:, 0]]
                                            af = dSs[a0[:, None] + np.arange(4)]
                                            bf = Ks[lr[kb + t["dqb_key"][st], t["dqb_d"][tt]]]
                                            acc = mma(af, bf, acc)
                                        for r in range(16):
                                            dr = acc_row[:, r] - acc_row[:, 0]
                                            ok = dr < left
                                            np.add.at(dq_accum, (lane_base + dr * H * D + tt * 32)[ok],
                                                      scale * acc[ok, r])
                    for w in range(2):
                        key = n0 + w * 32 + t["g_col"][:, 0]
                        ok = key < sk
                        for tt in range(D // 32):
                            for g in range(4):
                                for e in range(4):
                                    d_ = t["g_d"][tt][:, 4 * g] + e
                                    dk[ks + key[ok], hk, d_[ok]] = rnd(dkacc[w, tt][ok, 4 * g + e] * scale)
                                    unscale = 1.0 if bug == "dv_keeps_p_factor" else 2.0 ** -p_log2
                                    dv[ks + key[ok], hk, d_[ok]] = rnd(dvacc[w, tt][ok, 4 * g + e] * unscale)
    if Tq == 0:
        return dq, dk, dv

    # 3. dq_convert_kernel or dq_kernel
    if atomic:
        acc = dq_accum.reshape(Tq, H, D)
        for b in range(B):
            qs, sq = _span(cu_q, b, sq_max, Tq)
            acc_row0 = qs if cu_q is not None else b * sq_max
            dq[qs:qs + sq] = rnd(acc[acc_row0:acc_row0 + sq])
        return dq, dk, dv
    gxq = grid_x if grid_x is not None else max((sq_max + QBM - 1) // QBM, 1)
    for b in range(B):
        qs, sq = _span(cu_q, b, sq_max, Tq)
        ks, sk = _span(cu_k, b, sk_max, Tk)
        nq = (sq + QBM - 1) // QBM
        for h in range(H):
            kvh = h // group
            Q, dO = q[qs:qs + sq, h], do[qs:qs + sq, h]
            K, V = k[ks:ks + sk, kvh], v[ks:ks + sk, kvh]
            for x in range(gxq):
                for mb in range(gxq - 1 - x, nq, gxq):
                    m0 = mb * QBM
                    first, end = _key_blocks(m0, QBM, sq, sk, causal, window, QBN)
                    state = []
                    for w in range(4):
                        mw = m0 + w * 32
                        qrow = mw + t["frag_b_row"]
                        okq = qrow < sq
                        qi = np.minimum(qrow, sq - 1)
                        qf = [np.where(okq[:, None], Q[qi[:, None], t["frag_d"][kc][:, None] + ar8], 0.0)
                              for kc in range(D // 16)]
                        of = [np.where(okq[:, None], dO[qi[:, None], t["frag_d"][kc][:, None] + ar8], 0.0)
                              for kc in range(D // 16)]
                        qcol = acc_row[:, 0] if bug == "dq_query_from_row" else acc_col[:, 0]
                        srow = mw + qcol
                        oks = srow < sq
                        l_raw = lse[h, qs + np.minimum(srow, sq - 1)]
                        lse_l = np.where(oks, np.where(l_raw == -np.inf, np.inf, l_raw), np.inf)
                        delta_l = np.where(oks, delta[h, qs + np.minimum(srow, sq - 1)], 0.0)
                        state.append((mw, qf, of, lse_l, delta_l, np.zeros((D // 32, 64, 16))))
                    for nb in range(first, end):
                        n0 = nb * QBN
                        Ks = np.full(c["lds_dq"], np.nan)
                        Vs = np.full(c["lds_dq"], np.nan)
                        _stage(t, Ks, K, n0, sk, "dq")
                        _stage(t, Vs, V, n0, sk, "dq")
                        for mw, qf, of, lse_l, delta_l, dqacc in state:
                            s = np.zeros((64, 16))
                            dp = np.zeros((64, 16))
                            for kc in range(D // 16):
                                at = lr[t["frag_a_row"][:, None], t["frag_d"][kc][:, None] + ar8]
                                kf, vf = Ks[at], Vs[at]
                                for st in range(2):
                                    s = mma(kf[:, 4 * st:4 * st + 4], qf[kc][:, 4 * st:4 * st + 4], s)
                                    dp = mma(vf[:, 4 * st:4 * st + 4], of[kc][:, 4 * st:4 * st + 4], dp)
                            if not _block_full(mw, 32, n0, QBN, sq, sk, causal, window):
                                s = np.where(_visible(mw + acc_col, n0 + acc_row, sq, sk, causal, window), s, -np.inf)
                            with np.errstate(invalid="ignore"):
                                dsv = np.exp(scale * s - lse_l[:, None]) * (dp - delta_l[:, None])
                            for st in range(4):
                                db = rnd(dsv[:, x_reg[st]])
                                for tt in range(D // 32):
                                    dqacc[tt] = mma(Ks[lr[t["xa_k"][st], t["xa_row"][tt]]], db, dqacc[tt])
                    for mw, qf, of, lse_l, delta_l, dqacc in state:
                        row = mw + t["g_col"][:, 0]
                        ok = row < sq
                        for tt in range(D // 32):
                            for g in range(4):
                                for e in range(4):
                                    dq[qs + row[ok], h, t["g_d"][tt][ok, 4 * g] + e] = rnd(dqacc[tt][ok, 4 * g + e] *
                                                                                           scale)
    return dq, dk, dv


def _dense(q, k, v, do, cu_q, cu_k, sq_max, sk_max, causal, window, scale):
    """Forward (o, lse) and gradients from common/flash_attn.h's rules, per sequence, float64."""
    Tq, H, _ = q.shape
    Hkv = k.shape[1]
    o = np.zeros(q.shape)
    lse = np.full((H, Tq), -np.inf)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    B = 1 if cu_q is None else len(cu_q) - 1
    for b in range(B):
        qs, qe = (0, sq_max) if cu_q is None else (cu_q[b], cu_q[b + 1])
        ks, ke = (0, sk_max) if cu_k is None else (cu_k[b], cu_k[b + 1])
        sq, sk = qe - qs, ke - ks
        pos = np.arange(sq)[:, None] + sk - sq
        j = np.arange(sk)[None, :]
        vis = np.ones((sq, sk), bool)
        if causal:
            vis &= j <= pos
        if window:
            vis &= j > pos - window
        for h in range(H):
            kvh = h // (H // Hkv)
            Q, K, V, dO = q[qs:qe, h], k[ks:ke, kvh], v[ks:ke, kvh], do[qs:qe, h]
            sc = np.where(vis, scale * Q @ K.T, -np.inf)
            mx = sc.max(axis=1, initial=-np.inf)
            seen = np.isfinite(mx)
            l = np.where(seen, mx + np.log(np.where(seen, np.exp(sc - np.where(seen, mx, 0)[:, None]).sum(1), 1)),
                         -np.inf)
            P = np.where(seen[:, None], np.exp(sc - np.where(seen, l, 0)[:, None]), 0.0)
            O = P @ V
            o[qs:qe, h], lse[h, qs:qe] = O, l
            dP = dO @ V.T
            dS = P * (dP - (dO * O).sum(1, keepdims=True))
            dq[qs:qe, h] = scale * dS @ K
            dk[ks:ke, kvh] += scale * dS.T @ Q
            dv[ks:ke, kvh] += P.T @ dO
    return o, lse, dq, dk, dv


CASES = [
    # (D, seqlens q, seqlens k (None: fixed-length sq_max/sk_max), sq_max, sk_max, H, Hkv, causal, window)
    (64, None, None, 70, 101, 3, 1, True, 0),        # sq != sk (bottom-right), tails, GQA 3
    (128, None, None, 45, 45, 2, 2, True, 20),       # window < S: query and key blocks skipped
    (64, None, None, 75, 40, 1, 1, True, 0),         # sq > sk: the first 35 queries see nothing
    (128, None, None, 40, 97, 3, 1, False, 0),       # non-causal, key tail, GQA 3
    (64, [0, 37, 37, 90], [0, 50, 61, 131], 53, 70, 2, 1, True, 7),  # varlen, an empty sequence, tiny window
    (64, [0, 20, 60], [0, 0, 45], 40, 45, 2, 2, False, 0),  # varlen: a sequence with queries and no keys
]


def _case(case, seed):
    D, cq, ck, sq_max, sk_max, H, Hkv, causal, window = CASES[case]
    rng = np.random.default_rng(seed)
    Tq = sq_max if cq is None else cq[-1]
    Tk = sk_max if ck is None else ck[-1]
    q, do = rng.standard_normal((Tq, H, D)), rng.standard_normal((Tq, H, D))
    k, v = rng.standard_normal((Tk, Hkv, D)), rng.standard_normal((Tk, Hkv, D))
    cu_q = None if cq is None else np.array(cq)
    cu_k = None if ck is None else np.array(ck)
    scale = 1.0 / np.sqrt(D)
    o, lse, dq, dk, dv = _dense(q, k, v, do, cu_q, cu_k, sq_max, sk_max, causal, window, scale)
    args = (D, q, k, v, o, do, lse, cu_q, cu_k, sq_max, sk_max, causal, window, scale)
    return args, (dq, dk, dv), lse


@pytest.fixture(scope="module")
def cases():
    return {i: _case(i, i) for i in range(len(CASES))}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_replay(host, cases, case, deterministic):
    args, want, lse = cases[case]
    got = _replay(host, *args, deterministic)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert not np.isnan(g).any(), f"{name}: rows not written or NaN read"
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-9, err_msg=name)
    if case == 2:  # the queries that see nothing get dq = 0
        assert np.isinf(lse[:, :35]).all() and (got[0][:35] == 0).all()
    if case == 5:  # a sequence without keys: its queries get dq = 0
        assert (got[0][:20] == 0).all()


def test_replay_grid_stride(host, cases):
    """A grid smaller than the blocks (a too-small max_seqlen hint) still covers every row and key."""
    args, want, _ = cases[0]
    for det in (False, True):
        got = _replay(host, *args, det, grid_x=1)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_rounded_replay(host, cases, dtype):
    """P and dS rounded to the operand type as the kernels round them (and the outputs to T). The error
    is then that of 16-bit operands in sums of ~100 terms: measured against the size of each gradient,
    a few units of the type's epsilon (bf16 2^-8, f16 2^-11), far below a layout mistake (order 1)."""
    eps = {"bf16": 2.0 ** -8, "f16": 2.0 ** -11}[dtype]
    for case in (0, 4):
        args, want, _ = cases[case]
        for det in (False, True):
            got = _replay(host, *args, det, dtype=dtype)
            for name, g, w in zip(("dq", "dk", "dv"), got, want):
                assert not np.isnan(g).any()
                err = np.abs(g - w).max() / np.abs(w).max()
                assert err < 8 * eps, (dtype, case, det, name, err)


BUGS = {
    # bug: (case, deterministic) where it must show
    "p_reg_step": (0, True),             # P/dS registers fed to the wrong 8-query step
    "causal_off_by_one": (0, True),      # j < i + off instead of <=
    "qblock_late": (1, True),            # the first query block of a key block skipped
    "lse_inf_kept": (2, True),           # lse = -inf not replaced by +inf: NaN from the rows that see nothing
    "ds_no_delta": (3, True),            # dS = P dP
    "dq_accum_fixed_rows": (4, False),   # varlen dq_accum rows at b * max_seqlen
    "dq_key_no_wave_offset": (0, False),  # wavefront 1 multiplies its dS with wavefront 0's keys
    "dq_query_from_row": (0, True),      # dq_kernel's lse/delta of the wrong query
    "dv_keeps_p_factor": (0, True, "f16"),  # dV's epilogue forgets P's 2^15 (f16 only)
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_planted_bug_is_caught(host, cases, bug):
    case, det, dtype = (BUGS[bug] + ("exact",))[:3]
    args, want, _ = cases[case]
    try:
        got = _replay(host, *args, det, dtype=dtype, bug=bug)
    except IndexError:  # a write outside dq_accum: caught as well
        return
    bad = False
    for g, w in zip(got, want):
        with np.errstate(invalid="ignore"):
            # exact: 1e-6; rounded (f16): well above test_rounded_replay's bound
            tol = 1e-6 if dtype == "exact" else 0.1 * np.abs(w).max()
            bad |= bool(np.isnan(g).any() or not np.allclose(g, w, rtol=0, atol=tol))
    assert bad, f"planted bug {bug} went unnoticed"
