// Grouped GEMM over moe_permute's rows (layout in common/grouped_gemm.h) for
// CUDA sm_80 and up, and its weight gradient.
//
// Forward (and the activation gradient, which is the same GEMM with the other
// weight layout): a 128x128x32 CTA tile, 4 warps of 64x64, bf16/fp16
// mma.sync.m16n8k16 with float32 accumulators, fragments read by ldmatrix
// from XOR-swizzled shared memory, two cp.async stages so the next K slice
// loads while the tensor cores work on the current one. On capability 9.0
// the forward and the fused SwiGLU run the wgmma kernel of
// grouped_gemm_sm90.cuh instead (same schedule and contract), unless
// MIXKIT_FORCE_SM80 is set; the weight gradient stays on this sm_80 path.
//
// Scheduling without a host sync: grid.x is an upper bound on the number of
// (expert, m-tile) pairs, ceil(rows / 128) + experts + 1, and grid.y the
// n-tiles. Each CTA walks the device-side offsets to find its expert and
// m-tile; slots past the last expert zero the rows after offsets[E] (the
// bad-id bucket), and the rest exit at once. So an empty expert costs one
// offsets walk, and the launch shape depends only on tensor shapes: the call
// captures in a CUDA graph.
//
// Fused SwiGLU (grouped_swiglu_gpu): with w13's gate and up blocks
// (Mixtral), the forward kernel with EPI = kEpiSwiglu, 64 output columns per
// CTA whose gate and up rows of w13 fill the 128-row weight tile; with
// interleaved (gate, up) columns (gpt-oss, either weight layout), the plain
// forward tile over h's 2F columns with EPI = kEpiGluPairs: the mma's
// accumulator pairs are adjacent columns, i.e. one (gate, up) pair, so each
// thread computes its outputs alone (details at the kernel). The optional
// bias is added in float32 in every epilogue.
//
// Weight gradient: the same 128x128 tile, warps and mma, with the reduction
// running over the expert's rows (BK = 32 per step) instead of over K: both
// operands are row-major in that reduction index, so both go through
// ldmatrix .trans (details at grouped_wgrad_kernel). grid.z = experts.
//
// HIP: the inline PTX cannot compile for AMD; the HIP build runs the MFMA
// kernels of grouped_gemm_mfma.cuh (forward, fused SwiGLU, weight gradient).
#include <algorithm>
#include <initializer_list>
#include <string>

#include "common/grouped_gemm.h"
#include "cuda/compat.cuh"

namespace mixkit {
namespace {

// The GPU kernels (CUDA and HIP) move 16-byte chunks: K and N multiples of 8,
// aligned pointers.
void check_gpu_shape(int64_t k, int64_t n, std::initializer_list<const void*> ptrs) {
  require(k % 8 == 0 && n % 8 == 0,
          "the GPU grouped GEMM needs K and N_out to be multiples of 8, got K = " + std::to_string(k) +
              ", N_out = " + std::to_string(n));
  for (const void* p : ptrs) require(p == nullptr || aligned_to(p, 16), "tensor pointers must be 16-byte aligned");
}

// dbias[e, n]: one thread per (expert, column), a block per 256 columns of
// one expert; the thread walks the expert's rows (consecutive threads read
// consecutive columns of a row) and sums in float32: deterministic. Bias
// gradients are (E, N), small next to the weight gradient.
constexpr int kBiasThreads = 256;

template <class T>
__global__ void __launch_bounds__(kBiasThreads) grouped_bias_grad_kernel(GroupedBiasGradArgs g) {
  const int64_t col = int64_t(blockIdx.x) * kBiasThreads + threadIdx.x;
  const int e = blockIdx.y;
  if (col >= g.n) return;
  const T* dy = static_cast<const T*>(g.dy);
  float acc = 0.f;
  for (int64_t r = g.offsets[e]; r < g.offsets[e + 1]; ++r) acc += to_f32(dy[r * g.n + col]);
  static_cast<T*>(g.db)[e * g.n + col] = from_f32<T>(acc);
}

}  // namespace

// Empty experts write their zeros: no early return for rows == 0.
void grouped_bias_grad_gpu(const GroupedBiasGradArgs& g, int device, void* stream) {
  check(g);
  require(g.dtype != DType::f32, "the GPU grouped bias gradient takes bfloat16 or float16 (float32 runs on the CPU)");
  require((g.n + kBiasThreads - 1) / kBiasThreads <= 0x7fffffff, "N_out too large for the grid");
  DeviceGuard guard(device);
  const dim3 grid(unsigned((g.n + kBiasThreads - 1) / kBiasThreads), unsigned(g.experts));
  const auto s = static_cast<gpuStream_t>(stream);
  if (g.dtype == DType::bf16) gpu_launch(grouped_bias_grad_kernel<bf16>, grid, kBiasThreads, 0, s, g);
  else gpu_launch(grouped_bias_grad_kernel<f16>, grid, kBiasThreads, 0, s, g);
  gpu_check(gpuGetLastError(), "launching grouped_bias_grad_kernel");
}

}  // namespace mixkit

