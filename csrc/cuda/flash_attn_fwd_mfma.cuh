// Flash-attention forward for AMD CDNA (gfx90a, gfx94x) matrix cores: the
// HIP counterpart of flash_attn_fwd_sm80.cuh, same contract
// (common/flash_attn.h), same schedule (grid-stride loop over query blocks,
// latest first; only key blocks meeting the visible range [lo, hi) are
// visited, so a window W costs O(S * W); element masks only on blocks that
// straddle the diagonal, the window edge or the end of the keys).
//
// Tiles: a workgroup of 4 wavefronts (256 threads) owns kBM = 128 query rows
// of one (sequence, head), 32 per wavefront; keys run in blocks of
// kBN = 4096 / D (64 at D = 64, 32 at D = 128), so the K and V tiles take the
// same ~18 KiB of LDS at both head dims and three workgroups fit a CU's
// 64 KiB. D = 256 keeps kBN = 32 (an S^T tile is 32 keys): 37 KiB, one
// workgroup a CU. The instruction is v_mfma_f32_32x32x8{bf16_1k,f16} (mfma.cuh).
//
// Softcap: S^T is capped (c * tanh(s * scale / c)) before the mask and the
// softmax takes it with scale 1; the sink enters once, in the epilogue
// (flash::finish_row, in P's 2^p_log2 units).
//
// The transposed products. Each wavefront computes S^T = K Q^T (A = a key
// tile, B = Q^T) and O^T += V^T P^T (A = V^T, B = P^T), not S = Q K^T and
// O = P V. In the 32x32 accumulator a lane owns one column (mfma.cuh), so
// with queries as columns:
//  - lane l owns query l % 32 of the wavefront's 32, in S^T and in O^T. Row
//    max and row sum are a lane's 16 * kBN / 32 registers plus one exchange
//    with lane l ^ 32 (the other half of the same query's keys); O^T's
//    rescale by the max correction is per lane, no shuffles;
//  - the accumulator of S^T is already P^T's B operand: register 4q + e of
//    lane l holds key 8q + 4(l / 32) + e of the tile (mod the permutation
//    below), which is B element e of lane l for the 8-key step q. P never
//    leaves registers (no LDS round trip, no cross-lane permute).
// (f16 P carries a factor 2^15 against MI200's flush of subnormal inputs:
// p_log2 below.)
// Key permutation: the A operand of S^T reads key row key_perm(l % 32), which
// swaps bits 2 and 3 of the tile row. Then register 4(2p + s) + e of lane l
// holds key 16p + 8(l / 32) + 4s + e, i.e. lane half h sees 8 consecutive
// keys per 16-key pair p, and V^T's operand for the two steps s = 0, 1 of a
// pair is one 16-byte LDS read per lane (the k pairing of mfma.cuh).
//
// LDS: K as [kBN keys][D + 8] (d contiguous: the A operand of S^T reads 8
// consecutive d of one key), V transposed as [D][kBN + 8] (the A operand of
// O^T reads 8 consecutive keys of one d); the transpose happens once a
// workgroup while staging (8 16-bit writes a 16-byte chunk) instead of in
// each of the 4 wavefronts' reads. D = 64: 9 + 9 KiB; D = 128: 8.5 + 10 KiB.
// The 8-element pads keep 16-byte reads of consecutive rows off the same
// banks, and K's chunk flip (lds_k) those of the permuted rows: both operand
// reads are conflict-free, the staging writes at most 2-way (counted on the
// emulated GPU, tests/test_emu_cost_kernels.py).
// Q fragments (the B operand of S^T, 8 consecutive d of the lane's query) are
// loaded once a query block from global memory into registers: D / 4 VGPRs.
// Registers a lane: O^T D / 2, S^T kBN / 2, Q D / 4, staging 16.
// The next key block's global loads go to registers before the MFMAs of the
// current one and are written to LDS after them (one LDS stage, as in
// grouped_gemm_mfma.cuh).
//
// The index math is in host+device constexpr functions (namespace fa) so that
// tests/test_mfma_attention.py replays the kernel on the CPU against dense
// attention. nvcc never sees this file's kernel; it needs hipcc.
#pragma once

#if !defined(__CUDACC__) || defined(__HIPCC__)

#include <cstdint>

