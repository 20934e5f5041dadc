// Rotary position embedding for CUDA and HIP: q and k in one launch, both
// layouts, inputs with any token and head strides (q/k views into a fused QKV
// projection need no copy).
//
// One lane owns P rotation pairs of one token. It computes their cos/sin once
// and applies them to every q and k head of that token, so the sincos cost is
// shared by Hq + Hkv heads and the kernel stays bound by DRAM.
#include <algorithm>

#include "common/ops.h"
#include "cuda/compat.cuh"

namespace mixkit {
namespace {

constexpr int kMaxHalf = 512;  // head_dim <= 1024, checked in check(RopeArgs)
constexpr int kMaxThreads = kMaxHalf;  // one lane per pair at most
constexpr int kBlockLanes = 256;       // lanes a block: tokens share a block along blockDim.y
constexpr int64_t kBusyLanes = 65536;  // lanes worth of work that keep HBM saturated

// ============================== kernels ======================================

template <class T, int P, bool kInterleaved, class Pos>
__global__ void __launch_bounds__(kMaxThreads) rope_kernel(RopeArgs a) {
  __shared__ float inv_freq[kMaxHalf];
  const int half = int(a.head_dim / 2);
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < half; i += blockDim.x * blockDim.y)
    inv_freq[i] = a.inv_freq ? a.inv_freq[i] : rope_inv_freq(a.theta, i, a.head_dim);
  __syncthreads();

  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int i0 = threadIdx.x * P;
  if (t >= a.tokens || i0 >= half) return;

  const float pos = float(static_cast<const Pos*>(a.positions)[t]);
  float c[P], s[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    // sincosf, not __sincosf: the fast intrinsic loses accuracy for the large
    // angles that long contexts produce.
    sincosf(pos * inv_freq[i0 + p], &s[p], &c[p]);
    c[p] *= a.attention_factor;
    s[p] *= a.inverse ? -a.attention_factor : a.attention_factor;
  }

  // q heads then k heads, split over blockIdx.y when there are few tokens
  // (decode), so a single token still spreads over many blocks.
  const int64_t total_heads = a.heads[0] + a.heads[1];
#pragma unroll 4
  for (int64_t hh = blockIdx.y; hh < total_heads; hh += gridDim.y) {
    const bool is_k = hh >= a.heads[0];
    const int64_t h = is_k ? hh - a.heads[0] : hh;
    const T* src = static_cast<const T*>(is_k ? a.in[1] : a.in[0]) +
                   t * (is_k ? a.stride_token[1] : a.stride_token[0]) + h * (is_k ? a.stride_head[1] : a.stride_head[0]);
    T* dst = static_cast<T*>(is_k ? a.out[1] : a.out[0]) + (t * (is_k ? a.heads[1] : a.heads[0]) + h) * a.head_dim;
    if constexpr (kInterleaved) {
      // P == 1 is the fallback for odd strides: two scalar accesses.
      using V = Pack<T, 2 * P>;
      V v, o;
      if constexpr (P > 1) {
        v = *reinterpret_cast<const V*>(src + 2 * i0);
      } else {
        v.v[0] = src[2 * i0];
        v.v[1] = src[2 * i0 + 1];
      }
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const float x0 = to_f32(v.v[2 * p]), x1 = to_f32(v.v[2 * p + 1]);
        o.v[2 * p] = from_f32<T>(x0 * c[p] - x1 * s[p]);
        o.v[2 * p + 1] = from_f32<T>(x1 * c[p] + x0 * s[p]);
      }
      if constexpr (P > 1) {
        *reinterpret_cast<V*>(dst + 2 * i0) = o;
      } else {
        dst[2 * i0] = o.v[0];
        dst[2 * i0 + 1] = o.v[1];
      }
    } else {
      using V = Pack<T, P>;
      const V v0 = *reinterpret_cast<const V*>(src + i0);
      const V v1 = *reinterpret_cast<const V*>(src + half + i0);
      V o0, o1;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const float x0 = to_f32(v0.v[p]), x1 = to_f32(v1.v[p]);
        o0.v[p] = from_f32<T>(x0 * c[p] - x1 * s[p]);
        o1.v[p] = from_f32<T>(x1 * c[p] + x0 * s[p]);
      }
      *reinterpret_cast<V*>(dst + i0) = o0;
      *reinterpret_cast<V*>(dst + half + i0) = o1;
    }
  }
}

// ============================== launcher =====================================

// Widest P whose accesses are 16-byte aligned for every pointer and stride;
// otherwise one pair per lane.
template <class T>
bool vector_ok(const RopeArgs& a, int p) {
  const int64_t elems = a.interleaved ? 2 * p : p;  // elements per access
  const size_t bytes = size_t(elems) * sizeof(T);
  if ((a.head_dim / 2) % p != 0) return false;
  for (int i = 0; i < 2; ++i) {
    if (a.heads[i] == 0) continue;
    if (!aligned_to(a.in[i], bytes) || !aligned_to(a.out[i], bytes)) return false;
    if (a.stride_token[i] % elems || a.stride_head[i] % elems || a.head_dim % elems) return false;
    if (!a.interleaved && (a.head_dim / 2) % elems) return false;
  }
  return true;
}

template <class T, int P, bool kInterleaved>
void launch(const RopeArgs& a, gpuStream_t stream) {
  const int lanes = int(a.head_dim / 2 / P);
  const int tokens_per_block = std::max(1, kBlockLanes / lanes);
  const int64_t blocks = (a.tokens + tokens_per_block - 1) / tokens_per_block;
  require(blocks <= 0x7fffffff, "too many tokens for one launch");
  // Split the heads over grid.y until about kBusyLanes lanes are busy: enough
  // to keep HBM saturated, without recomputing cos/sin more often than needed.
  const int64_t total_heads = a.heads[0] + a.heads[1];
  const int64_t busy = a.tokens * lanes;
  const int64_t head_groups =
      std::clamp<int64_t>((kBusyLanes + busy - 1) / busy, 1, std::min<int64_t>(total_heads, 65535));
  const dim3 grid{unsigned(blocks), unsigned(head_groups)}, block{unsigned(lanes), unsigned(tokens_per_block)};
  if (a.positions_int64)
    gpu_launch(rope_kernel<T, P, kInterleaved, int64_t>, grid, block, 0, stream, a);
  else
    gpu_launch(rope_kernel<T, P, kInterleaved, int32_t>, grid, block, 0, stream, a);
}

}  // namespace

void rope_gpu(const RopeArgs& a, int device, void* stream) {
  check(a);
  if (a.tokens == 0 || a.heads[0] + a.heads[1] == 0) return;
  DeviceGuard guard(device);
  const gpuStream_t s = static_cast<gpuStream_t>(stream);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kPairs = 16 / int(sizeof(T));  // half-split: two 16-byte loads per lane
    if (a.interleaved) {
      if (vector_ok<T>(a, kPairs / 2)) launch<T, kPairs / 2, true>(a, s);
      else launch<T, 1, true>(a, s);
    } else {
      if (vector_ok<T>(a, kPairs)) launch<T, kPairs, false>(a, s);
      else launch<T, 1, false>(a, s);
    }
  });
  gpu_check(gpuGetLastError(), "launching rope_kernel");
}

}  // namespace mixkit
