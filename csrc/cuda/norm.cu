// RMSNorm, fused residual + RMSNorm and non-parametric LayerNorm for CUDA and
// HIP (through compat.cuh).
//
// Memory-bound, so the design is about bytes: each row is read once with
// 16-byte vector loads, held in registers while it is reduced in float32, and
// written once. A row belongs to `tpr` lanes (blockDim.x); narrow rows share a
// block along blockDim.y so that blocks keep at least 128 threads.
#include <algorithm>
#include <type_traits>

#include "common/norm.h"
#include "common/ops.h"
#include "cuda/compat.cuh"

namespace mixkit {
namespace {

using norm::kMaxThreads;

// ============================== kernels ======================================

// Row `off` (in elements) of a tensor, as vectors. Null stays null: offsetting
// a null pointer is undefined and would let the compiler drop the kernels'
// "is this optional input present" tests.
template <class T, int VEC>
__device__ __forceinline__ const Pack<T, VEC>* in_row(const void* base, int64_t off) {
  return base ? reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(base) + off) : nullptr;
}
template <class T, int VEC>
__device__ __forceinline__ Pack<T, VEC>* out_row(void* base, int64_t off) {
  return base ? reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(base) + off) : nullptr;
}

// Sum over the blockDim.x lanes that own a row. A row wider than a warp
// spans whole warps (tpr is a power of two), and a block may hold several such
// rows (tpr = 64 on CUDA gives two rows of two warps): warp w of row y posts to
// slot y * (tpr / warp) + w and reads back only its row's slots. Must be
// reached by every thread of the block.
__device__ __forceinline__ float row_sum(float v, float* smem) {
  const int tpr = blockDim.x;
  for (int m = (tpr < kWarpSize ? tpr : kWarpSize) / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  // mutant-equivalent(flip, bound): tpr is a power of two (common/norm.h),
  // none lies between kWarpSize and kWarpSize + 1; at tpr == kWarpSize the
  // shared-memory path below adds one slot per row (the warp's sum) to zeros:
  // the same value, and every thread of the block takes the same branch.
  if (tpr <= kWarpSize) return v;
  const int warps = tpr / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* slots = smem + threadIdx.y * warps;
  __syncthreads();  // the previous call may still be reading smem
  if (lane == 0) slots[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  v = lane < warps ? slots[lane] : 0.f;
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

template <class T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_kernel(NormFwdArgs a) {
  using V = Pack<T, VEC>;
  __shared__ float smem[kMaxThreads / kWarpSize];
  const int tpr = blockDim.x;
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.rows;
  const int64_t nvec = a.cols / VEC;
  const int64_t off = active ? row * a.cols : 0;
  const V* x = in_row<T, VEC>(a.x, off);
  const V* res = in_row<T, VEC>(a.residual, off);
  V* h = out_row<T, VEC>(a.h, off);

  float v[ITEMS][VEC];
  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t j = int64_t(i) * tpr + threadIdx.x;
    const bool ok = active && j < nvec;
    V xv;
    if (ok) {
      xv = x[j];
      if (res) {
        // Round the sum to T before normalising it: the fused op then equals
        // rms_norm(x + residual) with the addition done in T.
        const V rv = res[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) xv.v[k] = from_f32<T>(to_f32(xv.v[k]) + to_f32(rv.v[k]));
        h[j] = xv;
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[i][k] = ok ? to_f32(xv.v[k]) : 0.f;
      s1 += v[i][k];
      s2 += v[i][k] * v[i][k];
    }
  }
  const float inv_cols = 1.f / float(a.cols);
  float mean = 0.f;
  if (a.centered) {
    // Two passes over the registers: the variance of x - mean, not
    // E[x^2] - mean^2, which cancels badly for rows with a large mean.
    mean = row_sum(s1, smem) * inv_cols;
    s2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const bool ok = active && int64_t(i) * tpr + threadIdx.x < nvec;
#pragma unroll
      for (int k = 0; k < VEC; ++k) s2 += ok ? (v[i][k] - mean) * (v[i][k] - mean) : 0.f;
    }
  }
  const float rstd = rsqrtf(row_sum(s2, smem) * inv_cols + a.eps);
  if (!active) return;

  const V* w = reinterpret_cast<const V*>(a.weight);
  V* y = out_row<T, VEC>(a.y, off);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t j = int64_t(i) * tpr + threadIdx.x;
    if (j >= nvec) continue;
    V out;
    if (w) {
      const V wv = w[j];
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = from_f32<T>((v[i][k] - mean) * rstd * to_f32(wv.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = from_f32<T>((v[i][k] - mean) * rstd);
    }
    y[j] = out;
  }
  if (threadIdx.x == 0) {
    if (a.mean) a.mean[row] = mean;
    if (a.rstd) a.rstd[row] = rstd;
  }
}

// Each row group (worker) walks rows worker, worker + workers, ... and keeps
// its share of the weight gradient in float32 registers; it writes one partial
// row at the end, which the caller sums. The trip count is the same for every
// thread, so the block-wide reductions stay in step.
//
// Blocks of up to 1024 threads leave 64 registers per thread. Narrow rows keep
// x and dy in registers between the two passes; wider rows (more than one
// 16-byte vector of each per lane) re-read them in the second pass, from L2,
// instead of spilling. (ptxas, nvcc 13.0: no spills but for 16-bit rows of
// 16k-32k elements, VEC 8 x ITEMS 4, whose 32 dw accumulators leave too few
// registers: 8 bytes of spill stores for f16, 40 for bf16; tools/
// kernel_resources.py lists them.)
template <class T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_kernel(NormBwdArgs a, int64_t workers) {
  using V = Pack<T, VEC>;
  constexpr bool kCache = ITEMS * VEC * sizeof(T) <= 16;
  constexpr int kCached = kCache ? ITEMS : 1;
  constexpr bool kOneItem = !kCache && !MIXKIT_AMD;
  constexpr int kPass2Unroll = kOneItem ? 1 : ITEMS;
  __shared__ float smem[kMaxThreads / kWarpSize];
  const int tpr = blockDim.x;
  const int64_t worker = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t nvec = a.cols / VEC;
  const float inv_cols = 1.f / float(a.cols);
  const V* wp = reinterpret_cast<const V*>(a.weight);

  float dw[ITEMS][VEC] = {};
  V x_cache[kCached], dy_cache[kCached];

  const int64_t iters = (a.rows + workers - 1) / workers;
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t row = worker + it * workers;
    const bool active = worker < workers && row < a.rows;
    const int64_t off = active ? row * a.cols : 0;
    const float mean = active && a.centered ? a.mean[row] : 0.f;
    const float rstd = active ? a.rstd[row] : 0.f;
    const V* x = in_row<T, VEC>(a.x, off);
    const V* dy = in_row<T, VEC>(a.grad_y, off);

    // Pass 1: the two row sums and this row's weight-gradient contribution.
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = int64_t(i) * tpr + threadIdx.x;
      if (!active || j >= nvec) continue;
      const V xv = x[j], dv = dy[j];
      if constexpr (kCache) {
        x_cache[i] = xv;
        dy_cache[i] = dv;
      }
      V wv;
      if (wp) wv = wp[j];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = to_f32(dv.v[k]);
        const float xh = (to_f32(xv.v[k]) - mean) * rstd;
        const float g = wp ? d * to_f32(wv.v[k]) : d;
        dw[i][k] += d * xh;
        sg += g;
        sgx += g * xh;
      }
      // Wide rows on NVIDIA: the next item's loads wait for this one's math,
      // so that the ITEMS * VEC dw accumulators and one item's vectors share
      // the 64 registers (ptxas spilled 184-328 bytes with every load hoisted;
      // gfx90a has 128 VGPRs at 1024 threads and needs none of this).
      if constexpr (kOneItem) asm volatile("" ::: "memory");
    }
    const float mg = a.centered ? row_sum(sg, smem) * inv_cols : 0.f;
    const float mgx = row_sum(sgx, smem) * inv_cols;
    if (!active) continue;

    // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ grad_h).
    const V* dh = in_row<T, VEC>(a.grad_h, off);
    V* dx = out_row<T, VEC>(a.grad_x, off);
    // One item at a time when x and dy are re-read (NVIDIA): nothing here is
    // indexed by i, and unrolled, the re-reads of every item were live at once.
#pragma unroll kPass2Unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = int64_t(i) * tpr + threadIdx.x;
      if (j >= nvec) continue;
      V xv, dv, wv, hv, out;
      if constexpr (kCache) {
        xv = x_cache[i];
        dv = dy_cache[i];
      } else {
        xv = x[j];
        dv = dy[j];
      }
      if (wp) wv = wp[j];
      if (dh) hv = dh[j];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xh = (to_f32(xv.v[k]) - mean) * rstd;
        const float g = wp ? to_f32(dv.v[k]) * to_f32(wv.v[k]) : to_f32(dv.v[k]);
        float d = rstd * (g - mg - xh * mgx);
        if (dh) d += to_f32(hv.v[k]);
        out.v[k] = from_f32<T>(d);
      }
      dx[j] = out;
    }
  }

  if (!a.weight || worker >= workers) return;
  // 16-byte stores of a lane's VEC contiguous columns: nvcc cannot prove a
  // float*'s alignment to vectorise element stores itself, and a warp's
  // 4-byte store 32 bytes apart takes 8x the ideal sectors.
  constexpr int kF = VEC >= 4 ? 4 : 1;
  using F = Pack<float, kF>;
  float* part = a.grad_w_partial + worker * a.cols;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t j = int64_t(i) * tpr + threadIdx.x;
    if (j >= nvec) continue;
