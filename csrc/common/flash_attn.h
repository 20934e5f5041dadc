// Exact attention without the S x S score matrix (flash attention): argument
// structs, their checks and the backend entry points of flash_attn and
// flash_attn_varlen, forward and backward. python/mixkit/ops/flash_attn.py
// validates shapes first; check() below re-validates what kernels index with.
//
// One struct serves the fixed-length and the packed (varlen) forms:
//  - fixed:  q (B, Sq, H, D), k/v (B, Sk, Hkv, D); cu_seqlens_q/k are null and
//            every sequence has seqlen_q queries and seqlen_k keys.
//  - varlen: q (Tq, H, D), k/v (Tk, Hkv, D); sequence b owns rows
//            cu_seqlens_q[b] .. cu_seqlens_q[b + 1] (same for k); seqlen_q/k
//            are the max_seqlen hints (GPU grid size), batch strides are 0.
// Row i of sequence b (fixed or varlen) sits at
//   base + b * stride[0] + ((cu ? cu[b] : 0) + i) * stride[1] + h * stride[2].
//
// Masks (CONVENTIONS.md), per sequence with sq queries and sk keys: query i
// is the absolute position i + sk - sq (bottom-right alignment). Key j is
// visible when j < sk and
//   causal:  j <= i + sk - sq
//   window W (causal only): j > i + sk - sq - W   (W keys, the query's own included)
// A query that sees no key gets a zero output and lse = -inf.
//
// Logit softcap c > 0 (Gemma 2): the scaled score s = scale * q.k becomes
// c * tanh(s / c) before the mask; the backward multiplies dS by
// 1 - tanh^2. Attention sinks (gpt-oss): a per-head logit sink[h], in the
// units of the (capped) scores, that joins each row's softmax denominator and
// carries no value: out_i = sum_j exp(s_ij - lse_i) v_j with
//   lse_i = log(sum_j exp(s_ij) + exp(sink[h])),
// so the lse written includes the sink, and a row that sees no key gets a zero
// output and lse = sink[h]. The backward needs no sink term beyond that lse
// (dS = P (dP - delta) still holds: the sink has no value, so its dP is 0);
// dsink[h] = -sum_i exp(sink[h] - lse_i) * delta_i is formed by the caller
// from lse and delta (python/mixkit/ops/flash_attn.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "ops.h"

