// Paged KV append and paged chunked prefill on the CPU: the semantics of the
// GPU kernels, in float32, any head dim. Every value used as an index is
// checked before any work, so a bad slot or block table raises instead of
// touching memory it should not.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/paged.h"

namespace mixkit {
namespace {

template <class T, class S>
void paged_kv_append(const PagedAppendArgs& a) {
  const S* slots = static_cast<const S*>(a.slots);
  const int64_t capacity = a.num_pages * a.page_size;
  for (int64_t t = 0; t < a.tokens; ++t)
    require(int64_t(slots[t]) < capacity, "slot_mapping[" + std::to_string(t) + "] = " + std::to_string(int64_t(slots[t])) +
                                              " is past the pool's num_pages * page_size = " + std::to_string(capacity));
  const int64_t d = a.head_dim, hkv = a.kv_heads;
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* kp = static_cast<T*>(a.k_pages);
  T* vp = static_cast<T*>(a.v_pages);
#pragma omp parallel for schedule(static) if (a.tokens * hkv * d > kCpuParallelGrain)
  for (int64_t t = 0; t < a.tokens; ++t) {
    const int64_t slot = int64_t(slots[t]);
    if (slot < 0) continue;  // padding
    for (int64_t h = 0; h < hkv; ++h) {
      const T* ks = k + t * a.k_stride[0] + h * a.k_stride[1];
      const T* vs = v + t * a.v_stride[0] + h * a.v_stride[1];
      std::copy(ks, ks + d, kp + (slot * hkv + h) * d);
      std::copy(vs, vs + d, vp + (slot * hkv + h) * d);
    }
  }
}

// Raises unless every index the attention will use is in range: cu_seqlens_q
// from 0 to total_q, non-decreasing; 0 <= seqlens_k <= max_pages * page_size;
// each page that holds a visible key a page of the pool.
void check_values(const PagedPrefillArgs& a) {
  require(a.cu_seqlens_q[0] == 0, "cu_seqlens_q must start at 0, got " + std::to_string(a.cu_seqlens_q[0]));
  require(a.cu_seqlens_q[a.batch] == a.total_q, "cu_seqlens_q must end at the " + std::to_string(a.total_q) +
                                                    " query rows, got " + std::to_string(a.cu_seqlens_q[a.batch]));
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t sq = int64_t(a.cu_seqlens_q[b + 1]) - a.cu_seqlens_q[b], sk = a.seqlens_k[b];
    const std::string at = "[" + std::to_string(b) + "]";
    require(sq >= 0, "cu_seqlens_q must be non-decreasing (at " + std::to_string(b) + ")");
    require(sq <= a.max_seqlen_q, "sequence " + std::to_string(b) + " has " + std::to_string(sq) +
                                      " queries, more than max_seqlen_q = " + std::to_string(a.max_seqlen_q));
    require(sk >= 0 && sk <= a.max_pages * a.page_size,
            "seqlens_k" + at + " = " + std::to_string(sk) + " is outside [0, max_pages * page_size = " +
                std::to_string(a.max_pages * a.page_size) + "]");
    if (sq == 0 || sk == 0) continue;
    int64_t lo, hi, lo_last, hi_last;
    visible_keys(sk - sq, sk, a.window, lo, hi);
    visible_keys(sk - 1, sk, a.window, lo_last, hi_last);
    for (int64_t i = lo / a.page_size; hi_last > lo && i <= (hi_last - 1) / a.page_size; ++i) {
      const int32_t page = a.block_table[b * a.max_pages + i];
      require(page >= 0 && page < a.num_pages, "block_table[" + std::to_string(b) + ", " + std::to_string(i) + "] = " +
                                                   std::to_string(page) + " holds a visible key but is not a page in [0, " +
                                                   std::to_string(a.num_pages) + ")");
    }
  }
}

// Per (sequence, KV head, query): every visible K and V row is converted to
// float32 once and used by all query heads of the GQA group.
template <class T>
void paged_prefill_attn(const PagedPrefillArgs& a) {
  if (a.batch > 0) check_values(a);
  const int64_t d = a.head_dim, hkv = a.kv_heads, group = a.heads / a.kv_heads;
  const T* q = static_cast<const T*>(a.q);
  const T* kp = static_cast<const T*>(a.k_pages);
  const T* vp = static_cast<const T*>(a.v_pages);
  T* out = static_cast<T*>(a.out);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t keys_hint = a.window > 0 ? std::min(a.window, a.max_pages * a.page_size) : a.max_pages * a.page_size;
  const int64_t work = a.total_q * a.heads * d * std::min<int64_t>(keys_hint, 4096);
#pragma omp parallel if (work > kCpuParallelGrain)
  {
    std::vector<float> qf(group * d), acc(group * d), row(d), score, m(group), l(group);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t kvh = 0; kvh < hkv; ++kvh) {
        const int64_t q0 = a.cu_seqlens_q[b], sq = a.cu_seqlens_q[b + 1] - q0, sk = a.seqlens_k[b];
        for (int64_t i = 0; i < sq; ++i) {
          int64_t lo, hi;
          visible_keys(sk - sq + i, sk, a.window, lo, hi);
          const int64_t n = hi - lo, t = q0 + i;
          if (int64_t(score.size()) < group * n) score.resize(group * n);
          for (int64_t g = 0; g < group; ++g) {
            const T* qg = q + t * a.q_stride[0] + (kvh * group + g) * a.q_stride[1];
            for (int64_t e = 0; e < d; ++e) qf[g * d + e] = to_f32(qg[e]) * a.scale;
          }
          std::fill(m.begin(), m.end(), neg_inf);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t p = lo + j;
            const int64_t page = a.block_table[b * a.max_pages + p / a.page_size];
            const T* kr = kp + page * a.k_stride[0] + (p % a.page_size) * a.k_stride[1] + kvh * a.k_stride[2];
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) row[e] = to_f32(kr[e]);
            for (int64_t g = 0; g < group; ++g) {
              const float* qg = qf.data() + g * d;
              float s = 0.f;
#pragma omp simd reduction(+ : s)
              for (int64_t e = 0; e < d; ++e) s += qg[e] * row[e];
              if (a.softcap > 0.f) s = a.softcap * std::tanh(s / a.softcap);
              score[g * n + j] = s;
              m[g] = std::max(m[g], s);
            }
          }
          std::fill(acc.begin(), acc.end(), 0.f);
          std::fill(l.begin(), l.end(), 0.f);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t p = lo + j;
            const int64_t page = a.block_table[b * a.max_pages + p / a.page_size];
            const T* vr = vp + page * a.v_stride[0] + (p % a.page_size) * a.v_stride[1] + kvh * a.v_stride[2];
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) row[e] = to_f32(vr[e]);
            for (int64_t g = 0; g < group; ++g) {
              const float w = std::exp(score[g * n + j] - m[g]);
              l[g] += w;
              float* ag = acc.data() + g * d;
#pragma omp simd
              for (int64_t e = 0; e < d; ++e) ag[e] += w * row[e];
            }
          }
          // The sink joins the denominator once (the max moves to it when it
          // is larger); with nothing visible the row gets zeros and lse =
          // the sink, or -inf without one.
          for (int64_t g = 0; g < group; ++g) {
            const int64_t r = t * a.heads + kvh * group + g;
            const float sink = a.sinks ? a.sinks[kvh * group + g] : neg_inf;
            float mg = m[g], lg = l[g];
            const float rescale = add_sink<false>(sink, mg, lg);
            const bool any = n > 0 || sink != neg_inf;
            const float inv = any ? rescale / lg : 0.f;
            for (int64_t e = 0; e < d; ++e) out[r * d + e] = from_f32<T>(acc[g * d + e] * inv);
            a.lse[r] = any ? mg + std::log(lg) : neg_inf;
          }
        }
      }
    }
  }
}

}  // namespace

void paged_kv_append_cpu(const PagedAppendArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (a.slots_int64) paged_kv_append<T, int64_t>(a);
    else paged_kv_append<T, int32_t>(a);
  });
}

void paged_prefill_attn_cpu(const PagedPrefillArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) { paged_prefill_attn<decltype(t)>(a); });
}

}  // namespace mixkit
