// Mixtral routing for CUDA and HIP (through compat.cuh): top-k router,
// permutation by expert and the weighted un-permutation, forward and backward
// (layout in common/moe.h). No kernel syncs with the host or allocates, so the
// whole path captures in a CUDA graph.
//
// Router: a group of G lanes (G = next_pow2(E), at most one warp) owns a token
// and holds its E logits in registers; k rounds of a butterfly arg-max pick the
// experts in rank order. Every lane ends a round with the same winner, because
// moe_ranks_before is a strict total order on (logit, index).
//
// Permute: a stable counting sort in three small passes over the ids (a
// per-chunk histogram, one block scanning it, per-row ranks inside each chunk)
// and one pass that copies rows. Nothing uses atomics, so row_map and offsets
// do not depend on scheduling.
#include <algorithm>
#include <type_traits>

#include "common/moe.h"
#include "cuda/compat.cuh"

namespace mixkit {
namespace {

constexpr int kRouteThreads = 128;   // a multiple of both warp widths (32, 64)
constexpr int kMaxItems = int(kMoeMaxExperts) / kWarpSize;  // logits per lane at E = 256
constexpr int kNoExpert = 1 << 20;   // exact in float, above any expert index
constexpr int kChunk = 512;          // rows per histogram chunk (and threads per block)
constexpr int kScanThreads = 256;
constexpr int kRowThreads = 256;
constexpr int64_t kMaxGrid = int64_t(1) << 20;

// ============================== kernels ======================================

template <class T, int ITEMS>
__global__ void __launch_bounds__(kRouteThreads) moe_route_kernel(MoeRouteArgs a) {
  const int group = blockDim.x, lane = threadIdx.x;
  const int E = int(a.experts), k = int(a.top_k);
  const T* logits = static_cast<const T*>(a.logits);
  // The trip count is the same for the whole block, so every lane reaches
  // every shuffle, including the lanes of tokens past the end.
  for (int64_t base = int64_t(blockIdx.x) * blockDim.y; base < a.tokens; base += int64_t(gridDim.x) * blockDim.y) {
    const int64_t t = base + threadIdx.y;
    const bool active = t < a.tokens;
    float v[ITEMS];
    unsigned taken = 0;  // bit i: expert lane + i * group is selected or absent
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int e = lane + i * group;
      const bool present = active && e < E;
      v[i] = present ? to_f32(logits[t * E + e]) : -INFINITY;
      if (!present) taken |= 1u << i;
    }
    const unsigned absent = taken;
    float top = 0.f, sum = 0.f;
    // Slot j is lane j % group's (its item j / group; k <= E <= ITEMS *
    // group, as the logits): the lane keeps the slot's weight and id in registers and stores
    // them once, scaled, after the rounds, so a token's slots go out in
    // contiguous requests, not one request per round read back to rescale.
    float slot_w[ITEMS];
    int slot_id[ITEMS];
    // Round j = s * group + r, unrolled over s: slot_w[s] stays a register.
#pragma unroll
    for (int s = 0; s < ITEMS; ++s)
    for (int r = 0; r < group && s * group + r < k; ++r) {
      const int j = s * group + r;
      float bv = -INFINITY;
      int bi = kNoExpert;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (!((taken >> i) & 1u) && moe_ranks_before(v[i], lane + i * group, bv, bi)) {
          bv = v[i];
          bi = lane + i * group;
        }
      }
      // Indices travel as floats: exact below 2^24, and compat.cuh names
      // only the float shuffle.
      for (int m = group / 2; m > 0; m >>= 1) {
        const float ov = shfl_xor(bv, m);
        const int oi = int(shfl_xor(float(bi), m));
        if (moe_ranks_before(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (bi < E && bi % group == lane) taken |= 1u << (bi / group);
      // Selected in descending order: the first is the softmax's maximum.
      if (j == 0) top = bv;
      const float w = expf(bv - top);
      sum += w;
      if (r == lane) {
        slot_w[s] = w;
        slot_id[s] = bi;
      }
    }
    if (!a.renormalize) {
      // The full softmax's denominator: each lane's present logits, then a
      // butterfly over the group (every lane reaches it, as above).
      sum = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
        if (!((absent >> i) & 1u)) sum += expf(v[i] - top);
      for (int m = group / 2; m > 0; m >>= 1) sum += shfl_xor(sum, m);
    }
    if (!active) continue;
    const float inv = 1.f / sum;
#pragma unroll
    for (int s = 0; s < ITEMS; ++s) {
      const int j = s * group + lane;
      if (j < k) {
        a.weights[t * k + j] = slot_w[s] * inv;
        a.expert_ids[t * k + j] = slot_id[s];
      }
    }
  }
}

// One thread per token: E + k stores, negligible next to the layer's GEMMs.
// Without renormalization (logits given) every expert gets p_e (g_sel - dot),
// with the full softmax p recomputed from the logits in two passes and g_sel
// found by scanning the token's k ids (k <= E <= 256; no per-thread array).
template <class T>
__global__ void __launch_bounds__(kRowThreads) moe_route_bwd_kernel(MoeRouteBwdArgs a) {
  const int64_t E = a.experts, k = a.top_k;
  T* dl = static_cast<T*>(a.grad_logits);
  const T* logits = static_cast<const T*>(a.logits);
  const T zero = from_f32<T>(0.f);
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < a.tokens;
       t += int64_t(gridDim.x) * blockDim.x) {
    const float* w = a.weights + t * k;
    const float* g = a.grad_weights + t * k;
    const int32_t* ids = a.expert_ids + t * k;
    float dot = 0.f;
    for (int64_t j = 0; j < k; ++j) dot += w[j] * g[j];
    if (!logits) {
      for (int64_t e = 0; e < E; ++e) dl[t * E + e] = zero;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = ids[j];
        if (e >= 0 && e < E) dl[t * E + e] = from_f32<T>(w[j] * (g[j] - dot));
      }
      continue;
    }
    const T* l = logits + t * E;
    float m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) m = fmaxf(m, to_f32(l[e]));
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += expf(to_f32(l[e]) - m);
    const float inv = 1.f / sum;
    for (int64_t e = 0; e < E; ++e) {
      float gs = 0.f;
      for (int64_t j = 0; j < k; ++j) gs = ids[j] == e ? g[j] : gs;
      dl[t * E + e] = from_f32<T>(expf(to_f32(l[e]) - m) * inv * (gs - dot));
    }
  }
}