#if !MIXKIT_AMD

#include "cuda/mma_sm80.cuh"

#ifdef MIXKIT_WITH_SM90
namespace mixkit::sm90 {  // grouped_gemm_sm90.cuh, built for sm_90a only (CMakeLists.txt)
template <class T, bool TRANS_B, int EPI>
void grouped_gemm(const GroupedGemmArgs& g, gpuStream_t stream, T* h, GluParams glu);
}
#endif

namespace mixkit {
namespace {

using namespace sm80;

constexpr int BM = 128, BN = 128, BK = 32;
constexpr int kThreads = 128;       // 4 warps in a 2x2 grid of 64x64 warp tiles
constexpr int kStages = 2;

// Shared-memory tiles, in 16-byte chunks of 8 elements. A row of 32 K
// elements is 4 chunks (64 bytes); chunk c of row r sits at c ^ ((r >> 1) & 3)
// so that the 8 rows one ldmatrix reads land in 8 distinct 16-byte bank
// groups. The [BK][BN] tile (weights stored (K, N)) has 16 chunks per row and
// swizzles with c ^ (r & 7) for the same reason.
__device__ __forceinline__ int swz_k(int r, int c) { return r * BK + ((c ^ ((r >> 1) & 3)) << 3); }
__device__ __forceinline__ int swz_n(int r, int c) { return r * BN + ((c ^ (r & 7)) << 3); }


// ============================== kernels ======================================

// kEpiSwiglu (with TRANS_B; g.b = w13 (E, 2F, K), g.n = F, g.c = act
// (rows, F), h = (rows, 2F) or null): the CTA owns BN / 2 = 64 output columns
// n0.. and stages w13's gate rows n0.. as Bs rows 0-63 and its up rows F + n0..
// as rows 64-127, so the main loop is the plain one. Each warp's 64 columns
// are 32 gate then the same 32 up columns (acc[][0..3] and acc[][4..7]), so
// one thread holds gate and up of the same outputs: the activation in float32
// in the epilogue, one rounding, and the register budget of the 128-wide tile.
// kEpiGluPairs (interleaved w13, g.n = 2F, g.c = act (rows, F), h (rows, 2F)):
// the plain tile; a thread's accumulator pair (c2, c2 + 1) is gate and up of
// act column (col / 2), stored as one 16-bit value.
template <class T, bool TRANS_B, int EPI>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(GroupedGemmArgs g, T* h, GluParams glu_p) {
  constexpr bool SWIGLU = EPI == kEpiSwiglu;
  static_assert(!SWIGLU || TRANS_B, "the fused SwiGLU reads w13 in nn.Linear's (2F, K) layout");
  constexpr int kOutCols = SWIGLU ? BN / 2 : BN;
  __shared__ __align__(128) T As[kStages][BM * BK];
  __shared__ __align__(128) T Bs[kStages][BN * BK];

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
        // SWIGLU: tile rows 0-63 are gate rows n0.., 64-127 up rows F + n0..
        const int64_t n = n0 + (SWIGLU ? r & (kOutCols - 1) : r), kk = k0 + c * 8;
        const int64_t wrow = SWIGLU && r >= kOutCols ? N + n : n;
        const bool ok = n < N && kk < K;
        cp_async16(&Bs[s][swz_k(r, c)], ok ? B + wrow * K + kk : B, ok);
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
          // SWIGLU: p = 0, 1 read gate tile rows, p = 2, 3 the matching up rows.
          const int nb = SWIGLU ? (p >> 1) * kOutCols + (warp >> 1) * 32 + (p & 1) * 16 : wn + p * 16;
          const int n = nb + (lane & 7) + ((lane >> 4) << 3);
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
  auto store2 = [](T* p, float lo, float hi) {
    *reinterpret_cast<uint32_t*>(p) = uint32_t(from_f32<T>(lo).bits) | (uint32_t(from_f32<T>(hi).bits) << 16);
  };
  // With SWIGLU a warp's 64 columns are 32 gate then the same 32 up
  // columns (ni and ni + 4), so 4 column steps; otherwise 8.
  constexpr int kSteps = SWIGLU ? 4 : 8;
  const int64_t wcol = SWIGLU ? (warp >> 1) * 32 : wn;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = row0 + wm + mi * 16 + g8 + half * 8;
      if (row >= row1) continue;
#pragma unroll
      for (int ni = 0; ni < kSteps; ++ni) {
        const int64_t col = n0 + wcol + ni * 8 + c2;
        if (col >= N) continue;
        const float v0 = acc[mi][ni][half * 2] + bias_at(col), v1 = acc[mi][ni][half * 2 + 1] + bias_at(col + 1);
        if constexpr (SWIGLU) {
          const float u0 = acc[mi][ni + 4][half * 2] + bias_at(N + col);
          const float u1 = acc[mi][ni + 4][half * 2 + 1] + bias_at(N + col + 1);
          store2(C + row * N + col, glu(v0, u0, glu_p.activation, glu_p.alpha, glu_p.limit),
                 glu(v1, u1, glu_p.activation, glu_p.alpha, glu_p.limit));
          if (h) {
            store2(h + row * 2 * N + col, v0, v1);
            store2(h + row * 2 * N + N + col, u0, u1);
          }
        } else if constexpr (EPI == kEpiGluPairs) {  // col even: v0 is gate j = col / 2, v1 its up
          C[row * (N / 2) + col / 2] = from_f32<T>(glu(v0, v1, glu_p.activation, glu_p.alpha, glu_p.limit));
          if (h) store2(h + row * N + col, v0, v1);
        } else {
          store2(C + row * N + col, v0, v1);
        }
      }
    }
  }
}

