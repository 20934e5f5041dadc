// Grouped GEMM over moe_permute's rows (contract in common/grouped_gemm.h)
// for AMD CDNA (gfx90a, gfx94x) matrix cores: the HIP counterpart of
// grouped_gemm_kernel in grouped_gemm.cu, with the same schedule.
//
// Tile: 128x128 outputs per workgroup of 256 threads = 4 wavefronts of 64,
// each a 64x64 wave tile made of 2x2 32x32 accumulators (64 f32 registers a
// lane), fed by v_mfma_f32_32x32x8{bf16_1k,f16}; K runs in 32-wide slices.
// Operand layouts and the "two instructions per 16-byte read" k pairing are
// in mfma.cuh.
//
// LDS: one stage of each operand, A as [128 rows][32 + 8 k] and B either
// [128 n][32 + 8 k] (trans_b, nn.Linear layout) or [32 k][128 + 8 n] (B
// stored (K, N)): 20 KiB (18.5 KiB), so three workgroups fit a CU's 64 KiB.
// The 8 elements of padding put rows 80 bytes apart, so the 16-byte
// fragment reads of 8 consecutive rows hit 8 distinct groups of 4 of the 32
// LDS banks (unpadded 64-byte rows would put every other row on the same
// banks).
// Latency hiding comes from registers instead of a second LDS stage: the
// next slice's global loads (2 + 2 16-byte chunks a thread) are issued
// before the current slice's MFMAs and written to LDS after them.
// (Unmeasured trade-off: no MI250X here. A second stage would save one
// barrier per slice at the cost of one workgroup per CU.)
//
// With B stored (K, N) the B operand wants 8 consecutive k of one column:
// the tile stays n-contiguous as loaded and each lane gathers its 8 values
// with 16-bit LDS reads (32 per k chunk, against 4 16-byte reads of A).
// The 32 lanes of a half-wave read 64 consecutive bytes; the two half-waves
// read rows 8 apart, which land on the same 16 banks (whether that costs a
// cycle depends on how the LDS schedules 16-bit reads: unmeasured).
//
// Fused SwiGLU, gate and up blocks (EPI = kEpiSwiglu, trans_b, w13 (E, 2F,
// K)): 64 output columns per workgroup; B tile rows 0-63 are w13's gate rows
// n0.., rows 64-127 its up rows F + n0... Wave w's accumulator column u = 0
// holds 32 gate columns and u = 1 the up columns of the same outputs, and a
// lane owns the same (row, column) in both, so the activation is computed in
// float32 in the epilogue from the unrounded sums, rounded once.
// Interleaved (gate, up) columns (EPI = kEpiGluPairs, gpt-oss, either
// layout): the plain tile over h's 2F columns; a lane owns one column, and
// lanes l and l ^ 1 own the adjacent columns 2j and 2j + 1 of the same rows
// (mfma.cuh's d_col), so one shuffle brings the up value to the gate's lane,
// which writes act column j. The optional bias is added in every epilogue.
//
// Scheduling without a host sync, as in CUDA: grid.x = ceil(rows / 128) +
// experts + 1 slots, grid.y = n-tiles; each workgroup walks the device-side
// offsets (find_tile). Slots past the last expert zero the rows from
// offsets[E] on; the rest exit.
//
// Weight gradient (grouped_wgrad_kernel): dB[e] = A_e^T dY_e, or with
// trans_b dY_e^T A_e. Both are out[p][q] = sum_r X[r][p] Y[r][q] over the
// expert's rows r, with (X, Y) = (A, dY) or (dY, A): trans_b swaps the
// operands instead of transposing the result, so both layouts store 64-byte
// row segments straight from the accumulators (no LDS transpose, whose
// 34 KiB buffer would fit one workgroup a CU instead of three). Same
// 128x128 tile, waves and MFMAs as the forward, the instruction's k now the
// row index, 32 rows per step. X and Y stage like the forward's (K, N)
// weight tile, [32 rows][128 + 8 columns] (17 KiB for the two), and both
// MFMA operands are gathered from them with 16-bit LDS reads, 8 rows of one
// column per lane (the A and B layouts are the same up to the name of the
// 32-wide index). That is 64 reads a lane per step for 16 MFMAs of 64
// cycles: even at one 32-lane half-wave a clock, the workgroup's 4 x 64
// reads take the CU's LDS 512 clocks while each SIMD spends 1024 on MFMAs
// (estimate, unmeasured). Grid: (K tiles, N tiles, experts), shapes only;
// rows past the expert's end stage as zeros, and an empty expert runs no
// step and writes its zeros.
//
// The index math lives in host+device constexpr functions below so that
// tests/test_mfma_layout.py can replay the kernel's addressing on the CPU.
// nvcc never sees this file; the kernel itself needs hipcc.
#pragma once

