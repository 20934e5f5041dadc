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
constexpr int BN = 16 * kWarps;  // keys per dK/dV CTA; also keys per step of dq_kernel
constexpr int BQ = 16 * kWarps;  // query rows per dq_kernel / delta_kernel / dq_convert_kernel block
constexpr float kLog2e = 1.4426950408889634f;

// Query rows per step of dkdv_kernel. At D = 128 a thread holds dK and dV
// (128 floats) plus S^T and dP^T (BM / 2 floats each); BM = 64 keeps that at
// 192 live accumulators. See flash_bwd below for the measured registers.
template <int D> constexpr int kBM = D <= 64 ? 64 : 32;

// Element offset of 16-byte chunk c of row r in a tile of CH chunks a row.
// CH >= 8: the low three chunk bits are XORed with the row, so the 8
// consecutive rows one ldmatrix phase reads hit 8 distinct bank groups (row
// pitch is a multiple of 128 bytes). CH = 4 (64-byte rows, two rows per 128
// bytes): XOR with (r >> 1) & 3 does the same for row pairs.
template <int CH>
__device__ __forceinline__ int swz(int r, int c) {
  static_assert(CH == 4 || CH % 8 == 0, "tile rows must be 4 or a multiple of 8 chunks");
  if constexpr (CH == 4) return r * 32 + ((c ^ ((r >> 1) & 3)) << 3);
  else return r * (CH * 8) + (((c & ~7) | ((c ^ r) & 7)) << 3);
}

// Where sequence b lives: first row and length, clamped into [0, total).
struct Span {
  int64_t start;
  int64_t len;
};
__device__ __forceinline__ Span span(const int32_t* cu, int64_t b, int64_t fixed_len, int64_t total) {
  if (!cu) return {0, fixed_len};
  const int64_t s = min(max(int64_t(cu[b]), int64_t(0)), total);
  const int64_t e = min(max(int64_t(cu[b + 1]), s), total);
  return {s, e - s};
}

// The mask of one sequence: key j is visible to query i when j < sk,
// j - i <= hi (causal) and j - i > lo (window), in 64 bits. An absent bound
// is +-2^40 (and a window is capped at 2^40), beyond any j - i for lengths
// below 2^31 yet far from overflow in the range arithmetic below.
struct Mask {
  int64_t sk, hi, lo;
  // Every pair of rows [m0, m0 + bm) and keys [n0, n0 + bn) is visible, or
  // hidden only because the row is past the sequence (which lse handles).
  __device__ __forceinline__ bool full(int64_t m0, int bm, int64_t n0, int bn) const {
    return n0 + bn <= sk && n0 + bn - 1 - m0 <= hi && n0 - (m0 + bm - 1) > lo;
  }
};
__device__ __forceinline__ Mask make_mask(const FlashFwdArgs& f, int64_t sq, int64_t sk) {
  constexpr int64_t kFar = int64_t(1) << 40;
  const int64_t off = sk - sq;
  return {sk, f.causal ? off : kFar, f.window > 0 ? off - min(f.window, kFar) : -kFar};
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

// Copies rows [row0, row0 + ROWS) of a (len)-row sequence into a swizzled
// [ROWS][D] tile; rows past the end are zero-filled.
template <int D, int ROWS, class T>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t row_stride, int64_t row0, int64_t len) {
  constexpr int kChunks = D / 8;
  static_assert(ROWS * kChunks % kThreads == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool ok = row0 + r < len;
    cp_async16(tile + swz<kChunks>(r, c), ok ? base + (row0 + r) * row_stride + c * 8 : base, ok);
  }
}