// dB[e] tile = A_e^T dY_e over the expert's rows, on the tensor cores. The
// output tile is BM x BN = 128 K-indices x 128 N-columns, 4 warps of 64x64 as
// in the forward; the mma's k dimension is the row index r, stepped BK = 32
// rows at a time. Both operands are row-major in r: A as [r][K index] and dY
// as [r][n], so both stage as [BK][128] tiles with the swz_n swizzle and both
// are read with ldmatrix .trans. For A (the mma's m x k operand, m = K index)
// the .trans turns the stored [k][m] 8x8 blocks into the row-major fragments
// mma wants; the 4 matrices of an x4 go m-block-first (a0: m 0-7 / k 0-7,
// a1: m 8-15, a2: k 8-15, a3: both), where the forward's B operand goes
// k-block-first. Rows past the expert's end load as zeros (cp.async src-size
// 0), so they add nothing; an empty expert runs no step and writes zeros.
template <class T, bool TRANS_B>
__global__ void __launch_bounds__(kThreads) grouped_wgrad_kernel(GroupedWgradArgs g) {
  static_assert(BM == BN, "A and dY tiles share the swz_n layout");
  // The transposed store stages the 128 x 128 output as [n][K index] with 8
  // elements of padding per row (272-byte rows: the pair-wise writes hit 16
  // distinct banks, the 16-byte reads are conflict-free), reusing the
  // operand stages' memory once the main loop is done.
  constexpr int kLdT = BM + 8;
  constexpr int kOperands = kStages * 2 * BK * BM;
  constexpr int kSmem = kOperands > BN * kLdT ? kOperands : BN * kLdT;
  __shared__ __align__(128) T smem[kSmem];

  const int64_t K = g.k, N = g.n;
  const int64_t m0 = int64_t(blockIdx.x) * BM, n0 = int64_t(blockIdx.y) * BN;
  const int e = blockIdx.z;
  const int64_t begin = g.offsets[e], end = g.offsets[e + 1];
  const T* A = static_cast<const T*>(g.a);
  const T* DY = static_cast<const T*>(g.dy);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = (warp & 1) * 64, wn = (warp >> 1) * 64;
  auto As = [&](int s) { return smem + s * BK * BM; };
  auto Bs = [&](int s) { return smem + (kStages + s) * BK * BN; };

  // BK rows from r0 into stage s: 512 16-byte chunks of each operand, four
  // per thread. K and N are multiples of 8, so a chunk is all in or all out.
  auto load = [&](int s, int64_t r0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx >> 4, c = idx & 15;
      const int64_t row = r0 + r, kk = m0 + c * 8, nn = n0 + c * 8;
      const bool ok_a = row < end && kk < K, ok_b = row < end && nn < N;
      cp_async16(&As(s)[swz_n(r, c)], ok_a ? A + row * K + kk : A, ok_a);
      cp_async16(&Bs(s)[swz_n(r, c)], ok_b ? DY + row * N + nn : DY, ok_b);
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

  const int64_t steps = (end - begin + BK - 1) / BK;
  if (steps > 0) load(0, begin);
  for (int64_t st = 0; st < steps; ++st) {
    const int s = int(st & 1);
    if (st + 1 < steps) {
      load(s ^ 1, begin + (st + 1) * BK);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // A fragments: lanes 8q..8q+7 address rows (k) ks*16 + (q >> 1) * 8 + 0..7
      // at m chunk (wm + mi*16) / 8 + (q & 1).
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int k = ks * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4_trans(af[mi], &As(s)[swz_n(k, (wm + mi * 16) / 8 + ((lane >> 3) & 1))]);
      }
      // B fragments exactly as the forward's (K, N) weight path.
      uint32_t bfr[8][2];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        uint32_t r4[4];
        const int k = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        ldmatrix_x4_trans(r4, &Bs(s)[swz_n(k, (wn + p * 16) / 8 + (lane >> 4))]);
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
    __syncthreads();  // stage s is refilled by the next step's load
  }

  T* out = static_cast<T*>(g.db) + int64_t(e) * K * N;
  const int g8 = lane >> 2, c2 = (lane & 3) * 2;
  if (!TRANS_B) {
    // [K index][n]: adjacent accumulator pairs are adjacent columns; one
    // 32-bit store each, as in the forward.
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t kk = m0 + wm + mi * 16 + g8 + half * 8;
        if (kk >= K) continue;
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          const int64_t col = n0 + wn + ni * 8 + c2;
          if (col >= N) continue;
          const T lo = from_f32<T>(acc[mi][ni][half * 2]), hi = from_f32<T>(acc[mi][ni][half * 2 + 1]);
          *reinterpret_cast<uint32_t*>(out + kk * N + col) = uint32_t(lo.bits) | (uint32_t(hi.bits) << 16);
        }
      }
    }
  } else {
    // [n][K index]: a thread's pairs run along n, i.e. stride K in memory.
    // Transpose through shared memory, then store whole 16-byte chunks of
    // output rows. (The main loop ended on a barrier: the stages are free.)
    T* Cs = smem;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
          for (int j = 0; j < 2; ++j)
            Cs[(wn + ni * 8 + c2 + j) * kLdT + wm + mi * 16 + g8 + half * 8] = from_f32<T>(acc[mi][ni][half * 2 + j]);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < BN * BM / 8 / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int nl = idx >> 4, c = idx & 15;
      const int64_t n = n0 + nl, kk = m0 + c * 8;
      if (n < N && kk < K)
        *reinterpret_cast<uint4*>(out + n * K + kk) = *reinterpret_cast<const uint4*>(&Cs[nl * kLdT + c * 8]);
    }
  }
}