#if !defined(__CUDACC__) || defined(__HIPCC__)

#include <cstdint>

#include "common/grouped_gemm.h"
#include "cuda/mfma.cuh"

namespace mixkit {
namespace mfma {
namespace gg {

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kThreads = 256;            // 4 wavefronts, a 2 x 2 grid of wave tiles
constexpr int kWaveM = 64, kWaveN = 64;  // per wavefront
constexpr int kTilesM = kWaveM / kM, kTilesN = kWaveN / kN;  // 32x32 accumulators a wave: 2 x 2
constexpr int kLdK = kBK + 8;            // row stride (elements) of the k-contiguous tiles
constexpr int kLdN = kBN + 8;            // row stride of the n-contiguous B tile
constexpr int kChunks = kBM * kBK / 8 / kThreads;  // 16-byte chunks a thread stages per operand: 2
static_assert(kBM == kBN && kBK % kPairK == 0 && kChunks * kThreads * 8 == kBN * kBK, "tile plan");
static_assert(kThreads / kWave == (kBM / kWaveM) * (kBN / kWaveN), "one wave tile per wavefront");

// Origin of wavefront w's 64x64 tile inside the 128x128 workgroup tile.
MIXKIT_MFMA_HD int wave_row0(int w) { return (w & 1) * kWaveM; }
MIXKIT_MFMA_HD int wave_col0(int w) { return (w >> 1) * kWaveN; }

// Staging: chunk i (0 .. kChunks - 1) of thread tid. A k-contiguous tile
// (A, or B with trans_b) has 4 chunks per 32-k row; consecutive threads take
// consecutive chunks, so a wavefront reads 16 rows x 64 contiguous bytes.
MIXKIT_MFMA_HD int stage_k_row(int tid, int i) { return (tid + i * kThreads) >> 2; }
MIXKIT_MFMA_HD int stage_k_col(int tid, int i) { return ((tid + i * kThreads) & 3) * 8; }
// The n-contiguous B tile ((K, N) weights) has 16 chunks per k row.
MIXKIT_MFMA_HD int stage_n_row(int tid, int i) { return (tid + i * kThreads) >> 4; }
MIXKIT_MFMA_HD int stage_n_col(int tid, int i) { return ((tid + i * kThreads) & 15) * 8; }

// LDS element offsets.
MIXKIT_MFMA_HD int lds_k(int row, int k) { return row * kLdK + k; }
MIXKIT_MFMA_HD int lds_n(int k, int n) { return k * kLdN + n; }

// Fragments for the 16-wide k chunk kc (0 .. kBK / 16 - 1) of a slice: lane
// `lane` of wavefront w reads 8 consecutive k starting at frag_k, of tile
// row frag_row(w, t, lane) for A tile t / column frag_col(w, u, lane) for B
// tile u. Elements 0-3 feed instruction step 0, 4-7 step 1 (mfma.cuh).
MIXKIT_MFMA_HD int frag_k(int kc, int lane) { return kc * kPairK + pair_k(lane, 0, 0); }
MIXKIT_MFMA_HD int frag_row(int w, int t, int lane) { return wave_row0(w) + t * kM + a_row(lane, 0); }
MIXKIT_MFMA_HD int frag_col(int w, int u, int lane) { return wave_col0(w) + u * kN + b_col(lane, 0); }

// Epilogue: accumulator register r of tile (t, u) in lane `lane` of wave w.
MIXKIT_MFMA_HD int out_row(int w, int t, int lane, int r) { return wave_row0(w) + t * kM + d_row(lane, r); }
MIXKIT_MFMA_HD int out_col(int w, int u, int lane, int r) { return wave_col0(w) + u * kN + d_col(lane, r); }

// Fused SwiGLU: kSwigluCols output columns per workgroup. B tile row r holds
// w13 row swiglu_w13_row(r, n0, F) (valid while n0 + r % 64 < F); wave w's
// accumulator column tile u reads tile rows swiglu_frag_col and writes
// output column swiglu_out_col (relative to n0) of act, and of h's gate
// (u = 0) or up (u = 1) half.
constexpr int kSwigluCols = kBN / 2;
MIXKIT_MFMA_HD int64_t swiglu_w13_row(int r, int64_t n0, int64_t ffn) {
  return r < kSwigluCols ? n0 + r : ffn + n0 + (r - kSwigluCols);
}
MIXKIT_MFMA_HD int swiglu_frag_col(int w, int u, int lane) { return u * kSwigluCols + (w >> 1) * kN + b_col(lane, 0); }
MIXKIT_MFMA_HD int swiglu_out_col(int w, int lane, int r) { return (w >> 1) * kN + d_col(lane, r); }
static_assert(kTilesN == 2 && kSwigluCols == 2 * kN, "SwiGLU pairs accumulator columns 0 (gate) and 1 (up)");

// Weight gradient: out (P, Q) = X^T Y per expert, (X, Y, P, Q) = (A, dY, K, N),
// or (dY, A, N, K) with trans_b. Workgroup (blockIdx.x, .y) = (K tile, N
// tile) in both layouts, so the grid's y extent is always the N tiles.
MIXKIT_MFMA_HD int64_t wgrad_p0(bool trans_b, int64_t k_tile, int64_t n_tile) {
  return (trans_b ? n_tile : k_tile) * kBM;
}
MIXKIT_MFMA_HD int64_t wgrad_q0(bool trans_b, int64_t k_tile, int64_t n_tile) {
  return (trans_b ? k_tile : n_tile) * kBN;
}
// X and Y slices of kBK rows stage as the (K, N) weight tile does
// (stage_n_row / stage_n_col, lds_n: tile row = expert row, tile column =
// p or q). Element e of step s's operand in lane `lane` of wave w, 16-wide
// row chunk kc: X tile t (the MFMA's A, m = p) and Y tile u (its B, n = q)
// are both 8 consecutive rows of one tile column.
MIXKIT_MFMA_HD int wgrad_frag_x(int w, int t, int kc, int lane, int s, int e) {
  return lds_n(frag_k(kc, lane) + pair_elem(s, e), frag_row(w, t, lane));
}
MIXKIT_MFMA_HD int wgrad_frag_y(int w, int u, int kc, int lane, int s, int e) {
  return lds_n(frag_k(kc, lane) + pair_elem(s, e), frag_col(w, u, lane));
}
static_assert(kBM == kBN && 3 * (2 * kBK * kLdN * 2) <= 64 * 1024,
              "X and Y share the staging plan; three workgroups fit a CU, as for the forward");

// Which expert and m-tile workgroup slot `slot` computes: the CUDA kernels'
// walk (common/grouped_gemm.h) with BM = 128.
#if MIXKIT_AMD
__host__ __device__
#endif
inline bool find_tile(const int64_t* off, int experts, int64_t rows, int64_t slot, int& expert, int64_t& row0,
                      int64_t& row1) {
  return mixkit::find_tile<kBM>(off, experts, rows, slot, expert, row0, row1);
}

}  // namespace gg

#if MIXKIT_AMD

// ============================== kernel =======================================

template <class T> struct Elem;  // the 16-bit scalar the builtin's operand vector holds
template <> struct Elem<bf16> { using type = short; };
template <> struct Elem<f16> { using type = _Float16; };

// kEpiSwiglu (implies TRANS_B): g.b = w13 (E, 2F, K), g.n = F, g.c = act
// (rows, F), h = (rows, 2F) pre-activations or null. kEpiGluPairs: g.n = 2F,
// g.c = act (rows, F), h (rows, 2F) or null.
template <class T, bool TRANS_B, int EPI>
__global__ void __launch_bounds__(gg::kThreads) grouped_gemm_kernel(GroupedGemmArgs g, T* h, GluParams glu_p) {
  using namespace gg;
  constexpr bool SWIGLU = EPI == kEpiSwiglu;
  static_assert(!SWIGLU || TRANS_B, "the fused SwiGLU reads w13 in nn.Linear's (2F, K) layout");
  using Op = typename Operand<T>::type;
  using E = typename Elem<T>::type;
  // 8 consecutive k of one row (or column): step s's operand is elements
  // 4s .. 4s + 3, which is what pair_elem says.
  struct alignas(16) Frag { Op step[2]; };
  static_assert(pair_elem(0, 0) == 0 && pair_elem(0, 3) == 3 && pair_elem(1, 0) == 4 && pair_elem(1, 3) == 7,
                "Frag's layout is pair_elem");
  constexpr int kOutCols = SWIGLU ? kSwigluCols : kBN;
  __shared__ __attribute__((aligned(16))) E As[kBM * kLdK];
  __shared__ __attribute__((aligned(16))) E Bs[TRANS_B ? kBN * kLdK : kBK * kLdN];

  const int64_t K = g.k, N = g.n;  // with SWIGLU, N = F
  const int64_t n0 = int64_t(blockIdx.y) * kOutCols;
  const int tid = threadIdx.x, lane = tid % kWave, w = tid / kWave;
  int expert = 0;
  int64_t row0, row1;
  T* C = static_cast<T*>(g.c);
  if (!find_tile(g.offsets, int(g.experts), g.rows, blockIdx.x, expert, row0, row1)) {
    if (EPI == kEpiGluPairs) {
      mixkit::zero_bad_rows<T, EPI>(C, h, row0, row1, n0, N - n0 < kOutCols ? N - n0 : kOutCols, N, tid, kThreads);
      return;
    }
    // Rows after offsets[E] have no expert: zero our columns of them, 16
    // bytes at a time (n0 and N are multiples of 8).
    const int64_t chunks = (N - n0 < kOutCols ? N - n0 : kOutCols) / 8;
    for (int64_t i = tid; i < (row1 - row0) * chunks; i += kThreads) {
      const int64_t row = row0 + i / chunks, col = n0 + (i % chunks) * 8;
      *reinterpret_cast<uint4*>(C + row * N + col) = uint4{0, 0, 0, 0};
      if (SWIGLU && h) {
        *reinterpret_cast<uint4*>(h + row * 2 * N + col) = uint4{0, 0, 0, 0};
        *reinterpret_cast<uint4*>(h + row * 2 * N + N + col) = uint4{0, 0, 0, 0};
      }
    }
    return;
  }

  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b) + int64_t(expert) * K * N * (SWIGLU ? 2 : 1);
  const T* bias = g.bias ? static_cast<const T*>(g.bias) + int64_t(expert) * N * (SWIGLU ? 2 : 1) : nullptr;
  auto bias_at = [&](int64_t col) { return bias ? to_f32(bias[col]) : 0.f; };

