// Grouped GEMM forward for Hopper (sm_90a only): the contract of
// grouped_gemm.cu's sm_80 kernel (layout in common/grouped_gemm.h), on wgmma.
// Included only by the sm_90a object library (CMakeLists.txt); grouped_gemm.cu
// picks it at run time on capability 9.0.
//
// A CTA computes a BM x BN = 128 x 128 tile with two warpgroups, each issuing
// m64n128k16 wgmmas for its 64 rows with A (64 x 16) and B (16 x 128) read
// from shared memory. K runs in BK = 64 slices: one slice of a row is 128
// bytes, exactly one row of the 128-byte swizzle, so the tiles are
//   A   [128 rows][64 k]                       K-major (like attention's Q)
//   B   trans_b, w (N, K): [128 n][64 k]       K-major (like attention's K)
//       !trans_b, w (K, N): 2 column blocks of [64 k][64 n], MN-major
//       (like attention's V: the wgmma's transpose-B bit, LBO = 64 * 128 B)
// with 16-byte chunk c of a 128-byte row r at chunk c ^ (r % 8). Descriptor
// values and the reasoning are in wgmma_sm90.cuh.
//
// Pipeline: kStages = 3 slices in flight through cp.async (all 256 threads
// load; rows past the expert's end and the K and N tails are zero-filled by
// src-size 0, so they add 0 * 0). 3 x 32 KB + 1 KB for the 1024-byte
// alignment = 97 KB, so two CTAs fit an SM (228 KB) and one CTA's barrier,
// epilogue and offsets walk hide under the other's wgmmas; __launch_bounds__
// (256, 2) caps registers at 128 for that (64 accumulators per thread). Per
// slice: wait for it, one barrier, issue its 4 wgmmas, then issue the loads of
// slice kt + 2 into the stage slice kt - 1 used (every warpgroup waited out
// its wgmmas before the barrier) while the tensor cores work, then wait.
// Not done (CUTLASS's sm90 kernels do): TMA loads from a producer warp with
// mbarriers, keeping one wgmma group in flight across the barrier, and a
// persistent tile scheduler.
//
// Scheduling, the bad-id rows and the fused SwiGLU epilogues are the sm_80
// kernel's (grouped_gemm.cu): grid.x = ceil(rows / 128) + experts + 1 slots
// walking the device offsets (no host sync, graph-capturable), grid.y the
// n-tiles. With kEpiSwiglu the CTA owns 64 output columns n0..: B tile rows
// 0-63 are w13's gate rows n0.., rows 64-127 its up rows F + n0.., so
// accumulator column j < 64 is gate and j + 64 the matching up: d[4i + e] and
// d[32 + 4i + e] of the same thread. (kEpiSwiglu without TRANS_B, w13 stored
// (E, K, 2F) as gate columns then up columns, would work the same way with
// the two MN-major column blocks as gate and up; no caller needs it, so it
// is not instantiated.) kEpiGluPairs (interleaved gate/up columns, gpt-oss)
// is the plain tile over h's 2F columns: a thread's pair d[4i + 2 half],
// d[4i + 2 half + 1] is one (gate, up) pair.
#pragma once

#include <cstdint>

#include "common/grouped_gemm.h"
#include "cuda/compat.cuh"
#include "cuda/mma_sm80.cuh"
#include "cuda/wgmma_sm90.cuh"