// Expert of row r, with out-of-range ids sent to the extra bucket E.
__device__ __forceinline__ int bucket_of(const int32_t* ids, int64_t r, int E) {
  const int32_t e = ids[r];
  return e >= 0 && e < E ? e : E;
}

// counts[chunk, b] = rows of bucket b in the chunk, for b in [0, E].
__global__ void __launch_bounds__(kChunk) moe_count_kernel(const int32_t* ids, int64_t rows, int E,
                                                            int32_t* counts) {
  __shared__ int s_bucket[kChunk];
  const int64_t r0 = int64_t(blockIdx.x) * kChunk;
  const int n = int(min(int64_t(kChunk), rows - r0));
  if (int(threadIdx.x) < n) s_bucket[threadIdx.x] = bucket_of(ids, r0 + threadIdx.x, E);
  __syncthreads();
  for (int b = threadIdx.x; b <= E; b += blockDim.x) {
    int c = 0;
    for (int i = 0; i < n; ++i) c += s_bucket[i] == b;
    counts[int64_t(blockIdx.x) * (E + 1) + b] = c;
  }
}

// One block: turns counts into each chunk's first row per bucket relative to
// the bucket's start, and writes the starts offsets[0..E] (offsets[E] = valid
// rows; the bad-id bucket follows it). Each bucket walks the chunks serially,
// kBatch loads at a time: 64 chunks at Mixtral's T = 16384, k = 2.
__global__ void __launch_bounds__(kScanThreads) moe_scan_kernel(int32_t* counts, int64_t chunks, int E,
                                                                 int64_t* offsets) {
  __shared__ int64_t start[kMoeMaxExperts + 1];
  constexpr int kBatch = 8;  // independent loads in flight per step of the serial walk
  for (int b = threadIdx.x; b <= E; b += blockDim.x) {
    int64_t run = 0;
    for (int64_t c0 = 0; c0 < chunks; c0 += kBatch) {
      int32_t n[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) n[i] = c0 + i < chunks ? counts[(c0 + i) * (E + 1) + b] : 0;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (c0 + i < chunks) counts[(c0 + i) * (E + 1) + b] = int32_t(run);
        run += n[i];
      }
    }
    start[b] = run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t acc = 0;
    for (int b = 0; b <= E; ++b) {
      const int64_t n = start[b];
      start[b] = acc;
      acc += n;
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b <= E; b += blockDim.x) offsets[b] = start[b];
}

