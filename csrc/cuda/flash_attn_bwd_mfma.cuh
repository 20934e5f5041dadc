// Flash-attention backward for AMD CDNA (gfx90a, gfx94x) matrix cores: the
// HIP counterpart of flash_attn_bwd_sm80.cuh, same contract
// (common/flash_attn.h) and the same launches on the caller's stream:
//  1. delta_kernel: delta_i = sum_d dO[i, d] * O[i, d] (float32, lse layout).
//  2. dkdv_kernel: a workgroup of kKvWaves = 2 wavefronts owns kBN = 64 keys
//     of one (sequence, kv head), 32 a wavefront, and loops over every query
//     head of the GQA group and every block of kBM = 32 queries that can see
//     one of its keys. dK and dV are summed inside the workgroup, no atomics.
//     With atomics allowed (!deterministic) and D = 64 (kAtomicDq) each
//     wavefront also adds scale * dS K over its 32 keys into the float32
//     dq_accum (atomicAdd).
//  3. after the atomic dQ: dq_convert_kernel rounds dq_accum into dq.
//     otherwise (deterministic; D = 128 in both modes, see kAtomicDq):
//     dq_kernel, a workgroup of kQWaves = 4 wavefronts owns
//     kQBM = 128 queries (32 a wavefront) of one (sequence, head) and walks
//     the visible blocks of kQBN = 32 keys in increasing order, recomputing
//     S and dP.
// The instruction is v_mfma_f32_32x32x8{bf16_1k,f16} (mfma.cuh): in its
// 32x32 accumulator a lane owns one column. The products are oriented so
// that the column is what the next product needs per lane:
//  - dkdv_kernel computes S = Q K^T and dP = dO V^T with the wavefront's 32
//    keys as columns. Register 4 st + e of lane l is then query
//    8 st + 4 (l / 32) + e of key l % 32, which is exactly B element e of
//    lane l in the 8-query step st of dV^T += dO^T P and dK^T += Q^T dS: P
//    and dS are B operands straight from registers. The A operands dO^T and
//    Q^T are 4 single 16-bit LDS reads of one head-dim column (the simplest
//    re-layout; a transposed copy or ds_read_u16_d16_hi packing is the
//    obvious next step).
//  - dQ (atomic path) = dS K needs dS with queries as rows: each wavefront
//    writes its dS tile, rounded to T, to LDS ([query][key], padded) and
//    reads it back as the A operand (8 bytes a lane); B = K is 4 16-bit LDS
//    reads of one head-dim column of the staged key tile.
//  - dq_kernel computes S^T = K Q^T and dP^T = V dO^T with its 32 queries as
//    columns (lse and delta are one register a lane), so dS^T's registers
//    are the B operand of dQ^T += K^T dS^T, and A = K^T is again 4 16-bit
//    LDS reads of a key tile column.
// P is 2^p_log2 * exp(...) as in the forward (f16: 2^15, against MI200's
// flush of subnormal MFMA inputs, mfma.cuh); dV drops the factor in its
// epilogue and dS is formed from the unscaled P. Rows that saw no key have
// lse = -inf; like the CUDA kernels this replaces it by +inf (and delta by 0
// past the sequence) so that P = exp2(-inf) = 0 exactly.
//
// LDS (16-bit elements, rows padded by kPad = 8 elements so that 16-byte
// reads of consecutive rows spread over the banks; conflicts unmeasured):
//   dkdv_kernel: K, V [64][D + 8], Q, dO [32][D + 8], lse, delta [32] float,
//                atomic path dS [2 waves][32][36]:
//                D = 64: 27,904 B (+ 4,608); D = 128: 52,480 B.
//   dq_kernel:   K, V [32][D + 8]: D = 64: 9,216 B; D = 128: 17,408 B.
// Registers a lane (f32 accumulators): dkdv dK^T, dV^T D / 2 each, S and dP
// 16 each; dq_kernel dQ^T D / 2, S^T and dP^T 16 each, Q and dO fragments
// D / 4 VGPRs each. hipcc 5.2 (gfx90a) allocates far more: dkdv 304-312
// VGPRs (96 AGPRs) at D = 64, 362-363 with the atomic dQ, 444-445 (188-189)
// at D = 128; dq_kernel 244 (D = 64) and 324-328 (D = 128). One wavefront
// a SIMD; no spills, no scratch, on gfx90a and gfx940.
//
// Simplest-correct choices worth revisiting on hardware: every step of the
// dkdv loop has two workgroup barriers (three with dQ) and no prefetch; the
// column reads are scalar 16-bit LDS reads; a dkdv workgroup is 2 wavefronts.
//
// Head dim 256. dK^T and dV^T together would be 256 accumulators a lane, so
// dkdv_kernel runs twice (PARTS), for dV (S, P, dV^T: two products) and for
// dK (S, dP, dS, dK^T: three), as flash_attn_bwd_sm80.cuh does. Staged K and
// V tiles would not fit the 64 KiB of LDS next to Q and dO ([64][264] each),
// so the lanes read their K and V fragments (8 consecutive d of one key)
// from global memory instead, per step: the same bytes for every query
// block, from the caches. dq_kernel likewise reads its Q and dO fragments
// per key block instead of holding D / 2 VGPRs of them next to a 128-float
// dQ^T. dQ always takes dq_kernel there (kAtomicDq).
//
// Softcap: S (S^T in dq_kernel) is capped before the mask, the softmax takes
// it with scale 1, and dS gains 1 - tanh^2 = 1 - (s_c / c)^2 from the capped
// score, which is still in its register when P and dS are formed.
//
// The index math is in host+device constexpr functions (namespace fab) so
// that tests/test_mfma_attention_bwd.py replays the kernels on the CPU
// against dense float64 gradients. nvcc never sees the kernels; they need hipcc.
#pragma once

#if !defined(__CUDACC__) || defined(__HIPCC__)

#include <cstdint>

#include "cuda/mfma.cuh"

