// Flash-attention backward for sm_80 and up: mma.sync m16n8k16 (bf16/fp16 in,
// float32 accumulate), ldmatrix from XOR-swizzled shared memory, cp.async
// double buffering. Included only by the generated per-(head dim, dtype)
// files (CMakeLists.txt).
//
// Three or four launches on the caller's stream:
//  1. delta_kernel:  delta_i = sum_d dO[i, d] * O[i, d] (float32, lse layout).
//  2. dkdv_kernel:   a CTA owns BN = 64 keys of one (sequence, kv head), 4
//     warps of 16 keys, and loops over every query head of the GQA group and
//     every query block that can see its keys. It works in the transposed
//     orientation (keys are the M dimension), so that S^T, P^T and dS^T land
//     in accumulators whose layout is the A operand of dV += P^T dO and
//     dK += dS^T Q: P and dS never touch shared memory on their way to dK
//     and dV, and dK/dV are summed over the group inside the CTA, without
//     atomics, deterministic in both modes.
//     With atomics allowed (!deterministic) it also writes dS^T to shared
//     memory and each warp adds scale * dS K for 16 query rows into the
//     float32 dq_accum with atomicAdd.
//  3. !deterministic: dq_convert_kernel rounds dq_accum into dq.
//     deterministic:  dq_kernel owns 64 query rows of one (sequence, head)
//     and walks its visible key blocks in increasing order, recomputing S
//     and dP (two extra GEMMs per block) to get dQ without atomics.
//
// Head dim 256: a warp's dK and dV (16 keys x D each) would take 256
// accumulators a thread, so dkdv_kernel runs twice, once for dV (S^T, P^T,
// dV: two GEMMs) and once for dK (and the atomic dQ): S^T, P^T, dP^T, dS^T,
// dK, four GEMMs. That is one GEMM more than the joint kernel's five, for
// the same 160 live accumulators as D = 128. dq_kernel takes key steps of
// 32 there (its dQ alone is 128 floats).
//
// Softcap: S is capped as in the forward (c * tanh(s * scale / c), softmax
// scale 1 after it), and dS gains the factor 1 - tanh^2, recovered from P
// and lse (flash::softcap_grad) rather than kept in registers through two
// GEMMs. Sinks need nothing here: the forward's lse includes the sink, so P
// is already right, and dsinks is formed by the caller from lse and delta.
//
// P = exp2(q.k * scale * log2(e) - lse * log2(e)). Rows that saw no key have
// lse = -inf; the kernels replace it by +inf (and delta by 0 for query rows
// past the sequence), so P = exp2(-inf) = 0 exactly and neither inf - inf nor
// 0 * inf can appear. Element masks are applied only on (query block, key
// block) pairs that straddle the causal diagonal, the window edge or the end
// of the keys; query rows past the sequence need no mask (P = 0 through lse).
//
// Robustness without a host sync: sequence bounds from cu_seqlens are clamped
// to the tensors and every kernel loops over its blocks with a stride of the
// grid, so a max_seqlen hint that is too small costs speed, never rows.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>

#include "cuda/flash_attn.cuh"
#include "cuda/mma_sm80.cuh"

