// Mixtral routing: top-k router, token permutation by expert and the weighted
// un-permutation, with their backward passes (csrc/cpu/moe_route.cpp,
// csrc/cuda/moe_route.cu, python/mixkit/ops/moe.py).
//
// Layout shared by every op here. The T * k (token, slot) pairs are numbered
// r = t * k + slot. moe_permute places pair r at row row_map[r] of the
// permuted buffer (N = T * k rows of H elements), grouped by expert and stable
// (ascending r within an expert), so expert e owns rows
// offsets[e] .. offsets[e + 1] and a grouped GEMM reads them directly. The
// inverse direction is a gather: token t sums rows row_map[t * k + slot], so
// unpermute and the permute backward need no atomics and are deterministic.
#pragma once

#include <cstdint>
#include <string>

#include "ops.h"

namespace mixkit {

// E above this needs more than one warp per token in the GPU router; Mixtral
// has 8, DeepSeek-V3 256.
constexpr int64_t kMoeMaxExperts = 256;

// The weights are a float32 softmax relative to the largest logit, over the
// k selected logits (renormalize: Mixtral, Qwen3-MoE's norm_topk_prob,
// gpt-oss) or over all E with only the selected k kept (OLMoE, Qwen3-MoE
// without norm_topk_prob): then they sum to less than 1.
struct MoeRouteArgs {
  DType dtype;           // of logits
  const void* logits;    // (tokens, experts), contiguous
  float* weights;        // (tokens, top_k) float32
  int32_t* expert_ids;   // (tokens, top_k)
  int64_t tokens;
  int64_t experts;
  int64_t top_k;
  bool renormalize;
};

// With g = grad_weights and dot = sum_j w_j g_j:
//   renormalized: grad_logits[t, ids[t, j]] = w_j (g_j - dot), zero elsewhere;
//   otherwise (logits given): grad_logits[t, i] = p_i (g_j [i = ids[t, j]] - dot)
//   for every expert i, p the full softmax of the logits, recomputed here.
struct MoeRouteBwdArgs {
  DType dtype;                 // of grad_logits (and of logits)
  const float* grad_weights;   // (tokens, top_k)
  const float* weights;        // (tokens, top_k), the forward output
  const int32_t* expert_ids;   // (tokens, top_k)
  void* grad_logits;           // (tokens, experts)
  const void* logits;          // (tokens, experts) without renormalization, else null
  int64_t tokens;
  int64_t experts;
  int64_t top_k;
};

// Builds offsets and row_map, then scatters x rows into x_perm. An expert id
// outside [0, experts) raises on the CPU; on the GPU (which cannot raise
// without a host sync) such a pair goes to a trailing bucket after
// offsets[experts], so offsets[experts] < tokens * top_k flags bad ids and
// nothing is written out of bounds.
struct MoePermuteArgs {
  DType dtype;
  const void* x;               // (tokens, hidden)
  const int32_t* expert_ids;   // (tokens, top_k)
  void* x_perm;                // (tokens * top_k, hidden)
  int64_t* offsets;            // (experts + 1,)
  int32_t* row_map;            // (tokens * top_k,)
  int32_t* workspace;          // GPU only: moe_permute_workspace_gpu() int32 elements
  int64_t tokens;
  int64_t top_k;
  int64_t hidden;
  int64_t experts;
};

// dst[row_map[t * k + s]] = scale[t, s] * src[t]: the permute forward (scale
// null: an exact copy) and the gradient of unpermute with respect to y_rows.
// Every destination row is written by exactly one (t, s).
struct MoeScatterArgs {
  DType dtype;
  const void* src;             // (tokens, hidden)
  const float* scale;          // optional (tokens, top_k)
  const int32_t* row_map;      // (tokens * top_k,)
  void* dst;                   // (tokens * top_k, hidden)
  int64_t tokens;
  int64_t top_k;
  int64_t hidden;
};

// dst[t] = sum_s weight[t, s] * src[row_map[t * k + s]] in float32, rounded
// once: unpermute (weights given) and the permute backward (weights null).
// Also, with grad_weights set, the unpermute weight gradient
// grad_weights[t, s] = <grad, src[row_map[t * k + s]]> (then `src` is y_rows
// and `grad` grad_y; dst and weights are unused).
struct MoeGatherArgs {
  DType dtype;
  const void* src;             // (tokens * top_k, hidden)
  const int32_t* row_map;      // (tokens * top_k,)
  const float* weights;        // optional (tokens, top_k)
  void* dst;                   // (tokens, hidden)
  const void* grad;            // weight-gradient mode: (tokens, hidden)
  float* grad_weights;         // weight-gradient mode: (tokens, top_k)
  int64_t tokens;
  int64_t top_k;
  int64_t hidden;
};

// Whether logit a of expert ia ranks before logit b of expert ib: larger
// first, ties to the lower index (CONVENTIONS.md). NaN ranks above every
// number, as in torch.topk and torch.sort, so a NaN logit is selected and its
// token's weights become NaN: the bad value propagates instead of being
// silently routed around. -0 and +0 tie.
MIXKIT_HD bool moe_ranks_before(float a, int ia, float b, int ib) {
  const bool nan_a = a != a, nan_b = b != b;
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && a != b) return a > b;
  return ia < ib;
}

