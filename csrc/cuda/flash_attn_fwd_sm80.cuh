// Flash-attention forward for sm_80 and up: mma.sync m16n8k16 (bf16/fp16 in,
// float32 accumulate), ldmatrix from XOR-swizzled shared memory, cp.async
// double buffering of K and V, online softmax in float32 with exp2.
// Included only by the generated per-(head dim, dtype) files (CMakeLists.txt).
//
// A CTA owns BM = 64 query rows of one (sequence, query head): 4 warps of 16
// rows. S = Q K^T lands in accumulators whose layout is that of the A
// operand of P V (mma_sm80.cuh), so P never touches shared memory. Keys go
// in blocks of BN = 64, or 32 at D = 256, where a thread's output alone is
// 128 floats. Shared memory: Q plus two stages of K and V, 80 KB at D = 128
// and 96 KB at D = 256, so two CTAs fit an SM on A100 and H100 up to D = 128
// and one (A100) or two (H100) at D = 256; ptxas then allows 255 registers a
// thread (measured, nvcc 13.0: 239 at D = 64, 255 at D = 128, no spills).
//
// Softcap: the raw scores become c * tanh(s * scale / c) before the mask and
// the softmax then takes them with scale 1 (a uniform branch: no second
// instantiation). Sinks enter once, in the epilogue (flash::finish_row).
//
// Only key blocks that intersect the visible range of the query block are
// loaded, so a window of W costs O(S * W), and element masks are applied only
// on blocks that straddle the causal diagonal, the window edge or the end of
// the keys.
//
// Robustness without a host sync: sequence bounds from cu_seqlens are clamped
// to the tensors, and each CTA loops over query blocks with a stride of the
// grid, so a max_seqlen hint that is too small costs speed, never rows.
#pragma once

#include <algorithm>
#include <cmath>

#include "cuda/flash_attn.cuh"
#include "cuda/mma_sm80.cuh"