namespace mixkit {
namespace sm80 {
namespace bwd {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int BN = 16 * kWarps;  // keys per dK/dV CTA
constexpr int BQ = 16 * kWarps;  // query rows per dq_kernel / delta_kernel / dq_convert_kernel block
template <int D> constexpr int kBNq = D > 128 ? 32 : 64;  // keys per step of dq_kernel
// Which of dK and dV a dkdv_kernel launch computes: both at D <= 128, one
// per launch at D = 256.
constexpr int kDV = 1, kDK = 2, kDKDV = 3;
constexpr float kLog2e = 1.4426950408889634f;

// Query rows per step of dkdv_kernel. A thread holds dK and dV (D floats)
// plus S^T and dP^T (BM / 2 floats each). At D = 128, BM = 64 (192 live
// accumulators) sits on the 255-register edge: nvcc 13.0 spills 20 bytes in
// the sm_90a atomic-dQ variant and its result flips with small code changes.
// BM = 32 (160) compiles without spills on sm_80 and sm_90a at the cost of
// twice the steps (barriers, K/V fragment reloads). D = 64 keeps BM = 64.
template <int D> constexpr int kBM = D <= 64 ? 64 : 32;

using flash::Span;
using flash::span;
using flash::swz;

// The mask of one sequence: key j is visible to query i when j < sk,
// j - i <= hi (causal) and j - i > lo (window). Lengths are below 2^31, so
// j - i lies in [1 - 2^31, 2^31 - 1]: an absent bound is INT_MAX / INT_MIN,
// and a window reaching past every key clamps to INT_MIN with the same
// outcome. Range arithmetic on these bounds is done in 64 bits.
struct Mask {
  int sk, hi, lo;
  // Every pair of rows [m0, m0 + bm) and keys [n0, n0 + bn) is visible, or
  // hidden only because the row is past the sequence (which lse handles).
  __device__ __forceinline__ bool full(int64_t m0, int bm, int64_t n0, int bn) const {
    return n0 + bn <= sk && n0 + bn - 1 - m0 <= hi && n0 - (m0 + bm - 1) > lo;
  }
};
__device__ __forceinline__ Mask make_mask(const FlashFwdArgs& f, int64_t sq, int64_t sk) {
  const int64_t off = sk - sq;
  return {int(sk), f.causal ? int(off) : INT_MAX,
          f.window > 0 ? int(max(off - min(f.window, int64_t(1) << 32), int64_t(INT_MIN))) : INT_MIN};
}

// The mask of one block pair in offsets from its corner: key jj = j - n0 is
// visible to row ii = i - m0 when jj < kend, jj - ii <= hi and jj - ii > lo.
// With ii in [0, BMx) and jj in [0, BNx), jj - ii lies in [1 - BMx, BNx - 1],
// so clamping hi and lo to [-BMx, BNx] keeps every outcome.
struct BlockMask {
  int kend, hi, lo;
  __device__ __forceinline__ bool visible(int ii, int jj) const {
    const int d = jj - ii;
    return jj < kend && d <= hi && d > lo;
  }
};
template <int BMx, int BNx>
__device__ __forceinline__ BlockMask block_mask(const Mask& m, int64_t m0, int64_t n0) {
  auto clamp = [](int64_t v) { return int(min(max(v, int64_t(-BMx)), int64_t(BNx))); };
  const int64_t diag = n0 - m0;
  return {int(min(m.sk - n0, int64_t(BNx))), clamp(m.hi - diag), clamp(m.lo - diag)};
}

// lse in log2 units for P = exp2(s * scale_log2 - l); -inf (a row that sees
// no key) and rows past the sequence become +inf so that P = 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// ---- shared-memory addressing ------------------------------------------------
// Tiles live at 128-byte aligned 32-bit shared addresses. Every ldmatrix lane
// keeps one address per access pattern, lane_addr = tile + byte offset of
// (row r_l, chunk c_l) with c_l in {0, 1}; the (row R, chunk C) step of an
// unrolled loop, R a multiple of 8 and C even (or c_l = 0), is then
//   (lane_addr ^ ((C & 7) << 4)) + (C & ~7) * 16 + R * pitch
// because the swizzle only XORs chunk bits 4-6 of the byte offset with row
// bits that a multiple of 8 rows leaves alone. That is one LOP3 on a live
// register with immediates, so ptxas rematerialises it instead of keeping a
// precomputed address per (R, C) for the whole kernel, which is what pushed
// dkdv_kernel at D = 128 past 255 registers with pointer arithmetic.
template <int CH>
__device__ __forceinline__ uint32_t swz_bytes(int r, int c) {
  return uint32_t(swz<CH>(r, c)) * 2u;  // 16-bit elements
}
template <int CH>
__device__ __forceinline__ uint32_t at(uint32_t lane_addr, int R, int C) {
  if constexpr (CH == 4) return (lane_addr ^ uint32_t(C << 4)) + uint32_t(R * 64);
  else return (lane_addr ^ uint32_t((C & 7) << 4)) + uint32_t((C & ~7) * 16 + R * CH * 16);
}

// The three lane patterns of ldmatrix.x4 (see mma_abt, mma_xb): address of
// this lane's 8x8-matrix row within a 16-row x 2-chunk step.
//   A:        lanes 0-15 rows 0-15 at chunk 0, lanes 16-31 the same at chunk 1
//   B (N,K):  lanes 0-7 rows 0-7 chunk 0, 8-15 rows 0-7 chunk 1, 16-23 rows
//             8-15 chunk 0, 24-31 rows 8-15 chunk 1
//   B^T (K,N): lanes 0-7 rows 0-7 chunk 0, 8-15 rows 8-15 chunk 0, 16-23
//             rows 0-7 chunk 1, 24-31 rows 8-15 chunk 1
template <int CH>
__device__ __forceinline__ uint32_t lane_a(uint32_t tile, int row0, int lane) {
  return tile + swz_bytes<CH>(row0 + (lane & 15), lane >> 4);
}
template <int CH>
__device__ __forceinline__ uint32_t lane_b(uint32_t tile, int lane) {
  return tile + swz_bytes<CH>((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
}
template <int CH>
__device__ __forceinline__ uint32_t lane_bt(uint32_t tile, int lane) {
  return tile + swz_bytes<CH>((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
}

// mma_sm80.cuh's wrappers take generic pointers; these take the 32-bit
// shared address directly so the XOR form above reaches the instruction.
#if defined(MIXKIT_EMULATE)
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr, const emu::trace::Site& site = {}) {
  emu::sm80::ldmatrix(r, emu::shared_ptr(addr, 16), false, site);
}
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr, const emu::trace::Site& site = {}) {
  emu::sm80::ldmatrix(r, emu::shared_ptr(addr, 16), true, site);
}
inline void sts_u32(uint32_t addr, uint32_t v) { std::memcpy(emu::shared_ptr(addr, 4), &v, 4); }
inline void sts_f32(uint32_t addr, float v) { std::memcpy(emu::shared_ptr(addr, 4), &v, 4); }
inline float2 lds_f32x2(uint32_t addr) {
  if (addr % 8) emu::fail("ld.shared.v2.f32 needs an 8-byte aligned address");
  float2 v;
  std::memcpy(&v, emu::shared_ptr(addr, 8), 8);
  return v;
}
inline void cp_async16_to(uint32_t dst, const void* src, bool valid, const emu::trace::Site& site = {}) {
  emu::sm80::cp_async16(emu::shared_ptr(dst, 16), src, valid ? 16 : 0, site);
}
#else
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void sts_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v));
}
__device__ __forceinline__ void sts_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v));
}
__device__ __forceinline__ float2 lds_f32x2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ void cp_async16_to(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
#endif

// Copies rows [row0, row0 + ROWS) of a (len)-row sequence into a swizzled
// [ROWS][D] tile at shared address `tile`; rows past the end are
// zero-filled. TPR threads share a row: a thread copies chunks tid % TPR +
// j * TPR of rows tid / TPR + i * RS. RS (8 or 16) is a multiple of 8 and TPR
// (at D = 256, 16 threads for 32 chunks) a multiple of 8 when it is not the
// whole row, so the swizzle leaves the steps as plain offsets: RS rows, or
// TPR chunks.
template <int D, int ROWS, class T>
__device__ __forceinline__ void load_tile(uint32_t tile, const T* base, int64_t row_stride, int64_t row0,
                                          int64_t len) {
  constexpr int CH = D / 8, TPR = CH < kThreads / 8 ? CH : kThreads / 8, RS = kThreads / TPR;
  static_assert(ROWS % RS == 0 && RS % 8 == 0 && CH % TPR == 0 && (TPR == CH || TPR % 8 == 0),
                "tile rows must divide among the threads");
  const int r = threadIdx.x / TPR, c = threadIdx.x % TPR;
  const uint32_t dst = tile + swz_bytes<CH>(r, c);
  const T* src = base + (row0 + r) * row_stride + c * 8;
  // Rolled at D = 256 (as in flash_attn_fwd_sm80.cuh): unrolled, the copies'
  // addresses outlive the loop and the kernels spill (nvcc 13.0, sm_80).
  constexpr int kUnroll = D > 128 ? 1 : ROWS / RS;
#pragma unroll kUnroll
  for (int i = 0; i < ROWS / RS; ++i) {
    const bool ok = row0 + r + i * RS < len;
#pragma unroll
    for (int j = 0; j < CH / TPR; ++j)
      cp_async16_to(dst + uint32_t(i * RS * CH * 16 + j * TPR * 16),
                    ok ? src + i * RS * row_stride + j * TPR * 8 : base, ok);
  }
}

// acc[16 x N] += A[16 rows] . B[N rows]^T over the D columns of two swizzled
// [rows][D] tiles: S^T = K Q^T, dP^T = V dO^T (dkdv_kernel) and S = Q K^T,
// dP = dO V^T (dq_kernel). a_lane: lane_a at the A rows, b_lane: lane_b, both
// of the shared-memory base; a_tile, b_tile: the tiles' byte offsets
// (multiples of 128), added after the XOR so that all tiles of one shape
// share one lane register per pattern. B is an (N, K) tile, so plain
// ldmatrix gives {b0, b1} of n8 tiles 2p and 2p + 1.
template <int D, int N, class T>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], uint32_t a_lane, uint32_t a_tile, uint32_t b_lane,
                                        uint32_t b_tile) {
  constexpr int CH = D / 8;
#pragma unroll 2
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t af[4];
    ldsm_x4(af, at<CH>(a_lane, 0, ks * 2) + a_tile);
#pragma unroll
    for (int p = 0; p < N / 16; ++p) {
      uint32_t r4[4];
      ldsm_x4(r4, at<CH>(b_lane, p * 16, ks * 2) + b_tile);
      Mma<T>::run(acc[2 * p], af, r4[0], r4[1]);
      Mma<T>::run(acc[2 * p + 1], af, r4[2], r4[3]);
    }
  }
}