// acc[16 x N] += A[a_row0 .. a_row0 + 16) . B[0 .. N)^T over the D columns of
// two swizzled [rows][D] tiles: S^T = K Q^T, dP^T = V dO^T (dkdv_kernel) and
// S = Q K^T, dP = dO V^T (dq_kernel). A by ldmatrix (lanes 0-15: rows at chunk
// 2ks, lanes 16-31: the same rows at chunk 2ks + 1, i.e. a0..a3); B is an
// (N, K) tile, so plain ldmatrix gives {b0, b1} of n8 tiles 2p and 2p + 1.
template <int D, int N, class T>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const T* A, int a_row0, const T* B, int lane) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t af[4];
    ldmatrix_x4(af, A + swz<CH>(a_row0 + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
    for (int p = 0; p < N / 16; ++p) {
      uint32_t r4[4];
      ldmatrix_x4(r4, B + swz<CH>(p * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
      Mma<T>::run(acc[2 * p], af, r4[0], r4[1]);
      Mma<T>::run(acc[2 * p + 1], af, r4[2], r4[3]);
    }
  }
}

// acc[16 x D] += X[16 x KD] . B[KD x D] where X is a float accumulator tile
// (16 rows x KD columns, n8 tiles) and B a swizzled [KD][D] tile: dV += P^T
// dO, dK += dS^T Q (dkdv_kernel), dQ += dS K (dq_kernel). The C fragments of
// n8 tiles 2kk and 2kk + 1, packed to T, are the A fragment of k16 step kk
// (mma_sm80.cuh). B is a (K, N) tile: ldmatrix.trans with lanes 0-7 / 8-15
// on k rows 0-7 / 8-15 of chunk 2p and lanes 16-31 the same of chunk 2p + 1.
template <int KD, int D, class T>
__device__ __forceinline__ void mma_xb(float (&acc)[D / 8][4], const float (&x)[KD / 8][4], const T* B, int lane) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int kk = 0; kk < KD / 16; ++kk) {
    const uint32_t xa[4] = {pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
                            pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                            pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int p = 0; p < D / 16; ++p) {
      uint32_t r4[4];
      ldmatrix_x4_trans(r4, B + swz<CH>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), p * 2 + (lane >> 4)));
      Mma<T>::run(acc[2 * p], xa, r4[0], r4[1]);
      Mma<T>::run(acc[2 * p + 1], xa, r4[2], r4[3]);
    }
  }
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