  // Global -> registers for the slice at k0. K and N are multiples of 8, so a
  // 16-byte chunk is all in or all out; out-of-range chunks stage zeros.
  uint4 ra[kChunks], rb[kChunks];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int64_t row = row0 + stage_k_row(tid, i), kk = k0 + stage_k_col(tid, i);
      ra[i] = row < row1 && kk < K ? *reinterpret_cast<const uint4*>(A + row * K + kk) : uint4{0, 0, 0, 0};
    }
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      if (TRANS_B) {  // B[e] is (N, K), or w13[e] (2F, K)
        const int r = stage_k_row(tid, i);
        const int64_t kk = k0 + stage_k_col(tid, i);
        const int64_t n = n0 + (SWIGLU ? r % kSwigluCols : r);
        const int64_t wrow = SWIGLU ? swiglu_w13_row(r, n0, N) : n;
        rb[i] = n < N && kk < K ? *reinterpret_cast<const uint4*>(B + wrow * K + kk) : uint4{0, 0, 0, 0};
      } else {  // B[e] is (K, N)
        const int64_t kk = k0 + stage_n_row(tid, i), n = n0 + stage_n_col(tid, i);
        rb[i] = kk < K && n < N ? *reinterpret_cast<const uint4*>(B + kk * N + n) : uint4{0, 0, 0, 0};
      }
    }
  };
  auto store = [&]() {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      *reinterpret_cast<uint4*>(&As[lds_k(stage_k_row(tid, i), stage_k_col(tid, i))]) = ra[i];
      if (TRANS_B)
        *reinterpret_cast<uint4*>(&Bs[lds_k(stage_k_row(tid, i), stage_k_col(tid, i))]) = rb[i];
      else
        *reinterpret_cast<uint4*>(&Bs[lds_n(stage_n_row(tid, i), stage_n_col(tid, i))]) = rb[i];
    }
  };

  float16_t acc[kTilesM][kTilesN];
