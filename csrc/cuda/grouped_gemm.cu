// Grouped GEMM over moe_permute's rows (layout in common/grouped_gemm.h) for
// CUDA sm_80 and up, and its weight gradient.
//
// Forward (and the activation gradient, which is the same GEMM with the other
// weight layout): a 128x128x32 CTA tile, 4 warps of 64x64, bf16/fp16
// mma.sync.m16n8k16 with float32 accumulators, fragments read by ldmatrix
// from XOR-swizzled shared memory, two cp.async stages so the next K slice
// loads while the tensor cores work on the current one. sm_90a runs this
// same sm_80 kernel for now (no wgmma/TMA path yet), so Hopper gets
// Ampere-class throughput.
//
// Scheduling without a host sync: grid.x is an upper bound on the number of
// (expert, m-tile) pairs, ceil(rows / 128) + experts + 1, and grid.y the
// n-tiles. Each CTA walks the device-side offsets to find its expert and
// m-tile; slots past the last expert zero the rows after offsets[E] (the
// bad-id bucket), and the rest exit at once. So an empty expert costs one
// offsets walk, and the launch shape depends only on tensor shapes: the call
// captures in a CUDA graph.
//
// Weight gradient: a SIMT kernel (float32 FMA, 64x64 output tile per CTA,
// rows of the expert staged through shared memory). It is correct but not
// tensor-core fast; a transposed-A mma path is the next step.
//
// HIP: the inline PTX cannot compile for AMD, so the HIP build gets launchers
// that raise until issue 8 adds an MFMA kernel.
#include <algorithm>
#include <string>

#include "common/grouped_gemm.h"
#include "cuda/compat.cuh"

#if !defined(__HIPCC__)

#include "cuda/mma_sm80.cuh"

namespace mixkit {
namespace {

using namespace sm80;

constexpr int BM = 128, BN = 128, BK = 32;
constexpr int kThreads = 128;       // 4 warps in a 2x2 grid of 64x64 warp tiles
constexpr int kStages = 2;
constexpr int kWgradTile = 64;      // wgrad: 64x64 outputs per CTA
constexpr int kWgradRows = 16;      // rows staged per step
constexpr int kWgradThreads = 256;  // 4x4 outputs per thread

// Shared-memory tiles, in 16-byte chunks of 8 elements. A row of 32 K
// elements is 4 chunks (64 bytes); chunk c of row r sits at c ^ ((r >> 1) & 3)
// so that the 8 rows one ldmatrix reads land in 8 distinct 16-byte bank
// groups. The [BK][BN] tile (weights stored (K, N)) has 16 chunks per row and
// swizzles with c ^ (r & 7) for the same reason.
__device__ __forceinline__ int swz_k(int r, int c) { return r * BK + ((c ^ ((r >> 1) & 3)) << 3); }
__device__ __forceinline__ int swz_n(int r, int c) { return r * BN + ((c ^ (r & 7)) << 3); }

// Which expert and m-tile CTA slot `slot` computes: walks the offsets (at
// most 256 experts, read from L1/L2 by every thread alike). Returns false for
// slots with no GEMM work; `row0 / row1` then bound the bad-id rows this slot
// zeroes (empty when there are none).
__device__ __forceinline__ bool find_tile(const int64_t* off, int experts, int64_t rows, int64_t slot, int& expert,
                                          int64_t& row0, int64_t& row1) {
  for (int e = 0; e < experts; ++e) {
    const int64_t begin = off[e], end = off[e + 1];
    const int64_t tiles = (end - begin + BM - 1) / BM;
    if (slot < tiles) {
      expert = e;
      row0 = begin + slot * BM;
      row1 = min(row0 + BM, end);
      return true;
    }
    slot -= tiles;
  }
  row0 = off[experts] + slot * BM;
  row1 = min(row0 + BM, rows);
  return false;
}

// ============================== kernels ======================================

template <class T, bool TRANS_B>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(GroupedGemmArgs g) {
  __shared__ __align__(128) T As[kStages][BM * BK];
  __shared__ __align__(128) T Bs[kStages][BN * BK];

  const int64_t K = g.k, N = g.n;
  const int64_t n0 = int64_t(blockIdx.y) * BN;
  int expert = 0;
  int64_t row0, row1;
  T* C = static_cast<T*>(g.c);
  if (!find_tile(g.offsets, int(g.experts), g.rows, blockIdx.x, expert, row0, row1)) {
    // Rows after offsets[E] have no expert: zero our BN columns of them.
    const int64_t width = min(int64_t(BN), N - n0);
    for (int64_t i = threadIdx.x; i < (row1 - row0) * width; i += kThreads)
      C[(row0 + i / width) * N + n0 + i % width] = from_f32<T>(0.f);
    return;
  }

  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b) + int64_t(expert) * K * N;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = (warp & 1) * 64, wn = (warp >> 1) * 64;

