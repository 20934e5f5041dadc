// KV-cache append and decode attention on the CPU: the same semantics as the
// GPU kernels (softcap and sinks included), in float32, any head dim. Parallel over (batch, KV head) above
// kCpuParallelGrain, like norm.cpp.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/decode.h"
#include "common/flash_attn.h"

namespace mixkit {
namespace {

template <class T, class P>
void kv_cache_append(const KvAppendArgs& a) {
  const P* pos = static_cast<const P*>(a.positions);
  // Values are checked here, before any write: on the CPU that costs nothing,
  // and an exception cannot leave an OpenMP region.
  for (int64_t i = 0; i < a.batch * a.seqlen; ++i)
    require(pos[i] >= 0, "positions must be >= 0, got " + std::to_string(int64_t(pos[i])));
  const int64_t d = a.head_dim, c = a.capacity, hkv = a.kv_heads;
  const int64_t first = std::max<int64_t>(0, a.seqlen - c);  // earlier tokens would be overwritten in this call
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* kc = static_cast<T*>(a.k_cache);
  T* vc = static_cast<T*>(a.v_cache);
  const int64_t work = a.batch * (a.seqlen - first) * hkv * d;
#pragma omp parallel for collapse(2) schedule(static) if (work > kCpuParallelGrain)
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t s = first; s < a.seqlen; ++s) {
      const int64_t slot = int64_t(pos[b * a.seqlen + s]) % c;
      for (int64_t h = 0; h < hkv; ++h) {
        const T* ks = k + b * a.k_stride[0] + s * a.k_stride[1] + h * a.k_stride[2];
        const T* vs = v + b * a.v_stride[0] + s * a.v_stride[1] + h * a.v_stride[2];
        const int64_t dst = ((b * c + slot) * hkv + h) * d;
        std::copy(ks, ks + d, kc + dst);
        std::copy(vs, vs + d, vc + dst);
      }
    }
  }
}

// Per (sequence, KV head): each visible K and V row is converted to float32
// once and used by every query head of the GQA group.
template <class T>
void decode_attn(const DecodeArgs& a) {
  for (int64_t b = 0; b < a.batch; ++b) {
    require(a.seqlens[b] >= 0, "cache_seqlens must be >= 0, got " + std::to_string(a.seqlens[b]));
    if (a.starts) require(a.starts[b] >= 0, "cache_starts must be >= 0, got " + std::to_string(a.starts[b]));
    if (!a.block_table) continue;
    require(a.seqlens[b] <= a.capacity, "cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(a.seqlens[b]) +
                                            " exceeds the block table's max_pages * page_size = " +
                                            std::to_string(a.capacity));
    // Only the pages that hold a visible key: an engine may have freed and
    // reused the pages behind the window.
    const int64_t seen = a.seqlens[b];
    const int64_t first = first_visible(a, b, seen, a.window > 0 ? std::min(a.window, a.capacity) : a.capacity);
    for (int64_t i = first / a.page_size; first < seen && i <= (seen - 1) / a.page_size; ++i) {
      const int32_t page = a.block_table[b * a.max_pages + i];
      require(page >= 0 && page < a.num_pages, "block_table[" + std::to_string(b) + ", " + std::to_string(i) +
                                                   "] = " + std::to_string(page) + " is not a page index in [0, " +
                                                   std::to_string(a.num_pages) + ")");
    }
  }
  const int64_t d = a.head_dim, c = a.capacity, hkv = a.kv_heads, group = a.heads / a.kv_heads;
  const int64_t keys = a.window > 0 ? std::min(a.window, c) : c;
  const T* q = static_cast<const T*>(a.q);
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  T* out = static_cast<T*>(a.out);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t work = a.batch * a.heads * keys * d;
#pragma omp parallel if (work > kCpuParallelGrain)
  {
    std::vector<float> qf(group * d), acc(group * d), row(d), score(group * keys), m(group), l(group);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t kvh = 0; kvh < hkv; ++kvh) {
        const int64_t seen = a.seqlens[b];
        const int64_t first = first_visible(a, b, seen, keys);  // position of the oldest visible token
        const int64_t n = seen - first;
        const int64_t row0 = b * a.heads + kvh * group;
        for (int64_t g = 0; g < group; ++g) {
          const T* qg = q + b * a.q_stride[0] + (kvh * group + g) * a.q_stride[1];
          for (int64_t i = 0; i < d; ++i) qf[g * d + i] = to_f32(qg[i]) * a.scale;
        }
        std::fill(m.begin(), m.end(), neg_inf);
        for (int64_t j = 0; j < n; ++j) {
          const T* kr = kc + k_offset(a, cache_index(a, b, first + j), kvh);
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) row[i] = to_f32(kr[i]);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * d;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < d; ++i) s += qg[i] * row[i];
            if (a.softcap > 0.f) s = a.softcap * std::tanh(s / a.softcap);
            score[g * keys + j] = s;
            m[g] = std::max(m[g], s);
          }
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(l.begin(), l.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const T* vr = vc + v_offset(a, cache_index(a, b, first + j), kvh);
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) row[i] = to_f32(vr[i]);
          for (int64_t g = 0; g < group; ++g) {
            const float p = std::exp(score[g * keys + j] - m[g]);
            l[g] += p;
            float* ag = acc.data() + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) ag[i] += p * row[i];
          }
        }
        // The sink joins the denominator once (the max moves to it when it is
        // larger). Nothing visible (seqlen 0): zeros, and lse = the sink, or
        // -inf without one, as on the GPU.
        for (int64_t g = 0; g < group; ++g) {
          const float sink = a.sinks ? a.sinks[kvh * group + g] : neg_inf;
          float mg = m[g], lg = l[g];
          const float rescale = add_sink<false>(sink, mg, lg);
          const bool any = n > 0 || sink != neg_inf;
          const float inv = any ? rescale / lg : 0.f;
          for (int64_t i = 0; i < d; ++i) out[(row0 + g) * d + i] = from_f32<T>(acc[g * d + i] * inv);
          a.lse[row0 + g] = any ? mg + std::log(lg) : neg_inf;
        }
      }
    }
  }
}

}  // namespace

void kv_cache_append_cpu(const KvAppendArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (a.positions_int64) kv_cache_append<T, int64_t>(a);
    else kv_cache_append<T, int32_t>(a);
  });
}

void decode_attn_cpu(const DecodeArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) { decode_attn<decltype(t)>(a); });
}

}  // namespace mixkit
