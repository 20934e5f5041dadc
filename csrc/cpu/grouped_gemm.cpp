// Grouped GEMM, its weight gradient and the fused SwiGLU GEMM on the CPU (layout in
// common/grouped_gemm.h). The CPU reads the offsets directly, lists the
// (expert, row block) tiles and spreads them over OpenMP threads. Each tile
// converts its weights' rows to float32 once per K step and accumulates a
// block of output rows in float32, rounding once at the end. Simple and exact
// in its summation order; the fast paths are the GPU kernels.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/grouped_gemm.h"

namespace mixkit {
namespace {

constexpr int64_t kRowBlock = 16;

void check_offsets(const int64_t* off, int64_t experts, int64_t rows) {
  bool ok = off[0] == 0 && off[experts] <= rows;
  for (int64_t e = 0; e < experts; ++e) ok = ok && off[e] <= off[e + 1];
  require(ok, "expert_offsets must start at 0, be non-decreasing and end at most at the row count; "
              "pass the offsets returned by moe_permute");
}

// The GEMM over the experts' rows; `store(row, acc)` receives each finished
// row of N float32 sums (the epilogue: round into C, or the fused SwiGLU).
// Rows from offsets[E] on are the caller's to zero.
template <class T, class Store>
void gemm(const GroupedGemmArgs& g, Store&& store) {
  const int64_t K = g.k, N = g.n;
  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b);
  struct Tile { int64_t e, r0, r1; };
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < g.experts; ++e)
    for (int64_t r = g.offsets[e]; r < g.offsets[e + 1]; r += kRowBlock)
      tiles.push_back({e, r, std::min(r + kRowBlock, g.offsets[e + 1])});
  const int64_t ntiles = int64_t(tiles.size());
#pragma omp parallel if (g.rows * K * N > kCpuParallelGrain)
  {
    std::vector<float> acc(kRowBlock * N), brow(N), arow(K);
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < ntiles; ++i) {
      const Tile t = tiles[i];
      const int64_t m = t.r1 - t.r0;
      const T* Be = B + t.e * K * N;
      std::fill(acc.begin(), acc.begin() + m * N, 0.f);
      if (!g.trans_b) {
        // acc[r, :] += a[r, kk] * B[e, kk, :]: the weight row is contiguous.
        for (int64_t kk = 0; kk < K; ++kk) {
          for (int64_t j = 0; j < N; ++j) brow[j] = to_f32(Be[kk * N + j]);
          for (int64_t r = 0; r < m; ++r) {
            const float av = to_f32(A[(t.r0 + r) * K + kk]);
            float* out = acc.data() + r * N;
            for (int64_t j = 0; j < N; ++j) out[j] += av * brow[j];
          }
        }
      } else {
        // acc[r, j] = <a[r, :], B[e, j, :]>: both operands contiguous in K.
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t kk = 0; kk < K; ++kk) arow[kk] = to_f32(A[(t.r0 + r) * K + kk]);
          for (int64_t j = 0; j < N; ++j) {
            const T* w = Be + j * K;
            float s = 0.f;
            for (int64_t kk = 0; kk < K; ++kk) s += arow[kk] * to_f32(w[kk]);
            acc[r * N + j] = s;
          }
        }
      }
      if (g.bias) {
        const T* bias = static_cast<const T*>(g.bias) + t.e * N;
        for (int64_t j = 0; j < N; ++j) brow[j] = to_f32(bias[j]);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j < N; ++j) acc[r * N + j] += brow[j];
      }
      for (int64_t r = 0; r < m; ++r) store(t.r0 + r, acc.data() + r * N);
    }
  }
}

template <class T>
void gemm(const GroupedGemmArgs& g) {
  const int64_t N = g.n;
  T* C = static_cast<T*>(g.c);
  std::fill(C + g.offsets[g.experts] * N, C + g.rows * N, from_f32<T>(0.f));  // the bad-id bucket
  gemm<T>(g, [&](int64_t row, const float* acc) {
    for (int64_t j = 0; j < N; ++j) C[row * N + j] = from_f32<T>(acc[j]);
  });
}