namespace mixkit {
namespace sm90 {
namespace gg {

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int BM = 64 * kWarpgroups, BN = 128, BK = 64;
constexpr int kStages = 3;
constexpr int kTileBytes = BM * BK * 2;  // A and B slices are both 16 KB
static_assert(BN * BK * 2 == kTileBytes, "A and B slices share one size");
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + the round-up to 1024

// Byte offset of 16-byte chunk c (of 8) of row r in a [rows][64] block with
// the 128-byte swizzle. Eight consecutive threads write one row's eight
// chunks: eight distinct 16-byte bank groups, no conflict.
__device__ __forceinline__ uint32_t swz128(int r, int c) { return uint32_t(r * 128 + (((c ^ r) & 7) << 4)); }


template <class T, bool TRANS_B, int EPI>
__global__ void __launch_bounds__(kThreads, 2) grouped_gemm_kernel(GroupedGemmArgs g, T* h, GluParams glu_p) {
  constexpr bool SWIGLU = EPI == kEpiSwiglu;
  constexpr int kOutCols = SWIGLU ? BN / 2 : BN;
  MIXKIT_DYNAMIC_SMEM(smem_raw, 16);
  // The swizzle is a function of address bits 4-9: tiles start on 1024-byte
  // boundaries, rounded up at run time (see flash_attn_fwd_sm90.cuh).
  unsigned char* smem = smem_raw + ((1024u - (sm80::smem_addr(smem_raw) & 1023u)) & 1023u);

  const int64_t K = g.k, N = g.n;  // with SWIGLU, N = F; with pairs, N = 2F
  const int64_t n0 = int64_t(blockIdx.y) * kOutCols;
  int expert = 0;
  int64_t row0, row1;
  T* C = static_cast<T*>(g.c);
  if (!find_tile<BM>(g.offsets, int(g.experts), g.rows, blockIdx.x, expert, row0, row1)) {
    // Rows after offsets[E] have no expert: zero our columns of them.
    zero_bad_rows<T, EPI>(C, h, row0, row1, n0, min(int64_t(kOutCols), N - n0), N, threadIdx.x, kThreads);
    return;
  }

  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b) + int64_t(expert) * K * N * (SWIGLU ? 2 : 1);
  const T* bias = g.bias ? static_cast<const T*>(g.bias) + int64_t(expert) * N * (SWIGLU ? 2 : 1) : nullptr;
  auto bias_at = [&](int64_t col) { return bias ? to_f32(bias[col]) : 0.f; };
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const uint32_t smem_base = sm80::smem_addr(smem);

  // Slice k0 .. k0 + 63 into stage s: 1024 chunks of A and 1024 of B, four
  // of each per thread. K and N are multiples of 8: a chunk is all in or out.
  auto load = [&](int s, int64_t k0) {
    unsigned char* As = smem + s * kStageBytes;
    unsigned char* Bs = As + kTileBytes;
#pragma unroll
    for (int i = 0; i < BM * BK / 8 / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx >> 3, c = idx & 7;
      const int64_t row = row0 + r, kk = k0 + c * 8;
      const bool ok = row < row1 && kk < K;
      sm80::cp_async16(As + swz128(r, c), ok ? A + row * K + kk : A, ok);
    }
#pragma unroll
    for (int i = 0; i < BN * BK / 8 / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      if constexpr (TRANS_B) {  // w (N, K): tile rows n, 8 chunks of k
        const int r = idx >> 3, c = idx & 7;
        // SWIGLU: tile rows 0-63 are gate rows n0.., 64-127 up rows F + n0..
        const int64_t n = n0 + (SWIGLU ? r & (kOutCols - 1) : r), kk = k0 + c * 8;
        const int64_t wrow = SWIGLU && r >= kOutCols ? N + n : n;
        const bool ok = n < N && kk < K;
        sm80::cp_async16(Bs + swz128(r, c), ok ? B + wrow * K + kk : B, ok);
      } else {  // w (K, N): tile rows k, 16 chunks of n in two column blocks
        const int r = idx >> 4, c = idx & 15;
        // SWIGLU (w13 (K, 2F)): block 0 is gate columns n0.., block 1 up
        // columns F + n0..
        const int64_t kk = k0 + r, n = n0 + (SWIGLU ? (c & 7) : c) * 8;
        const int64_t wcol = SWIGLU && c >= 8 ? N + n : n;
        // mutant-equivalent(bound): n and N are multiples of 8, so n < N - 1
        // holds exactly when n < N does.
        const bool n_ok = n < N;
        const bool ok = kk < K && n_ok;
        sm80::cp_async16(Bs + (c >> 3) * (BK * 128) + swz128(r, c), ok ? B + kk * N * (SWIGLU ? 2 : 1) + wcol : B, ok);
      }
    }
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  const int64_t ktiles = (K + BK - 1) / BK;
  // One commit group per slice, empty ones included, so wait_group counts
  // slices.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load(s, int64_t(s) * BK);
    sm80::cp_async_commit();
  }
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int s = int(kt % kStages);
    // After the barrier slice kt has landed for every thread, and every
    // warpgroup has waited out its wgmmas of slice kt - 1.
    sm80::cp_async_wait<kStages - 2>();
    fence_proxy_async();
    __syncthreads();

    const uint32_t a_addr = smem_base + s * kStageBytes + wg * 64 * 128;
    const uint32_t b_addr = smem_base + s * kStageBytes + kTileBytes;
    pin(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // A: k step ks is byte 32 ks of each 128-byte row. B K-major the
      // same; B MN-major: k rows 16 ks.. of both column blocks (LBO apart).
      const uint64_t da = smem_desc(a_addr + ks * 32, 16, 1024);
      const uint64_t db = TRANS_B ? smem_desc(b_addr + ks * 32, 16, 1024)
                                  : smem_desc(b_addr + ks * 16 * 128, BK * 128, 1024);
      wgmma_ss<T, BN, !TRANS_B>(acc, da, db, 1);
    }
    wgmma_commit();