#include "cuda/mfma.cuh"

namespace mixkit {
namespace mfma {
namespace fa {

constexpr int kWaves = 4;
constexpr int kThreads = kWaves * kWave;
constexpr int kWaveM = kN;                 // queries a wavefront: the accumulator's columns
constexpr int kBM = kWaves * kWaveM;       // queries a workgroup: 128
constexpr int kPad = 8;                    // elements of padding a LDS row
// Keys a block: 64 (D = 64), 32 (D = 128 and 256).
MIXKIT_MFMA_HD int block_n(int d) { return d <= 128 ? 4096 / d : 32; }

// Tile row i of a 32-key S^T tile reads key key_perm(i): bits 2 and 3 swapped.
MIXKIT_MFMA_HD int key_perm(int i) { return (i & ~12) | ((i & 4) << 1) | ((i & 8) >> 1); }

// First of the 8 consecutive head-dim elements lane `lane` reads for the
// 16-wide k chunk kc of S^T (for the key tile and for Q alike).
MIXKIT_MFMA_HD int frag_d(int kc, int lane) { return kc * kPairK + pair_k(lane, 0, 0); }
// Query (within the wavefront's 32) whose Q^T column lane `lane` supplies.
MIXKIT_MFMA_HD int q_row(int lane) { return b_col(lane, 0); }
// Key (within the block) whose row lane `lane` supplies to S^T tile u.
MIXKIT_MFMA_HD int k_row(int u, int lane) { return u * kM + key_perm(a_row(lane, 0)); }
// S^T tile u, register r of lane `lane`: key s_key (within the block), query
// s_query (within the wavefront).
MIXKIT_MFMA_HD int s_key(int u, int lane, int r) { return u * kM + key_perm(d_row(lane, r)); }
MIXKIT_MFMA_HD int s_query(int lane, int r) { return d_col(lane, r); }
// O^T += V^T P^T over S^T tile u in key pairs p = 0, 1 and steps s = 0, 1:
// B element e is S^T register pv_reg(p, s, e); A (V^T) is element
// pair_elem(s, e) of lane `lane`'s 16-byte read of V^T row vt_row(t, lane)
// (d, for output tile t) at key vt_key(u, p, lane).
MIXKIT_MFMA_HD int pv_reg(int p, int s, int e) { return 4 * (2 * p + s) + e; }
MIXKIT_MFMA_HD int vt_row(int t, int lane) { return t * kM + a_row(lane, 0); }
MIXKIT_MFMA_HD int vt_key(int u, int p, int lane) { return u * kM + p * kPairK + pair_k(lane, 0, 0); }
// O^T tile t, register r of lane `lane`: head-dim element o_d, query o_query.
// Registers 4q .. 4q + 3 are 4 consecutive d (one 8-byte store).
MIXKIT_MFMA_HD int o_d(int t, int lane, int r) { return t * kM + d_row(lane, r); }
MIXKIT_MFMA_HD int o_query(int lane, int r) { return d_col(lane, r); }

// Staging of a [kBN][D] K or V block: 16-byte chunk i of thread tid is
// row stage_row, elements stage_col .. + 7; consecutive threads take
// consecutive chunks of a row (coalesced global reads).
MIXKIT_MFMA_HD int stage_chunks(int d) { return block_n(d) * d / 8 / kThreads; }
MIXKIT_MFMA_HD int stage_row(int d, int tid, int i) { return (tid + i * kThreads) / (d / 8); }
MIXKIT_MFMA_HD int stage_col(int d, int tid, int i) { return (tid + i * kThreads) % (d / 8) * 8; }
// LDS element offsets: K [key][d], V^T [d][key]. The S^T A-operand read
// (k_row) takes permuted keys: ds_read_b128's 8-lane phases (0-3 + 20-23,
// 4-7 + 16-19, ...) then read rows r and r + 8 or r + 24, which the padded
// pitch (17 or 9 16-byte chunks, r % 8 the bank group) puts on the same banks:
// the emulated GPU counted 2 LDS cycles a read instead of 1. Key bit 3 flips
// chunk bit 2 (elements dd ^ 32), so each phase's 8 rows use 8 bank groups.
MIXKIT_MFMA_HD int lds_k(int d, int key, int dd) { return key * (d + kPad) + (dd ^ ((key & 8) << 2)); }
MIXKIT_MFMA_HD int lds_vt(int d, int dd, int key) { return dd * (block_n(d) + kPad) + key; }
MIXKIT_MFMA_HD int lds_k_size(int d) { return block_n(d) * (d + kPad); }
MIXKIT_MFMA_HD int lds_vt_size(int d) { return d * (block_n(d) + kPad); }

// P is formed as 2^p_log2 * exp(scale * (s - max)), and the row sums in the
// same units. MI200's f16 MFMAs flush subnormal inputs (|x| < 2^-14, mfma.cuh),
// which would drop every probability below 6.1e-5: with thousands of keys that
// is a visible share of the row's mass, counted in the sum but not in O. At
// 2^15 the flush threshold falls to 2^-29 while P <= 2^15 stays inside f16's
// range (65504); an exact power of two costs no precision, and folding it into
// the exp2 argument costs no instruction. bf16 shares f32's exponent range.
MIXKIT_MFMA_HD int p_log2(bool f16) { return f16 ? 15 : 0; }

// Key blocks [first, end) of kBN = bn keys that meet the visible keys
// [lo, hi) of query rows [m0, m0 + kBM) of a sequence with sk keys, queries
// at absolute position i + off (off = sk - sq).
struct KeyBlocks {
  int64_t first, end;
};
MIXKIT_MFMA_HD KeyBlocks key_blocks(int64_t m0, int64_t sk, int64_t off, bool causal, int64_t window, int bn) {
  const int64_t diag = m0 + kBM + off;
  // mutant-equivalent(flip): at sk == diag both arms are the same value.
  const int64_t hi = causal ? (sk < diag ? sk : diag) : sk;
  const int64_t w0 = m0 + off - window + 1;
  const int64_t lo = window > 0 ? (w0 > 0 ? w0 : 0) : 0;
  const int64_t first = lo / bn;
  return {first, hi > lo ? (hi + bn - 1) / bn : first};
}

static_assert(kThreads == 256 && kBM == 128, "tile plan");
static_assert(stage_chunks(64) * kThreads * 8 == block_n(64) * 64 &&
                  stage_chunks(128) * kThreads * 8 == block_n(128) * 128 &&
                  stage_chunks(256) * kThreads * 8 == block_n(256) * 256,
              "staging covers a block");
static_assert(2 * (lds_k_size(256) + lds_vt_size(256)) <= 64 * 1024, "D = 256 fits a CU's LDS");
static_assert(2 * (lds_k_size(128) + lds_vt_size(128)) <= 64 * 1024 / 3 &&
                  2 * (lds_k_size(64) + lds_vt_size(64)) <= 64 * 1024 / 3,
              "three workgroups a CU");
static_assert(key_perm(key_perm(13)) == 13 && s_key(0, 32, pv_reg(1, 0, 2)) == 16 + 8 + 2, "key pairing");

}  // namespace fa

#if MIXKIT_AMD
}  // namespace mfma

}  // namespace mixkit