namespace mixkit {
namespace mfma {
namespace fab {

constexpr int kPad = 8;                       // elements of padding a LDS row
constexpr int kKvWaves = 2;                   // dkdv_kernel
constexpr int kKvThreads = kKvWaves * kWave;  // 128
constexpr int kBN = kKvWaves * kN;            // keys a dkdv workgroup: 64, 32 a wavefront
constexpr int kBM = kM;                       // queries a dkdv step: 32
constexpr int kQWaves = 4;                    // dq_kernel
constexpr int kQThreads = kQWaves * kWave;    // 256
constexpr int kQBM = kQWaves * kN;            // queries a dq workgroup: 128, 32 a wavefront
constexpr int kQBN = kM;                      // keys a dq step: 32
constexpr int kSteps = kM / kK;               // 8-wide k steps over a 32-wide tile: 4

// ---- LDS ------------------------------------------------------------------------
// Element offset of (row, col) in a [rows][d + kPad] tile (K, V, Q, dO).
MIXKIT_MFMA_HD int lds_row(int d, int row, int col) { return row * (d + kPad) + col; }
MIXKIT_MFMA_HD int lds_tile_size(int d, int rows) { return rows * (d + kPad); }
// dS of wavefront w in dkdv_kernel: [kBM queries][kN keys + kDsPad]. Read
// back 8 bytes a lane, 16 lanes (16 query rows) a phase: a row of 18 words
// (2 x odd) puts those 16 rows on 16 different bank pairs; with kPad's 20
// words rows r and r + 8 shared banks (2-way). Its 16-bit writes are a row
// per 32 lanes, conflict-free at any padding.
constexpr int kDsPad = 4;
MIXKIT_MFMA_HD int lds_ds(int w, int q, int key) { return (w * kBM + q) * (kN + kDsPad) + key; }
MIXKIT_MFMA_HD int lds_ds_size() { return kKvWaves * kBM * (kN + kDsPad); }

// Staging a [rows][d] block with `threads` threads: 16-byte chunk i of thread
// tid is row stage_row, elements stage_col .. + 7 (consecutive threads take
// consecutive chunks of a row: coalesced global reads).
MIXKIT_MFMA_HD int stage_chunks(int d, int rows, int threads) { return rows * d / 8 / threads; }
MIXKIT_MFMA_HD int stage_row(int d, int threads, int tid, int i) { return (tid + i * threads) / (d / 8); }
MIXKIT_MFMA_HD int stage_col(int d, int threads, int tid, int i) { return (tid + i * threads) % (d / 8) * 8; }

// ---- fragments -------------------------------------------------------------------
// Products over the head dim (S, dP, S^T, dP^T) use mfma.cuh's pairing: per
// 16-wide chunk kc a lane reads 8 consecutive d of its A row and of its B
// column (one 16-byte read each), elements 4 st .. 4 st + 3 feeding step st.
MIXKIT_MFMA_HD int frag_d(int kc, int lane) { return kc * kPairK + pair_k(lane, 0, 0); }
// ... the A row and the B column (tile rows of the two 16-byte reads).
MIXKIT_MFMA_HD int frag_a_row(int lane) { return a_row(lane, 0); }
MIXKIT_MFMA_HD int frag_b_row(int lane) { return b_col(lane, 0); }

// The 32x32 accumulator of S (dkdv) or S^T (dq): register r of lane `lane`
// is tile row acc_row and column acc_col. dkdv: query acc_row, key acc_col
// (of the wavefront's 32); dq: key acc_row, query acc_col.
MIXKIT_MFMA_HD int acc_row(int lane, int r) { return d_row(lane, r); }
MIXKIT_MFMA_HD int acc_col(int lane, int r) { return d_col(lane, r); }

// Products over a 32-wide tile (dV^T += dO^T P, dK^T += Q^T dS, dQ^T += K^T
// dS^T) in kSteps steps st of 8: B element e is accumulator register
// x_reg(st, e) of the lane (see the top of the file), A element e is
// (xa_row, xa_k): head dim 32 t + xa_row, summation index (query or key)
// xa_k.
MIXKIT_MFMA_HD int x_reg(int st, int e) { return 4 * st + e; }
MIXKIT_MFMA_HD int xa_row(int t, int lane, int e) { return t * kM + a_row(lane, e); }
MIXKIT_MFMA_HD int xa_k(int st, int lane, int e) { return st * kK + a_k(lane, e); }
// Their accumulators (dV^T, dK^T, dQ^T tile t): head dim g_d, and g_col
// (key for dK^T/dV^T, query for dQ^T). Registers 4 g .. 4 g + 3 are 4
// consecutive d: one 8-byte store.
MIXKIT_MFMA_HD int g_d(int t, int lane, int r) { return t * kM + d_row(lane, r); }
MIXKIT_MFMA_HD int g_col(int lane, int r) { return d_col(lane, r); }

// dQ (atomic path, dkdv_kernel) = dS K over the wavefront's 32 keys, per
// head-dim tile t: A = dS element e is query a_row, key dqa_key (4
// consecutive keys: one 8-byte read of the dS tile); B = K element e is key
// dqb_key (of the wavefront's 32), head dim dqb_d. Accumulator register r:
// query acc_row, head dim 32 t + acc_col.
MIXKIT_MFMA_HD int dqa_q(int lane, int e) { return a_row(lane, e); }
MIXKIT_MFMA_HD int dqa_key(int st, int lane, int e) { return st * kK + a_k(lane, e); }
MIXKIT_MFMA_HD int dqb_key(int st, int lane, int e) { return st * kK + b_k(lane, e); }
MIXKIT_MFMA_HD int dqb_d(int t, int lane, int e) { return t * kN + b_col(lane, e); }

// ---- masks and block ranges ---------------------------------------------------------
// common/flash_attn.h: key j is visible to query i of a sequence with sq
// queries and sk keys when j < sk and (causal) j <= i + sk - sq and (window
// W > 0) j > i + sk - sq - W. i < sq is added so that padded rows are
// masked too (they also get P = 0 through lse = +inf). `window` is clamped
// to 2^32 by the callers: beyond every key, and no int64 overflow.
MIXKIT_MFMA_HD bool visible(int64_t i, int64_t j, int64_t sq, int64_t sk, bool causal, int64_t window) {
  const int64_t pos = i + sk - sq;
  return i < sq && j < sk && (!causal || j <= pos) && (window == 0 || j > pos - window);
}
// Every (query, key) of [m0, m0 + bm) x [n0, n0 + bn) is visible: no element mask.
MIXKIT_MFMA_HD bool block_full(int64_t m0, int bm, int64_t n0, int bn, int64_t sq, int64_t sk, bool causal,
                               int64_t window) {
  const int64_t off = sk - sq;
  return m0 + bm <= sq && n0 + bn <= sk && (!causal || n0 + bn - 1 <= m0 + off) &&
         (window == 0 || n0 > m0 + bm - 1 + off - window);
}
MIXKIT_MFMA_HD int64_t clamp_window(int64_t w) { return w < (int64_t(1) << 32) ? w : int64_t(1) << 32; }

struct Range {
  int64_t first, end;  // blocks [first, end); empty when end <= first
};
// Blocks of bm queries holding a query that sees a key of [n0, n0 + bn):
// i >= j - off (causal) and i < j - off + W (window), over j in [n0, jmax].
MIXKIT_MFMA_HD Range query_blocks(int64_t n0, int bn, int64_t sq, int64_t sk, bool causal, int64_t window, int bm) {
  const int64_t off = sk - sq;
  const int64_t jmax = (n0 + bn < sk ? n0 + bn : sk) - 1;
  const int64_t lo0 = causal ? n0 - off : 0;
  const int64_t lo = lo0 > 0 ? lo0 : 0;
  // mutant-equivalent(bound): window > 1 widens only W = 1's range, to every
  // later query block; none of those sees these keys, the mask gives them
  // probability 0, and the gradients are the same (at a cost).
  const int64_t hi0 = window > 0 ? jmax - off + window : sq;
  const int64_t hi = hi0 < sq ? hi0 : sq;
  if (jmax < n0 || hi <= lo) return {0, 0};
  return {lo / bm, (hi + bm - 1) / bm};
}
// Blocks of bn keys holding a key that a query of [m0, m0 + bm) sees.
MIXKIT_MFMA_HD Range key_blocks(int64_t m0, int bm, int64_t sq, int64_t sk, bool causal, int64_t window, int bn) {
  const int64_t off = sk - sq;
  const int64_t imax = (m0 + bm < sq ? m0 + bm : sq) - 1;
  const int64_t hi0 = causal ? imax + off + 1 : sk;
  const int64_t hi = hi0 < sk ? hi0 : sk;
  const int64_t lo0 = window > 0 ? m0 + off - window + 1 : 0;
  const int64_t lo = lo0 > 0 ? lo0 : 0;
  if (imax < m0 || hi <= lo) return {0, 0};
  return {lo / bn, (hi + bn - 1) / bn};
}

// P = 2^p_log2 * exp(...): as fa::p_log2 of the forward (flash_attn_fwd_mfma.cuh).
MIXKIT_MFMA_HD int p_log2(bool f16) { return f16 ? 15 : 0; }

// The atomic dQ inside dkdv_kernel at D = 64 only. At D = 128 its dK^T and
// dV^T accumulators (128 registers) plus the dQ tile leave hipcc 5.2 without
// room on gfx940 (512 VGPRs, 10-23 VGPR and 36-54 SGPR spills; gfx90a fits at
// 500-506), so D = 128 takes the deterministic dq_kernel in both modes: the
// same result without dq_accum, at the cost of recomputing S and dP.
template <int D> constexpr bool kAtomicDq = D <= 64;

static_assert(kKvThreads == 128 && kBN == 64 && kBM == 32 && kQThreads == 256 && kQBM == 128 && kQBN == 32,
              "tile plan");
static_assert(2 * lds_tile_size(128, kBN) * 2 + 2 * lds_tile_size(128, kBM) * 2 + 2 * kBM * 4 +
                      lds_ds_size() * 2 <=
                  64 * 1024,
              "dkdv_kernel's LDS at D = 128");
static_assert(x_reg(1, 2) == 6 && acc_row(33, x_reg(1, 2)) == xa_k(1, 33, 2), "P's registers are B of step st");

}  // namespace fab

#if MIXKIT_AMD
}  // namespace mfma
}  // namespace mixkit