// The permuted row count T * k is stored in int32 row maps; element offsets
// (row * hidden) are computed in int64 everywhere, so T * k * H may exceed
// 2^31 as long as T * k does not.
constexpr int64_t kMoeMaxRows = INT32_MAX;

inline void check_moe_sizes(int64_t tokens, int64_t top_k, int64_t hidden) {
  require(tokens >= 0, "tokens must be >= 0");
  require(top_k >= 1 && top_k <= kMoeMaxExperts, "top_k must be in [1, 256]");
  require(tokens <= kMoeMaxRows / top_k,
          "tokens * top_k = " + std::to_string(tokens) + " * " + std::to_string(top_k) +
              " exceeds the int32 row map (2^31 - 1 rows)");
  require(hidden >= 1 && hidden <= (int64_t(1) << 30), "hidden size must be in [1, 2^30]");
  require(tokens * top_k <= INT64_MAX / hidden, "tokens * top_k * hidden overflows int64");
}

inline void check(const MoeRouteArgs& a) {
  check_dtype(a.dtype);
  require(a.tokens >= 0, "tokens must be >= 0");
  require(a.experts >= 1 && a.experts <= kMoeMaxExperts, "experts must be in [1, 256]");
  require(a.top_k >= 1 && a.top_k <= a.experts, "top_k must be in [1, experts]");
  require(a.tokens <= INT64_MAX / a.experts, "tokens * experts overflows int64");
  require(a.tokens == 0 || (a.logits && a.weights && a.expert_ids), "null tensor pointer");
}

inline void check(const MoeRouteBwdArgs& a) {
  check_dtype(a.dtype);
  require(a.tokens >= 0, "tokens must be >= 0");
  require(a.experts >= 1 && a.experts <= kMoeMaxExperts, "experts must be in [1, 256]");
  require(a.top_k >= 1 && a.top_k <= a.experts, "top_k must be in [1, experts]");
  require(a.tokens <= INT64_MAX / a.experts, "tokens * experts overflows int64");
  require(a.tokens == 0 || (a.grad_weights && a.weights && a.expert_ids && a.grad_logits), "null tensor pointer");
}

inline void check(const MoePermuteArgs& a) {
  check_dtype(a.dtype);
  check_moe_sizes(a.tokens, a.top_k, a.hidden);
  require(a.experts >= 1 && a.experts <= kMoeMaxExperts, "experts must be in [1, 256]");
  require(a.offsets, "null offsets pointer");
  require(a.tokens == 0 || (a.x && a.expert_ids && a.x_perm && a.row_map), "null tensor pointer");
}

inline void check(const MoeScatterArgs& a) {
  check_dtype(a.dtype);
  check_moe_sizes(a.tokens, a.top_k, a.hidden);
  require(a.tokens == 0 || (a.src && a.row_map && a.dst), "null tensor pointer");
}

inline void check(const MoeGatherArgs& a) {
  check_dtype(a.dtype);
  check_moe_sizes(a.tokens, a.top_k, a.hidden);
  require(a.tokens == 0 || (a.src && a.row_map), "null tensor pointer");
  require(a.tokens == 0 || (a.grad_weights ? a.grad != nullptr : a.dst != nullptr),
          "null output pointer");
}

// ---- backends --------------------------------------------------------------
void moe_route_cpu(const MoeRouteArgs& a);
void moe_route_bwd_cpu(const MoeRouteBwdArgs& a);
void moe_permute_cpu(const MoePermuteArgs& a);
void moe_scatter_cpu(const MoeScatterArgs& a);
void moe_gather_cpu(const MoeGatherArgs& a);

void moe_route_gpu(const MoeRouteArgs& a, int device, void* stream);
void moe_route_bwd_gpu(const MoeRouteBwdArgs& a, int device, void* stream);
// int32 elements of scratch moe_permute_gpu needs (per-chunk histograms).
int64_t moe_permute_workspace_gpu(int64_t tokens, int64_t top_k, int64_t experts);
void moe_permute_gpu(const MoePermuteArgs& a, int device, void* stream);
void moe_scatter_gpu(const MoeScatterArgs& a, int device, void* stream);
void moe_gather_gpu(const MoeGatherArgs& a, int device, void* stream);

}  // namespace mixkit