// dK, dV of BN keys of kv head blockIdx.y, summed over the query heads of
// its group; with DQ also scale * dS K atomically into dq_accum.
//
// Work is a flat list of (query head, query block) steps so that the
// double buffer prefetches across heads too. Per step, stage s = t & 1:
//   wait + barrier       stage s (Q, dO, lse, delta) is in shared memory and
//                        every warp is done with step t - 1
//   prefetch t + 1       cp.async of Q, dO into stage s ^ 1; lse and delta
//                        into a register (one value a thread)
//   S^T, P^T, dV, dP^T, dS^T, dK   warp-local, registers
//   DQ: dS^T -> smem, barrier, dQ rows -> atomicAdd
//   lse/delta register -> stage s ^ 1 (read by step t + 1 after its barrier)
template <int D, class T, bool DQ>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(FlashBwdArgs a) {
  constexpr int BM = kBM<D>;
  constexpr int NT = BM / 8;  // n8 tiles of queries in S^T
  constexpr int DT = D / 8;   // n8 tiles of the head dim
  static_assert(BM % 16 == 0 && 2 * BM <= kThreads && kWarps % (BM / 16) == 0, "query block shape");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BN * D;
  T* Qs = Vs + BN * D;        // [2][BM * D]
  T* dOs = Qs + 2 * BM * D;   // [2][BM * D]
  T* dSs = dOs + 2 * BM * D;  // [BN][BM], DQ only
  float* lse_s = reinterpret_cast<float*>(dSs + (DQ ? BN * BM : 0));  // [2][BM], log2 units
  float* delta_s = lse_s + 2 * BM;                                      // [2][BM]

  const FlashFwdArgs& f = a.f;
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const int64_t group = f.heads / f.kv_heads;
  const Span qspan = span(f.cu_seqlens_q, b, f.seqlen_q, f.total_q);
  const Span kspan = span(f.cu_seqlens_k, b, f.seqlen_k, f.total_k);
  const int64_t sq = qspan.len, sk = kspan.len;
  const Mask mask = make_mask(f, sq, sk);
  // dq_accum is (total_q, heads, D) with the rows of the fixed layout packed
  // batch-major, so row i of sequence b is row acc_row0 + i.
  const int64_t acc_row0 = f.cu_seqlens_q ? qspan.start : b * f.seqlen_q;

  const T* kbase = static_cast<const T*>(f.k) + b * f.k_stride[0] + kspan.start * f.k_stride[1] + hk * f.k_stride[2];
  const T* vbase = static_cast<const T*>(f.v) + b * f.v_stride[0] + kspan.start * f.v_stride[1] + hk * f.v_stride[2];
  // Query-side bases for head 0; head h adds h * stride[2].
  const T* qbase0 = static_cast<const T*>(f.q) + b * f.q_stride[0] + qspan.start * f.q_stride[1];
  const T* dobase0 = static_cast<const T*>(a.dout) + b * a.do_stride[0] + qspan.start * a.do_stride[1];
  const int64_t stat0 = b * f.lse_stride[0] + qspan.start;  // + h * lse_stride[1] + i

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c2 = (lane & 3) * 2;
  const float scale_log2 = f.scale * kLog2e;

  for (int64_t nb = blockIdx.x; nb * BN < sk; nb += gridDim.x) {
    const int64_t n0 = nb * BN;
    // Queries that see some key of [n0, jmax]: i >= j - hi and i < j - lo.
    const int64_t jmax = min(n0 + BN, sk) - 1;
    const int64_t lo = max(int64_t(0), n0 - mask.hi);
    const int64_t hi = min(sq, jmax - mask.lo);
    const int64_t m_first = lo / BM * BM;
    const int64_t nblk = hi > lo ? (hi - m_first + BM - 1) / BM : 0;
    const int64_t steps = group * nblk;

    // Step t's query head, first row and where its lse/delta live.
    auto step_head = [&](int64_t t) { return hk * group + t / nblk; };
    auto step_m0 = [&](int64_t t) { return m_first + t % nblk * BM; };
    auto load_step = [&](int s, int64_t t) {
      const int64_t h = step_head(t), m0 = step_m0(t);
      load_tile<D, BM>(Qs + s * BM * D, qbase0 + h * f.q_stride[2], f.q_stride[1], m0, sq);
      load_tile<D, BM>(dOs + s * BM * D, dobase0 + h * a.do_stride[2], a.do_stride[1], m0, sq);
    };
    // Threads [0, BM) fetch lse, [BM, 2 BM) delta of row m0 + tid % BM.
    auto fetch_stat = [&](int64_t t) -> float {
      const int64_t h = step_head(t), i = step_m0(t) + tid % BM;
      const bool is_lse = tid < BM;
      if (tid >= 2 * BM) return 0.f;
      if (i >= sq) return is_lse ? INFINITY : 0.f;
      const int64_t idx = stat0 + h * f.lse_stride[1] + i;
      return is_lse ? lse_log2(f.lse[idx]) : a.delta[idx];
    };
    auto store_stat = [&](int s, float v) {
      if (tid < 2 * BM) (tid < BM ? lse_s : delta_s)[s * BM + tid % BM] = v;
    };

    float dk[DT][4], dv[DT][4];
    zero(dk);
    zero(dv);
    if (steps > 0) {
      load_tile<D, BN>(Ks, kbase, f.k_stride[1], n0, sk);
      load_tile<D, BN>(Vs, vbase, f.v_stride[1], n0, sk);
      load_step(0, 0);
      cp_async_commit();
      store_stat(0, fetch_stat(0));
    }

    for (int64_t t = 0; t < steps; ++t) {
      const int s = int(t & 1);
      cp_async_wait<0>();
      __syncthreads();
      float next_stat = 0.f;
      if (t + 1 < steps) {
        load_step(s ^ 1, t + 1);
        cp_async_commit();
        next_stat = fetch_stat(t + 1);
      }
      const int64_t h = step_head(t), m0 = step_m0(t);
      const T* Q = Qs + s * BM * D;
      const T* dO = dOs + s * BM * D;
      const float* lse = lse_s + s * BM;
      const float* delta = delta_s + s * BM;

      // S^T = K Q^T: this warp's 16 keys x BM queries. Rows of the C
      // fragments are keys (g, g + 8), columns queries (c2, c2 + 1).
      float p[NT][4];
      zero(p);
      mma_abt<D, BM>(p, Ks, warp * 16, Q, lane);
      const bool full = mask.full(m0, BM, n0, BN);
      const BlockMask bm = block_mask<BM, BN>(mask, m0, n0);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float2 l = *reinterpret_cast<const float2*>(lse + nt * 8 + c2);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = exp2f(fmaf(p[nt][e], scale_log2, -((e & 1) ? l.y : l.x)));
          if (!full && !bm.visible(nt * 8 + c2 + (e & 1), warp * 16 + g + (e >> 1) * 8)) v = 0.f;
          p[nt][e] = v;
        }
      }

      // dV += P^T dO.
      mma_xb<BM, D>(dv, p, dO, lane);

      // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta[query]) in place.
      float ds[NT][4];
      zero(ds);
      mma_abt<D, BM>(ds, Vs, warp * 16, dO, lane);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float2 dl = *reinterpret_cast<const float2*>(delta + nt * 8 + c2);
        ds[nt][0] = p[nt][0] * (ds[nt][0] - dl.x);
        ds[nt][1] = p[nt][1] * (ds[nt][1] - dl.y);
        ds[nt][2] = p[nt][2] * (ds[nt][2] - dl.x);
        ds[nt][3] = p[nt][3] * (ds[nt][3] - dl.y);
      }

      // dK += dS^T Q (scaled in the epilogue).
      mma_xb<BM, D>(dk, ds, Q, lane);

      if constexpr (DQ) {
        // dS^T rounded to T into a [BN keys][BM queries] tile: pairs of
        // adjacent queries as one 32-bit word, chunk nt of rows g / g + 8.
        constexpr int SCH = BM / 8;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int r = warp * 16 + g;
          *reinterpret_cast<uint32_t*>(dSs + swz<SCH>(r, nt) + c2) = pack2<T>(ds[nt][0], ds[nt][1]);
          *reinterpret_cast<uint32_t*>(dSs + swz<SCH>(r + 8, nt) + c2) = pack2<T>(ds[nt][2], ds[nt][3]);
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
        constexpr int QC = CW < 64 ? CW : 64;
        const int wm = warp % MW, wd = warp / MW;
        const int64_t row = m0 + wm * 16 + g;  // and row + 8
        float* acc_base = a.dq_accum + ((acc_row0 + row) * f.heads + h) * D;
        const int64_t acc_row8 = int64_t(8) * f.heads * D;
#pragma unroll
        for (int d0 = wd * CW; d0 < wd * CW + CW; d0 += QC) {
          float dq[QC / 8][4];
          zero(dq);
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t af[4];
            ldmatrix_x4_trans(af, dSs + swz<SCH>(kk * 16 + (lane & 7) + ((lane >> 4) << 3), wm * 2 + ((lane >> 3) & 1)));
#pragma unroll
            for (int pp = 0; pp < QC / 16; ++pp) {
              uint32_t r4[4];
              ldmatrix_x4_trans(r4, Ks + swz<D / 8>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                     d0 / 8 + pp * 2 + (lane >> 4)));
              Mma<T>::run(dq[2 * pp], af, r4[0], r4[1]);
              Mma<T>::run(dq[2 * pp + 1], af, r4[2], r4[3]);
            }
          }