#include <cmath>
#include <type_traits>

#include "common/flash_attn.h"
#include "cuda/compat.cuh"
#include "cuda/flash_attn.cuh"

namespace mixkit {
namespace mfma {
namespace fab {

// ============================== kernels ======================================

constexpr float kLog2e = 1.4426950408889634f;

// Which of dK and dV a dkdv_kernel launch computes: both at D <= 128, one
// per launch at D = 256.
constexpr int kDV = 1, kDK = 2, kDKDV = 3;
// K and V staged in LDS (dkdv_kernel), Q and dO held in VGPRs (dq_kernel):
// up to D = 128; at D = 256 both read from global memory per step.
template <int D> constexpr bool kStaged = D <= 128;

// 8 consecutive 16-bit values of one row: step s's operand is elements 4s .. 4s + 3.
template <class T> struct alignas(16) Frag {
  typename Operand<T>::type step[2];
};
template <class T> struct alignas(8) Quad {
  typename Operand<T>::type v;
};

// Four floats rounded once to the operand type (round to nearest even).
template <class T> __device__ __forceinline__ typename Operand<T>::type to_operand(float a, float b, float c, float d);
template <> __device__ __forceinline__ short4_t to_operand<bf16>(float a, float b, float c, float d) {
  return short4_t{short(from_f32<bf16>(a).bits), short(from_f32<bf16>(b).bits), short(from_f32<bf16>(c).bits),
                  short(from_f32<bf16>(d).bits)};
}
template <> __device__ __forceinline__ half4_t to_operand<f16>(float a, float b, float c, float d) {
  return half4_t{_Float16(a), _Float16(b), _Float16(c), _Float16(d)};
}
// Four 16-bit LDS values as an operand.
template <class T> __device__ __forceinline__ typename Operand<T>::type operand_of(uint16_t a, uint16_t b, uint16_t c,
                                                                                   uint16_t d);
template <> __device__ __forceinline__ short4_t operand_of<bf16>(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
  return short4_t{short(a), short(b), short(c), short(d)};
}
template <> __device__ __forceinline__ half4_t operand_of<f16>(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
  return half4_t{__builtin_bit_cast(_Float16, a), __builtin_bit_cast(_Float16, b), __builtin_bit_cast(_Float16, c),
                 __builtin_bit_cast(_Float16, d)};
}

// The 16 bits of operand element e. Copied out of the vector first: clang 15
// (hipcc's, and the emulated build's) compiles __builtin_bit_cast of an
// ext_vector element as a cast of the vector's leading bits, element 0's.
template <class V> __device__ __forceinline__ uint16_t element_bits(const V& v, int e) {
  const auto x = v[e];
  return __builtin_bit_cast(uint16_t, x);
}

__device__ __forceinline__ void zero(float16_t& acc) {
#pragma unroll
  for (int r = 0; r < kAccRegs; ++r) acc[r] = 0.f;
}

// Where sequence b lives (flash::span): cu_seqlens clamped into [0, total).
struct Span {
  int64_t start, len;
};
__device__ __forceinline__ Span span(const int32_t* cu, int64_t b, int64_t fixed_len, int64_t total) {
  if (!cu) return {0, fixed_len};
  const int64_t s = min(max(int64_t(cu[b]), int64_t(0)), total);
  const int64_t e = min(max(int64_t(cu[b + 1]), s), total);
  return {s, e - s};
}

// Rows [row0, row0 + ROWS) of a len-row sequence into a [ROWS][D + kPad]
// tile; rows past the end are zeros.
template <int D, int ROWS, int THREADS, class T>
__device__ __forceinline__ void stage(uint16_t* tile, const T* base, int64_t row_stride, int64_t row0, int64_t len) {
  constexpr int kChunks = stage_chunks(D, ROWS, THREADS);
  static_assert(kChunks * THREADS * 8 == ROWS * D, "staging covers the tile");
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int r = stage_row(D, THREADS, threadIdx.x, i), c = stage_col(D, THREADS, threadIdx.x, i);
    const int64_t row = row0 + r;
    *reinterpret_cast<uint4*>(&tile[lds_row(D, r, c)]) =
        row < len ? *reinterpret_cast<const uint4*>(base + row * row_stride + c) : uint4{0, 0, 0, 0};
  }
}

__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// delta = rowsum(dO * O): D / 8 lanes a row, 16 bytes of each a lane,
// contiguous across the lanes (a thread a row read 16 bytes a row apart:
// twice the sectors per request).
template <int D, class T>
__global__ void __launch_bounds__(256) delta_kernel(FlashBwdArgs a) {
  constexpr int kLanes = D / 8, kRowsPerPass = 256 / kLanes;
  static_assert(256 % kRowsPerPass == 0, "every lane of a wavefront must run the same number of passes (shuffles)");
  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Span qs = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const T* obase = static_cast<const T*>(f.out) + b * f.o_stride[0] + qs.start * f.o_stride[1] + h * f.o_stride[2];
  const T* dobase = static_cast<const T*>(a.dout) + b * a.do_stride[0] + qs.start * a.do_stride[1] + h * a.do_stride[2];
  float* dbase = a.delta + b * f.lse_stride[0] + h * f.lse_stride[1] + qs.start;
  const int chunk = threadIdx.x % kLanes;
  for (int64_t m0 = int64_t(blockIdx.x) * 256; m0 < qs.len; m0 += int64_t(gridDim.x) * 256) {
    for (int r = threadIdx.x / kLanes; r < 256; r += kRowsPerPass) {
      const int64_t i = m0 + r;
      float acc = 0.f;
      if (i < qs.len) {
        const Pack<T, 8> o = *reinterpret_cast<const Pack<T, 8>*>(obase + i * f.o_stride[1] + chunk * 8);
        const Pack<T, 8> d = *reinterpret_cast<const Pack<T, 8>*>(dobase + i * a.do_stride[1] + chunk * 8);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(to_f32(o.v[e]), to_f32(d.v[e]), acc);
      }
#pragma unroll
      for (int m = kLanes / 2; m > 0; m >>= 1) acc += shfl_xor(acc, m);
      if (i < qs.len && chunk == 0) dbase[i] = acc;
    }
  }
}

// dK and/or dV (PARTS) of kBN keys of kv head blockIdx.y, summed over its
// query heads; with DQ also scale * dS K atomically into dq_accum.
template <int D, class T, bool DQ, int PARTS>
__global__ void __launch_bounds__(kKvThreads) dkdv_kernel(FlashBwdArgs a) {
  static_assert(D == 64 || D == 128 || D == 256, "head dims of the GPU kernels");
  constexpr bool DV = PARTS & kDV, DK = PARTS & kDK, kLds = kStaged<D>;
  static_assert(PARTS >= 1 && PARTS <= 3 && (DK || !DQ) && (kLds || !DQ), "dQ needs dS and the staged K");
  constexpr int kTiles = D / kM;  // head-dim tiles of dK^T, dV^T, dQ
  __shared__ __attribute__((aligned(16))) uint16_t Ks[kLds ? lds_tile_size(D, kBN) : 8];
  __shared__ __attribute__((aligned(16))) uint16_t Vs[kLds ? lds_tile_size(D, kBN) : 8];
  __shared__ __attribute__((aligned(16))) uint16_t Qs[lds_tile_size(D, kBM)];
  __shared__ __attribute__((aligned(16))) uint16_t dOs[lds_tile_size(D, kBM)];
  __shared__ __attribute__((aligned(16))) uint16_t dSs[DQ ? lds_ds_size() : 8];
  __shared__ float lse_s[kBM], delta_s[kBM];

  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const int group = int(f.heads / f.kv_heads);
  const Span qspan = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const Span kspan = span(f.cu_seqlens_k, b, f.seqlen_k, f.total_k);
  const int64_t sq = qspan.len, sk = kspan.len, window = clamp_window(f.window);
  // dq_accum is (total_q, heads, D), the fixed layout's rows packed batch-major.
  const int64_t acc_row0 = f.cu_seqlens_q ? qspan.start : b * f.seqlen_q;
  const T* kbase = static_cast<const T*>(f.k) + b * f.k_stride[0] + kspan.start * f.k_stride[1] + hk * f.k_stride[2];
  const T* vbase = static_cast<const T*>(f.v) + b * f.v_stride[0] + kspan.start * f.v_stride[1] + hk * f.v_stride[2];
  // Query-side bases of head 0; head h adds h * stride[2].
  const T* qbase0 = static_cast<const T*>(f.q) + b * f.q_stride[0] + qspan.start * f.q_stride[1];
  const T* dobase0 = static_cast<const T*>(a.dout) + b * a.do_stride[0] + qspan.start * a.do_stride[1];
  const int64_t stat0 = b * f.lse_stride[0] + qspan.start;  // + h * lse_stride[1] + i
  const float* lse_base = f.lse + stat0;
  const float* delta_base = a.delta + stat0;
  // The epilogue's bases and row strides live in VGPRs (the same in every
  // lane): kept in SGPRs through the loops they made the atomic variant
  // spill 16-22 SGPRs (hipcc 5.2).
  T* dk_base = static_cast<T*>(a.dk) + b * a.dk_stride[0] + kspan.start * a.dk_stride[1] + hk * a.dk_stride[2];
  T* dv_base = static_cast<T*>(a.dv) + b * a.dv_stride[0] + kspan.start * a.dv_stride[1] + hk * a.dv_stride[2];
  int64_t dk_rs = a.dk_stride[1], dv_rs = a.dv_stride[1];
#if !defined(MIXKIT_EMULATE)
  asm volatile("" : "+v"(dk_base), "+v"(dv_base), "+v"(dk_rs), "+v"(dv_rs));
#endif

  const int tid = threadIdx.x, lane = tid % kWave, w = tid / kWave;
  // The softcap's constants (cap_mul 0: none) in VGPRs, like the epilogue's
  // bases: as SGPRs they cost the atomic variant 2 SGPR spills (hipcc 5.2).
  float cap = f.softcap, cap_mul = f.softcap > 0.f ? f.scale / f.softcap : 0.f;
#if !defined(MIXKIT_EMULATE)
  asm volatile("" : "+v"(cap), "+v"(cap_mul));
#endif
  const float scale_log2 = (f.softcap > 0.f ? 1.f : f.scale) * kLog2e;
  constexpr float kPLog2 = float(p_log2(std::is_same<T, f16>::value));

  for (int64_t n0 = int64_t(blockIdx.x) * kBN; n0 < sk; n0 += int64_t(gridDim.x) * kBN) {
    const int64_t nw = n0 + w * kN;  // this wavefront's first key
    const Range qb = query_blocks(n0, kBN, sq, sk, f.causal, window, kBM);
    __syncthreads();  // every wavefront is done with the previous key block's tiles
    if constexpr (kLds) {
      stage<D, kBN, kKvThreads>(Ks, kbase, f.k_stride[1], n0, sk);
      stage<D, kBN, kKvThreads>(Vs, vbase, f.v_stride[1], n0, sk);
    }
    // The lane's B fragment of K or V at chunk kc: key w * kN + frag_b_row,
    // from the staged tile or (D = 256) from global memory (zeros past sk).
    const int64_t bkey = nw + frag_b_row(lane);
    auto key_frag = [&](const uint16_t* tile, const T* gbase, int64_t gstride, int kc) -> Frag<T> {
      const int dd = frag_d(kc, lane);
      if constexpr (kLds) return *reinterpret_cast<const Frag<T>*>(&tile[lds_row(D, w * kN + frag_b_row(lane), dd)]);
      else return bkey < sk ? *reinterpret_cast<const Frag<T>*>(gbase + bkey * gstride + dd) : Frag<T>{};
    };

    float16_t dk[DK ? kTiles : 1], dv[DV ? kTiles : 1];
#pragma unroll
    for (int t = 0; t < (DK ? kTiles : 1); ++t) zero(dk[t]);
#pragma unroll
    for (int t = 0; t < (DV ? kTiles : 1); ++t) zero(dv[t]);
    for (int hh = 0; hh < group; ++hh) {
      const int64_t h = hk * group + hh;
      for (int64_t mb = qb.first; mb < qb.end; ++mb) {
        const int64_t m0 = mb * kBM;
        __syncthreads();  // every wavefront is done with the previous step's Q, dO, dS, stats
        stage<D, kBM, kKvThreads>(Qs, qbase0 + h * f.q_stride[2], f.q_stride[1], m0, sq);
        stage<D, kBM, kKvThreads>(dOs, dobase0 + h * a.do_stride[2], a.do_stride[1], m0, sq);
        if (tid < 2 * kBM) {
          const int64_t i = m0 + tid % kBM, idx = h * f.lse_stride[1] + i;
          if (tid < kBM) lse_s[tid] = i < sq ? lse_log2(lse_base[idx]) : INFINITY;
          else delta_s[tid - kBM] = i < sq ? delta_base[idx] : 0.f;
        }
        __syncthreads();

        // S = Q K^T (and, DK, dP = dO V^T): 32 queries x the wavefront's 32 keys.
        float16_t s, dp;
        zero(s);
        zero(dp);
#pragma unroll
        for (int kc = 0; kc < D / kPairK; ++kc) {
          const int ar = frag_a_row(lane), dd = frag_d(kc, lane);
          const Frag<T> qf = *reinterpret_cast<const Frag<T>*>(&Qs[lds_row(D, ar, dd)]);
          const Frag<T> kf = key_frag(Ks, kbase, f.k_stride[1], kc);
#pragma unroll
          for (int st = 0; st < 2; ++st) s = mma_32x32x8(qf.step[st], kf.step[st], s);
          if constexpr (DK) {
            const Frag<T> of = *reinterpret_cast<const Frag<T>*>(&dOs[lds_row(D, ar, dd)]);
            const Frag<T> vf = key_frag(Vs, vbase, f.v_stride[1], kc);
#pragma unroll
            for (int st = 0; st < 2; ++st) dp = mma_32x32x8(of.step[st], vf.step[st], dp);
          }
        }
        // P (times 2^kPLog2) in s, dS in dp. Masked scores become -inf, and
        // -inf - l is -inf for every l, +inf included. Under a softcap the
        // capped score s_c gives dS its factor 1 - (s_c / c)^2.
        const bool full = block_full(m0, kBM, nw, kN, sq, sk, f.causal, window);
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) {
          const int qi = acc_row(lane, r);
          float cap_grad = 1.f;
          if (cap_mul != 0.f) {
            const float t = flash::tanh_via_exp2(s[r] * cap_mul);
            s[r] = cap * t;
            cap_grad = 1.f - t * t;
          }
          if (!full && !visible(m0 + qi, nw + acc_col(lane, r), sq, sk, f.causal, window)) s[r] = -INFINITY;
          s[r] = exp2f(fmaf(s[r], scale_log2, kPLog2 - lse_s[qi]));
          dp[r] = s[r] * exp2f(-kPLog2) * (dp[r] - delta_s[qi]) * cap_grad;
        }

        // P and dS rounded once to T: the B operands of the 4 steps below
        // (and, DQ, the dS tile). Converting before the MFMAs lets the 32
        // f32 values die early: the atomic variant at D = 128 otherwise
        // spills VGPRs on gfx940.
        typename Operand<T>::type pb[kSteps], db[kSteps];
#pragma unroll
        for (int st = 0; st < kSteps; ++st) {
          pb[st] = to_operand<T>(s[x_reg(st, 0)], s[x_reg(st, 1)], s[x_reg(st, 2)], s[x_reg(st, 3)]);
          db[st] = to_operand<T>(dp[x_reg(st, 0)], dp[x_reg(st, 1)], dp[x_reg(st, 2)], dp[x_reg(st, 3)]);
        }
        if constexpr (DQ) {
          // dS into this wavefront's [query][key] tile (register x_reg(st, e)
          // is row acc_row, column acc_col) ...
#pragma unroll
          for (int st = 0; st < kSteps; ++st)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              dSs[lds_ds(w, acc_row(lane, x_reg(st, e)), acc_col(lane, x_reg(st, e)))] = element_bits(db[st], e);
        }

        // dV^T += dO^T P, then dK^T += Q^T dS: B from registers, A = 4
        // 16-bit reads of one head-dim column of dO / Q. Two loops rather
        // than one: the scheduler issues all reads of a loop up front (one
        // VGPR each), and 128 of them made the atomic variant at D = 128
        // spill on gfx940.
        if constexpr (DV) {
#pragma unroll
          for (int st = 0; st < kSteps; ++st)
#pragma unroll
            for (int t = 0; t < kTiles; ++t) {
              uint16_t o4[4];
#pragma unroll
              for (int e = 0; e < 4; ++e) o4[e] = dOs[lds_row(D, xa_k(st, lane, e), xa_row(t, lane, e))];
              dv[t] = mma_32x32x8(operand_of<T>(o4[0], o4[1], o4[2], o4[3]), pb[st], dv[t]);
            }
        }
        if constexpr (DK) {
#pragma unroll
          for (int st = 0; st < kSteps; ++st)
#pragma unroll
            for (int t = 0; t < kTiles; ++t) {
              uint16_t q4[4];
#pragma unroll
              for (int e = 0; e < 4; ++e) q4[e] = Qs[lds_row(D, xa_k(st, lane, e), xa_row(t, lane, e))];
              dk[t] = mma_32x32x8(operand_of<T>(q4[0], q4[1], q4[2], q4[3]), db[st], dk[t]);
            }
        }

        if constexpr (DQ) {
          // mutant-equivalent(barrier): the dS tile is this wavefront's own
          // (lds_ds(w, ..): rows w * kBM on), so no other wavefront reads or
          // writes it, and DQ implies DK: the DK loop's MFMAs, which wait for
          // the whole wavefront, lie between its stores and these reads; a
          // wavefront's LDS operations execute in order. Kept as the compiler
          // fence that keeps these cross-lane reads after the stores.
          __syncthreads();
          // ... read back as A of dQ = dS K over the wavefront's 32 keys.
          // Register r is query row 8 (r / 4) + r % 4 below the lane's first
          // (acc_row): one per-lane pointer plus constant row offsets keeps
          // the scalar registers from spilling (24 SGPR spills otherwise).
          const int64_t row_stride = f.heads * D;
          const int64_t left = sq - m0 - acc_row(lane, 0);  // rows from the lane's first to the end
          float* acc_lane = a.dq_accum + ((acc_row0 + m0 + acc_row(lane, 0)) * f.heads + h) * D + acc_col(lane, 0);
#pragma unroll 1
          for (int t = 0; t < kTiles; ++t) {
            float16_t dq;
            zero(dq);
#pragma unroll
            for (int st = 0; st < kSteps; ++st) {
              const auto af = *reinterpret_cast<const Quad<T>*>(&dSs[lds_ds(w, dqa_q(lane, 0), dqa_key(st, lane, 0))]);
              uint16_t k4[4];
#pragma unroll
              for (int e = 0; e < 4; ++e) k4[e] = Ks[lds_row(D, w * kN + dqb_key(st, lane, e), dqb_d(t, lane, e))];
              dq = mma_32x32x8(af.v, operand_of<T>(k4[0], k4[1], k4[2], k4[3]), dq);
            }
#pragma unroll
            for (int r = 0; r < kAccRegs; ++r) {
              const int dr = acc_row(lane, r) - acc_row(lane, 0);  // 8 (r / 4) + r % 4
              // unsafeAtomicAdd: the hardware global_atomic_add_f32 instead of
              // atomicAdd's compare-and-swap loop (16 a tile under hipcc 5.2).
              // Correct on coarse-grained memory (hipMalloc, hence torch's
              // allocator), not on fine-grained / host memory on MI200.
              if (dr < left) unsafeAtomicAdd(acc_lane + dr * row_stride + t * kN, f.scale * dq[r]);
            }
          }
        }
      }
    }

    // Epilogue: lane l writes key nw + l % 32, 4 consecutive d a store; keys
    // past sk are not written, keys no query sees get zeros.
    const int64_t key = nw + g_col(lane, 0);
    if (key < sk) {
      T* dkrow = dk_base + key * dk_rs;
      T* dvrow = dv_base + key * dv_rs;
      const float vscale = exp2f(-kPLog2);
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int g = 0; g < kAccRegs / 4; ++g) {
          if constexpr (DK) {
            Pack<T, 4> pk;
#pragma unroll
            for (int e = 0; e < 4; ++e) pk.v[e] = from_f32<T>(dk[t][4 * g + e] * f.scale);
            *reinterpret_cast<Pack<T, 4>*>(dkrow + g_d(t, lane, 4 * g)) = pk;
          }
          if constexpr (DV) {
            Pack<T, 4> pv;
#pragma unroll
            for (int e = 0; e < 4; ++e) pv.v[e] = from_f32<T>(dv[t][4 * g + e] * vscale);
            *reinterpret_cast<Pack<T, 4>*>(dvrow + g_d(t, lane, 4 * g)) = pv;
          }
        }
    }
  }
}