#include <cmath>
#include <type_traits>

#include "cuda/compat.cuh"
#include "cuda/flash_attn.cuh"

namespace mixkit {
namespace mfma {
namespace fa {

// ============================== kernel =======================================

constexpr float kLog2e = 1.4426950408889634f;

// 8 consecutive 16-bit values of one row: step s's operand is elements
// 4s .. 4s + 3 (pair_elem).
template <class T> struct alignas(16) Frag {
  typename Operand<T>::type step[2];
};

// Four floats rounded once to the operand type.
template <class T> __device__ __forceinline__ typename Operand<T>::type to_operand(float a, float b, float c, float d);
template <> __device__ __forceinline__ short4_t to_operand<bf16>(float a, float b, float c, float d) {
  return short4_t{short(from_f32<bf16>(a).bits), short(from_f32<bf16>(b).bits), short(from_f32<bf16>(c).bits),
                  short(from_f32<bf16>(d).bits)};
}
template <> __device__ __forceinline__ half4_t to_operand<f16>(float a, float b, float c, float d) {
  return half4_t{_Float16(a), _Float16(b), _Float16(c), _Float16(d)};
}

template <int D, class T>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(FlashFwdArgs a) {
  static_assert(D == 64 || D == 128 || D == 256, "head dims of the GPU kernels");
  constexpr int kBN = block_n(D);
  constexpr int kTilesS = kBN / kM;  // S^T tiles (32 keys each) a block
  constexpr int kTilesO = D / kN;    // O^T tiles (32 head-dim rows each)
  constexpr int kChunks = stage_chunks(D);
  static_assert(pair_elem(0, 0) == 0 && pair_elem(0, 3) == 3 && pair_elem(1, 0) == 4 && pair_elem(1, 3) == 7,
                "Frag's layout is pair_elem");
  static_assert(o_d(1, 33, 6) == o_d(1, 33, 4) + 2 && pv_reg(1, 1, 3) == 15, "8-byte output stores");

  __shared__ __attribute__((aligned(16))) uint16_t Ks[lds_k_size(D)];
  __shared__ __attribute__((aligned(16))) uint16_t Vt[lds_vt_size(D)];

  const int64_t b = blockIdx.z, h = blockIdx.y, kvh = h / (a.heads / a.kv_heads);
  const flash::Span qspan = flash::span(a.cu_seqlens_q, b, a.seqlen_q, a.total_q);
  const flash::Span kspan = flash::span(a.cu_seqlens_k, b, a.seqlen_k, a.total_k);
  const int64_t sq = qspan.len, sk = kspan.len, off = sk - sq;
  const T* qbase = static_cast<const T*>(a.q) + b * a.q_stride[0] + qspan.start * a.q_stride[1] + h * a.q_stride[2];
  const T* kbase = static_cast<const T*>(a.k) + b * a.k_stride[0] + kspan.start * a.k_stride[1] + kvh * a.k_stride[2];
  const T* vbase = static_cast<const T*>(a.v) + b * a.v_stride[0] + kspan.start * a.v_stride[1] + kvh * a.v_stride[2];
  T* obase = static_cast<T*>(a.out) + b * a.o_stride[0] + qspan.start * a.o_stride[1] + h * a.o_stride[2];
  float* lbase = a.lse + b * a.lse_stride[0] + h * a.lse_stride[1] + qspan.start;

  const int tid = threadIdx.x, lane = tid % kWave, w = tid / kWave;
  const bool capped = a.softcap > 0.f;
  const float sscale = capped ? 1.f : a.scale;  // the softmax's scale of the (capped) scores
  const float scale_log2 = sscale * kLog2e;
  const float sink = a.sinks ? a.sinks[h] : -INFINITY;
  constexpr float kPLog2 = float(p_log2(std::is_same<T, f16>::value));
  const int64_t nblocks_q = (sq + kBM - 1) / kBM;

  // Global -> registers for the block at key n0; rows past sk stage zeros
  // (V's zeros meet P = 0 there, so no garbage times zero).
  uint4 rk[kChunks], rv[kChunks];
  auto load = [&](int64_t n0) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int64_t key = n0 + stage_row(D, tid, i);
      const int c = stage_col(D, tid, i);
      const bool ok = key < sk;
      rk[i] = ok ? *reinterpret_cast<const uint4*>(kbase + key * a.k_stride[1] + c) : uint4{0, 0, 0, 0};
      rv[i] = ok ? *reinterpret_cast<const uint4*>(vbase + key * a.v_stride[1] + c) : uint4{0, 0, 0, 0};
    }
  };
  // V^T's transpose: the 8 values of a chunk go to 8 rows of V^T, one 16-bit
  // write each. Lanes of one key write the same element step at once; in
  // element order that is 16 (D = 128) lanes on one bank (16-way, counted on
  // the emulated GPU). Rotated by the chunk index, step j of chunk c writes
  // element (j + c / 8) % 8, and the lanes spread over the banks: 2-way at
  // D = 128, none at D = 64.
  auto store = [&]() {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int key = stage_row(D, tid, i), c = stage_col(D, tid, i);
      *reinterpret_cast<uint4*>(&Ks[lds_k(D, key, c)]) = rk[i];
      const int rot = (c / 8) & 7;
      uint32_t v[4] = {rv[i].x, rv[i].y, rv[i].z, rv[i].w};  // rotated below: v's element j is (j + rot) % 8
      const uint32_t t0 = v[0], t1 = v[1];
      if (rot & 4) v[0] = v[2], v[1] = v[3], v[2] = t0, v[3] = t1;  // by 4 elements
      const uint32_t u0 = v[0];
      if (rot & 2) v[0] = v[1], v[1] = v[2], v[2] = v[3], v[3] = u0;  // by 2
      const uint32_t w0 = v[0];
      if (rot & 1) {  // by 1
#pragma unroll
        for (int q = 0; q < 3; ++q) v[q] = (v[q] >> 16) | (v[q + 1] << 16);
        v[3] = (v[3] >> 16) | (w0 << 16);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) Vt[lds_vt(D, c + ((j + rot) & 7), key)] = uint16_t(v[j / 2] >> (16 * (j % 2)));
    }
  };

