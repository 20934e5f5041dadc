"""The HIP flash-attention forward's index math, replayed on the CPU.

There is no AMD GPU here. csrc/cuda/flash_attn_fwd_mfma.cuh keeps every
lane/register -> (query, key, head-dim) mapping, the staging plan, the LDS
offsets and the key-block range in constexpr functions; they are compiled as
plain host C++, print their tables, and a Python transliteration of
flash_fwd_kernel drives the model of v_mfma_f32_32x32x8 from
tests/test_mfma_layout.py (written from AMD's element -> register description)
over whole grids. The result is compared with dense attention in float64
written from the mask rules of common/flash_attn.h / CONVENTIONS.md, not from
the kernel.

What the replay models: the kernel's loops, the S^T = K Q^T and
O^T += V^T P^T products with the key permutation, the per-lane online softmax
with its lane ^ 32 exchanges, flash::BlockMask (transliterated) including the
`full` shortcut, the key-block range, the epilogue and which rows are written.
What it does not: bf16/fp16 rounding of inputs, of P and of the output (all
float64 here; the tolerance is 1e-9), exp2 vs exp, hardware scheduling and
LDS timing (barriers are assumed to order the stages). LDS is refilled with
NaN before each block is staged, so a read of anything the staging did not
write shows up as NaN.

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
#include "cuda/flash_attn_fwd_mfma.cuh"

using namespace mixkit::mfma;
using namespace mixkit::mfma::fa;

""" + TABLE_HELPER + r"""
void dump(int d) {
  const int bn = block_n(d), ch = stage_chunks(d);
  std::printf("{\"consts\": [%d,%d,%d,%d,%d,%d,%d,%d]", kThreads, kWaves, kWaveM, kBM, bn, ch,
              lds_k_size(d), lds_vt_size(d));
  table("key_perm", 32, 1, 1, [](int i, int, int) { return key_perm(i); });
  table("frag_d", d / kPairK, 64, 1, [](int kc, int l, int) { return frag_d(kc, l); });
  table("q_row", 64, 1, 1, [](int l, int, int) { return q_row(l); });
  table("k_row", bn / 32, 64, 1, [](int u, int l, int) { return k_row(u, l); });
  table("s_key", bn / 32, 64, 16, [](int u, int l, int r) { return s_key(u, l, r); });
  table("s_query", 64, 16, 1, [](int l, int r, int) { return s_query(l, r); });
  table("pv_reg", 2, 2, 4, [](int p, int s, int e) { return pv_reg(p, s, e); });
  table("pair_elem", 2, 4, 1, [](int s, int e, int) { return pair_elem(s, e); });
  table("vt_row", d / 32, 64, 1, [](int t, int l, int) { return vt_row(t, l); });
  table("vt_key", bn / 32, 2, 64, [](int u, int p, int l) { return vt_key(u, p, l); });
  table("o_d", d / 32, 64, 16, [](int t, int l, int r) { return o_d(t, l, r); });
  table("o_query", 64, 16, 1, [](int l, int r, int) { return o_query(l, r); });
  table("stage_row", kThreads, ch, 1, [d](int t, int i, int) { return stage_row(d, t, i); });
  table("stage_col", kThreads, ch, 1, [d](int t, int i, int) { return stage_col(d, t, i); });
  table("lds_k", bn, d, 1, [d](int k, int e, int) { return lds_k(d, k, e); });
  table("lds_vt", d, bn, 1, [d](int e, int k, int) { return lds_vt(d, e, k); });
  std::printf("}");
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "key_blocks") {
    // stdin: "m0 sk off causal window bn" per line; stdout: "first end".
    long long m0, sk, off, window;
    int causal, bn;
    while (std::cin >> m0 >> sk >> off >> causal >> window >> bn) {
      const KeyBlocks kb = key_blocks(m0, sk, off, causal != 0, window, bn);
      std::printf("%lld %lld\n", (long long)kb.first, (long long)kb.end);
    }
    return 0;
  }
  std::printf("{\"p_log2\": [%d, %d],\n\"64\": ", p_log2(false), p_log2(true));
  dump(64);
  std::printf(",\n\"128\": ");
  dump(128);
  std::printf("}\n");
  return 0;
}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    exe = build_host_program(tmp_path_factory, HOST_PROGRAM, "flash_attn_fwd_mfma.cuh", "mfma_attn_host")
    raw = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    plans = {}
    for D in (64, 128):
        out = raw[str(D)]
        c = dict(zip(["threads", "waves", "wave_m", "BM", "BN", "chunks", "lds_k", "lds_vt"], out["consts"]))
        BN, ch = c["BN"], c["chunks"]
        shapes = {"key_perm": (32,), "frag_d": (D // 16, 64), "q_row": (64,), "k_row": (BN // 32, 64),
                  "s_key": (BN // 32, 64, 16), "s_query": (64, 16), "pv_reg": (2, 2, 4), "pair_elem": (2, 4),
                  "vt_row": (D // 32, 64), "vt_key": (BN // 32, 2, 64), "o_d": (D // 32, 64, 16),
                  "o_query": (64, 16), "stage_row": (c["threads"], ch), "stage_col": (c["threads"], ch),
                  "lds_k": (BN, D), "lds_vt": (D, BN)}
        t = {k: np.array(out[k]).reshape(s) for k, s in shapes.items()}
        t["c"] = c
        t["D"] = D
        plans[D] = t
    plans["p_log2"] = {"bf16": raw["p_log2"][0], "f16": raw["p_log2"][1]}
    plans["exe"] = exe
    return plans


def _key_blocks(host, queries):
    """key_blocks() of the header for a list of (m0, sk, off, causal, window, bn)."""
    inp = "".join(f"{m0} {sk} {off} {int(c)} {w} {bn}\n" for m0, sk, off, c, w, bn in queries)
    out = subprocess.run([str(host["exe"]), "key_blocks"], input=inp, check=True, capture_output=True,
                         text=True).stdout
    return [tuple(int(v) for v in line.split()) for line in out.splitlines()]


# ---- the plan's invariants ------------------------------------------------------------

@pytest.mark.parametrize("D", [64, 128])
def test_plan_tables(host, D):
    t = host[D]
    c, BN = t["c"], t["c"]["BN"]
    assert c["BM"] == c["waves"] * c["wave_m"] == 128 and c["threads"] == 64 * c["waves"]
    assert 2 * (c["lds_k"] + c["lds_vt"]) <= 64 * 1024 // 3  # three workgroups a CU
    assert sorted(t["key_perm"].tolist()) == list(range(32))
    # Staging writes each element of the [BN][D] block once; 16-byte aligned K stores.
    seen = np.zeros((BN, D), int)
    for j in range(8):
        np.add.at(seen, (t["stage_row"], t["stage_col"] + j), 1)
    assert (seen == 1).all()
    for name, size in (("lds_k", c["lds_k"]), ("lds_vt", c["lds_vt"])):
        off = t[name]
        assert len(np.unique(off)) == off.size and off.min() >= 0 and off.max() < size
        frag = off.reshape(off.shape[0], -1, 8)  # 16-byte fragments are contiguous (whole rows need not be:
        assert (frag[..., 1:] - frag[..., :-1] == 1).all()  # the bank rotations move fragments within a row)
        assert (frag[..., 0] % 8 == 0).all()
    assert (t["lds_k"][t["stage_row"], t["stage_col"]] % 8 == 0).all()
    # 16-byte fragment reads: aligned and inside a row.
    for kc in range(D // 16):
        for u in range(BN // 32):
            start = t["lds_k"][t["k_row"][u], t["frag_d"][kc]]
            assert (start % 8 == 0).all() and (t["frag_d"][kc] + 8 <= D).all()
    for tt in range(D // 32):
        for u in range(BN // 32):
            for p in range(2):
                assert (t["lds_vt"][t["vt_row"][tt], t["vt_key"][u, p]] % 8 == 0).all()
                assert (t["vt_key"][u, p] + 8 <= BN).all()
    # Each lane owns one query in S^T and O^T; the halves of a wave share it.
    for tab in (t["s_query"], t["o_query"]):
        assert (tab == tab[:, :1]).all()
        assert (tab[:32, 0] == tab[32:, 0]).all() and sorted(tab[:32, 0].tolist()) == list(range(32))
    assert (t["q_row"] == t["s_query"][:, 0]).all()
    # S^T covers every (query, key) of the block once.
    seen = np.zeros((32, BN), int)
    for u in range(BN // 32):
        np.add.at(seen, (np.broadcast_to(t["s_query"], (64, 16)), t["s_key"][u]), 1)
    assert (seen == 1).all()
    # 8-byte output stores: registers 4g .. 4g + 3 are consecutive d, and O^T covers (d, query) once.
    od = t["o_d"]
    g = od.reshape(D // 32, 64, 4, 4)
    assert (g[..., 1:] - g[..., :-1] == 1).all() and (g[..., 0] % 4 == 0).all()
    seen = np.zeros((D, 32), int)
    for tt in range(D // 32):
        np.add.at(seen, (od[tt], t["o_query"]), 1)
    assert (seen == 1).all()


@pytest.mark.parametrize("D", [64, 128])
def test_p_registers_are_the_b_operand(host, D):
    """S^T register pv_reg(p, s, e) of lane l holds the key that V^T's read feeds as A element pair_elem(s, e)."""
    t = host[D]
    for u in range(t["c"]["BN"] // 32):
        for p in range(2):
            for s in range(2):
                for e in range(4):
                    key_b = t["s_key"][u][:, t["pv_reg"][p, s, e]]            # lane -> key of B element e
                    key_a = t["vt_key"][u, p] + t["pair_elem"][s, e]          # lane -> key of A element e
                    # The instruction multiplies A element e of lane (h, i) with B element e of lane (h, j):
                    # both halves must agree lane by lane within a half, for every i, j of that half.
                    for h in range(2):
                        assert len(set(key_b[32 * h:32 * h + 32].tolist())) == 1
                        assert (key_a[32 * h:32 * h + 32] == key_b[32 * h]).all()


@pytest.mark.parametrize("m0,sk,off,causal,window", [
    (0, 200, 50, True, 0), (128, 200, 50, True, 0), (0, 200, 50, True, 40), (128, 300, 150, True, 33),
    (0, 10, -300, True, 0), (256, 1000, 600, True, 64), (0, 100, 0, False, 0), (0, 0, 0, False, 0),
    (128, 129, 0, True, 1),
])
def test_key_blocks(host, m0, sk, off, causal, window):
    """[first, end) is exactly the set of blocks holding a key some row of the query block sees."""
    for D in (64, 128):
        bn = host[D]["c"]["BN"]
        ((first, end),) = _key_blocks(host, [(m0, sk, off, causal, window, bn)])
        i = np.arange(m0, m0 + 128)[:, None] + off
        j = np.arange(sk)[None, :]
        vis = np.ones((128, sk), bool)
        if causal:
            vis &= j <= i
        if window:
            vis &= j > i - window
        blocks = sorted(set((np.nonzero(vis.any(0))[0] // bn).tolist()))
        if blocks:
            assert (first, end) == (blocks[0], blocks[-1] + 1)
        else:
            assert end <= first


# ---- the kernel replay ----------------------------------------------------------------------

def _block_mask(m0, bm, n0, bn, sk, off, causal, window):
    """flash::BlockMask, transliterated: (full, visible(ii, jj) as a function of arrays)."""
    full = n0 + bn <= sk and (not causal or n0 + bn - 1 <= m0 + off) and (window == 0 or n0 > m0 + bm - 1 + off - window)
    kend = min(sk - n0, bn)
    diag = m0 + off - n0
    cd = min(max(diag, -bm), bn)
    wd = min(max(diag - window, -bm), bn)

    def visible(ii, jj):
        v = jj < kend
        if causal:
            v = v & (jj <= ii + cd)
        if window > 0:
            v = v & (jj > ii + wd)
        return v
    return full, visible


def _span(cu, b, fixed_len, total):
    if cu is None:
        return 0, fixed_len
    s = min(max(int(cu[b]), 0), total)
    e = min(max(int(cu[b + 1]), s), total)
    return s, e - s


def _xor32(x):
    """shfl_xor(x, 32) over the lane axis (the last)."""
    return np.concatenate([x[..., 32:], x[..., :32]], axis=-1)


def _ftz_f16(x):
    """MI200's f16 MFMA operand flush: |x| below the smallest normal 2^-14 reads as 0."""
    return np.where(np.abs(x) < 2.0 ** -14, 0.0, x)


def _replay(host, D, q, k, v, cu_q, cu_k, sq_max, sk_max, causal, window, scale, grid_x=None, bug=None,
            dtype="bf16"):
    """flash_fwd_kernel's grid, transliterated. q (Tq, H, D), k/v (Tk, Hkv, D) packed; fixed length is
    cu = None with batch 1. Returns out (Tq, H, D) and lse (H, Tq), NaN where nothing was written.
    dtype "f16" models P's 2^p_log2 factor and the flush of P operands below 2^-14 (only P's: the
    inputs' flush is the caller's data, mfma.cuh)."""
    t = host[D]
    p_log2 = 0 if bug == "no_p_offset" else host["p_log2"][dtype]
    p_ftz = _ftz_f16 if dtype == "f16" else (lambda x: x)
    c = t["c"]
    BM, BN, W = c["BM"], c["BN"], c["waves"]
    Tq, H, _ = q.shape
    Tk, Hkv, _ = k.shape
    B = 1 if cu_q is None else len(cu_q) - 1
    out = np.full(q.shape, np.nan)
    lse = np.full((H, Tq), np.nan)
    gx = grid_x if grid_x is not None else max((sq_max + BM - 1) // BM, 1)
    pe = t["pair_elem"]
    ar8 = np.arange(8)
    lanes = np.arange(64)
    key_perm_read = t["k_row"] if bug != "k_rows_unpermuted" else (np.arange(BN // 32)[:, None] * 32 + lanes % 32)
    for b in range(B):
        qs, sq = _span(cu_q, b, sq_max, Tq)
        ks, sk = _span(cu_k, b, sk_max, Tk)
        off = sk - sq
        nq = (sq + BM - 1) // BM
        blocks = {x: list(range(gx - 1 - x, nq, gx)) for x in range(gx)}  # latest query blocks first
        mbs = [mb for x in range(gx) for mb in blocks[x]]
        ranges = dict(zip(mbs, _key_blocks(host, [(mb * BM, sk, off, causal, window, BN) for mb in mbs])))
        for h in range(H):
            kvh = h // (H // Hkv)
            Q, K, V = q[qs:qs + sq, h], k[ks:ks + sk, kvh], v[ks:ks + sk, kvh]
            for x in range(gx):
                for mb in blocks[x]:
                    m0 = mb * BM
                    first, end = ranges[mb]
                    if bug == "window_block_late":
                        first += 1
                    qf = []
                    for w in range(W):
                        qrow = m0 + w * c["wave_m"] + t["q_row"]
                        ok = qrow < sq
                        qf.append([np.where(ok[:, None], Q[np.minimum(qrow, sq - 1)[:, None],
                                                           t["frag_d"][kc][:, None] + ar8], 0.0)
                                   for kc in range(D // 16)])
                    o = np.zeros((W, D // 32, 64, 16))
                    m = np.full((W, 64), -np.inf)
                    lsum = np.zeros((W, 64))
                    for nb in range(first, end):
                        n0 = nb * BN
                        Ks = np.full(c["lds_k"], np.nan)
                        Vt = np.full(c["lds_vt"], np.nan)
                        rows, cols = t["stage_row"].ravel(), t["stage_col"].ravel()
                        key = n0 + rows
                        okk = key < sk
                        kc_ = np.where(okk[:, None], K[np.minimum(key, sk - 1)[:, None], cols[:, None] + ar8], 0.0)
                        vc_ = np.where(okk[:, None], V[np.minimum(key, sk - 1)[:, None], cols[:, None] + ar8], 0.0)
                        Ks[t["lds_k"][rows, cols][:, None] + ar8] = kc_
                        Vt[t["lds_vt"][cols[:, None] + ar8, rows[:, None]]] = vc_
                        for w in range(W):
                            mw = m0 + w * c["wave_m"]
                            s = np.zeros((BN // 32, 64, 16))
                            for kc in range(D // 16):
                                for u in range(BN // 32):
                                    kf = Ks[t["lds_k"][key_perm_read[u], t["frag_d"][kc]][:, None] + ar8]
                                    for st in range(2):
                                        s[u] = mfma_32x32x8(kf[:, pe[st]], qf[w][kc][:, pe[st]], s[u])
                            full, visible = _block_mask(mw, 32, n0, BN, sk, off, causal, window)
                            if bug == "mask_ignored":
                                full = True
                            if not full:
                                for u in range(BN // 32):
                                    s[u] = np.where(visible(t["s_query"], t["s_key"][u]), s[u], -np.inf)
                            mx = np.maximum(m[w], s.max(axis=(0, 2)))
                            if bug != "no_half_exchange":
                                mx = np.maximum(mx, _xor32(mx))
                            base = np.where(mx == -np.inf, 0.0, mx * scale)
                            with np.errstate(invalid="ignore"):
                                corr = np.where(m[w] == -np.inf, 0.0, np.exp(m[w] * scale - base))
                            if bug == "no_rescale":
                                corr = np.where(m[w] == -np.inf, 0.0, 1.0)
                            m[w] = mx
                            lsum[w] *= corr
                            o[w] *= corr[None, :, None]
                            p = 2.0 ** p_log2 * np.exp(s * scale - base[None, :, None])
                            lsum[w] += p.sum(axis=(0, 2))
                            for u in range(BN // 32):
                                for pp in range(2):
                                    pb = [p_ftz(p[u][:, t["pv_reg"][pp, st]]) for st in range(2)]
                                    for tt in range(D // 32):
                                        vf = Vt[t["lds_vt"][t["vt_row"][tt], t["vt_key"][u, pp]][:, None] + ar8]
                                        for st in range(2):
                                            o[w, tt] = mfma_32x32x8(vf[:, pe[st]], pb[st], o[w, tt])
                    for w in range(W):
                        tot = lsum[w] + (_xor32(lsum[w]) if bug != "sum_one_half" else 0.0)
                        inv = np.where(tot > 0, 1.0 / np.where(tot > 0, tot, 1.0), 0.0)
                        row = m0 + w * c["wave_m"] + t["o_query"][:, 0]
                        for lane in range(64):
                            if row[lane] >= sq:
                                continue
                            for tt in range(D // 32):
                                out[qs + row[lane], h, t["o_d"][tt, lane]] = o[w, tt, lane] * inv[lane]
                            if lane < 32:
                                lse[h, qs + row[lane]] = (m[w, lane] * scale + np.log(tot[lane]) - p_log2 * np.log(2.0)
                                                          if tot[lane] > 0 else -np.inf)
    return out, lse


def _dense(q, k, v, cu_q, cu_k, sq_max, sk_max, causal, window, scale):
    """Attention from CONVENTIONS.md's rules, per sequence, float64."""
    Tq, H, D = q.shape
    Hkv = k.shape[1]
    out = np.zeros(q.shape)
    lse = np.full((H, Tq), -np.inf)
    B = 1 if cu_q is None else len(cu_q) - 1
    for b in range(B):
        qs, qe = (0, sq_max) if cu_q is None else (cu_q[b], cu_q[b + 1])
        ks, ke = (0, sk_max) if cu_k is None else (cu_k[b], cu_k[b + 1])
        sq, sk = qe - qs, ke - ks
        pos = np.arange(sq)[:, None] + sk - sq  # queries are the last sq positions
        j = np.arange(sk)[None, :]
        vis = np.ones((sq, sk), bool)
        if causal:
            vis &= j <= pos
        if window:
            vis &= j > pos - window  # at most W keys, the query's own included
        for h in range(H):
            kvh = h // (H // Hkv)
            sc = scale * q[qs:qe, h] @ k[ks:ke, kvh].T
            sc = np.where(vis, sc, -np.inf)
            mx = sc.max(axis=1, initial=-np.inf)
            seen = np.isfinite(mx)
            e = np.exp(sc - np.where(seen, mx, 0.0)[:, None])
            den = e.sum(axis=1)
            out[qs:qe, h] = np.where(seen[:, None], (e @ v[ks:ke, kvh]) / np.where(seen, den, 1.0)[:, None], 0.0)
            lse[h, qs:qe] = np.where(seen, mx + np.log(np.where(seen, den, 1.0)), -np.inf)
    return out, lse


CASES = [
    # (D, seqlens q, seqlens k (None: fixed-length sq_max/sk_max), sq_max, sk_max, H, Hkv, causal, window)
    (64, None, None, 150, 203, 2, 1, True, 0),       # sq != sk (bottom-right), tails, 2 query blocks
    (128, None, None, 113, 113, 3, 3, True, 40),     # window < S, several key blocks skipped
    (64, None, None, 70, 40, 1, 1, True, 0),         # sq > sk: the first 30 queries see nothing
    (128, None, None, 40, 161, 2, 1, False, 0),      # non-causal, key tail
    (64, [0, 37, 37, 170], [0, 50, 61, 200], 133, 139, 2, 2, True, 7),  # varlen, an empty sequence, tiny window
    (128, None, None, 129, 129, 1, 1, True, 1),      # window 1: the diagonal only
    (64, None, None, 200, 200, 1, 1, True, 64),      # window = BN
]


def _case(D, cq, ck, sq_max, sk_max, H, Hkv, causal, window, seed):
    rng = np.random.default_rng(seed)
    Tq = sq_max if cq is None else cq[-1]
    Tk = sk_max if ck is None else ck[-1]
    q = rng.standard_normal((Tq, H, D))
    k = rng.standard_normal((Tk, Hkv, D))
    v = rng.standard_normal((Tk, Hkv, D))
    return q, k, v, (None if cq is None else np.array(cq)), (None if ck is None else np.array(ck))


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_replay(host, case, dtype):
    D, cq, ck, sq_max, sk_max, H, Hkv, causal, window = CASES[case]
    q, k, v, cu_q, cu_k = _case(D, cq, ck, sq_max, sk_max, H, Hkv, causal, window, case)
    # The kernel's exp2(s * scale * log2(e) - m * scale * log2(e)) is exp(scale * (s - m)) here.
    # With the 2^15 factor no f16 P of these cases is flushed, so the comparison stays at 1e-9.
    scale = 1.0 / np.sqrt(D)
    got, got_lse = _replay(host, D, q, k, v, cu_q, cu_k, sq_max, sk_max, causal, window, scale, dtype=dtype)
    want, want_lse = _dense(q, k, v, cu_q, cu_k, sq_max, sk_max, causal, window, scale)
    assert not np.isnan(got).any() and not np.isnan(got_lse).any()  # every row written, no NaN read
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(np.isinf(got_lse), np.isinf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[fin], want_lse[fin], rtol=0, atol=1e-9)
    if case == 2:
        assert np.isinf(want_lse[:, :30]).all() and (got[:30] == 0).all()  # the rows that see nothing


def test_replay_grid_stride(host):
    """A grid smaller than the query blocks (a too-small max_seqlen hint) still covers every row."""
    D, cq, ck, sq_max, sk_max, H, Hkv, causal, window = CASES[0]
    q, k, v, cu_q, cu_k = _case(D, cq, ck, sq_max, sk_max, H, Hkv, causal, window, 0)
    got, _ = _replay(host, D, q, k, v, cu_q, cu_k, sq_max, sk_max, causal, window, 0.125, grid_x=1)
    want, _ = _dense(q, k, v, cu_q, cu_k, sq_max, sk_max, causal, window, 0.125)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def _small_probabilities():
    """One key at score 0, 199 at -10 (P = e^-10 = 4.5e-5, below f16's 2^-14 = 6.1e-5): 1% of each row's
    mass sits in probabilities that an unscaled f16 P would lose to the MFMA's flush."""
    D, sk, sq = 64, 200, 40
    rng = np.random.default_rng(7)
    scale = 1.0 / np.sqrt(D)
    q = np.zeros((sq, 1, D))
    q[:, 0, 0] = 1.0
    k = np.zeros((sk, 1, D))
    k[1:, 0, 0] = -10.0 / scale
    v = rng.standard_normal((sk, 1, D))
    return D, q, k, v, sq, sk, scale


def test_f16_small_probabilities_survive_the_flush(host):
    D, q, k, v, sq, sk, scale = _small_probabilities()
    got, got_lse = _replay(host, D, q, k, v, None, None, sq, sk, False, 0, scale, dtype="f16")
    want, want_lse = _dense(q, k, v, None, None, sq, sk, False, 0, scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got_lse, want_lse, rtol=0, atol=1e-9)
    bad, _ = _replay(host, D, q, k, v, None, None, sq, sk, False, 0, scale, dtype="f16", bug="no_p_offset")
    assert np.abs(bad - want).max() > 1e-3  # what the factor prevents


@pytest.mark.parametrize("bug,case", [
    ("k_rows_unpermuted", 0), ("k_rows_unpermuted", 1), ("no_half_exchange", 0), ("sum_one_half", 3),
    ("no_rescale", 1), ("mask_ignored", 0), ("window_block_late", 4),
])
def test_planted_bugs_are_caught(host, bug, case):
    D, cq, ck, sq_max, sk_max, H, Hkv, causal, window = CASES[case]
    q, k, v, cu_q, cu_k = _case(D, cq, ck, sq_max, sk_max, H, Hkv, causal, window, case)
    scale = 1.0 / np.sqrt(D)
    got, got_lse = _replay(host, D, q, k, v, cu_q, cu_k, sq_max, sk_max, causal, window, scale, bug=bug)
    want, want_lse = _dense(q, k, v, cu_q, cu_k, sq_max, sk_max, causal, window, scale)
    with np.errstate(invalid="ignore"):
        same = np.allclose(got, want, rtol=0, atol=1e-6) and np.allclose(got_lse, want_lse, rtol=0, atol=1e-6)
    assert not same, f"planted bug {bug} went unnoticed"