// Deterministic dQ: kQBM queries of head blockIdx.y, 32 a wavefront; key
// blocks of kQBN in increasing order.
template <int D, class T>
__global__ void __launch_bounds__(kQThreads) dq_kernel(FlashBwdArgs a) {
  static_assert(D == 64 || D == 128 || D == 256, "head dims of the GPU kernels");
  constexpr bool kRegs = kStaged<D>;  // Q and dO fragments held in VGPRs
  constexpr int kTiles = D / kM;
  __shared__ __attribute__((aligned(16))) uint16_t Ks[lds_tile_size(D, kQBN)];
  __shared__ __attribute__((aligned(16))) uint16_t Vs[lds_tile_size(D, kQBN)];

  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, h = blockIdx.y, kvh = h / (f.heads / f.kv_heads);
  const Span qspan = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const Span kspan = span(f.cu_seqlens_k, b, f.seqlen_k, f.total_k);
  const int64_t sq = qspan.len, sk = kspan.len, window = clamp_window(f.window);
  const T* qbase = static_cast<const T*>(f.q) + b * f.q_stride[0] + qspan.start * f.q_stride[1] + h * f.q_stride[2];
  const T* dobase =
      static_cast<const T*>(a.dout) + b * a.do_stride[0] + qspan.start * a.do_stride[1] + h * a.do_stride[2];
  const T* kbase = static_cast<const T*>(f.k) + b * f.k_stride[0] + kspan.start * f.k_stride[1] + kvh * f.k_stride[2];
  const T* vbase = static_cast<const T*>(f.v) + b * f.v_stride[0] + kspan.start * f.v_stride[1] + kvh * f.v_stride[2];
  T* dqbase = static_cast<T*>(a.dq) + b * a.dq_stride[0] + qspan.start * a.dq_stride[1] + h * a.dq_stride[2];
  const int64_t stat0 = b * f.lse_stride[0] + h * f.lse_stride[1] + qspan.start;

  const int tid = threadIdx.x, lane = tid % kWave, w = tid / kWave;
  const bool capped = f.softcap > 0.f;
  const float scale_log2 = (capped ? 1.f : f.scale) * kLog2e;
  const float cap_mul = capped ? f.scale / f.softcap : 0.f;
  const int64_t nblocks_q = (sq + kQBM - 1) / kQBM;

  // Latest query blocks first: under a causal mask they see the most keys.
  for (int64_t mb = int64_t(gridDim.x) - 1 - blockIdx.x; mb < nblocks_q; mb += gridDim.x) {
    const int64_t m0 = mb * kQBM, mw = m0 + w * kN;
    const Range kb = key_blocks(m0, kQBM, sq, sk, f.causal, window, kQBN);

    // Q and dO as B fragments (8 consecutive d of the lane's query per
    // chunk): loaded once into VGPRs, or (D = 256) re-read per key block.
    const int64_t qrow = mw + frag_b_row(lane);
    auto q_frag = [&](const T* base, int64_t stride, int kc) {
      return qrow < sq ? *reinterpret_cast<const Frag<T>*>(base + qrow * stride + frag_d(kc, lane)) : Frag<T>{};
    };
    Frag<T> qf[kRegs ? D / kPairK : 1], of[kRegs ? D / kPairK : 1];
    if constexpr (kRegs) {
#pragma unroll
      for (int kc = 0; kc < D / kPairK; ++kc) {
        qf[kc] = q_frag(qbase, f.q_stride[1], kc);
        of[kc] = q_frag(dobase, a.do_stride[1], kc);
      }
    }
    // The lane's query in S^T (acc_col) is its B column (frag_b_row): one lse, one delta.
    const int64_t srow = mw + acc_col(lane, 0);
    const float lse = srow < sq ? lse_log2(f.lse[stat0 + srow]) : INFINITY;
    const float delta = srow < sq ? a.delta[stat0 + srow] : 0.f;

    float16_t dq[kTiles];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) zero(dq[t]);
    for (int64_t nb = kb.first; nb < kb.end; ++nb) {
      const int64_t n0 = nb * kQBN;
      __syncthreads();  // every wavefront is done with the previous block
      stage<D, kQBN, kQThreads>(Ks, kbase, f.k_stride[1], n0, sk);
      stage<D, kQBN, kQThreads>(Vs, vbase, f.v_stride[1], n0, sk);
      __syncthreads();

      // S^T = K Q^T, dP^T = V dO^T: 32 keys x the wavefront's 32 queries.
      float16_t s, dp;
      zero(s);
      zero(dp);
#pragma unroll
      for (int kc = 0; kc < D / kPairK; ++kc) {
        const int at = lds_row(D, frag_a_row(lane), frag_d(kc, lane));
        const Frag<T> kf = *reinterpret_cast<const Frag<T>*>(&Ks[at]);
        const Frag<T> vf = *reinterpret_cast<const Frag<T>*>(&Vs[at]);
        Frag<T> qk, ok;
        if constexpr (kRegs) {
          qk = qf[kc];
          ok = of[kc];
        } else {
          qk = q_frag(qbase, f.q_stride[1], kc);
          ok = q_frag(dobase, a.do_stride[1], kc);
        }
#pragma unroll
        for (int st = 0; st < 2; ++st) {
          s = mma_32x32x8(kf.step[st], qk.step[st], s);
          dp = mma_32x32x8(vf.step[st], ok.step[st], dp);
        }
      }
      const bool full = block_full(mw, kN, n0, kQBN, sq, sk, f.causal, window);
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) {
        float cap_grad = 1.f;
        if (capped) {
          const float t = flash::tanh_via_exp2(s[r] * cap_mul);
          s[r] = f.softcap * t;
          cap_grad = 1.f - t * t;
        }
        if (!full && !visible(mw + acc_col(lane, r), n0 + acc_row(lane, r), sq, sk, f.causal, window))
          s[r] = -INFINITY;
        dp[r] = exp2f(fmaf(s[r], scale_log2, -lse)) * (dp[r] - delta) * cap_grad;
      }
      // dQ^T += K^T dS^T: B = dS^T's registers, A = 4 16-bit reads of one
      // head-dim column of K.
#pragma unroll
      for (int st = 0; st < kSteps; ++st) {
        const auto db = to_operand<T>(dp[x_reg(st, 0)], dp[x_reg(st, 1)], dp[x_reg(st, 2)], dp[x_reg(st, 3)]);
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          uint16_t k4[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) k4[e] = Ks[lds_row(D, xa_k(st, lane, e), xa_row(t, lane, e))];
          dq[t] = mma_32x32x8(operand_of<T>(k4[0], k4[1], k4[2], k4[3]), db, dq[t]);
        }
      }
    }

    // Epilogue: the lane's query, 4 consecutive d a store.
    const int64_t row = mw + g_col(lane, 0);
    if (row < sq) {
      T* dqrow = dqbase + row * a.dq_stride[1];
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int g = 0; g < kAccRegs / 4; ++g) {
          Pack<T, 4> pk;
#pragma unroll
          for (int e = 0; e < 4; ++e) pk.v[e] = from_f32<T>(dq[t][4 * g + e] * f.scale);
          *reinterpret_cast<Pack<T, 4>*>(dqrow + g_d(t, lane, 4 * g)) = pk;
        }
    }
  }
}