#pragma unroll
    for (int k = 0; k < VEC; k += kF) {
      F f;
#pragma unroll
      for (int e = 0; e < kF; ++e) f.v[e] = dw[i][k + e];
      *reinterpret_cast<F*>(part + j * VEC + k) = f;
    }
  }
}

// ============================== launchers ====================================

// The (vec, items, tpr, rpb) layout of a row: common/norm.h.
template <class T>
norm::Config norm_config(int64_t cols, std::initializer_list<const void*> ptrs) {
  bool aligned = true;
  for (const void* p : ptrs) aligned = aligned && (p == nullptr || aligned_to(p, 16));
  return norm::config(int(sizeof(T)), cols, aligned);
}

// Turns the runtime (vec, items) into template arguments in this one place.
template <class T, class F>
void with_config(const norm::Config& c, F&& f) {
  constexpr int kVec = 16 / int(sizeof(T));
  using std::integral_constant;
  if (c.vec > 1) {
    switch (c.items) {
      case 1: return f(integral_constant<int, kVec>{}, integral_constant<int, 1>{});
      case 2: return f(integral_constant<int, kVec>{}, integral_constant<int, 2>{});
      default: return f(integral_constant<int, kVec>{}, integral_constant<int, 4>{});
    }
  }
  switch (c.items) {
    case 1: return f(integral_constant<int, 1>{}, integral_constant<int, 1>{});
    case 4: return f(integral_constant<int, 1>{}, integral_constant<int, 4>{});
    default: return f(integral_constant<int, 1>{}, integral_constant<int, 16>{});
  }
}

}  // namespace

