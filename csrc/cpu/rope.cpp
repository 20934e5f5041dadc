// Rotary position embedding on the CPU, both layouts, q and k together.
#include <cmath>
#include <vector>

#include "common/ops.h"

namespace mixkit {
namespace {

template <class T, class P>
void rope(const RopeArgs& a) {
  const int64_t d = a.head_dim, half = d / 2;
  const P* pos = static_cast<const P*>(a.positions);
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = a.inv_freq ? a.inv_freq[i] : rope_inv_freq(a.theta, i, d);
  const float sign = a.inverse ? -1.f : 1.f, scale = a.attention_factor;
  const int64_t work = a.tokens * (a.heads[0] + a.heads[1]) * d;
#pragma omp parallel if (work > kCpuParallelGrain)
  {
    std::vector<float> cs(half), sn(half);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.tokens; ++t) {
      // Angles in float32 from the integer position, as the conventions ask.
      const float p = float(pos[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float ang = p * inv_freq[i];
        cs[i] = scale * std::cos(ang);
        sn[i] = sign * scale * std::sin(ang);
      }
      for (int which = 0; which < 2; ++which) {
        const T* in = static_cast<const T*>(a.in[which]);
        T* out = static_cast<T*>(a.out[which]);
        for (int64_t hd = 0; hd < a.heads[which]; ++hd) {
          const T* src = in + t * a.stride_token[which] + hd * a.stride_head[which];
          T* dst = out + (t * a.heads[which] + hd) * d;
          for (int64_t i = 0; i < half; ++i) {
            // Pair i is (i, i + d/2) half-split, (2i, 2i + 1) interleaved.
            const int64_t i0 = a.interleaved ? 2 * i : i;
            const int64_t i1 = a.interleaved ? 2 * i + 1 : i + half;
            const float x0 = to_f32(src[i0]), x1 = to_f32(src[i1]);
            dst[i0] = from_f32<T>(x0 * cs[i] - x1 * sn[i]);
            dst[i1] = from_f32<T>(x1 * cs[i] + x0 * sn[i]);
          }
        }
      }
    }
  }
}

}  // namespace

void rope_cpu(const RopeArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (a.positions_int64) rope<T, int64_t>(a);
    else rope<T, int32_t>(a);
  });
}

}  // namespace mixkit