// acc[16 x D] += X[16 x KD] . B[KD x D] where X is a float accumulator tile
// (16 rows x KD columns, n8 tiles) and B a swizzled [KD][D] tile: dV += P^T
// dO, dK += dS^T Q (dkdv_kernel), dQ += dS K (dq_kernel). The C fragments of
// n8 tiles 2kk and 2kk + 1, packed to T, are the A fragment of k16 step kk
// (mma_sm80.cuh). B is a (K, N) tile: ldmatrix.trans with b_lane = lane_bt
// of the shared-memory base, b_tile the tile's byte offset.
template <int KD, int D, class T>
__device__ __forceinline__ void mma_xb(float (&acc)[D / 8][4], const float (&x)[KD / 8][4], uint32_t b_lane,
                                       uint32_t b_tile) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int kk = 0; kk < KD / 16; ++kk) {
    const uint32_t xa[4] = {pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
                            pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                            pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int p = 0; p < D / 16; ++p) {
      uint32_t r4[4];
      ldsm_x4_trans(r4, at<CH>(b_lane, kk * 16, p * 2) + b_tile);
      Mma<T>::run(acc[2 * p], xa, r4[0], r4[1]);
      Mma<T>::run(acc[2 * p + 1], xa, r4[2], r4[3]);
    }
  }
}