// row_map[r] = the bucket's start + the chunk's first row in the bucket + rows
// of the bucket before r in the chunk: O(kChunk) shared-memory reads per row.
__global__ void __launch_bounds__(kChunk) moe_rank_kernel(const int32_t* ids, int64_t rows, int E,
                                                           const int64_t* offsets, const int32_t* first,
                                                           int32_t* row_map) {
  __shared__ int s_bucket[kChunk];
  const int64_t r0 = int64_t(blockIdx.x) * kChunk;
  const int n = int(min(int64_t(kChunk), rows - r0));
  const int me = threadIdx.x;
  if (me < n) s_bucket[me] = bucket_of(ids, r0 + me, E);
  __syncthreads();
  if (me >= n) return;
  const int b = s_bucket[me];
  int rank = 0;
  for (int i = 0; i < me; ++i) rank += s_bucket[i] == b;
  row_map[r0 + me] = int32_t(offsets[b] + first[int64_t(blockIdx.x) * (E + 1) + b] + rank);
}

// dst[row_map[t * k + s]] = scale[t, s] * src[t]. A block per token reads its
// row once and writes its k copies. Row indices outside [0, T * k) are
// skipped, so a corrupt row_map cannot write out of bounds.
// ptxas otherwise caps the scaled variants at 32 registers (full occupancy)
// and spills 4 bytes; 4 blocks of 256 threads per SM hide latency well enough.
template <class T, int VEC, bool kScaled>
__global__ void __launch_bounds__(kRowThreads, 4) moe_scatter_kernel(MoeScatterArgs a) {
  using V = Pack<T, VEC>;
  const int64_t k = a.top_k, rows = a.tokens * k, nvec = a.hidden / VEC;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    const V* in = reinterpret_cast<const V*>(static_cast<const T*>(a.src) + t * a.hidden);
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const V xv = in[j];
      for (int64_t s = 0; s < k; ++s) {
        const int64_t pos = a.row_map[t * k + s];
        if (pos < 0 || pos >= rows) continue;
        V o = xv;
        if constexpr (kScaled) {
          const float w = a.scale[t * k + s];
#pragma unroll
          for (int q = 0; q < VEC; ++q) o.v[q] = from_f32<T>(w * to_f32(xv.v[q]));
        }
        reinterpret_cast<V*>(static_cast<T*>(a.dst) + pos * a.hidden)[j] = o;
      }
    }
  }
}

// dst[t] = sum_s weight[t, s] * src[row_map[t * k + s]], float32, one
// rounding. Each token gathers its own rows: no atomics, deterministic.
template <class T, int VEC>
__global__ void __launch_bounds__(kRowThreads) moe_gather_kernel(MoeGatherArgs a) {
  using V = Pack<T, VEC>;
  const int64_t k = a.top_k, rows = a.tokens * k, nvec = a.hidden / VEC;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    V* out = reinterpret_cast<V*>(static_cast<T*>(a.dst) + t * a.hidden);
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      float acc[VEC] = {};
      for (int64_t s = 0; s < k; ++s) {
        const int64_t pos = a.row_map[t * k + s];
        if (pos < 0 || pos >= rows) continue;
        const float w = a.weights ? a.weights[t * k + s] : 1.f;
        const V yv = reinterpret_cast<const V*>(static_cast<const T*>(a.src) + pos * a.hidden)[j];
#pragma unroll
        for (int q = 0; q < VEC; ++q) acc[q] += w * to_f32(yv.v[q]);
      }
      V o;
#pragma unroll
      for (int q = 0; q < VEC; ++q) o.v[q] = from_f32<T>(acc[q]);
      out[j] = o;
    }
  }
}