namespace mixkit {
namespace sm80 {
namespace fwd {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int BM = 16 * kWarps;  // query rows per CTA
template <int D> constexpr int kBN = D > 128 ? 32 : 64;  // keys per iteration
constexpr float kLog2e = 1.4426950408889634f;

using flash::Span;
using flash::span;
using flash::swz;

// The [tiles][4] accumulator arrays as the flat arrays flash:: helpers take
// (same elements, same order).
template <int N>
__device__ __forceinline__ float (&flat(float (&a)[N][4]))[N * 4] {
  return reinterpret_cast<float(&)[N * 4]>(a);
}

// Copies rows [row0, row0 + ROWS) of a (len)-row sequence into a swizzled
// tile; rows past the end are zero-filled, so V's padding contributes 0 * 0.
template <int D, int ROWS, class T>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t row_stride, int64_t row0, int64_t len) {
  constexpr int kChunks = D / 8, kIters = ROWS * kChunks / kThreads;
  // Unrolled, the D = 256 loads' 16 per-chunk addresses stay live through
  // the key loop and push the kernel past 255 registers (96 bytes of
  // spills, nvcc 13.0); rolled, none spill, at one loop counter's cost.
  // mutant-equivalent(flip): D >= 128 only rolls the D = 128 loop too, the
  // same loads in the same order.
  constexpr int kUnroll = D > 128 ? 1 : kIters;
#pragma unroll kUnroll
  for (int i = 0; i < kIters; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool ok = row0 + r < len;
    cp_async16(tile + swz<D / 8>(r, c), ok ? base + (row0 + r) * row_stride + c * 8 : base, ok);
  }
}

template <int D, class T>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(FlashFwdArgs a) {
  constexpr int BN = kBN<D>;
  MIXKIT_DYNAMIC_SMEM(smem_raw, 128);
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * D;  // [2][BN * D]
  T* Vs = Ks + 2 * BN * D;  // [2][BN * D]

  const int64_t b = blockIdx.z, h = blockIdx.y, kvh = h / (a.heads / a.kv_heads);
  const Span qspan = span(a.cu_seqlens_q, b, a.seqlen_q, a.total_q);
  const Span kspan = span(a.cu_seqlens_k, b, a.seqlen_k, a.total_k);
  const int64_t sq = qspan.len, sk = kspan.len, off = sk - sq;
  const T* qbase = static_cast<const T*>(a.q) + b * a.q_stride[0] + qspan.start * a.q_stride[1] + h * a.q_stride[2];
  const T* kbase = static_cast<const T*>(a.k) + b * a.k_stride[0] + kspan.start * a.k_stride[1] + kvh * a.k_stride[2];
  const T* vbase = static_cast<const T*>(a.v) + b * a.v_stride[0] + kspan.start * a.v_stride[1] + kvh * a.v_stride[2];
  T* obase = static_cast<T*>(a.out) + b * a.o_stride[0] + qspan.start * a.o_stride[1] + h * a.o_stride[2];
  float* lbase = a.lse + b * a.lse_stride[0] + h * a.lse_stride[1] + qspan.start;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c2 = (lane & 3) * 2;
  const bool capped = a.softcap > 0.f;
  const float sscale = capped ? 1.f : a.scale;  // the softmax's scale of the (capped) scores
  const float scale_log2 = sscale * kLog2e;
  const float sink = a.sinks ? a.sinks[h] : -INFINITY;
  const int64_t nblocks_q = (sq + BM - 1) / BM;

  // Heaviest (latest) query blocks first: under a causal mask they see the
  // most keys, and starting them first evens out the tail of the grid.
  for (int64_t mb = int64_t(gridDim.x) - 1 - blockIdx.x; mb < nblocks_q; mb += gridDim.x) {
    const int64_t m0 = mb * BM;
    // Visible keys of this block: [lo, hi).
    const int64_t hi = a.causal ? min(sk, m0 + BM + off) : sk;
    const int64_t lo = a.window > 0 ? max(int64_t(0), m0 + off - a.window + 1) : 0;
    const int64_t n_first = lo / BN, n_end = hi > lo ? (hi + BN - 1) / BN : n_first;

    __syncthreads();  // the previous query block's warps are done with Qs/Ks/Vs
    load_tile<D, BM>(Qs, qbase, a.q_stride[1], m0, sq);
    cp_async_commit();
    if (n_first < n_end) {
      load_tile<D, BN>(Ks, kbase, a.k_stride[1], n_first * BN, sk);
      load_tile<D, BN>(Vs, vbase, a.v_stride[1], n_first * BN, sk);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // Q's A fragments (lanes 0-15: rows at chunk 2ks, 16-31: chunk 2ks + 1).
    // Kept in registers at D = 64; at D = 128 the 32 extra registers made
    // ptxas spill, so the fragments are re-read from shared memory per key
    // block (25% more ldmatrix traffic than K alone).
    constexpr bool kQInRegs = D <= 64;
    uint32_t qf[kQInRegs ? D / 16 : 1][4];
    auto q_frag = [&](int ks) -> const uint32_t(&)[4] {
      if constexpr (kQInRegs) {
        return qf[ks];
      } else {
        ldmatrix_x4(qf[0], Qs + swz<D / 8>(warp * 16 + (lane & 15), ks * 2 + (lane >> 4)));
        return qf[0];
      }
    };
    if constexpr (kQInRegs) {
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
        ldmatrix_x4(qf[ks], Qs + swz<D / 8>(warp * 16 + (lane & 15), ks * 2 + (lane >> 4)));
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max of the raw scores q.k, rows g and g + 8
    float l[2] = {0.f, 0.f};              // this thread's share of the row sums
    const int64_t row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

    for (int64_t nb = n_first; nb < n_end; ++nb) {
      const int s = int((nb - n_first) & 1);
      if (nb + 1 < n_end) {
        load_tile<D, BN>(Ks + (s ^ 1) * BN * D, kbase, a.k_stride[1], (nb + 1) * BN, sk);
        load_tile<D, BN>(Vs + (s ^ 1) * BN * D, vbase, a.v_stride[1], (nb + 1) * BN, sk);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* K = Ks + s * BN * D;
      const T* V = Vs + s * BN * D;

      // S = Q K^T for 16 rows x 64 keys per warp.
      float sc[BN / 8][4];
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const uint32_t(&qa)[4] = q_frag(ks);
#pragma unroll
        for (int p = 0; p < BN / 16; ++p) {
          uint32_t r4[4];
          ldmatrix_x4(r4, K + swz<D / 8>(p * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
          Mma<T>::run(sc[2 * p], qa, r4[0], r4[1]);
          Mma<T>::run(sc[2 * p + 1], qa, r4[2], r4[3]);
        }
      }

      if (capped) flash::softcap_scores(flat(sc), a.softcap, a.scale);
      const flash::BlockMask mask(m0, BM, nb * BN, BN, sk, off, a.causal, a.window);
      if (!mask.full) flash::apply_mask(flat(sc), mask, warp * 16 + g, c2);
      flash::online_softmax(flat(sc), flat(o), m, l, scale_log2);

      // O += P V: P's accumulators are the A fragments of each 16-key step.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t pa[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]), pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                                pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
        for (int p = 0; p < D / 16; ++p) {
          uint32_t r4[4];
          ldmatrix_x4_trans(r4, V + swz<D / 8>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), p * 2 + (lane >> 4)));
          Mma<T>::run(o[2 * p], pa, r4[0], r4[1]);
          Mma<T>::run(o[2 * p + 1], pa, r4[2], r4[3]);
        }
      }
      __syncthreads();  // stage s is refilled two iterations on
    }
    // mutant-equivalent(barrier): no copy can be pending here. A non-empty
    // key range ends with the loop's cp_async_wait<0>() and no commit after
    // it; an empty one leaves only the K/V group, which holds no copies (Q's
    // group landed at the cp_async_wait<1>() before the loop).
    cp_async_wait<0>();

    flash::store_rows<T>(flat(o), m, l, row, sq, obase, a.o_stride[1], lbase, sscale, sink, lane,
                         [](float lo, float hi) { return pack2<T>(lo, hi); });
  }
}

}  // namespace fwd

template <int D, class T>
void flash_fwd(const FlashFwdArgs& a, gpuStream_t stream) {
  constexpr int kSmem = (fwd::BM + 4 * fwd::kBN<D>) * D * int(sizeof(T));
  flash::launch(fwd::flash_fwd_kernel<D, T>, dim3(flash::grid_blocks(a.seqlen_q, fwd::BM), unsigned(a.heads), unsigned(a.batch)), fwd::kThreads, kSmem, stream,
                "launching the sm80 flash_fwd_kernel", a);
}

}  // namespace sm80
}  // namespace mixkit