// The dynamic shared memory rounded up to 128 bytes (the XOR addressing
// needs aligned tiles; launches request kAlignPad extra bytes).
constexpr int kAlignPad = 128;
__device__ __forceinline__ unsigned char* aligned_smem(unsigned char* raw) {
  const uint32_t pad = (128u - (sm80::smem_addr(raw) & 127u)) & 127u;
  return raw + pad;
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// ============================== kernels ======================================

// delta = rowsum(dO * O): D / 8 lanes per row, 16 bytes of each per lane.
template <int D, class T>
__global__ void __launch_bounds__(kThreads) delta_kernel(FlashBwdArgs a) {
  constexpr int kLanes = D / 8, kRowsPerPass = kThreads / kLanes;
  static_assert(BQ % kRowsPerPass == 0, "every lane of a warp must run the same number of passes (shuffles)");
  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Span qs = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const T* obase = static_cast<const T*>(f.out) + b * f.o_stride[0] + qs.start * f.o_stride[1] + h * f.o_stride[2];
  const T* dobase = static_cast<const T*>(a.dout) + b * a.do_stride[0] + qs.start * a.do_stride[1] + h * a.do_stride[2];
  float* dbase = a.delta + b * f.lse_stride[0] + h * f.lse_stride[1] + qs.start;
  const int chunk = threadIdx.x % kLanes;
  for (int64_t m0 = int64_t(blockIdx.x) * BQ; m0 < qs.len; m0 += int64_t(gridDim.x) * BQ) {
#pragma unroll 2
    for (int r = threadIdx.x / kLanes; r < BQ; r += kRowsPerPass) {
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

// dK and/or dV (PARTS: kDV, kDK, kDKDV) of BN keys of kv head blockIdx.y,
// summed over the query heads of its group; with DQ (kDK in PARTS) also
// scale * dS K atomically into dq_accum.
//
// Work is one sequence of (query head, query block) steps so that the
// double buffer prefetches across heads too. Per step t, stage s = t & 1:
//   wait + barrier       stage s (Q, dO, lse, delta) is in shared memory and
//                        every warp is done with step t - 1
//   prefetch t + 1       cp.async of Q, dO into stage s ^ 1; lse and delta
//                        into a register (one value a thread)
//   S^T, P^T, dV, dP^T, dS^T, dK   warp-local, registers
//   DQ: dS^T -> smem, barrier, dQ rows -> atomicAdd
//   lse/delta register -> stage s ^ 1 (read by step t + 1 after its barrier)
template <int D, class T, bool DQ, int PARTS>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(FlashBwdArgs a) {
  constexpr bool DV = PARTS & kDV, DK = PARTS & kDK;
  static_assert(PARTS >= 1 && PARTS <= 3 && (DK || !DQ), "dQ needs dS: the dK part");
  constexpr int BM = kBM<D>;
  constexpr int NT = BM / 8;  // n8 tiles of queries in S^T
  constexpr int DT = D / 8;   // n8 tiles of the head dim
  static_assert(BM % 16 == 0 && 2 * BM <= kThreads && kWarps % (BM / 16) == 0, "query block shape");

  constexpr int CH = D / 8, SCH = BM / 8;  // 16-byte chunks a row: [*][D] tiles, the dS^T tile
  constexpr uint32_t kKVBytes = BN * D * 2, kQBytes = BM * D * 2, kSBytes = DQ ? BN * BM * 2 : 0;
  // Byte offsets from the (128-byte aligned) shared-memory base.
  constexpr uint32_t Ks = 0, Vs = Ks + kKVBytes;
  constexpr uint32_t Qs = Vs + kKVBytes;      // [2][BM][D]
  constexpr uint32_t dOs = Qs + 2 * kQBytes;  // [2][BM][D]
  constexpr uint32_t dSs = dOs + 2 * kQBytes;  // [BN][BM], DQ only
  constexpr uint32_t lse_s = dSs + kSBytes;     // [2][BM] float, log2 units
  constexpr uint32_t delta_s = lse_s + 2 * BM * 4;  // [2][BM] float
  MIXKIT_DYNAMIC_SMEM(smem_raw, 128);
  const uint32_t base = smem_addr(aligned_smem(smem_raw));

  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const int group = int(f.heads / f.kv_heads);
  const Span qspan = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const Span kspan = span(f.cu_seqlens_k, b, f.seqlen_k, f.total_k);
  const int sq = int(qspan.len), sk = int(kspan.len);  // below 2^31: 32-bit to spare registers
  const Mask mask = make_mask(f, sq, sk);
  // dq_accum is (total_q, heads, D) with the rows of the fixed layout packed
  // batch-major, so row i of sequence b is row acc_row0 + i.
  const int acc_row0 = int(f.cu_seqlens_q ? qspan.start : b * f.seqlen_q);  // < total_q < 2^31

  const int kstart = int(kspan.start);  // < total_k < 2^31
  // Query-side bases for head 0; head h adds h * stride[2].
  const T* qbase0 = static_cast<const T*>(f.q) + b * f.q_stride[0] + qspan.start * f.q_stride[1];
  const T* dobase0 = static_cast<const T*>(a.dout) + b * a.do_stride[0] + qspan.start * a.do_stride[1];
  const int64_t stat0 = b * f.lse_stride[0] + qspan.start;  // + h * lse_stride[1] + i

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c2 = (lane & 3) * 2;
  const bool capped = f.softcap > 0.f;
  const float scale_log2 = (capped ? 1.f : f.scale) * kLog2e;
  const float inv_cap = capped ? 1.f / f.softcap : 0.f;
  // Per-lane ldmatrix addresses, one per pattern, shared by all [*][D] tiles.
  const uint32_t l_a = lane_a<CH>(base, warp * 16, lane), l_b = lane_b<CH>(base, lane),
                 l_bt = lane_bt<CH>(base, lane);

  for (int nb = blockIdx.x; int64_t(nb) * BN < sk; nb += gridDim.x) {
    const int64_t n0 = int64_t(nb) * BN;
    // Queries that see some key of [n0, jmax]: i >= j - hi and i < j - lo.
    const int64_t jmax = min(n0 + BN, int64_t(sk)) - 1;
    const int64_t lo = max(int64_t(0), n0 - int64_t(mask.hi));
    const int64_t hi = min(int64_t(sq), jmax - int64_t(mask.lo));
    const int m_first = hi > lo ? int(lo / BM * BM) : 0;
    const int nblk = hi > lo ? int((hi - m_first + BM - 1) / BM) : 0;

    // A step is (query head hk * group + hh, query block m_first + mb * BM).
    auto load_step = [&](int s, int hh, int mb) {
      const int64_t h = hk * group + hh, m0 = m_first + int64_t(mb) * BM;
      load_tile<D, BM>(base + Qs + s * kQBytes, qbase0 + h * f.q_stride[2], f.q_stride[1], m0, sq);
      load_tile<D, BM>(base + dOs + s * kQBytes, dobase0 + h * a.do_stride[2], a.do_stride[1], m0, sq);
    };
    // Threads [0, BM) fetch lse, [BM, 2 BM) delta of row m0 + tid % BM.
    auto fetch_stat = [&](int hh, int mb) -> float {
      const int64_t h = hk * group + hh, i = m_first + int64_t(mb) * BM + tid % BM;
      const bool is_lse = tid < BM;
      if (tid >= 2 * BM) return 0.f;
      if (i >= sq) return is_lse ? INFINITY : 0.f;
      const int64_t idx = stat0 + h * f.lse_stride[1] + i;
      return is_lse ? lse_log2(f.lse[idx]) : a.delta[idx];
    };
    auto store_stat = [&](int s, float v) {
      if (tid < 2 * BM) sts_f32(base + (tid < BM ? lse_s : delta_s) + (s * BM + tid % BM) * 4, v);
    };

    // The key-side pointers are rebuilt per key block from kstart, which the
    // empty asm makes opaque: hoisted out of this grid-stride loop they stay
    // live through the step loop and, at D = 128 (255 registers), spill.
    int ks0 = kstart;
    asm volatile("" : "+r"(ks0));
    const int64_t krow0 = int64_t(ks0) + n0;  // first key row of this block

    float dk[DK ? DT : 1][4], dv[DV ? DT : 1][4];
    zero(dk);
    zero(dv);
    if (nblk > 0) {
      const T* kbase = static_cast<const T*>(f.k) + b * f.k_stride[0] + hk * f.k_stride[2];
      const T* vbase = static_cast<const T*>(f.v) + b * f.v_stride[0] + hk * f.v_stride[2];
      load_tile<D, BN>(base + Ks, kbase + krow0 * f.k_stride[1], f.k_stride[1], 0, int64_t(sk) - n0);
      load_tile<D, BN>(base + Vs, vbase + krow0 * f.v_stride[1], f.v_stride[1], 0, int64_t(sk) - n0);
      load_step(0, 0, 0);
      cp_async_commit();
      store_stat(0, fetch_stat(0, 0));
    }

    // Counters instead of one flat step index: no 64-bit division per step.
    for (int hh = 0, mb = 0, s = 0; nblk > 0 && hh < group; s ^= 1) {
      cp_async_wait<0>();
      __syncthreads();
      const int next_mb = mb + 1 == nblk ? 0 : mb + 1, next_hh = next_mb == 0 ? hh + 1 : hh;
      const bool has_next = next_hh < group;
      float next_stat = 0.f;
      if (has_next) {
        load_step(s ^ 1, next_hh, next_mb);
        cp_async_commit();
        next_stat = fetch_stat(next_hh, next_mb);
      }
      const int64_t h = hk * group + hh, m0 = m_first + int64_t(mb) * BM;
      const uint32_t so = s * kQBytes;
      const uint32_t lse = base + lse_s + s * BM * 4 + c2 * 4, delta = lse + (delta_s - lse_s);

      // S^T = K Q^T: this warp's 16 keys x BM queries. Rows of the C
      // fragments are keys (g, g + 8), columns queries (c2, c2 + 1).
      float p[NT][4];
      zero(p);
      mma_abt<D, BM, T>(p, l_a, Ks, l_b, Qs + so);
      if (capped) flash::softcap_scores(p, f.softcap, f.scale);
      // Masked scores become -inf before the exponential: -inf - l is -inf
      // for every l, +inf included, so P = 0.
      if (!mask.full(m0, BM, n0, BN)) {
        const BlockMask bm = block_mask<BM, BN>(mask, m0, n0);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!bm.visible(nt * 8 + c2 + (e & 1), warp * 16 + g + (e >> 1) * 8)) p[nt][e] = -INFINITY;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float2 l = lds_f32x2(lse + nt * 32);
        p[nt][0] = exp2f(fmaf(p[nt][0], scale_log2, -l.x));
        p[nt][1] = exp2f(fmaf(p[nt][1], scale_log2, -l.y));
        p[nt][2] = exp2f(fmaf(p[nt][2], scale_log2, -l.x));
        p[nt][3] = exp2f(fmaf(p[nt][3], scale_log2, -l.y));
      }

      // dV += P^T dO.
      if constexpr (DV) mma_xb<BM, D, T>(dv, p, l_bt, dOs + so);

      // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta[query]) in place
      // (times 1 - tanh^2 under a softcap).
      float ds[DK ? NT : 1][4];
      if constexpr (DK) {
        zero(ds);
        mma_abt<D, BM, T>(ds, l_a, Vs, l_b, dOs + so);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float2 dl = lds_f32x2(delta + nt * 32);
          ds[nt][0] = p[nt][0] * (ds[nt][0] - dl.x);
          ds[nt][1] = p[nt][1] * (ds[nt][1] - dl.y);
          ds[nt][2] = p[nt][2] * (ds[nt][2] - dl.x);
          ds[nt][3] = p[nt][3] * (ds[nt][3] - dl.y);
        }
        if (capped) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const float2 l = lds_f32x2(lse + nt * 32);
            ds[nt][0] *= flash::softcap_grad(p[nt][0], l.x, inv_cap);
            ds[nt][1] *= flash::softcap_grad(p[nt][1], l.y, inv_cap);
            ds[nt][2] *= flash::softcap_grad(p[nt][2], l.x, inv_cap);
            ds[nt][3] *= flash::softcap_grad(p[nt][3], l.y, inv_cap);
          }
        }
        // dK += dS^T Q (scaled in the epilogue).
        mma_xb<BM, D, T>(dk, ds, l_bt, Qs + so);
      }

      if constexpr (DQ) {
        // dS^T rounded to T into a [BN keys][BM queries] tile: pairs of
        // adjacent queries as one 32-bit word, chunk nt of rows g / g + 8.
        const uint32_t ds_st = base + dSs + swz_bytes<SCH>(warp * 16 + g, 0) + c2 * 2;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          sts_u32(at<SCH>(ds_st, 0, nt), pack2<T>(ds[nt][0], ds[nt][1]));
          sts_u32(at<SCH>(ds_st, 8, nt), pack2<T>(ds[nt][2], ds[nt][3]));
        }
        __syncthreads();

        // dQ[BM x D] = dS K: warp (wm, wd) computes query rows wm * 16.. and
        // head-dim columns [wd * CW, wd * CW + CW) in chunks of at most 64
        // columns (32 accumulators), so dQ never coexists whole with dK, dV.
        // A = dS from the [key][query] tile: stored rows are k, columns m, so
        // ldmatrix.trans with lanes 0-7 on keys 0-7 / queries 0-7 (a0), 8-15
        // keys 0-7 / queries 8-15 (a1), 16-23 keys 8-15 / queries 0-7 (a2),
        // 24-31 keys 8-15 / queries 8-15 (a3). B = K, a (K, N) = [key][d]
        // tile: ldmatrix.trans as in mma_xb.
        constexpr int MW = BM / 16, DW = kWarps / MW, CW = D / DW;
        constexpr int QC = CW < 32 ? CW : 32;
        const int wm = warp % MW, wd = warp / MW;
        // The dS^T tile is read as A with the lane_b pattern (rows are keys =
        // k, chunks are queries = m), K as B^T.
        // at() composes only for whole 8-chunk steps: wd's first chunk.
        static_assert(DW == 1 || CW % 64 == 0, "per-warp dQ columns must start on an 8-chunk boundary");
        const uint32_t ds_a = lane_b<SCH>(base + dSs, lane), k_bt = at<CH>(l_bt, 0, wd * CW / 8) + Ks;
        const int64_t row = m0 + wm * 16 + g;  // and row + 8
        float* acc_base = a.dq_accum + ((acc_row0 + row) * f.heads + h) * D;
        const int64_t acc_row8 = int64_t(8) * f.heads * D;
        // Rolled at D = 256: 4 chunks of dQ columns whose unrolled addresses
        // spill next to the 128 dK accumulators (nvcc 13.0, sm_80).
#pragma unroll(D > 128 ? 1 : CW / QC)
        for (int cc = 0; cc < CW / 8; cc += QC / 8) {
          float dq[QC / 8][4];
          zero(dq);
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t af[4];
            ldsm_x4_trans(af, at<SCH>(ds_a, kk * 16, wm * 2));
#pragma unroll
            for (int pp = 0; pp < QC / 16; ++pp) {
              uint32_t r4[4];
              ldsm_x4_trans(r4, at<CH>(k_bt, kk * 16, cc + pp * 2));
              Mma<T>::run(dq[2 * pp], af, r4[0], r4[1]);
              Mma<T>::run(dq[2 * pp + 1], af, r4[2], r4[3]);
            }
          }
#pragma unroll
          for (int nt = 0; nt < QC / 8; ++nt) {
            float* p0 = acc_base + wd * CW + cc * 8 + nt * 8 + c2;
            if (row < sq) {
              atomicAdd(p0, f.scale * dq[nt][0]);
              atomicAdd(p0 + 1, f.scale * dq[nt][1]);
            }
            if (row + 8 < sq) {
              atomicAdd(p0 + acc_row8, f.scale * dq[nt][2]);
              atomicAdd(p0 + acc_row8 + 1, f.scale * dq[nt][3]);
            }
          }
        }
      }

      if (has_next) store_stat(s ^ 1, next_stat);
      hh = next_hh;
      mb = next_mb;
    }

    // Epilogue: rows are keys g and g + 8 of this warp; keys past sk (the
    // zero-filled tail) are not written. Keys no query sees get zeros.
    T* dkbase = static_cast<T*>(a.dk) + b * a.dk_stride[0] + krow0 * a.dk_stride[1] + hk * a.dk_stride[2];
    T* dvbase = static_cast<T*>(a.dv) + b * a.dv_stride[0] + krow0 * a.dv_stride[1] + hk * a.dv_stride[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int j = warp * 16 + g + r * 8;  // from n0
      if (n0 + j >= sk) continue;
      T* dkrow = dkbase + j * a.dk_stride[1];
      T* dvrow = dvbase + j * a.dv_stride[1];
#pragma unroll
      for (int nt = 0; nt < DT; ++nt) {
        if constexpr (DK)
          *reinterpret_cast<uint32_t*>(dkrow + nt * 8 + c2) =
              pack2<T>(dk[nt][2 * r] * f.scale, dk[nt][2 * r + 1] * f.scale);
        if constexpr (DV)
          *reinterpret_cast<uint32_t*>(dvrow + nt * 8 + c2) = pack2<T>(dv[nt][2 * r], dv[nt][2 * r + 1]);
      }
    }
    __syncthreads();  // the next key block reloads Ks / Vs and the stages
  }
}

