// RMSNorm, fused residual + RMSNorm and non-parametric LayerNorm on the CPU.
// One row at a time in float32, rows spread over OpenMP threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/ops.h"

namespace mixkit {
namespace {

template <class T>
void norm_fwd(const NormFwdArgs& a) {
  const int64_t cols = a.cols;
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  const T* w = static_cast<const T*>(a.weight);
  T* y = static_cast<T*>(a.y);
  T* h = static_cast<T*>(a.h);
#pragma omp parallel if (a.rows * cols > kCpuParallelGrain)
  {
    std::vector<float> v(cols);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const int64_t off = r * cols;
      // The residual sum is rounded to T before it is normalised, so the fused
      // op equals rms_norm(x + residual) computed in T.
      for (int64_t c = 0; c < cols; ++c) {
        float t = to_f32(x[off + c]);
        if (res) {
          const T s = from_f32<T>(t + to_f32(res[off + c]));
          h[off + c] = s;
          t = to_f32(s);
        }
        v[c] = t;
      }
      float mean = 0.f;
      if (a.centered) {
        double s = 0.0;
        for (int64_t c = 0; c < cols; ++c) s += v[c];
        mean = float(s / double(cols));
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < cols; ++c) ss += (v[c] - mean) * (v[c] - mean);
      const float rstd = 1.f / std::sqrt(ss / float(cols) + a.eps);
      for (int64_t c = 0; c < cols; ++c) {
        float o = (v[c] - mean) * rstd;
        if (w) o *= to_f32(w[c]);
        y[off + c] = from_f32<T>(o);
      }
      if (a.mean) a.mean[r] = mean;
      if (a.rstd) a.rstd[r] = rstd;
    }
  }
}

// Rows are split into `partials` contiguous chunks, one weight-gradient partial
// row each, so the result does not depend on the number of threads.
template <class T>
void norm_bwd(const NormBwdArgs& a) {
  const int64_t cols = a.cols;
  const T* dy = static_cast<const T*>(a.grad_y);
  const T* dh = static_cast<const T*>(a.grad_h);
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  T* dx = static_cast<T*>(a.grad_x);
  const int64_t parts = w ? a.partials : std::max<int64_t>(1, std::min<int64_t>(a.rows, 256));
  const float inv_cols = 1.f / float(cols);
#pragma omp parallel if (a.rows * cols > kCpuParallelGrain)
  {
    std::vector<float> xhat(cols), g(cols);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < parts; ++p) {
      float* dw = w ? a.grad_w_partial + p * cols : nullptr;
      if (dw) std::fill(dw, dw + cols, 0.f);
      const int64_t r0 = a.rows * p / parts, r1 = a.rows * (p + 1) / parts;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * cols;
        const float mean = a.centered ? a.mean[r] : 0.f;
        const float rstd = a.rstd[r];
        float sum_g = 0.f, sum_gx = 0.f;
        for (int64_t c = 0; c < cols; ++c) {
          const float dyc = to_f32(dy[off + c]);
          xhat[c] = (to_f32(x[off + c]) - mean) * rstd;
          g[c] = w ? dyc * to_f32(w[c]) : dyc;
          if (dw) dw[c] += dyc * xhat[c];
          sum_g += g[c];
          sum_gx += g[c] * xhat[c];
        }
        const float mg = a.centered ? sum_g * inv_cols : 0.f;
        const float mgx = sum_gx * inv_cols;
        for (int64_t c = 0; c < cols; ++c) {
          float d = rstd * (g[c] - mg - xhat[c] * mgx);
          if (dh) d += to_f32(dh[off + c]);
          dx[off + c] = from_f32<T>(d);
        }
      }
    }
  }
}

}  // namespace

void norm_fwd_cpu(const NormFwdArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) { norm_fwd<decltype(t)>(a); });
}

void norm_bwd_cpu(const NormBwdArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) { norm_bwd<decltype(t)>(a); });
}

}  // namespace mixkit
