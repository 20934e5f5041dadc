// Mixtral routing on the CPU: top-k router, permutation by expert and the
// weighted un-permutation, forward and backward (layout in common/moe.h).
// Tokens and rows spread over OpenMP threads; the permutation's counting pass
// is serial, which keeps it stable and costs one read of the ids.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/moe.h"

namespace mixkit {
namespace {

template <class T>
void route(const MoeRouteArgs& a) {
  const int64_t E = a.experts, k = a.top_k;
  const T* logits = static_cast<const T*>(a.logits);
#pragma omp parallel if (a.tokens * E > kCpuParallelGrain)
  {
    std::vector<float> v(E);
    std::vector<int> order(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.tokens; ++t) {
      for (int64_t e = 0; e < E; ++e) v[e] = to_f32(logits[t * E + e]);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](int i, int j) { return moe_ranks_before(v[i], i, v[j], j); });
      // The first selected logit is the largest: softmax in float32 relative
      // to it, summed in slot order (the GPU kernel sums in the same order).
      const float m = v[order[0]];
      float* w = a.weights + t * k;
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        a.expert_ids[t * k + j] = order[j];
        w[j] = std::exp(v[order[j]] - m);
        sum += w[j];
      }
      if (!a.renormalize) {
        sum = 0.f;
        for (int64_t e = 0; e < E; ++e) sum += std::exp(v[e] - m);
      }
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < k; ++j) w[j] *= inv;
    }
  }
}

template <class T>
void route_bwd(const MoeRouteBwdArgs& a) {
  const int64_t E = a.experts, k = a.top_k;
  T* dl = static_cast<T*>(a.grad_logits);
  const T* logits = static_cast<const T*>(a.logits);
  const T zero = from_f32<T>(0.f);
#pragma omp parallel if (a.tokens * E > kCpuParallelGrain)
  {
    std::vector<float> gsel(logits ? E : 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.tokens; ++t) {
      const float* w = a.weights + t * k;
      const float* g = a.grad_weights + t * k;
      const int32_t* ids = a.expert_ids + t * k;  // range-checked before the parallel region
      float dot = 0.f;
      for (int64_t j = 0; j < k; ++j) dot += w[j] * g[j];
      if (!logits) {
        std::fill(dl + t * E, dl + (t + 1) * E, zero);
        for (int64_t j = 0; j < k; ++j) dl[t * E + ids[j]] = from_f32<T>(w[j] * (g[j] - dot));
        continue;
      }
      // Every expert's logit moves the full softmax's denominator.
      const T* l = logits + t * E;
      float m = -INFINITY;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, to_f32(l[e]));
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(to_f32(l[e]) - m);
      std::fill(gsel.begin(), gsel.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) gsel[ids[j]] = g[j];
      const float inv = 1.f / sum;
      for (int64_t e = 0; e < E; ++e) dl[t * E + e] = from_f32<T>(std::exp(to_f32(l[e]) - m) * inv * (gsel[e] - dot));
    }
  }
}

// Copies row t (or scale * row t) to rows row_map[t * k + s].
template <class T>
void scatter_rows(const T* src, const float* scale, const int32_t* row_map, T* dst, int64_t tokens, int64_t k,
                  int64_t hidden) {
#pragma omp parallel for schedule(static) if (tokens * k * hidden > kCpuParallelGrain)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* in = src + t * hidden;
    for (int64_t s = 0; s < k; ++s) {
      T* out = dst + int64_t(row_map[t * k + s]) * hidden;
      if (!scale) {
        std::copy(in, in + hidden, out);
        continue;
      }
      const float w = scale[t * k + s];
      for (int64_t c = 0; c < hidden; ++c) out[c] = from_f32<T>(w * to_f32(in[c]));
    }
  }
}

void check_row_map(const int32_t* row_map, int64_t rows) {
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) ok = ok && row_map[r] >= 0 && row_map[r] < rows;
  require(ok, "row_map holds a row outside [0, tokens * top_k); pass the row_map returned by moe_permute");
}