// Deterministic dQ: BQ query rows of head blockIdx.y, 16 per warp; key
// blocks in increasing order, K and V double-buffered. Per block S = Q K^T,
// P, dP = dO V^T, dS = P * (dP - delta), dQ += dS K. Rows of every fragment
// are queries (g, g + 8), so lse and delta are two registers a thread.
template <int D, class T>
__global__ void __launch_bounds__(kThreads) dq_kernel(FlashBwdArgs a) {
  constexpr int BN = kBNq<D>;
  constexpr int NT = BN / 8, DT = D / 8;
  constexpr int CH = D / 8;
  constexpr uint32_t kQBytes = BQ * D * 2, kKVBytes = BN * D * 2;
  // Byte offsets from the (128-byte aligned) shared-memory base.
  constexpr uint32_t Qs = 0, dOs = Qs + kQBytes;
  constexpr uint32_t Ks = dOs + kQBytes;       // [2][BN][D]
  constexpr uint32_t Vs = Ks + 2 * kKVBytes;  // [2][BN][D]
  MIXKIT_DYNAMIC_SMEM(smem_raw, 128);
  const uint32_t base = smem_addr(aligned_smem(smem_raw));

  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, h = blockIdx.y, kvh = h / (f.heads / f.kv_heads);
  const Span qspan = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const Span kspan = span(f.cu_seqlens_k, b, f.seqlen_k, f.total_k);
  const int64_t sq = qspan.len, sk = kspan.len;
  const Mask mask = make_mask(f, sq, sk);
  const T* qbase = static_cast<const T*>(f.q) + b * f.q_stride[0] + qspan.start * f.q_stride[1] + h * f.q_stride[2];
  const T* dobase =
      static_cast<const T*>(a.dout) + b * a.do_stride[0] + qspan.start * a.do_stride[1] + h * a.do_stride[2];
  const T* kbase = static_cast<const T*>(f.k) + b * f.k_stride[0] + kspan.start * f.k_stride[1] + kvh * f.k_stride[2];
  const T* vbase = static_cast<const T*>(f.v) + b * f.v_stride[0] + kspan.start * f.v_stride[1] + kvh * f.v_stride[2];
  T* dqbase = static_cast<T*>(a.dq) + b * a.dq_stride[0] + qspan.start * a.dq_stride[1] + h * a.dq_stride[2];
  const int64_t stat0 = b * f.lse_stride[0] + h * f.lse_stride[1] + qspan.start;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c2 = (lane & 3) * 2;
  const bool capped = f.softcap > 0.f;
  const float scale_log2 = (capped ? 1.f : f.scale) * kLog2e;
  const float inv_cap = capped ? 1.f / f.softcap : 0.f;
  const int64_t nblocks_q = (sq + BQ - 1) / BQ;
  // Per-lane ldmatrix addresses, one per pattern, shared by all [*][D] tiles.
  const uint32_t l_a = lane_a<CH>(base, warp * 16, lane), l_b = lane_b<CH>(base, lane),
                 l_bt = lane_bt<CH>(base, lane);

  // Latest query blocks first: under a causal mask they see the most keys.
  for (int64_t mb = int64_t(gridDim.x) - 1 - blockIdx.x; mb < nblocks_q; mb += gridDim.x) {
    const int64_t m0 = mb * BQ;
    // Keys some row of [m0, imax] sees: j <= i + hi and j > i + lo.
    const int64_t imax = min(m0 + BQ, sq) - 1;
    const int64_t lo = max(int64_t(0), m0 + mask.lo + 1);
    const int64_t hi = min(sk, imax + int64_t(mask.hi) + 1);
    const int64_t n_first = lo / BN * BN;
    const int64_t steps = hi > lo ? (hi - n_first + BN - 1) / BN : 0;

    const int64_t row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    float lse[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = row[r] < sq;
      lse[r] = ok ? lse_log2(f.lse[stat0 + row[r]]) : INFINITY;
      delta[r] = ok ? a.delta[stat0 + row[r]] : 0.f;
    }

    float dq[DT][4];
    zero(dq);
    if (steps > 0) {
      load_tile<D, BQ>(base + Qs, qbase, f.q_stride[1], m0, sq);
      load_tile<D, BQ>(base + dOs, dobase, a.do_stride[1], m0, sq);
      load_tile<D, BN>(base + Ks, kbase, f.k_stride[1], n_first, sk);
      load_tile<D, BN>(base + Vs, vbase, f.v_stride[1], n_first, sk);
      cp_async_commit();
    }
    for (int64_t t = 0; t < steps; ++t) {
      const int s = int(t & 1);
      const int64_t n0 = n_first + t * BN;
      cp_async_wait<0>();
      __syncthreads();  // stage s landed; every warp is done with stage s ^ 1
      if (t + 1 < steps) {
        load_tile<D, BN>(base + Ks + (s ^ 1) * kKVBytes, kbase, f.k_stride[1], n0 + BN, sk);
        load_tile<D, BN>(base + Vs + (s ^ 1) * kKVBytes, vbase, f.v_stride[1], n0 + BN, sk);
        cp_async_commit();
      }
      const uint32_t so = s * kKVBytes;

      // S = Q K^T: rows queries (g, g + 8), columns keys (c2, c2 + 1).
      float p[NT][4];
      zero(p);
      mma_abt<D, BN, T>(p, l_a, Qs, l_b, Ks + so);
      if (capped) flash::softcap_scores(p, f.softcap, f.scale);
      if (!mask.full(m0, BQ, n0, BN)) {
        const BlockMask bm = block_mask<BQ, BN>(mask, m0, n0);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!bm.visible(warp * 16 + g + (e >> 1) * 8, nt * 8 + c2 + (e & 1))) p[nt][e] = -INFINITY;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[nt][e] = exp2f(fmaf(p[nt][e], scale_log2, -lse[e >> 1]));

      float ds[NT][4];
      zero(ds);
      mma_abt<D, BN, T>(ds, l_a, dOs, l_b, Vs + so);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[nt][e] = p[nt][e] * (ds[nt][e] - delta[e >> 1]);
      if (capped) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) ds[nt][e] *= flash::softcap_grad(p[nt][e], lse[e >> 1], inv_cap);
      }

      mma_xb<BN, D, T>(dq, ds, l_bt, Ks + so);
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= sq) continue;
      T* dqrow = dqbase + row[r] * a.dq_stride[1];
