// Flash-attention forward for Hopper (sm_90a only): wgmma.mma_async with
// float32 accumulators, cp.async double buffering of K and V into 128-byte
// swizzled shared memory, online softmax in float32 with exp2. Same
// semantics as flash_attn_fwd_sm80.cuh (spans, clamping, masks, -inf
// handling, epilogue); only the tensor-core path differs.
// Included only by the generated per-(head dim, dtype) files (CMakeLists.txt).
//
// A CTA owns BM = 128 query rows of one (sequence, query head): two
// warpgroups of 64 rows, each issuing its own wgmma. Per key block of BN = 128
// keys (64 at D = 256, where a thread's output is already 128 floats):
//   S = Q K^T   m64nBNk16, A = Q and B = K from shared memory (both K-major);
//   O += P V    m64nDk16,   A = P from registers, B = V (keys x d, d
//               contiguous: MN-major, transpose bit set); at D = 256 two
//               m64n128k16 on the two halves of d.
// The S accumulators, packed to 16 bits, are the register A fragments of P
// (layouts in wgmma_sm90.cuh), so P never touches shared memory.
//
// Shared memory: Q plus two stages of K and V, each tile stored as D / 64
// column blocks of [rows][64] with the 128-byte swizzle (16-byte chunk c of
// row r at chunk c ^ (r % 8)); 81 KB at D = 64, 161 KB at D = 128, 193 KB at
// D = 256 (plus 1 KB to round the base up to the 1024-byte swizzle period).
//
// Softcap and sinks as in flash_attn_fwd_sm80.cuh: the cap on the scores
// before the mask (softmax scale 1 after it), the sink in the epilogue.
//
// All 256 threads load with cp.async (zero-fill past the sequence end, so
// V's padding contributes 0 * 0) while the tensor cores work on the other
// stage; the warpgroups meet at one barrier per key block. Not done here
// (FlashAttention-3 does both): TMA loads from a producer warp, and
// ping-pong scheduling that overlaps one warpgroup's softmax with the
// other's wgmma.
//
// ptxas (nvcc 13.0, sm_90a): 205 registers at D = 64, 252 at D = 128, no
// spills, and no C7511 "wgmma serialized" note (which it does print once an
// ordinary instruction touches an in-flight accumulator).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/flash_attn.cuh"
#include "cuda/mma_sm80.cuh"
#include "cuda/wgmma_sm90.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_attn_fwd_sm90.cuh uses wgmma: compile it for sm_90a only"
#endif