void norm_fwd_gpu(const NormFwdArgs& a, int device, void* stream) {
  check(a);
  if (a.rows == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    const norm::Config c = norm_config<T>(a.cols, {a.x, a.residual, a.weight, a.y, a.h});
    with_config<T>(c, [&](auto vec, auto items) {
      const int64_t blocks = (a.rows + c.rpb - 1) / c.rpb;
      require(blocks <= 0x7fffffff, "too many rows for one launch");
      gpu_launch(norm_fwd_kernel<T, vec, items>, dim3(unsigned(blocks)), dim3(c.tpr, c.rpb), 0,
                 static_cast<gpuStream_t>(stream), a);
    });
  });
  gpu_check(gpuGetLastError(), "launching norm_fwd_kernel");
}

int64_t norm_bwd_partials_gpu(DType dtype, int64_t rows, int64_t cols, int device) {
  int64_t partials = 1;
  dispatch_dtype(dtype, [&](auto t) {
    // Alignment does not change lanes per row enough to matter here; assume the
    // aligned case. Enough row groups to fill every SM once at full occupancy.
    const norm::Config c = norm_config<decltype(t)>(cols, {});
    const int64_t groups_per_sm = std::max(1, 2048 / (c.tpr * c.rpb)) * int64_t(c.rpb);
    partials = std::max<int64_t>(1, std::min<int64_t>(rows, sm_count(device) * groups_per_sm));
  });
  return partials;
}

void norm_bwd_gpu(const NormBwdArgs& a, int device, void* stream) {
  check(a);
  if (a.rows == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    const norm::Config c = norm_config<T>(a.cols, {a.grad_y, a.grad_h, a.x, a.weight, a.grad_x, a.grad_w_partial});
    // With a weight, the caller sized the partials buffer; without one, one
    // row per row group, capped so the grid stays reasonable.
    const int64_t workers = a.weight ? a.partials : std::min<int64_t>(a.rows, int64_t(1) << 20);
    const int64_t blocks = (workers + c.rpb - 1) / c.rpb;
    with_config<T>(c, [&](auto vec, auto items) {
      gpu_launch(norm_bwd_kernel<T, vec, items>, dim3(unsigned(blocks)), dim3(c.tpr, c.rpb), 0,
                 static_cast<gpuStream_t>(stream), a, workers);
    });
  });
  gpu_check(gpuGetLastError(), "launching norm_bwd_kernel");
}

}  // namespace mixkit