#pragma unroll
      for (int nt = 0; nt < DT; ++nt)
        *reinterpret_cast<uint32_t*>(dqrow + nt * 8 + c2) =
            pack2<T>(dq[nt][2 * r] * f.scale, dq[nt][2 * r + 1] * f.scale);
    }
    __syncthreads();  // the next query block reloads Qs, dOs and the stages
  }
}

// dq = dq_accum rounded to T (dq_accum already holds scale * dS K).
template <int D, class T>
__global__ void __launch_bounds__(kThreads) dq_convert_kernel(FlashBwdArgs a) {
  constexpr int kLanes = D / 4, kRowsPerPass = kThreads / kLanes;
  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Span qs = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const int64_t acc_row0 = f.cu_seqlens_q ? qs.start : b * f.seqlen_q;
  T* dqbase = static_cast<T*>(a.dq) + b * a.dq_stride[0] + qs.start * a.dq_stride[1] + h * a.dq_stride[2];
  const int chunk = threadIdx.x % kLanes;
  for (int64_t m0 = int64_t(blockIdx.x) * BQ; m0 < qs.len; m0 += int64_t(gridDim.x) * BQ) {
    for (int r = threadIdx.x / kLanes; r < BQ; r += kRowsPerPass) {
      const int64_t i = m0 + r;
      if (i >= qs.len) break;
      // 4 elements a lane: one 16-byte load (the launcher checks dq_accum's
      // alignment) and one 8-byte store, both contiguous across the lanes.
      // (8 scalar loads a lane, 32 bytes apart, took a sector per lane each.)
      const float* src = a.dq_accum + ((acc_row0 + i) * f.heads + h) * D + chunk * 4;
      const Pack<float, 4> in = *reinterpret_cast<const Pack<float, 4>*>(src);
      Pack<T, 4> out;
#pragma unroll
      for (int e = 0; e < 4; ++e) out.v[e] = from_f32<T>(in.v[e]);
      *reinterpret_cast<Pack<T, 4>*>(dqbase + i * a.dq_stride[1] + chunk * 4) = out;
    }
  }
}

