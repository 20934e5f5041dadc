// Grouped GEMM over the permuted rows of moe_permute (csrc/common/moe.h):
// expert e owns rows offsets[e] .. offsets[e + 1] of A, and
//   C[rows of e] = A[rows of e] @ B[e]        (trans_b = false, B: (E, K, N))
//   C[rows of e] = A[rows of e] @ B[e]^T      (trans_b = true,  B: (E, N, K),
//                                              how nn.Linear stores weights)
// accumulated in float32 and rounded once. Rows from offsets[E] on (the
// bad-id bucket of the GPU permute) are written as zeros. The offsets live on
// the tensors' device: the GPU kernel reads them there, so no call syncs.
//
// The weight gradient ("wgrad") sums over the rows of each expert:
//   dB[e] = A_e^T @ dY_e  (K, N)   or, with trans_b, dY_e^T @ A_e  (N, K).
//
// The fused SwiGLU GEMM ("swiglu") is Mixtral's first expert GEMM with its
// activation in the epilogue: with w13[e] (2F, K) = gate rows then up rows,
//   h = x_e @ w13[e]^T  (2F columns),  act = silu(h[:, :F]) * h[:, F:]  (F),
// the activation computed in float32 from the unrounded sums and rounded
// once; h itself (rounded) is written too when a pointer is given, for the
// backward. Rows from offsets[E] on are zero in both.
//
// (csrc/cpu/grouped_gemm.cpp, csrc/cuda/grouped_gemm.cu,
// python/mixkit/ops/moe_mlp.py.)
#pragma once

#include <cstdint>
#include <string>

#include "moe.h"
#include "ops.h"

namespace mixkit {

struct GroupedGemmArgs {
  DType dtype;              // of a, b and c
  const void* a;            // (rows, k), contiguous
  const void* b;            // (experts, k, n), or (experts, n, k) with trans_b
  const int64_t* offsets;   // (experts + 1,), non-decreasing, offsets[0] == 0
  void* c;                  // (rows, n)
  int64_t rows;
  int64_t k;
  int64_t n;
  int64_t experts;
  bool trans_b;
};

struct GroupedWgradArgs {
  DType dtype;              // of a, dy and db
  const void* a;            // (rows, k)
  const void* dy;           // (rows, n)
  const int64_t* offsets;   // (experts + 1,)
  void* db;                 // (experts, k, n), or (experts, n, k) with trans_b
  int64_t rows;
  int64_t k;
  int64_t n;
  int64_t experts;
  bool trans_b;
};

struct GroupedSwigluArgs {
  DType dtype;              // of x, w13, act and h
  const void* x;            // (rows, k), contiguous
  const void* w13;          // (experts, 2 * ffn, k): gate rows, then up rows
  const int64_t* offsets;   // (experts + 1,)
  void* act;                // (rows, ffn)
  void* h;                  // (rows, 2 * ffn) pre-activations, or null: not stored
  int64_t rows;
  int64_t k;
  int64_t ffn;
  int64_t experts;
};

inline void check_grouped_sizes(int64_t rows, int64_t k, int64_t n, int64_t experts) {
  require(rows >= 0 && rows <= kMoeMaxRows, "rows must be in [0, 2^31 - 1]");
  require(k >= 1 && k <= (int64_t(1) << 30), "K must be in [1, 2^30]");
  require(n >= 1 && n <= (int64_t(1) << 30), "N_out must be in [1, 2^30]");
  require(experts >= 1 && experts <= kMoeMaxExperts, "experts must be in [1, 256]");
  require(rows <= INT64_MAX / (k > n ? k : n), "rows * K overflows int64");
  require(experts <= INT64_MAX / k / n, "experts * K * N_out overflows int64");
}

inline void check(const GroupedGemmArgs& a) {
  check_dtype(a.dtype);
  check_grouped_sizes(a.rows, a.k, a.n, a.experts);
  require(a.offsets && a.b, "null offsets or weight pointer");
  require(a.rows == 0 || (a.a && a.c), "null tensor pointer");
}

inline void check(const GroupedWgradArgs& a) {
  check_dtype(a.dtype);
  check_grouped_sizes(a.rows, a.k, a.n, a.experts);
  require(a.offsets && a.db, "null offsets or weight-gradient pointer");
  require(a.rows == 0 || (a.a && a.dy), "null tensor pointer");
}

inline void check(const GroupedSwigluArgs& a) {
  check_dtype(a.dtype);
  require(a.ffn >= 1 && a.ffn <= (int64_t(1) << 29), "ffn must be in [1, 2^29]");
  check_grouped_sizes(a.rows, a.k, 2 * a.ffn, a.experts);
  require(a.offsets && a.w13, "null offsets or weight pointer");
  require(a.rows == 0 || (a.x && a.act), "null tensor pointer");
}

// Which expert and m-tile CTA slot `slot` of a GPU grouped GEMM computes,
// with tiles of BM rows: walks the device-side offsets (at most 256 experts,
// read by every thread alike). Returns false for slots with no GEMM work;
// [row0, row1) then bounds the rows after offsets[E] (the bad-id bucket)
// that the slot zeroes, empty when there are none. Launching an upper bound
// of ceil(rows / BM) + experts + 1 slots covers every case without a host
// sync, so the launch shape depends only on tensor shapes.
template <int BM>
MIXKIT_HD bool find_tile(const int64_t* off, int experts, int64_t rows, int64_t slot, int& expert, int64_t& row0,
                         int64_t& row1) {
  for (int e = 0; e < experts; ++e) {
    const int64_t begin = off[e], end = off[e + 1];
    const int64_t tiles = (end - begin + BM - 1) / BM;
    if (slot < tiles) {
      expert = e;
      row0 = begin + slot * BM;
      row1 = row0 + BM < end ? row0 + BM : end;
      return true;
    }
    slot -= tiles;
  }
  row0 = off[experts] + slot * BM;
  row1 = row0 + BM < rows ? row0 + BM : rows;
  return false;
}

// The share of thread `tid` (of `threads`) in zeroing columns [n0, n0 +
// width) of the bad-id rows [row0, row1) of C, N columns wide, and of both
// halves (gate, up) of h when the fused SwiGLU stores it.
template <class T, bool SWIGLU>
MIXKIT_HD void zero_bad_rows(T* C, T* h, int64_t row0, int64_t row1, int64_t n0, int64_t width, int64_t N,
                             int64_t tid, int64_t threads) {
  for (int64_t i = tid; i < (row1 - row0) * width; i += threads) {
    const int64_t row = row0 + i / width, col = n0 + i % width;
    C[row * N + col] = from_f32<T>(0.f);
    if (SWIGLU && h) h[row * 2 * N + col] = h[row * 2 * N + N + col] = from_f32<T>(0.f);
  }
}

// ---- backends --------------------------------------------------------------
void grouped_gemm_cpu(const GroupedGemmArgs& a);
void grouped_wgrad_cpu(const GroupedWgradArgs& a);
void grouped_swiglu_cpu(const GroupedSwigluArgs& a);
// CUDA: sm_80 tensor cores, and a wgmma forward on sm_90a. HIP: MFMA
// (gfx90a) for all three.
void grouped_gemm_gpu(const GroupedGemmArgs& a, int device, void* stream);
void grouped_wgrad_gpu(const GroupedWgradArgs& a, int device, void* stream);
void grouped_swiglu_gpu(const GroupedSwigluArgs& a, int device, void* stream);

}  // namespace mixkit