// ============================== launchers ====================================

gpuStream_t as_stream(void* s) { return static_cast<gpuStream_t>(s); }

// The CUDA kernel for (T, trans_b, EPI): the wgmma one on capability 9.0, else sm_80's.
template <class T, int EPI>
void launch_forward(const GroupedGemmArgs& g, int device, void* stream, T* h, GluParams glu) {
  constexpr int kOutCols = EPI == kEpiSwiglu ? BN / 2 : BN;
  const dim3 grid(unsigned((g.rows + BM - 1) / BM + g.experts + 1), unsigned((g.n + kOutCols - 1) / kOutCols));
  const bool hopper = hopper_or_sm80(device) == 90;
#ifdef MIXKIT_WITH_SM90
  if (hopper) {
    if (g.trans_b) sm90::grouped_gemm<T, true, EPI>(g, as_stream(stream), h, glu);
    else if constexpr (EPI != kEpiSwiglu) sm90::grouped_gemm<T, false, EPI>(g, as_stream(stream), h, glu);
    return;
  }
#endif
  (void)hopper;
  if (g.trans_b)
    gpu_launch(grouped_gemm_kernel<T, true, EPI>, grid, kThreads, 0, as_stream(stream), g, h, glu);
  else if constexpr (EPI != kEpiSwiglu)
    gpu_launch(grouped_gemm_kernel<T, false, EPI>, grid, kThreads, 0, as_stream(stream), g, h, glu);
}

}  // namespace