#pragma unroll
  for (int t = 0; t < kTilesM; ++t)
#pragma unroll
    for (int u = 0; u < kTilesN; ++u)
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) acc[t][u][r] = 0.f;

  const int64_t ktiles = (K + kBK - 1) / kBK;
  load(0);
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    store();
    __syncthreads();
    if (kt + 1 < ktiles) load((kt + 1) * kBK);  // in flight during the MFMAs below
#pragma unroll
    for (int kc = 0; kc < kBK / kPairK; ++kc) {
      const int k = frag_k(kc, lane);
      Frag a[kTilesM], b[kTilesN];
#pragma unroll
      for (int t = 0; t < kTilesM; ++t) a[t] = *reinterpret_cast<const Frag*>(&As[lds_k(frag_row(w, t, lane), k)]);
#pragma unroll
      for (int u = 0; u < kTilesN; ++u) {
        const int col = SWIGLU ? swiglu_frag_col(w, u, lane) : frag_col(w, u, lane);
        if (TRANS_B) {
          b[u] = *reinterpret_cast<const Frag*>(&Bs[lds_k(col, k)]);
        } else {
#pragma unroll
          for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int e = 0; e < kOperandElems; ++e) b[u].step[s][e] = Bs[lds_n(k + pair_elem(s, e), col)];
        }
      }
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int t = 0; t < kTilesM; ++t)
#pragma unroll
          for (int u = 0; u < kTilesN; ++u) acc[t][u] = mma_32x32x8(a[t].step[s], b[u].step[s], acc[t][u]);
    }
    __syncthreads();  // the tiles are overwritten by the next slice's store
  }

  // Epilogue: one rounding per output. A lane owns one column of each 32x32
  // tile, so each register's 64 lanes store two 64-byte row segments.
  if constexpr (SWIGLU) {
    const int64_t col = n0 + swiglu_out_col(w, lane, 0);
    if (col < N) {
#pragma unroll
      for (int t = 0; t < kTilesM; ++t)
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) {
          const int64_t row = row0 + out_row(w, t, lane, r);
          if (row >= row1) continue;
          const float gate = acc[t][0][r] + bias_at(col), up = acc[t][1][r] + bias_at(N + col);
          C[row * N + col] = from_f32<T>(glu(gate, up, glu_p.activation, glu_p.alpha, glu_p.limit));
          if (h) {
            h[row * 2 * N + col] = from_f32<T>(gate);
            h[row * 2 * N + N + col] = from_f32<T>(up);
          }
        }
    }
  } else if constexpr (EPI == kEpiGluPairs) {
    // Every lane reaches every shuffle; the bounds checks come after it.
#pragma unroll
    for (int u = 0; u < kTilesN; ++u) {
      const int64_t col = n0 + out_col(w, u, lane, 0);  // even lanes: a gate column; odd: its up
      const float b = col < N ? bias_at(col) : 0.f;
#pragma unroll
      for (int t = 0; t < kTilesM; ++t)
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) {
          const float v = acc[t][u][r] + b;
          const float up = shfl_xor(v, 1);
          const int64_t row = row0 + out_row(w, t, lane, r);
          if (col >= N || row >= row1) continue;
          if (h) h[row * N + col] = from_f32<T>(v);
          if (lane % 2 == 0) C[row * (N / 2) + col / 2] = from_f32<T>(glu(v, up, glu_p.activation, glu_p.alpha,
                                                                                glu_p.limit));
        }
    }
  } else {
#pragma unroll
    for (int u = 0; u < kTilesN; ++u) {
      const int64_t col = n0 + out_col(w, u, lane, 0);
      if (col >= N) continue;
#pragma unroll
      for (int t = 0; t < kTilesM; ++t)
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) {
          const int64_t row = row0 + out_row(w, t, lane, r);
          if (row < row1) C[row * N + col] = from_f32<T>(acc[t][u][r] + bias_at(col));
        }
    }
  }
}