  // Heaviest (latest) query blocks first, as in the CUDA kernels.
  for (int64_t mb = int64_t(gridDim.x) - 1 - blockIdx.x; mb < nblocks_q; mb += gridDim.x) {
    const int64_t m0 = mb * kBM, mw = m0 + w * kWaveM;
    const KeyBlocks kb = key_blocks(m0, sk, off, a.causal, a.window, kBN);

    // Q^T's B fragments: 8 consecutive d of the lane's query per 16-wide chunk.
    Frag<T> q[D / kPairK];
    const int64_t qrow = mw + q_row(lane);
#pragma unroll
    for (int kc = 0; kc < D / kPairK; ++kc)
      q[kc] = qrow < sq ? *reinterpret_cast<const Frag<T>*>(qbase + qrow * a.q_stride[1] + frag_d(kc, lane))
                        : Frag<T>{};

    float16_t o[kTilesO];
#pragma unroll
    for (int t = 0; t < kTilesO; ++t)
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) o[t][r] = 0.f;
    float m = -INFINITY;  // running max of the lane's query's raw scores (both half-waves agree)
    float l = 0.f;        // this half-wave's share of the row sum

    // D = 256 stages each block when it is needed instead of prefetching the
    // next one into registers: the 32 VGPRs of staging live through the
    // MFMAs next to Q's 64 and O^T's 128 made hipcc 5.2 spill (11-34 VGPRs).
    constexpr bool kPrefetch = D <= 128;
    // mutant-equivalent(flip): first <= end also loads an empty range's first
    // block into registers, bounds-checked (key < sk), and no store() follows.
    if (kPrefetch && kb.first < kb.end) load(kb.first * kBN);
    for (int64_t nb = kb.first; nb < kb.end; ++nb) {
      if (!kPrefetch) load(nb * kBN);
      __syncthreads();  // every wavefront is done reading the previous block (or query block)
      store();
      __syncthreads();
      if (kPrefetch && nb + 1 < kb.end) load((nb + 1) * kBN);  // in flight during the MFMAs below

      // S^T = K Q^T: kTilesS tiles of 32 keys x the wavefront's 32 queries.
      float16_t s[kTilesS];
#pragma unroll
      for (int u = 0; u < kTilesS; ++u)
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) s[u][r] = 0.f;
#pragma unroll
      for (int kc = 0; kc < D / kPairK; ++kc) {
#pragma unroll
        for (int u = 0; u < kTilesS; ++u) {
          const Frag<T> kf = *reinterpret_cast<const Frag<T>*>(&Ks[lds_k(D, k_row(u, lane), frag_d(kc, lane))]);
#pragma unroll
          for (int st = 0; st < 2; ++st) s[u] = mma_32x32x8(kf.step[st], q[kc].step[st], s[u]);
        }
      }