void grouped_gemm_gpu(const GroupedGemmArgs& g, int device, void* stream) {
  check(g);
  require(g.dtype != DType::f32, "the GPU grouped GEMM takes bfloat16 or float16 (float32 runs on the CPU only)");
  check_gpu_shape(g.k, g.n, {g.a, g.b, g.c});
  require((g.n + BN - 1) / BN <= 65535, "N_out too large for the grid (at most 65535 * 128)");
  if (g.rows == 0) return;
  DeviceGuard guard(device);
  if (g.dtype == DType::bf16) launch_forward<bf16, kEpiPlain>(g, device, stream, nullptr, GluParams{});
  else launch_forward<f16, kEpiPlain>(g, device, stream, nullptr, GluParams{});
  gpu_check(gpuGetLastError(), "launching grouped_gemm_kernel");
}

// Gate and up blocks: the 64-column kEpiSwiglu tile over F; interleaved
// pairs: the plain tile over h's 2F columns with the pairs epilogue.
void grouped_swiglu_gpu(const GroupedSwigluArgs& s, int device, void* stream) {
  check(s);
  require(s.dtype != DType::f32, "the GPU fused SwiGLU GEMM takes bfloat16 or float16 (float32 runs on the CPU only)");
  check_gpu_shape(s.k, s.ffn, {s.x, s.w13, s.act, s.h});
  require((2 * s.ffn + BN - 1) / BN <= 65535, "ffn too large for the grid (at most 65535 * 64)");
  if (s.rows == 0) return;
  DeviceGuard guard(device);
  const GroupedGemmArgs g{s.dtype, s.x, s.w13, s.offsets, s.act, s.rows, s.k, s.interleaved ? 2 * s.ffn : s.ffn,
                          s.experts, s.trans_b, s.bias};
  const GluParams glu{s.activation, s.alpha, s.limit};
  auto launch = [&](auto t) {
    using T = decltype(t);
    T* h = static_cast<T*>(s.h);
    if (s.interleaved) launch_forward<T, kEpiGluPairs>(g, device, stream, h, glu);
    else launch_forward<T, kEpiSwiglu>(g, device, stream, h, glu);
  };
  if (s.dtype == DType::bf16) launch(bf16{});
  else launch(f16{});
  gpu_check(gpuGetLastError(), "launching grouped_gemm_kernel (fused SwiGLU)");
}