// The same math as the GPU's fused epilogue: the gated activation from the
// float32 sums (bias included), one rounding.
template <class T>
void swiglu(const GroupedSwigluArgs& s) {
  const int64_t F = s.ffn;
  const GroupedGemmArgs g{s.dtype, s.x, s.w13, s.offsets, nullptr, s.rows, s.k, 2 * F, s.experts, s.trans_b, s.bias};
  T* act = static_cast<T*>(s.act);
  T* h = static_cast<T*>(s.h);
  const T zero = from_f32<T>(0.f);
  std::fill(act + s.offsets[s.experts] * F, act + s.rows * F, zero);
  if (h) std::fill(h + s.offsets[s.experts] * 2 * F, h + s.rows * 2 * F, zero);
  const int64_t gate_step = s.interleaved ? 2 : 1, up_at = s.interleaved ? 1 : F;
  gemm<T>(g, [&](int64_t row, const float* acc) {
    for (int64_t j = 0; j < F; ++j)
      act[row * F + j] = from_f32<T>(glu(acc[gate_step * j], acc[gate_step * j + up_at], s.activation, s.alpha,
                                         s.limit));
    if (h)
      for (int64_t j = 0; j < 2 * F; ++j) h[row * 2 * F + j] = from_f32<T>(acc[j]);
  });
}

template <class T>
void wgrad(const GroupedWgradArgs& g) {
  const int64_t K = g.k, N = g.n;
  const T* A = static_cast<const T*>(g.a);
  const T* DY = static_cast<const T*>(g.dy);
  T* DB = static_cast<T*>(g.db);
  // One task per (expert, row of A^T): dB[e, kk, :] = sum_r a[r, kk] * dy[r, :].
  const int64_t tasks = g.experts * K;
#pragma omp parallel if (g.rows * K * N > kCpuParallelGrain)
  {
    std::vector<float> acc(N);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t e = i / K, kk = i % K;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = g.offsets[e]; r < g.offsets[e + 1]; ++r) {
        const float av = to_f32(A[r * K + kk]);
        const T* dy = DY + r * N;
        for (int64_t j = 0; j < N; ++j) acc[j] += av * to_f32(dy[j]);
      }
      T* out = DB + e * K * N;
      if (!g.trans_b)
        for (int64_t j = 0; j < N; ++j) out[kk * N + j] = from_f32<T>(acc[j]);
      else
        for (int64_t j = 0; j < N; ++j) out[j * K + kk] = from_f32<T>(acc[j]);
    }
  }
}

template <class T>
void bias_grad(const GroupedBiasGradArgs& g) {
  const int64_t N = g.n;
  const T* DY = static_cast<const T*>(g.dy);
  T* DB = static_cast<T*>(g.db);
#pragma omp parallel if (g.rows * N > kCpuParallelGrain)
  {
    std::vector<float> acc(N);
#pragma omp for schedule(static)
    for (int64_t e = 0; e < g.experts; ++e) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = g.offsets[e]; r < g.offsets[e + 1]; ++r)
        for (int64_t j = 0; j < N; ++j) acc[j] += to_f32(DY[r * N + j]);
      for (int64_t j = 0; j < N; ++j) DB[e * N + j] = from_f32<T>(acc[j]);
    }
  }
}

}  // namespace

void grouped_bias_grad_cpu(const GroupedBiasGradArgs& a) {
  check(a);
  check_offsets(a.offsets, a.experts, a.rows);
  dispatch_dtype(a.dtype, [&](auto t) { bias_grad<decltype(t)>(a); });
}

void grouped_gemm_cpu(const GroupedGemmArgs& a) {
  check(a);
  check_offsets(a.offsets, a.experts, a.rows);
  dispatch_dtype(a.dtype, [&](auto t) { gemm<decltype(t)>(a); });
}

void grouped_swiglu_cpu(const GroupedSwigluArgs& a) {
  check(a);
  check_offsets(a.offsets, a.experts, a.rows);
  dispatch_dtype(a.dtype, [&](auto t) { swiglu<decltype(t)>(a); });
}

void grouped_wgrad_cpu(const GroupedWgradArgs& a) {
  check(a);
  check_offsets(a.offsets, a.experts, a.rows);
  dispatch_dtype(a.dtype, [&](auto t) { wgrad<decltype(t)>(a); });
}

}  // namespace mixkit