// dB[e] tile (contract in common/grouped_gemm.h, plan at the top of this file).
template <class T, bool TRANS_B>
__global__ void __launch_bounds__(gg::kThreads) grouped_wgrad_kernel(GroupedWgradArgs g) {
  using namespace gg;
  using Op = typename Operand<T>::type;
  using E = typename Elem<T>::type;
  struct alignas(16) Frag { Op step[2]; };
  __shared__ __attribute__((aligned(16))) E Xs[kBK * kLdN];
  __shared__ __attribute__((aligned(16))) E Ys[kBK * kLdN];

  const int64_t P = TRANS_B ? g.n : g.k, Q = TRANS_B ? g.k : g.n;
  const T* X = static_cast<const T*>(TRANS_B ? g.dy : g.a);
  const T* Y = static_cast<const T*>(TRANS_B ? g.a : g.dy);
  const int64_t p0 = wgrad_p0(TRANS_B, blockIdx.x, blockIdx.y), q0 = wgrad_q0(TRANS_B, blockIdx.x, blockIdx.y);
  const int expert = blockIdx.z;
  const int64_t begin = g.offsets[expert], end = g.offsets[expert + 1];
  const int tid = threadIdx.x, lane = tid % kWave, w = tid / kWave;

  // Global -> registers for the kBK rows from r0. P and Q are multiples of
  // 8, so a 16-byte chunk is all in or all out; rows past the expert's end
  // and columns past P or Q stage zeros.
  uint4 rx[kChunks], ry[kChunks];
  auto load = [&](int64_t r0) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int64_t row = r0 + stage_n_row(tid, i);
      const int c = stage_n_col(tid, i);
      rx[i] = row < end && p0 + c < P ? *reinterpret_cast<const uint4*>(X + row * P + p0 + c) : uint4{0, 0, 0, 0};
      ry[i] = row < end && q0 + c < Q ? *reinterpret_cast<const uint4*>(Y + row * Q + q0 + c) : uint4{0, 0, 0, 0};
    }
  };
  auto store = [&]() {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int off = lds_n(stage_n_row(tid, i), stage_n_col(tid, i));
      *reinterpret_cast<uint4*>(&Xs[off]) = rx[i];
      *reinterpret_cast<uint4*>(&Ys[off]) = ry[i];
    }
  };

  float16_t acc[kTilesM][kTilesN];