template <class Kernel>
void launch(Kernel kernel, dim3 grid, int smem, gpuStream_t stream, const FlashBwdArgs& a, const char* what) {
  flash::launch(kernel, grid, kThreads, smem, stream, what, a);
}

using flash::grid_blocks;

}  // namespace bwd

template <int D, class T>
void flash_bwd(const FlashBwdArgs& a, gpuStream_t stream) {
  using namespace bwd;
  const FlashFwdArgs& f = a.f;
  const unsigned batch = unsigned(f.batch), heads = unsigned(f.heads), kv_heads = unsigned(f.kv_heads);
  const bool has_q = f.total_q > 0;
  const unsigned qblocks = grid_blocks(f.seqlen_q, BQ);

  if (has_q) launch(delta_kernel<D, T>, dim3(qblocks, heads, batch), 0, stream, a, "launching flash_bwd delta_kernel");

  // With no query rows dK and dV are zeros: the dkdv kernel finds no steps
  // and writes them without touching q, dout, lse or delta.
  constexpr int BM = kBM<D>;
  const dim3 kv_grid(grid_blocks(f.seqlen_k, BN), kv_heads, batch);
  const int kv_smem_base = (2 * BN * D + 4 * BM * D) * int(sizeof(T)) + 4 * BM * int(sizeof(float)) + kAlignPad;
  // D = 256: dV, then dK (with the atomic dQ), in two launches (see the top).
  constexpr int kParts = D > 128 ? kDK : kDKDV;
  if constexpr (kParts == kDK)
    launch(dkdv_kernel<D, T, false, kDV>, kv_grid, kv_smem_base, stream, a, "launching flash_bwd dkdv_kernel (dV)");
  if (a.deterministic || !has_q) {
    launch(dkdv_kernel<D, T, false, kParts>, kv_grid, kv_smem_base, stream, a, "launching flash_bwd dkdv_kernel");
  } else {
    launch(dkdv_kernel<D, T, true, kParts>, kv_grid, kv_smem_base + BN * BM * int(sizeof(T)), stream, a,
           "launching flash_bwd dkdv_kernel");
  }

  if (!has_q) return;
  const dim3 q_grid(qblocks, heads, batch);
  if (a.deterministic) {
    launch(dq_kernel<D, T>, q_grid, (2 * BQ * D + 4 * kBNq<D> * D) * int(sizeof(T)) + kAlignPad, stream, a,
           "launching flash_bwd dq_kernel");
  } else {
    launch(dq_convert_kernel<D, T>, q_grid, 0, stream, a, "launching flash_bwd dq_convert_kernel");
  }
}

}  // namespace sm80
}  // namespace mixkit