// dq = dq_accum rounded to T (dq_accum already holds scale * dS K). A row is
// D / 4 lanes converting 4 elements each: one 16-byte load (flash_attn_bwd_gpu
// checks dq_accum's alignment) and one 8-byte store, both contiguous across
// the lanes. (A thread a row read D * heads * 4 bytes apart across the lanes:
// a sector per lane per load.)
template <int D, class T>
__global__ void __launch_bounds__(256) dq_convert_kernel(FlashBwdArgs a) {
  constexpr int kLanes = D / 4, kRowsPerPass = 256 / kLanes;
  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Span qs = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const int64_t acc_row0 = f.cu_seqlens_q ? qs.start : b * f.seqlen_q;
  T* dqbase = static_cast<T*>(a.dq) + b * a.dq_stride[0] + qs.start * a.dq_stride[1] + h * a.dq_stride[2];
  const int chunk = threadIdx.x % kLanes;
  for (int64_t m0 = int64_t(blockIdx.x) * 256; m0 < qs.len; m0 += int64_t(gridDim.x) * 256) {
    for (int r = threadIdx.x / kLanes; r < 256; r += kRowsPerPass) {
      const int64_t i = m0 + r;
      if (i >= qs.len) break;
      const float* src = a.dq_accum + ((acc_row0 + i) * f.heads + h) * D + chunk * 4;
      const Pack<float, 4> in = *reinterpret_cast<const Pack<float, 4>*>(src);
      Pack<T, 4> out;
#pragma unroll
      for (int e = 0; e < 4; ++e) out.v[e] = from_f32<T>(in.v[e]);
      *reinterpret_cast<Pack<T, 4>*>(dqbase + i * a.dq_stride[1] + chunk * 4) = out;
    }
  }
}