  // One K slice into stage s: 512 16-byte chunks of A and 512 of B, four of
  // each per thread. K and N are multiples of 8, so a chunk is all in or all out.
  auto load = [&](int s, int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx >> 2, c = idx & 3;
      const int64_t row = row0 + r, kk = k0 + c * 8;
      const bool ok = row < row1 && kk < K;
      cp_async16(&As[s][swz_k(r, c)], ok ? A + row * K + kk : A, ok);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = tid + i * kThreads;
      if (TRANS_B) {  // B[e] is (N, K): rows n, 4 chunks of K
        const int r = idx >> 2, c = idx & 3;
        const int64_t n = n0 + r, kk = k0 + c * 8;
        const bool ok = n < N && kk < K;
        cp_async16(&Bs[s][swz_k(r, c)], ok ? B + n * K + kk : B, ok);
      } else {  // B[e] is (K, N): rows k, 16 chunks of N
        const int r = idx >> 4, c = idx & 15;
        const int64_t kk = k0 + r, n = n0 + c * 8;
        const bool ok = kk < K && n < N;
        cp_async16(&Bs[s][swz_n(r, c)], ok ? B + kk * N + n : B, ok);
      }
    }
    cp_async_commit();
  };

  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  const int64_t ktiles = (K + BK - 1) / BK;
  load(0, 0);
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int s = int(kt & 1);
    if (kt + 1 < ktiles) {
      load(s ^ 1, (kt + 1) * BK);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // A fragments: lanes 0-15 address rows 0-15 at k chunk 2ks, lanes
      // 16-31 the same rows at chunk 2ks + 1 (mma's a0..a3 order).
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int r = wm + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], &As[s][swz_k(r, ks * 2 + (lane >> 4))]);
      }
      // B fragments for two n8 tiles per ldmatrix: {b0, b1} of tile 2p and
      // {b0, b1} of tile 2p + 1.
      uint32_t bfr[8][2];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        uint32_t r4[4];
        if (TRANS_B) {
          const int n = wn + p * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(r4, &Bs[s][swz_k(n, ks * 2 + ((lane >> 3) & 1))]);
        } else {
          const int k = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          ldmatrix_x4_trans(r4, &Bs[s][swz_n(k, (wn + p * 16) / 8 + (lane >> 4))]);
        }
        bfr[2 * p][0] = r4[0];
        bfr[2 * p][1] = r4[1];
        bfr[2 * p + 1][0] = r4[2];
        bfr[2 * p + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) Mma<T>::run(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
    }
    __syncthreads();  // stage s is refilled by the next iteration's load
  }

  // Epilogue: each thread owns pairs of adjacent columns; round once and
  // store them as one 32-bit word (N % 8 == 0 keeps pairs whole and aligned).
  const int g8 = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = row0 + wm + mi * 16 + g8 + half * 8;
      if (row >= row1) continue;
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
        const int64_t col = n0 + wn + ni * 8 + c2;
        if (col >= N) continue;
        const T lo = from_f32<T>(acc[mi][ni][half * 2]), hi = from_f32<T>(acc[mi][ni][half * 2 + 1]);
        *reinterpret_cast<uint32_t*>(C + row * N + col) = uint32_t(lo.bits) | (uint32_t(hi.bits) << 16);
      }
    }
  }
}

// dB[e] tile (k0.., j0..) = sum over the expert's rows r of a[r, k] * dy[r, j];
// written at [k][j] or, with TRANS_B, at [j][k]. Empty experts write zeros.
template <class T, bool TRANS_B>
__global__ void __launch_bounds__(kWgradThreads) grouped_wgrad_kernel(GroupedWgradArgs g) {
  __shared__ float as[kWgradRows][kWgradTile];
  __shared__ float ds[kWgradRows][kWgradTile];
  const int64_t K = g.k, N = g.n;
  const int64_t k0 = int64_t(blockIdx.x) * kWgradTile, j0 = int64_t(blockIdx.y) * kWgradTile;
  const int e = blockIdx.z;
  const int64_t begin = g.offsets[e], end = g.offsets[e + 1];
  const T* A = static_cast<const T*>(g.a);
  const T* DY = static_cast<const T*>(g.dy);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // outputs k = ty*4.., j = tx*4..
  float acc[4][4] = {};
  for (int64_t r0 = begin; r0 < end; r0 += kWgradRows) {
    for (int i = threadIdx.x; i < kWgradRows * kWgradTile; i += kWgradThreads) {
      const int rr = i / kWgradTile, cc = i % kWgradTile;
      const int64_t r = r0 + rr;
      as[rr][cc] = (r < end && k0 + cc < K) ? to_f32(A[r * K + k0 + cc]) : 0.f;
      ds[rr][cc] = (r < end && j0 + cc < N) ? to_f32(DY[r * N + j0 + cc]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int rr = 0; rr < kWgradRows; ++rr) {
      float av[4], dv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = as[rr][ty * 4 + i];
        dv[i] = ds[rr][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], dv[j], acc[i][j]);
    }
    __syncthreads();
  }
  T* out = static_cast<T*>(g.db) + int64_t(e) * K * N;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t k = k0 + ty * 4 + i;
    if (k >= K) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = j0 + tx * 4 + j;
      if (n >= N) continue;
      out[TRANS_B ? n * K + k : k * N + n] = from_f32<T>(acc[i][j]);
    }
  }
}