#pragma unroll
  for (int t = 0; t < kTilesM; ++t)
#pragma unroll
    for (int u = 0; u < kTilesN; ++u)
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) acc[t][u][r] = 0.f;

  const int64_t steps = (end - begin + kBK - 1) / kBK;  // 0 for an empty expert
  if (steps > 0) load(begin);
  for (int64_t st = 0; st < steps; ++st) {
    store();
    __syncthreads();
    if (st + 1 < steps) load(begin + (st + 1) * kBK);  // in flight during the MFMAs below
#pragma unroll
    for (int kc = 0; kc < kBK / kPairK; ++kc) {
      Frag x[kTilesM], y[kTilesN];
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int e = 0; e < kOperandElems; ++e) {
#pragma unroll
          for (int t = 0; t < kTilesM; ++t) x[t].step[s][e] = Xs[wgrad_frag_x(w, t, kc, lane, s, e)];
#pragma unroll
          for (int u = 0; u < kTilesN; ++u) y[u].step[s][e] = Ys[wgrad_frag_y(w, u, kc, lane, s, e)];
        }
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int t = 0; t < kTilesM; ++t)
#pragma unroll
          for (int u = 0; u < kTilesN; ++u) acc[t][u] = mma_32x32x8(x[t].step[s], y[u].step[s], acc[t][u]);
    }
    __syncthreads();  // the tiles are overwritten by the next step's store
  }

  // One rounding per output; each register's 64 lanes store two 64-byte
  // segments of out's rows, in both layouts (the operand swap above).
  T* out = static_cast<T*>(g.db) + int64_t(expert) * g.k * g.n;