namespace mixkit {

struct FlashFwdArgs {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  void* out;                    // q's shape, o_stride
  float* lse;                   // natural-log log-sum-exp of the scaled scores, float32
  const int32_t* cu_seqlens_q;  // (batch + 1,) or null (fixed)
  const int32_t* cu_seqlens_k;  // (batch + 1,) or null (fixed)
  int64_t batch;
  int64_t heads;
  int64_t kv_heads;             // heads % kv_heads == 0; query head h reads kv head h / (heads / kv_heads)
  int64_t head_dim;
  int64_t seqlen_q;             // fixed: Sq; varlen: max_seqlen_q
  int64_t seqlen_k;             // fixed: Sk; varlen: max_seqlen_k
  int64_t total_q;              // rows of q: B * Sq (fixed) or Tq (varlen)
  int64_t total_k;              // rows of k and v
  int64_t q_stride[3];          // batch, token, head strides in elements; the last dim is contiguous
  int64_t k_stride[3];
  int64_t v_stride[3];
  int64_t o_stride[3];
  int64_t lse_stride[2];        // batch, head strides of lse in floats; the token stride is 1.
                                // fixed (B, H, Sq): {H * Sq, Sq}; varlen (H, Tq): {0, Tq}
  bool causal;
  int64_t window;               // 0: no window; >= 1 needs causal
  float scale;                  // softmax scale, 1/sqrt(D) by default
  float softcap;                // 0: none; else c > 0 (finite)
  const float* sinks;           // (heads,) float32 logits, or null
};

// dq, dk, dv have the shapes of q, k, v (strides dq/dk/dv_stride); dout has
// out's shape. delta (lse layout) and dq_accum are float32 workspaces the
// caller allocates: delta = rowsum(dout * out), written by the backward and
// read back by the caller for dsinks; dq_accum is
// (total_q, heads, head_dim) contiguous, zero-filled, used by the GPU's
// non-deterministic path (atomicAdd) and ignored otherwise.
struct FlashBwdArgs {
  FlashFwdArgs f;               // the forward's arguments (out and lse as the forward wrote them)
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  int64_t do_stride[3];
  int64_t dq_stride[3];
  int64_t dk_stride[3];
  int64_t dv_stride[3];
  float* delta;
  float* dq_accum;
  bool deterministic;           // GPU: dQ without atomics (a separate pass over query blocks)
};

inline void check(const FlashFwdArgs& a) {
  check_dtype(a.dtype);
  require(a.batch >= 0 && a.batch <= 65535, "batch must be in [0, 65535]");
  require(a.heads >= 1 && a.heads <= 65535, "heads must be in [1, 65535]");
  require(a.kv_heads >= 1 && a.heads % a.kv_heads == 0,
          "heads must be a positive multiple of kv_heads, got heads = " + std::to_string(a.heads) +
              ", kv_heads = " + std::to_string(a.kv_heads));
  require(a.head_dim >= 1 && a.head_dim <= 1024, "head_dim must be in [1, 1024]");
  const int64_t max_len = (int64_t(1) << 31) - 1;
  require(a.seqlen_q >= 0 && a.seqlen_q <= max_len && a.seqlen_k >= 0 && a.seqlen_k <= max_len,
          "sequence lengths must be in [0, 2^31)");
  require(a.total_q >= 0 && a.total_q <= max_len && a.total_k >= 0 && a.total_k <= max_len,
          "total rows must be in [0, 2^31)");
  require((a.cu_seqlens_q == nullptr) == (a.cu_seqlens_k == nullptr), "give both cu_seqlens or neither");
  if (!a.cu_seqlens_q) {
    require(a.batch * a.seqlen_q == a.total_q && a.batch * a.seqlen_k == a.total_k,
            "fixed-length total rows must equal batch * seqlen");
  } else {
    require(a.q_stride[0] == 0 && a.k_stride[0] == 0 && a.v_stride[0] == 0 && a.o_stride[0] == 0 &&
                a.lse_stride[0] == 0,
            "varlen tensors have no batch dimension: their batch strides must be 0");
  }
  require(a.window >= 0, "window must be >= 1, or 0 for none");
  require(a.window == 0 || a.causal, "a window needs causal=True");
  require(std::isfinite(a.scale) && a.scale > 0.f, "softmax scale must be finite and > 0");
  require(std::isfinite(a.softcap) && a.softcap >= 0.f, "softcap must be finite and > 0, or 0 for none");
  require(a.total_q == 0 || (a.q && a.out && a.lse), "null tensor pointer");
  require(a.total_k == 0 || (a.k && a.v), "null tensor pointer");
}

inline void check(const FlashBwdArgs& a) {
  check(a.f);
  require(a.f.total_q == 0 || (a.dout && a.dq && a.delta), "null tensor pointer");
  require(!a.f.cu_seqlens_q || (a.do_stride[0] == 0 && a.dq_stride[0] == 0 && a.dk_stride[0] == 0 &&
                                a.dv_stride[0] == 0),
          "varlen gradients have no batch dimension: their batch strides must be 0");
  require(a.f.total_k == 0 || (a.dk && a.dv), "null tensor pointer");
}

// A row's end with a sink (-inf: none), for the CPU backends and the paged
// prefill kernel: folds it into the row's max m and sum l of exp(s - m)
// (scores in natural-log units, or log2 units with Log2) and returns the
// factor the accumulated output takes before the division by l. A larger
// sink becomes the max (always, for a row that saw nothing: l = 1, factor
// 0). The other GPU kernels do the same in flash::finish_row
// (csrc/cuda/flash_attn.cuh).
template <bool Log2>
MIXKIT_HD float add_sink(float sink, float& m, float& l) {
  if (sink > m) {
    const float rescale = Log2 ? exp2f(m - sink) : expf(m - sink);
    l = l * rescale + 1.f;
    m = sink;
    return rescale;
  }
  if (sink != -INFINITY) l += Log2 ? exp2f(sink - m) : expf(sink - m);  // a NaN sink lands here
  return 1.f;
}

// ---- backends --------------------------------------------------------------
// The CPU backend also validates cu_seqlens values (0 first, non-decreasing,
// ending at total rows, every length within max_seqlen) and raises. The GPU
// kernels cannot raise without a host sync; they clamp each sequence to
// [0, total) and loop past the max_seqlen grid, so bad values never read or
// write outside the tensors. Python checks the values before the GPU call.
void flash_attn_fwd_cpu(const FlashFwdArgs& a);
void flash_attn_bwd_cpu(const FlashBwdArgs& a);

void flash_attn_fwd_gpu(const FlashFwdArgs& a, int device, void* stream);
// The forward kernel flash_attn_fwd_gpu runs on `device`: 90 (wgmma), 80
// (mma.sync), 0 (none on this backend).
int flash_attn_fwd_arch(int device);
void flash_attn_bwd_gpu(const FlashBwdArgs& a, int device, void* stream);

}  // namespace mixkit