      if (capped) {
        const float mul = a.scale / a.softcap;
#pragma unroll
        for (int u = 0; u < kTilesS; ++u)
#pragma unroll
          for (int r = 0; r < kAccRegs; ++r) s[u][r] = a.softcap * flash::tanh_via_exp2(s[u][r] * mul);
      }
      const flash::BlockMask mask(mw, kWaveM, nb * kBN, kBN, sk, off, a.causal, a.window);
      if (!mask.full) {
#pragma unroll
        for (int u = 0; u < kTilesS; ++u)
#pragma unroll
          for (int r = 0; r < kAccRegs; ++r)
            if (!mask.visible(s_query(lane, r), s_key(u, lane, r))) s[u][r] = -INFINITY;
      }

      // Online softmax of the lane's query: its keys of this block are the
      // lane's registers and those of lane ^ 32.
      float mx = m;
#pragma unroll
      for (int u = 0; u < kTilesS; ++u)
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) mx = fmaxf(mx, s[u][r]);
      mx = fmaxf(mx, shfl_xor(mx, kWave / 2));
      // A query that has seen only masked keys keeps max -inf: subtract 0
      // instead, so exp2(-inf) = 0 and no inf - inf NaN appears.
      const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
      const float corr = m == -INFINITY ? 0.f : exp2f(m * scale_log2 - base);
      const float pbase = base - kPLog2;  // P = 2^kPLog2 * exp2(s * scale_log2 - base)
      m = mx;
      l *= corr;