namespace mixkit {
namespace sm90 {
namespace fwd {

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int BM = 64 * kWarpgroups;  // query rows per CTA
template <int D> constexpr int kBN = D > 128 ? 64 : 128;  // keys per iteration
constexpr float kLog2e = 1.4426950408889634f;

// ---- kernel -----------------------------------------------------------------

// Byte offset of 16-byte chunk c (of D / 8) of row r in a 128B-swizzled tile
// of ROWS rows: column block c / 8, then row r's 128 bytes, chunk c ^ (r % 8).
// Eight consecutive threads write one row's eight chunks: no bank conflict.
// Not flash::swz: wgmma's 128-byte swizzle wants 128-byte rows, so D = 128 is
// two column blocks rather than 256-byte rows.
template <int ROWS>
__device__ __forceinline__ uint32_t swz128(int r, int c) {
  return uint32_t((c >> 3) * ROWS * 128 + r * 128 + (((c ^ r) & 7) << 4));
}

// Copies rows [row0, row0 + ROWS) of a (len)-row sequence into a swizzled
// tile; rows past the end are zero-filled.
template <int D, int ROWS, class T>
__device__ __forceinline__ void load_tile(unsigned char* tile, const T* base, int64_t row_stride, int64_t row0,
                                          int64_t len) {
  constexpr int kChunks = D / 8, kIters = ROWS * kChunks / kThreads;
  // Rolled at D = 256 (as in flash_attn_fwd_sm80.cuh): unrolled, the copies'
  // addresses outlive the loop and push the kernel into spills (nvcc 13.0).
  constexpr int kUnroll = D > 128 ? 1 : kIters;
#pragma unroll kUnroll
  for (int i = 0; i < kIters; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool ok = row0 + r < len;
    sm80::cp_async16(tile + swz128<ROWS>(r, c), ok ? base + (row0 + r) * row_stride + c * 8 : base, ok);
  }
}

template <int D, class T>
__global__ void __launch_bounds__(kThreads, 1) flash_fwd_kernel(FlashFwdArgs a) {
  constexpr int BN = kBN<D>;
  constexpr int kQBytes = BM * D * 2, kKVBytes = BN * D * 2;
  // The swizzle is a function of the address bits, so every tile must start
  // on a 1024-byte boundary. Rounded up at run time (the launch adds 1 KB):
  // declaring __align__(1024) instead lets the compiler fold the round-up
  // away and trust an alignment that only the loader can guarantee.
  MIXKIT_DYNAMIC_SMEM(smem_raw, 16);
  unsigned char* Qs = smem_raw + ((1024u - (sm80::smem_addr(smem_raw) & 1023u)) & 1023u);
  unsigned char* Ks = Qs + kQBytes;       // [2][kKVBytes]
  unsigned char* Vs = Ks + 2 * kKVBytes;  // [2][kKVBytes]

  const int64_t b = blockIdx.z, h = blockIdx.y, kvh = h / (a.heads / a.kv_heads);
  const flash::Span qspan = flash::span(a.cu_seqlens_q, b, a.seqlen_q, a.total_q);
  const flash::Span kspan = flash::span(a.cu_seqlens_k, b, a.seqlen_k, a.total_k);
  const int64_t sq = qspan.len, sk = kspan.len, off = sk - sq;
  const T* qbase = static_cast<const T*>(a.q) + b * a.q_stride[0] + qspan.start * a.q_stride[1] + h * a.q_stride[2];
  const T* kbase = static_cast<const T*>(a.k) + b * a.k_stride[0] + kspan.start * a.k_stride[1] + kvh * a.k_stride[2];
  const T* vbase = static_cast<const T*>(a.v) + b * a.v_stride[0] + kspan.start * a.v_stride[1] + kvh * a.v_stride[2];
  T* obase = static_cast<T*>(a.out) + b * a.o_stride[0] + qspan.start * a.o_stride[1] + h * a.o_stride[2];
  float* lbase = a.lse + b * a.lse_stride[0] + h * a.lse_stride[1] + qspan.start;

  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, c2 = (lane & 3) * 2;
  const bool capped = a.softcap > 0.f;
  const float sscale = capped ? 1.f : a.scale;  // the softmax's scale of the (capped) scores
  const float scale_log2 = sscale * kLog2e;
  const float sink = a.sinks ? a.sinks[h] : -INFINITY;
  const int64_t nblocks_q = (sq + BM - 1) / BM;

  // Descriptor bases: this warpgroup's 64 Q rows, and stage 0 of K and V.
  const uint32_t q_addr = sm80::smem_addr(Qs) + wg * 64 * 128;
  const uint32_t k_addr = sm80::smem_addr(Ks), v_addr = sm80::smem_addr(Vs);

  // Heaviest (latest) query blocks first: under a causal mask they see the
  // most keys, and starting them first evens out the tail of the grid.
  for (int64_t mb = int64_t(gridDim.x) - 1 - blockIdx.x; mb < nblocks_q; mb += gridDim.x) {
    const int64_t m0 = mb * BM;
    // Visible keys of this block: [lo, hi).
    const int64_t hi = a.causal ? min(sk, m0 + BM + off) : sk;
    const int64_t lo = a.window > 0 ? max(int64_t(0), m0 + off - a.window + 1) : 0;
    // mutant-equivalent(flip): hi == lo only at lo == 0 (hi = m0 + BM + off
    // exceeds lo by BM + W - 1, and hi = sk = lo would need m0 = sq + W - 1,
    // past the last block), where ceil(lo / BN) is n_first as well.
    const int64_t n_first = lo / BN, n_end = hi > lo ? (hi + BN - 1) / BN : n_first;

    __syncthreads();  // the previous query block's wgmmas are done with Qs/Ks/Vs
    load_tile<D, BM>(Qs, qbase, a.q_stride[1], m0, sq);
    if (n_first < n_end) {
      load_tile<D, BN>(Ks, kbase, a.k_stride[1], n_first * BN, sk);
      load_tile<D, BN>(Vs, vbase, a.v_stride[1], n_first * BN, sk);
    }
    sm80::cp_async_commit();

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max of the raw scores q.k, rows g and g + 8
    float l[2] = {0.f, 0.f};              // this thread's share of the row sums
    const int64_t row[2] = {m0 + wg * 64 + warp * 16 + g, m0 + wg * 64 + warp * 16 + g + 8};

    for (int64_t nb = n_first; nb < n_end; ++nb) {
      const int s = int((nb - n_first) & 1);
      // One barrier per key block: after it, stage s has landed for every
      // thread, and both warpgroups have waited out their wgmmas of the
      // previous block, which read stage s ^ 1, so it can be refilled now
      // and has this whole block's compute to land.
      sm80::cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
      if (nb + 1 < n_end) {
        load_tile<D, BN>(Ks + (s ^ 1) * kKVBytes, kbase, a.k_stride[1], (nb + 1) * BN, sk);
        load_tile<D, BN>(Vs + (s ^ 1) * kKVBytes, vbase, a.v_stride[1], (nb + 1) * BN, sk);
        sm80::cp_async_commit();
      }
      const uint32_t ks_addr = k_addr + s * kKVBytes, vs_addr = v_addr + s * kKVBytes;

      // S = Q K^T: 64 rows x BN keys per warpgroup, D / 16 k-steps. K step ks
      // is column block ks / 4, byte (ks % 4) * 32 of each 128-byte row.
      float sc[BN / 2];
      pin(sc);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        wgmma_ss<T, BN>(sc, smem_desc(q_addr + (ks >> 2) * BM * 128 + (ks & 3) * 32, 16, 1024),
                        smem_desc(ks_addr + (ks >> 2) * BN * 128 + (ks & 3) * 32, 16, 1024), ks > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      pin(sc);

      if (capped) flash::softcap_scores(sc, a.softcap, a.scale);
      const flash::BlockMask mask(m0, BM, nb * BN, BN, sk, off, a.causal, a.window);
      if (!mask.full) flash::apply_mask(sc, mask, wg * 64 + warp * 16 + g, c2);
      flash::online_softmax(sc, o, m, l, scale_log2);

      // O += P V: keys 16kk .. 16kk + 15 are rows 16kk.. of V's column
      // blocks, two 1024-byte atoms of 8 keys (SBO); d 64 .. 127 is the next
      // column block (LBO). At D = 256 the second m64n128 starts two column
      // blocks on, and its accumulators are o[64..127], the columns 128.. of
      // the layout store_rows reads.
      uint32_t pa[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = sm80::pack2<T>(sc[8 * kk + 0], sc[8 * kk + 1]);
        pa[kk][1] = sm80::pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
        pa[kk][2] = sm80::pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
        pa[kk][3] = sm80::pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
      }
      constexpr int kN = D < 128 ? D : 128;  // d per wgmma
      pin(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int half = 0; half < D / kN; ++half)
          wgmma_rs<T, kN>(reinterpret_cast<float(&)[kN / 2]>(o[half * kN / 2]), pa[kk],
                          smem_desc(vs_addr + half * (kN / 64) * BN * 128 + kk * 16 * 128, BN * 128, 1024), 1);
      wgmma_commit();
      wgmma_wait<0>();
      pin(o);
    }
    sm80::cp_async_wait<0>();  // an empty block range leaves the Q group pending

    flash::store_rows<T>(o, m, l, row, sq, obase, a.o_stride[1], lbase, sscale, sink, lane,
                         [](float lo, float hi) { return sm80::pack2<T>(lo, hi); });
  }
}

}  // namespace fwd

template <int D, class T>
void flash_fwd(const FlashFwdArgs& a, gpuStream_t stream) {
  static_assert(D == 64 || D == 128 || D == 256, "sm90::flash_fwd: head dim 64, 128 or 256");
  constexpr int kSmem = (fwd::BM + 4 * fwd::kBN<D>) * D * int(sizeof(T)) + 1024;
  flash::launch(fwd::flash_fwd_kernel<D, T>, dim3(flash::grid_blocks(a.seqlen_q, fwd::BM), unsigned(a.heads), unsigned(a.batch)), fwd::kThreads, kSmem, stream,
                "launching the sm90 flash_fwd_kernel", a);
}

}  // namespace sm90
}  // namespace mixkit