// Sum over a block of kRowThreads lanes (a multiple of the warp width). Every
// thread of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // the previous call may still be reading smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kRowThreads / kWarpSize ? smem[lane] : 0.f;
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

// grad_weights[t, s] = <grad_y[t], y_rows[row_map[t * k + s]]>: a block per
// (token, slot) pair.
template <class T, int VEC>
__global__ void __launch_bounds__(kRowThreads) moe_weight_grad_kernel(MoeGatherArgs a) {
  using V = Pack<T, VEC>;
  __shared__ float smem[kRowThreads / kWarpSize];
  const int64_t k = a.top_k, rows = a.tokens * k, nvec = a.hidden / VEC;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t t = r / k, pos = a.row_map[r];
    const bool valid = pos >= 0 && pos < rows;
    const V* g = reinterpret_cast<const V*>(static_cast<const T*>(a.grad) + t * a.hidden);
    const V* y = reinterpret_cast<const V*>(static_cast<const T*>(a.src) + (valid ? pos : 0) * a.hidden);
    float dot = 0.f;
    for (int64_t j = threadIdx.x; valid && j < nvec; j += blockDim.x) {
      const V gv = g[j], yv = y[j];
#pragma unroll
      for (int q = 0; q < VEC; ++q) dot += to_f32(gv.v[q]) * to_f32(yv.v[q]);
    }
    dot = block_sum(dot, smem);
    if (threadIdx.x == 0) a.grad_weights[r] = dot;
  }
}

// ============================== launchers ====================================

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

gpuStream_t as_stream(void* s) { return static_cast<gpuStream_t>(s); }

// Every kernel of this file strides over its work by the grid, so a grid
// below the work is only slower. The emulated GPU's tests lower the cap
// (emu::Device::max_grid) so that the loops run more than once at test sizes.
unsigned grid_for(int64_t work) {
  int64_t cap = kMaxGrid;
#if defined(MIXKIT_EMULATE)
  if (emu::device().max_grid > 0) cap = std::min(cap, emu::device().max_grid);
#endif
  return unsigned(std::max<int64_t>(1, std::min(work, cap)));
}

// 16-byte accesses when the row length and every pointer allow them.
template <class T, class F>
void with_vec(int64_t hidden, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int kVec = 16 / int(sizeof(T));
  bool ok = hidden % kVec == 0;
  for (const void* p : ptrs) ok = ok && (p == nullptr || aligned_to(p, 16));
  if (ok) return f(std::integral_constant<int, kVec>{});
  f(std::integral_constant<int, 1>{});
}

int64_t chunks_for(int64_t rows) { return (rows + kChunk - 1) / kChunk; }

}  // namespace

void moe_route_gpu(const MoeRouteArgs& a, int device, void* stream) {
  check(a);
  if (a.tokens == 0) return;
  DeviceGuard guard(device);
  const int group = std::min(kWarpSize, next_pow2(a.experts));
  const int items = next_pow2((a.experts + group - 1) / group);
  const int per_block = kRouteThreads / group;
  const dim3 block(group, per_block);
  const unsigned grid = grid_for((a.tokens + per_block - 1) / per_block);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    static_assert(kMaxItems <= 8, "the switch below instantiates 1, 2, 4 and 8 logits per lane");
    switch (items) {
      case 1: gpu_launch(moe_route_kernel<T, 1>, grid, block, 0, as_stream(stream), a); break;
      case 2: gpu_launch(moe_route_kernel<T, 2>, grid, block, 0, as_stream(stream), a); break;
      case 4: gpu_launch(moe_route_kernel<T, 4>, grid, block, 0, as_stream(stream), a); break;
      default: gpu_launch(moe_route_kernel<T, kMaxItems>, grid, block, 0, as_stream(stream), a); break;
    }
  });
  gpu_check(gpuGetLastError(), "launching moe_route_kernel");
}