    // Refill the stage slice kt - 1 used while the tensor cores work.
    const int64_t next = kt + kStages - 1;
    if (next < ktiles) load(int(next % kStages), next * BK);
    sm80::cp_async_commit();

    wgmma_wait<0>();
    pin(acc);
  }
  // mutant-equivalent(barrier): the wait at the top of the last iteration
  // covered every group up to slice ktiles - 1; the groups committed after it
  // (and the prologue's past ktiles) load nothing, so no copy is in flight.
  sm80::cp_async_wait<0>();  // only empty groups can remain; leave none behind

  // Epilogue: thread (warp, lane) of warpgroup wg holds rows
  // 64 wg + 16 warp + g (+ 8) and columns 8i + c2 (+ 1): round once and store
  // each pair as one 32-bit word (N % 8 == 0 keeps pairs whole and aligned).
  const int g8 = lane >> 2, c2 = (lane & 3) * 2;
  auto store2 = [](T* p, float lo, float hi) {
    *reinterpret_cast<uint32_t*>(p) = uint32_t(from_f32<T>(lo).bits) | (uint32_t(from_f32<T>(hi).bits) << 16);
  };
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + wg * 64 + warp * 16 + g8 + half * 8;
    if (row >= row1) continue;
#pragma unroll
    for (int i = 0; i < kOutCols / 8; ++i) {
      const int64_t col = n0 + i * 8 + c2;
      if (col >= N) continue;
      const float* d = &acc[4 * i + 2 * half];
      if constexpr (SWIGLU) {
        const float* u = &acc[BN / 4 + 4 * i + 2 * half];  // column j + 64
        const float gate[2] = {d[0] + bias_at(col), d[1] + bias_at(col + 1)};
        const float up[2] = {u[0] + bias_at(N + col), u[1] + bias_at(N + col + 1)};
        // As the sm_80 kernel: float32, one rounding.
        store2(C + row * N + col, glu(gate[0], up[0], glu_p.activation, glu_p.alpha, glu_p.limit),
               glu(gate[1], up[1], glu_p.activation, glu_p.alpha, glu_p.limit));
        if (h) {
          store2(h + row * 2 * N + col, gate[0], gate[1]);
          store2(h + row * 2 * N + N + col, up[0], up[1]);
        }
      } else if constexpr (EPI == kEpiGluPairs) {
        const float gate = d[0] + bias_at(col), up = d[1] + bias_at(col + 1);  // col is even
        C[row * (N / 2) + col / 2] = from_f32<T>(glu(gate, up, glu_p.activation, glu_p.alpha, glu_p.limit));
        if (h) store2(h + row * N + col, gate, up);
      } else {
        store2(C + row * N + col, d[0] + bias_at(col), d[1] + bias_at(col + 1));
      }
    }
  }
}

}  // namespace gg

// Same checks, grid and semantics as grouped_gemm.cu's launchers, which call
// this on capability 9.0 after their own argument checks. kEpiSwiglu and
// kEpiGluPairs: g is the forward-GEMM view of GroupedSwigluArgs (b = w13,
// n = ffn or 2 ffn, c = act, trans_b, bias) and h the pre-activations or null.
template <class T, bool TRANS_B, int EPI>
void grouped_gemm(const GroupedGemmArgs& g, gpuStream_t stream, T* h, GluParams glu) {
  if (g.rows == 0) return;
  constexpr int kOutCols = EPI == kEpiSwiglu ? gg::BN / 2 : gg::BN;
  const dim3 grid(unsigned((g.rows + gg::BM - 1) / gg::BM + g.experts + 1),
                  unsigned((g.n + kOutCols - 1) / kOutCols));
  auto kernel = gg::grouped_gemm_kernel<T, TRANS_B, EPI>;
  // Above 48 KB of dynamic shared memory needs the attribute; cheap, and
  // allowed during graph capture.
  gpu_check(gpuSetMaxDynamicSharedMemory(kernel, gg::kSmemBytes), "configuring the sm90 grouped_gemm_kernel");
  gpu_launch(kernel, grid, gg::kThreads, gg::kSmemBytes, stream, g, h, glu);
  gpu_check(gpuGetLastError(), "launching the sm90 grouped_gemm_kernel");
}

}  // namespace sm90
}  // namespace mixkit