// ============================== launcher =====================================


// At least one block per (sequence, head): the kernels walk the real lengths
// with a grid stride.
inline unsigned grid_blocks(int64_t len, int tile) {
  const int64_t n = (len + tile - 1) / tile;
  return unsigned(n < 1 ? 1 : n > INT32_MAX ? INT32_MAX : n);
}

// The caller (flash_attn_bwd_gpu) checks the arguments (check(), head dim,
// dtype, 16-byte alignment, strides multiple of 8), returns early on empty
// problems (batch 0) and sets the device, as for the CUDA kernels.
template <int D, class T> void flash_bwd(const FlashBwdArgs& a, hipStream_t stream) {
  const FlashFwdArgs& f = a.f;
  const unsigned batch = unsigned(f.batch), heads = unsigned(f.heads), kv_heads = unsigned(f.kv_heads);
  const bool has_q = f.total_q > 0;
  if (has_q) {
    gpu_launch((delta_kernel<D, T>), dim3(grid_blocks(f.seqlen_q, 256), heads, batch), dim3(256), 0, stream, a);
    gpu_check(hipGetLastError(), "launching the MFMA flash_bwd delta_kernel");
  }
  // With no query rows dK and dV are zeros: dkdv_kernel finds no query
  // blocks and writes them without touching q, dout, lse or delta.
  const dim3 kv_grid(grid_blocks(f.seqlen_k, kBN), kv_heads, batch);
  const bool atomic_dq = kAtomicDq<D> && !a.deterministic && has_q;
  if constexpr (kAtomicDq<D>) {
    if (atomic_dq) gpu_launch((dkdv_kernel<D, T, true, kDKDV>), kv_grid, dim3(kKvThreads), 0, stream, a);
  }
  // D = 256: dV, then dK, in two launches (see the top).
  constexpr int kParts = kStaged<D> ? kDKDV : kDK;
  if constexpr (kParts == kDK) gpu_launch((dkdv_kernel<D, T, false, kDV>), kv_grid, dim3(kKvThreads), 0, stream, a);
  if (!atomic_dq) gpu_launch((dkdv_kernel<D, T, false, kParts>), kv_grid, dim3(kKvThreads), 0, stream, a);
  gpu_check(hipGetLastError(), "launching the MFMA flash_bwd dkdv_kernel");
  if (!has_q) return;
  if (!atomic_dq) {
    gpu_launch((dq_kernel<D, T>), dim3(grid_blocks(f.seqlen_q, kQBM), heads, batch), dim3(kQThreads), 0, stream, a);
    gpu_check(hipGetLastError(), "launching the MFMA flash_bwd dq_kernel");
  } else {
    gpu_launch((dq_convert_kernel<D, T>), dim3(grid_blocks(f.seqlen_q, 256), heads, batch), dim3(256), 0, stream, a);
    gpu_check(hipGetLastError(), "launching the MFMA flash_bwd dq_convert_kernel");
  }
}

}  // namespace fab

// mixkit::mfma::flash_bwd<D, T>: the entry point flash_attn.cu dispatches to.
template <int D, class T> void flash_bwd(const FlashBwdArgs& a, hipStream_t stream) { fab::flash_bwd<D, T>(a, stream); }

#endif  // MIXKIT_AMD

}  // namespace mfma
}  // namespace mixkit

#endif  // !__CUDACC__ || __HIPCC__