#pragma unroll
          for (int nt = 0; nt < QC / 8; ++nt) {
            float* p0 = acc_base + d0 + nt * 8 + c2;
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

      if (t + 1 < steps) store_stat(s ^ 1, next_stat);
    }

    // Epilogue: rows are keys g and g + 8 of this warp; keys past sk (the
    // zero-filled tail) are not written. Keys no query sees get zeros.
    T* dkbase = static_cast<T*>(a.dk) + b * a.dk_stride[0] + kspan.start * a.dk_stride[1] + hk * a.dk_stride[2];
    T* dvbase = static_cast<T*>(a.dv) + b * a.dv_stride[0] + kspan.start * a.dv_stride[1] + hk * a.dv_stride[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t j = n0 + warp * 16 + g + r * 8;
      if (j >= sk) continue;
      T* dkrow = dkbase + j * a.dk_stride[1];
      T* dvrow = dvbase + j * a.dv_stride[1];
#pragma unroll
      for (int nt = 0; nt < DT; ++nt) {
        *reinterpret_cast<uint32_t*>(dkrow + nt * 8 + c2) =
            pack2<T>(dk[nt][2 * r] * f.scale, dk[nt][2 * r + 1] * f.scale);
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
  constexpr int NT = BN / 8, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* dOs = Qs + BQ * D;
  T* Ks = dOs + BQ * D;     // [2][BN * D]
  T* Vs = Ks + 2 * BN * D;  // [2][BN * D]

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
  const float scale_log2 = f.scale * kLog2e;
  const int64_t nblocks_q = (sq + BQ - 1) / BQ;

  // Latest query blocks first: under a causal mask they see the most keys.
  for (int64_t mb = int64_t(gridDim.x) - 1 - blockIdx.x; mb < nblocks_q; mb += gridDim.x) {
    const int64_t m0 = mb * BQ;
    // Keys some row of [m0, imax] sees: j <= i + hi and j > i + lo.
    const int64_t imax = min(m0 + BQ, sq) - 1;
    const int64_t lo = max(int64_t(0), m0 + mask.lo + 1);
    const int64_t hi = min(sk, imax + mask.hi + 1);
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
      load_tile<D, BQ>(Qs, qbase, f.q_stride[1], m0, sq);
      load_tile<D, BQ>(dOs, dobase, a.do_stride[1], m0, sq);
      load_tile<D, BN>(Ks, kbase, f.k_stride[1], n_first, sk);
      load_tile<D, BN>(Vs, vbase, f.v_stride[1], n_first, sk);
      cp_async_commit();
    }
    for (int64_t t = 0; t < steps; ++t) {
      const int s = int(t & 1);
      const int64_t n0 = n_first + t * BN;
      cp_async_wait<0>();
      __syncthreads();  // stage s landed; every warp is done with stage s ^ 1
      if (t + 1 < steps) {
        load_tile<D, BN>(Ks + (s ^ 1) * BN * D, kbase, f.k_stride[1], n0 + BN, sk);
        load_tile<D, BN>(Vs + (s ^ 1) * BN * D, vbase, f.v_stride[1], n0 + BN, sk);
        cp_async_commit();
      }
      const T* K = Ks + s * BN * D;
      const T* V = Vs + s * BN * D;

      // S = Q K^T: rows queries (g, g + 8), columns keys (c2, c2 + 1).
      float p[NT][4];
      zero(p);
      mma_abt<D, BN>(p, Qs, warp * 16, K, lane);
      const bool full = mask.full(m0, BQ, n0, BN);
      const BlockMask bm = block_mask<BQ, BN>(mask, m0, n0);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = exp2f(fmaf(p[nt][e], scale_log2, -lse[e >> 1]));
          if (!full && !bm.visible(warp * 16 + g + (e >> 1) * 8, nt * 8 + c2 + (e & 1))) v = 0.f;
          p[nt][e] = v;
        }

      float ds[NT][4];
      zero(ds);
      mma_abt<D, BN>(ds, dOs, warp * 16, V, lane);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[nt][e] = p[nt][e] * (ds[nt][e] - delta[e >> 1]);

      mma_xb<BN, D>(dq, ds, K, lane);
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
  constexpr int kLanes = D / 8, kRowsPerPass = kThreads / kLanes;
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
      // dq_accum comes from a caller's allocation whose alignment is not
      // checked beyond 4 bytes: scalar loads (coalesced across the lanes).
      const float* src = a.dq_accum + ((acc_row0 + i) * f.heads + h) * D + chunk * 8;
      Pack<T, 8> out;
#pragma unroll
      for (int e = 0; e < 8; ++e) out.v[e] = from_f32<T>(src[e]);
      *reinterpret_cast<Pack<T, 8>*>(dqbase + i * a.dq_stride[1] + chunk * 8) = out;
    }
  }
}

