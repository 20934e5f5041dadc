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
// Optional per-expert biases (gpt-oss): bias[e] (N,) is added to expert e's
// rows in float32, before the one rounding.
//
// The fused SwiGLU GEMM ("swiglu") is the experts' first GEMM with its gated
// activation in the epilogue: h = x_e @ w13[e]^T (+ bias[e]), 2F columns,
// then act (F columns) from each (gate, up) pair of h, in float32 from the
// unrounded sums, rounded once; h itself (rounded, bias included) is written
// too when a pointer is given, for the backward. w13[e] is (2F, K)
// (trans_b, nn.Linear) or (K, 2F), its 2F outputs either all gates then all
// ups (Mixtral: gate j = h[j], up j = h[F + j]) or interleaved (gpt-oss:
// gate j = h[2j], up j = h[2j + 1]). The activation is silu(gate) * up, or
// gpt-oss's clamped SwiGLU (glu below). Rows from offsets[E] on are zero.
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
  DType dtype;              // of a, b, c and bias
  const void* a;            // (rows, k), contiguous
  const void* b;            // (experts, k, n), or (experts, n, k) with trans_b
  const int64_t* offsets;   // (experts + 1,), non-decreasing, offsets[0] == 0
  void* c;                  // (rows, n)
  int64_t rows;
  int64_t k;
  int64_t n;
  int64_t experts;
  bool trans_b;
  const void* bias;         // (experts, n), or null
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

// The gated unit of the fused SwiGLU epilogue.
enum GluActivation : int32_t {
  kGluSilu = 0,       // silu(gate) * up
  kGluSwigluOss = 1,  // gpt-oss: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
};

struct GroupedSwigluArgs {
  DType dtype;              // of x, w13, act, h and bias
  const void* x;            // (rows, k), contiguous
  const void* w13;          // (experts, 2 * ffn, k) with trans_b, else (experts, k, 2 * ffn)
  const int64_t* offsets;   // (experts + 1,)
  void* act;                // (rows, ffn)
  void* h;                  // (rows, 2 * ffn) pre-activations in w13's column order, or null: not stored
  int64_t rows;
  int64_t k;
  int64_t ffn;
  int64_t experts;
  bool trans_b;
  bool interleaved;         // gate, up, gate, up, ... instead of the gate block, then the up block
  int32_t activation;       // GluActivation
  float alpha;              // kGluSwigluOss
  float limit;
  const void* bias;         // (experts, 2 * ffn) in w13's column order, or null
};

// The epilogue's activation on unrounded float32 sums (every backend calls
// this). gpt-oss's clamps are transformers' torch.clamp: a NaN stays NaN
// (the comparisons below are false for it), and the ends are kept.
MIXKIT_HD float glu(float gate, float up, int32_t activation, float alpha, float limit) {
  if (activation == kGluSwigluOss) {
    gate = gate > limit ? limit : gate;
    up = up > limit ? limit : up < -limit ? -limit : up;
    return (up + 1.f) * (gate / (1.f + expf(-alpha * gate)));
  }
  // silu(x) = x / (1 + e^-x); e^-x = inf gives the right -0 limit.
  return gate / (1.f + expf(-gate)) * up;
}

// dbias[e] = the sum of expert e's rows of dy (the bias gradient of a
// grouped GEMM), float32 accumulation, rounded once; rows from offsets[E] on
// are not summed. Deterministic: one thread per (expert, column).
struct GroupedBiasGradArgs {
  DType dtype;              // of dy and db
  const void* dy;           // (rows, n)
  const int64_t* offsets;   // (experts + 1,)
  void* db;                 // (experts, n)
  int64_t rows;
  int64_t n;
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
  require(a.trans_b || a.interleaved,
          "a (experts, K, 2F) w13 must have interleaved gate/up columns (gpt-oss's layout)");
  require(a.activation == kGluSilu || a.activation == kGluSwigluOss, "unknown activation code");
  require(std::isfinite(a.alpha) && std::isfinite(a.limit) && a.limit > 0.f,
          "alpha must be finite and limit finite and > 0");
}

inline void check(const GroupedBiasGradArgs& a) {
  check_dtype(a.dtype);
  check_grouped_sizes(a.rows, 1, a.n, a.experts);
  require(a.offsets && a.db, "null offsets or bias-gradient pointer");
  require(a.rows == 0 || a.dy, "null tensor pointer");
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

// What a GPU grouped GEMM kernel writes in its epilogue: C as computed
// (plain), the fused SwiGLU of gate and up blocks (a CTA owns output columns
// n0.. of act and the matching gate and up columns of w13), or the fused
// SwiGLU of interleaved (gate, up) column pairs (a CTA computes the plain
// GEMM tile over the 2F columns of h and writes half as many act columns).
enum GemmEpilogue : int { kEpiPlain = 0, kEpiSwiglu = 1, kEpiGluPairs = 2 };

// The fused SwiGLU epilogue's activation (GroupedSwigluArgs' fields).
struct GluParams {
  int32_t activation;
  float alpha;
  float limit;
};

// The share of thread `tid` (of `threads`) in zeroing the bad-id rows [row0,
// row1): columns [n0, n0 + width) of C (N columns wide) and of both halves
// (gate, up) of h for kEpiSwiglu; for kEpiGluPairs, n0 and width count h's
// 2F = N columns and C is act, N / 2 wide.
template <class T, int EPI>
MIXKIT_HD void zero_bad_rows(T* C, T* h, int64_t row0, int64_t row1, int64_t n0, int64_t width, int64_t N,
                             int64_t tid, int64_t threads) {
  for (int64_t i = tid; i < (row1 - row0) * width; i += threads) {
    const int64_t row = row0 + i / width, col = n0 + i % width;
    if (EPI == kEpiGluPairs) {
      if (col % 2 == 0) C[row * (N / 2) + col / 2] = from_f32<T>(0.f);
      if (h) h[row * N + col] = from_f32<T>(0.f);
      continue;
    }
    C[row * N + col] = from_f32<T>(0.f);
    if (EPI == kEpiSwiglu && h) h[row * 2 * N + col] = h[row * 2 * N + N + col] = from_f32<T>(0.f);
  }
}

// ---- backends --------------------------------------------------------------
void grouped_gemm_cpu(const GroupedGemmArgs& a);
void grouped_wgrad_cpu(const GroupedWgradArgs& a);
void grouped_swiglu_cpu(const GroupedSwigluArgs& a);
void grouped_bias_grad_cpu(const GroupedBiasGradArgs& a);
// CUDA: sm_80 tensor cores, and a wgmma forward on sm_90a. HIP: MFMA
// (gfx90a) for all three.
void grouped_gemm_gpu(const GroupedGemmArgs& a, int device, void* stream);
void grouped_wgrad_gpu(const GroupedWgradArgs& a, int device, void* stream);
void grouped_swiglu_gpu(const GroupedSwigluArgs& a, int device, void* stream);
void grouped_bias_grad_gpu(const GroupedBiasGradArgs& a, int device, void* stream);

}  // namespace mixkit