#pragma unroll
  for (int u = 0; u < kTilesN; ++u) {
    const int64_t q = q0 + out_col(w, u, lane, 0);
    if (q >= Q) continue;
#pragma unroll
    for (int t = 0; t < kTilesM; ++t)
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) {
        const int64_t p = p0 + out_row(w, t, lane, r);
        if (p < P) out[p * Q + q] = from_f32<T>(acc[t][u][r]);
      }
  }
}

// ============================== launchers ====================================

// The callers (grouped_gemm_gpu, grouped_swiglu_gpu) check the arguments,
// K % 8 == N % 8 == 0, 16-byte alignment, rows > 0 and the grid limit, and set
// the device, as for the CUDA kernel; they also check the launch error.
template <class T, bool TRANS_B> void grouped_gemm(const GroupedGemmArgs& g, hipStream_t stream) {
  const dim3 grid(unsigned((g.rows + gg::kBM - 1) / gg::kBM + g.experts + 1), unsigned((g.n + gg::kBN - 1) / gg::kBN));
  gpu_launch((grouped_gemm_kernel<T, TRANS_B, kEpiPlain>), grid, dim3(gg::kThreads), 0, stream, g,
             static_cast<T*>(nullptr), GluParams{});
}

// Gate and up blocks: 64 act columns a workgroup; interleaved pairs: the
// plain tile over h's 2F columns.
template <class T> void grouped_swiglu(const GroupedSwigluArgs& s, hipStream_t stream) {
  const GluParams glu{s.activation, s.alpha, s.limit};
  T* h = static_cast<T*>(s.h);
  const int64_t tiles_m = (s.rows + gg::kBM - 1) / gg::kBM + s.experts + 1;
  if (s.interleaved) {
    const GroupedGemmArgs g{s.dtype, s.x, s.w13, s.offsets, s.act, s.rows, s.k, 2 * s.ffn, s.experts, s.trans_b,
                            s.bias};
    const dim3 grid(unsigned(tiles_m), unsigned((2 * s.ffn + gg::kBN - 1) / gg::kBN));
    if (s.trans_b) gpu_launch((grouped_gemm_kernel<T, true, kEpiGluPairs>), grid, dim3(gg::kThreads), 0, stream, g, h, glu);
    else gpu_launch((grouped_gemm_kernel<T, false, kEpiGluPairs>), grid, dim3(gg::kThreads), 0, stream, g, h, glu);
    return;
  }
  const GroupedGemmArgs g{s.dtype, s.x, s.w13, s.offsets, s.act, s.rows, s.k, s.ffn, s.experts, true, s.bias};
  const dim3 grid(unsigned(tiles_m), unsigned((s.ffn + gg::kSwigluCols - 1) / gg::kSwigluCols));
  gpu_launch((grouped_gemm_kernel<T, true, kEpiSwiglu>), grid, dim3(gg::kThreads), 0, stream, g, h, glu);
}

// The caller (grouped_wgrad_gpu) checks as for the forward, except that it
// launches for rows == 0 too: every expert's gradient is written, zeros for
// the empty ones. grid.y (N tiles) must be at most 65535.
template <class T, bool TRANS_B> void grouped_wgrad(const GroupedWgradArgs& g, hipStream_t stream) {
  const dim3 grid(unsigned((g.k + gg::kBM - 1) / gg::kBM), unsigned((g.n + gg::kBN - 1) / gg::kBN),
                  unsigned(g.experts));
  gpu_launch((grouped_wgrad_kernel<T, TRANS_B>), grid, dim3(gg::kThreads), 0, stream, g);
}

#endif  // MIXKIT_AMD

}  // namespace mfma
}  // namespace mixkit

#endif  // !__CUDACC__ || __HIPCC__