template <class Kernel>
void launch(Kernel kernel, dim3 grid, int smem, gpuStream_t stream, const FlashBwdArgs& a, const char* what) {
  if (smem > 48 * 1024)
    gpu_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
              "raising a flash_bwd kernel's shared-memory limit");
  kernel<<<grid, kThreads, smem, stream>>>(a);
  gpu_check(gpuGetLastError(), what);
}

// Blocks of `tile` rows for a max_seqlen hint: at least one per (sequence,
// head), since the kernels walk the real lengths with a grid stride.
inline unsigned grid_blocks(int64_t len, int tile) {
  return unsigned(std::min<int64_t>(std::max<int64_t>((len + tile - 1) / tile, 1), INT32_MAX));
}

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
  const int kv_smem_base = (2 * BN * D + 4 * BM * D) * int(sizeof(T)) + 4 * BM * int(sizeof(float));
  if (a.deterministic || !has_q) {
    launch(dkdv_kernel<D, T, false>, kv_grid, kv_smem_base, stream, a, "launching flash_bwd dkdv_kernel");
  } else {
    launch(dkdv_kernel<D, T, true>, kv_grid, kv_smem_base + BN * BM * int(sizeof(T)), stream, a,
           "launching flash_bwd dkdv_kernel");
  }

  if (!has_q) return;
  const dim3 q_grid(qblocks, heads, batch);
  if (a.deterministic) {
    launch(dq_kernel<D, T>, q_grid, (2 * BQ * D + 4 * BN * D) * int(sizeof(T)), stream, a,
           "launching flash_bwd dq_kernel");
  } else {
    launch(dq_convert_kernel<D, T>, q_grid, 0, stream, a, "launching flash_bwd dq_convert_kernel");
  }
}

}  // namespace sm80
}  // namespace mixkit