#pragma unroll
      for (int t = 0; t < kTilesO; ++t)
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) o[t][r] *= corr;
#pragma unroll
      for (int u = 0; u < kTilesS; ++u)
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) {
          s[u][r] = exp2f(fmaf(s[u][r], scale_log2, -pbase));
          l += s[u][r];
        }

      // O^T += V^T P^T: S^T's registers are P^T's B operand (see the top).
#pragma unroll
      for (int u = 0; u < kTilesS; ++u)
#pragma unroll
        for (int p = 0; p < kM / kPairK; ++p) {
          typename Operand<T>::type pb[2];
#pragma unroll
          for (int st = 0; st < 2; ++st)
            pb[st] = to_operand<T>(s[u][pv_reg(p, st, 0)], s[u][pv_reg(p, st, 1)], s[u][pv_reg(p, st, 2)],
                                   s[u][pv_reg(p, st, 3)]);
#pragma unroll
          for (int t = 0; t < kTilesO; ++t) {
            const Frag<T> vf = *reinterpret_cast<const Frag<T>*>(&Vt[lds_vt(D, vt_row(t, lane), vt_key(u, p, lane))]);
#pragma unroll
            for (int st = 0; st < 2; ++st) o[t] = mma_32x32x8(vf.step[st], pb[st], o[t]);
          }
        }
    }

    // Epilogue: out = O / l rounded once, lse = m * scale + ln(l) (l without
    // the 2^kPLog2 of P), the sink folded in; queries that saw nothing get
    // zeros and -inf (or the sink), rows >= sq are not stored.
    const flash::RowEnd end = flash::finish_row(m * sscale, l + shfl_xor(l, kWave / 2), sink, kPLog2);
    const float inv = end.inv;
    const int64_t row = mw + o_query(lane, 0);
    if (row < sq) {
      T* orow = obase + row * a.o_stride[1];
#pragma unroll
      for (int t = 0; t < kTilesO; ++t)
#pragma unroll
        for (int g = 0; g < kAccRegs / 4; ++g) {
          Pack<T, 4> pk;
#pragma unroll
          for (int e = 0; e < 4; ++e) pk.v[e] = from_f32<T>(o[t][4 * g + e] * inv);
          *reinterpret_cast<Pack<T, 4>*>(orow + o_d(t, lane, 4 * g)) = pk;
        }
      if (lane < kWave / 2) lbase[row] = end.lse;
    }
  }
}

// ============================== launcher =====================================

// The caller (flash_attn_fwd_gpu) checks the arguments (check(), head dim,
// dtype, 16-byte alignment, strides multiple of 8), returns early on empty
// problems and sets the device, as for the CUDA kernels.
template <int D, class T> void flash_fwd(const FlashFwdArgs& a, hipStream_t stream) {
  const dim3 grid(flash::grid_blocks(a.seqlen_q, kBM), unsigned(a.heads), unsigned(a.batch));
  gpu_launch((flash_fwd_kernel<D, T>), grid, dim3(kThreads), 0, stream, a);
  gpu_check(hipGetLastError(), "launching the MFMA flash_fwd_kernel");
}

}  // namespace fa

// mixkit::mfma::flash_fwd<D, T>: the entry point flash_attn.cu dispatches to.
template <int D, class T> void flash_fwd(const FlashFwdArgs& a, hipStream_t stream) { fa::flash_fwd<D, T>(a, stream); }

#endif  // MIXKIT_AMD

}  // namespace mfma
}  // namespace mixkit

#endif  // !__CUDACC__ || __HIPCC__