void grouped_wgrad_gpu(const GroupedWgradArgs& g, int device, void* stream) {
  check(g);
  require(g.dtype != DType::f32, "the GPU grouped wgrad takes bfloat16 or float16 (float32 runs on the CPU only)");
  check_gpu_shape(g.k, g.n, {g.a, g.dy, g.db});
  require((g.n + BN - 1) / BN <= 65535, "N_out too large for the grid (at most 65535 * 128)");
  DeviceGuard guard(device);
  // Every (expert, output tile) gets a CTA, empty experts included: they
  // write the zeros of their gradient.
  const dim3 grid(unsigned((g.k + BM - 1) / BM), unsigned((g.n + BN - 1) / BN), unsigned(g.experts));
  auto launch = [&](auto t) {
    using T = decltype(t);
    if (g.trans_b)
      gpu_launch(grouped_wgrad_kernel<T, true>, grid, kThreads, 0, as_stream(stream), g);
    else
      gpu_launch(grouped_wgrad_kernel<T, false>, grid, kThreads, 0, as_stream(stream), g);
  };
  if (g.dtype == DType::bf16) launch(bf16{});
  else launch(f16{});
  gpu_check(gpuGetLastError(), "launching grouped_wgrad_kernel");
}

}  // namespace mixkit

#else  // MIXKIT_AMD

#include "cuda/grouped_gemm_mfma.cuh"

namespace mixkit {

// HIP: the MFMA kernel of grouped_gemm_mfma.cuh (gfx90a / gfx94x), same
// contract and schedule as the CUDA kernels.
void grouped_gemm_gpu(const GroupedGemmArgs& g, int device, void* stream) {
  check(g);
  require(g.dtype != DType::f32, "the GPU grouped GEMM takes bfloat16 or float16 (float32 runs on the CPU only)");
  check_gpu_shape(g.k, g.n, {g.a, g.b, g.c});
  require((g.n + mfma::gg::kBN - 1) / mfma::gg::kBN <= 65535, "N_out too large for the grid (at most 65535 * 128)");
  if (g.rows == 0) return;
  DeviceGuard guard(device);
  const auto s = static_cast<hipStream_t>(stream);
  if (g.dtype == DType::bf16) {
    if (g.trans_b) mfma::grouped_gemm<bf16, true>(g, s);
    else mfma::grouped_gemm<bf16, false>(g, s);
  } else {
    if (g.trans_b) mfma::grouped_gemm<f16, true>(g, s);
    else mfma::grouped_gemm<f16, false>(g, s);
  }
  gpu_check(gpuGetLastError(), "launching mfma::grouped_gemm_kernel");
}

void grouped_swiglu_gpu(const GroupedSwigluArgs& s, int device, void* stream) {
  check(s);
  require(s.dtype != DType::f32, "the GPU fused SwiGLU GEMM takes bfloat16 or float16 (float32 runs on the CPU only)");
  check_gpu_shape(s.k, s.ffn, {s.x, s.w13, s.act, s.h});
  require((s.ffn + mfma::gg::kSwigluCols - 1) / mfma::gg::kSwigluCols <= 65535,
          "ffn too large for the grid (at most 65535 * 64)");
  if (s.rows == 0) return;
  DeviceGuard guard(device);
  const auto st = static_cast<hipStream_t>(stream);
  if (s.dtype == DType::bf16) mfma::grouped_swiglu<bf16>(s, st);
  else mfma::grouped_swiglu<f16>(s, st);
  gpu_check(gpuGetLastError(), "launching mfma::grouped_gemm_kernel (fused SwiGLU)");
}

// Empty experts must write their zeros: no early return for rows == 0.
void grouped_wgrad_gpu(const GroupedWgradArgs& g, int device, void* stream) {
  check(g);
  require(g.dtype != DType::f32, "the GPU grouped wgrad takes bfloat16 or float16 (float32 runs on the CPU only)");
  check_gpu_shape(g.k, g.n, {g.a, g.dy, g.db});
  require((g.n + mfma::gg::kBN - 1) / mfma::gg::kBN <= 65535, "N_out too large for the grid (at most 65535 * 128)");
  DeviceGuard guard(device);
  const auto s = static_cast<hipStream_t>(stream);
  if (g.dtype == DType::bf16) {
    if (g.trans_b) mfma::grouped_wgrad<bf16, true>(g, s);
    else mfma::grouped_wgrad<bf16, false>(g, s);
  } else {
    if (g.trans_b) mfma::grouped_wgrad<f16, true>(g, s);
    else mfma::grouped_wgrad<f16, false>(g, s);
  }
  gpu_check(gpuGetLastError(), "launching mfma::grouped_wgrad_kernel");
}

}  // namespace mixkit

#endif  // MIXKIT_AMD