template <class T>
void permute(const MoePermuteArgs& a) {
  const int64_t rows = a.tokens * a.top_k, E = a.experts;
  std::vector<int64_t> cursor(E + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t e = a.expert_ids[r];
    require(e >= 0 && e < E, "expert_ids[" + std::to_string(r / a.top_k) + ", " + std::to_string(r % a.top_k) +
                                 "] = " + std::to_string(e) + " is outside [0, num_experts = " +
                                 std::to_string(E) + ")");
    ++cursor[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) cursor[e + 1] += cursor[e];
  std::copy(cursor.begin(), cursor.end(), a.offsets);
  // Walking the pairs in order makes the grouping stable.
  for (int64_t r = 0; r < rows; ++r) a.row_map[r] = int32_t(cursor[a.expert_ids[r]]++);
  scatter_rows(static_cast<const T*>(a.x), nullptr, a.row_map, static_cast<T*>(a.x_perm), a.tokens, a.top_k,
               a.hidden);
}

template <class T>
void gather(const MoeGatherArgs& a) {
  const int64_t k = a.top_k, hidden = a.hidden;
  const T* src = static_cast<const T*>(a.src);
  if (a.grad_weights) {
    const T* grad = static_cast<const T*>(a.grad);
#pragma omp parallel for schedule(static) if (a.tokens * k * hidden > kCpuParallelGrain)
    for (int64_t t = 0; t < a.tokens; ++t) {
      for (int64_t s = 0; s < k; ++s) {
        const T* row = src + int64_t(a.row_map[t * k + s]) * hidden;
        float dot = 0.f;
        for (int64_t c = 0; c < hidden; ++c) dot += to_f32(grad[t * hidden + c]) * to_f32(row[c]);
        a.grad_weights[t * k + s] = dot;
      }
    }
    return;
  }
  T* dst = static_cast<T*>(a.dst);
#pragma omp parallel if (a.tokens * k * hidden > kCpuParallelGrain)
  {
    std::vector<float> acc(hidden);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < k; ++s) {
        const T* row = src + int64_t(a.row_map[t * k + s]) * hidden;
        const float w = a.weights ? a.weights[t * k + s] : 1.f;
        for (int64_t c = 0; c < hidden; ++c) acc[c] += w * to_f32(row[c]);
      }
      for (int64_t c = 0; c < hidden; ++c) dst[t * hidden + c] = from_f32<T>(acc[c]);
    }
  }
}

}  // namespace

void moe_route_cpu(const MoeRouteArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) { route<decltype(t)>(a); });
}

void moe_route_bwd_cpu(const MoeRouteBwdArgs& a) {
  check(a);
  for (int64_t r = 0; r < a.tokens * a.top_k; ++r)
    require(a.expert_ids[r] >= 0 && a.expert_ids[r] < a.experts, "expert_ids out of range in the router backward");
  dispatch_dtype(a.dtype, [&](auto t) { route_bwd<decltype(t)>(a); });
}

void moe_permute_cpu(const MoePermuteArgs& a) {
  check(a);
  dispatch_dtype(a.dtype, [&](auto t) { permute<decltype(t)>(a); });
}

void moe_scatter_cpu(const MoeScatterArgs& a) {
  check(a);
  check_row_map(a.row_map, a.tokens * a.top_k);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    scatter_rows(static_cast<const T*>(a.src), a.scale, a.row_map, static_cast<T*>(a.dst), a.tokens, a.top_k,
                 a.hidden);
  });
}

void moe_gather_cpu(const MoeGatherArgs& a) {
  check(a);
  check_row_map(a.row_map, a.tokens * a.top_k);
  dispatch_dtype(a.dtype, [&](auto t) { gather<decltype(t)>(a); });
}

}  // namespace mixkit