void moe_route_bwd_gpu(const MoeRouteBwdArgs& a, int device, void* stream) {
  check(a);
  if (a.tokens == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(a.dtype, [&](auto t) {
    gpu_launch(moe_route_bwd_kernel<decltype(t)>, grid_for((a.tokens + kRowThreads - 1) / kRowThreads), kRowThreads, 0,
               as_stream(stream), a);
  });
  gpu_check(gpuGetLastError(), "launching moe_route_bwd_kernel");
}

int64_t moe_permute_workspace_gpu(int64_t tokens, int64_t top_k, int64_t experts) {
  check_moe_sizes(tokens, top_k, 1);
  require(experts >= 1 && experts <= kMoeMaxExperts, "experts must be in [1, 256]");
  return chunks_for(tokens * top_k) * (experts + 1);
}

void moe_permute_gpu(const MoePermuteArgs& a, int device, void* stream) {
  check(a);
  const int64_t rows = a.tokens * a.top_k, chunks = chunks_for(rows);
  const int E = int(a.experts);
  require(chunks == 0 || a.workspace, "null workspace pointer");
  DeviceGuard guard(device);
  gpuStream_t s = as_stream(stream);
  // chunks <= 2^31 / kChunk, within every GPU's grid limit.
  if (chunks > 0) {
    gpu_launch(moe_count_kernel, unsigned(chunks), kChunk, 0, s, a.expert_ids, rows, E, a.workspace);
    gpu_check(gpuGetLastError(), "launching moe_count_kernel");
  }
  gpu_launch(moe_scan_kernel, 1, kScanThreads, 0, s, a.workspace, chunks, E, a.offsets);
  gpu_check(gpuGetLastError(), "launching moe_scan_kernel");
  if (chunks == 0) return;
  gpu_launch(moe_rank_kernel, unsigned(chunks), kChunk, 0, s, a.expert_ids, rows, E, a.offsets, a.workspace, a.row_map);
  gpu_check(gpuGetLastError(), "launching moe_rank_kernel");
  const MoeScatterArgs copy{a.dtype, a.x, nullptr, a.row_map, a.x_perm, a.tokens, a.top_k, a.hidden};
  moe_scatter_gpu(copy, device, stream);
}

void moe_scatter_gpu(const MoeScatterArgs& a, int device, void* stream) {
  check(a);
  if (a.tokens == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    with_vec<T>(a.hidden, {a.src, a.dst}, [&](auto vec) {
      if (a.scale)
        gpu_launch(moe_scatter_kernel<T, vec, true>, grid_for(a.tokens), kRowThreads, 0, as_stream(stream), a);
      else
        gpu_launch(moe_scatter_kernel<T, vec, false>, grid_for(a.tokens), kRowThreads, 0, as_stream(stream), a);
    });
  });
  gpu_check(gpuGetLastError(), "launching moe_scatter_kernel");
}

void moe_gather_gpu(const MoeGatherArgs& a, int device, void* stream) {
  check(a);
  if (a.tokens == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (a.grad_weights) {
      with_vec<T>(a.hidden, {a.src, a.grad}, [&](auto vec) {
        gpu_launch(moe_weight_grad_kernel<T, vec>, grid_for(a.tokens * a.top_k), kRowThreads, 0, as_stream(stream), a);
      });
    } else {
      with_vec<T>(a.hidden, {a.src, a.dst}, [&](auto vec) {
        gpu_launch(moe_gather_kernel<T, vec>, grid_for(a.tokens), kRowThreads, 0, as_stream(stream), a);
      });
    }
  });
  gpu_check(gpuGetLastError(), "launching moe_gather_kernel");
}

}  // namespace mixkit