// ============================== launchers ====================================

gpuStream_t as_stream(void* s) { return static_cast<gpuStream_t>(s); }

void check_gpu_shape(int64_t k, int64_t n, std::initializer_list<const void*> ptrs) {
  require(k % 8 == 0 && n % 8 == 0,
          "the GPU grouped GEMM needs K and N_out to be multiples of 8, got K = " + std::to_string(k) +
              ", N_out = " + std::to_string(n));
  for (const void* p : ptrs) require(p == nullptr || aligned_to(p, 16), "tensor pointers must be 16-byte aligned");
}

}  // namespace

void grouped_gemm_gpu(const GroupedGemmArgs& g, int device, void* stream) {
  check(g);
  require(g.dtype != DType::f32, "the GPU grouped GEMM takes bfloat16 or float16 (float32 runs on the CPU only)");
  check_gpu_shape(g.k, g.n, {g.a, g.b, g.c});
  require((g.n + BN - 1) / BN <= 65535, "N_out too large for the grid (at most 65535 * 128)");
  if (g.rows == 0) return;
  DeviceGuard guard(device);
  const dim3 grid(unsigned((g.rows + BM - 1) / BM + g.experts + 1), unsigned((g.n + BN - 1) / BN));
  auto launch = [&](auto t) {
    using T = decltype(t);
    if (g.trans_b)
      grouped_gemm_kernel<T, true><<<grid, kThreads, 0, as_stream(stream)>>>(g);
    else
      grouped_gemm_kernel<T, false><<<grid, kThreads, 0, as_stream(stream)>>>(g);
  };
  if (g.dtype == DType::bf16) launch(bf16{});
  else launch(f16{});
  gpu_check(gpuGetLastError(), "launching grouped_gemm_kernel");
}

void grouped_wgrad_gpu(const GroupedWgradArgs& g, int device, void* stream) {
  check(g);
  require(g.dtype != DType::f32, "the GPU grouped wgrad takes bfloat16 or float16 (float32 runs on the CPU only)");
  require((g.n + kWgradTile - 1) / kWgradTile <= 65535, "N_out too large for the grid");
  DeviceGuard guard(device);
  const dim3 grid(unsigned((g.k + kWgradTile - 1) / kWgradTile), unsigned((g.n + kWgradTile - 1) / kWgradTile),
                  unsigned(g.experts));
  auto launch = [&](auto t) {
    using T = decltype(t);
    if (g.trans_b)
      grouped_wgrad_kernel<T, true><<<grid, kWgradThreads, 0, as_stream(stream)>>>(g);
    else
      grouped_wgrad_kernel<T, false><<<grid, kWgradThreads, 0, as_stream(stream)>>>(g);
  };
  if (g.dtype == DType::bf16) launch(bf16{});
  else launch(f16{});
  gpu_check(gpuGetLastError(), "launching grouped_wgrad_kernel");
}

}  // namespace mixkit

#else  // __HIPCC__

namespace mixkit {

void grouped_gemm_gpu(const GroupedGemmArgs& g, int, void*) {
  check(g);
  throw std::runtime_error("mixkit: grouped_gemm is not implemented on HIP yet (the CUDA kernel uses mma.sync PTX; "
                           "an MFMA kernel is planned in issue 8); run it on the CPU");
}

void grouped_wgrad_gpu(const GroupedWgradArgs& g, int, void*) {
  check(g);
  throw std::runtime_error("mixkit: grouped_gemm's weight gradient is not implemented on HIP yet (issue 8)");
}

}  // namespace mixkit

#endif  // __HIPCC__
