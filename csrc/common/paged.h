// Paged KV cache for a serving engine (vLLM-style pages): argument structs,
// their checks and the backend entry points of paged_kv_append and
// paged_prefill_attn. Decode over the same pages is decode_attn_paged
// (common/decode.h). python/mixkit/ops/paged.py validates shapes first;
// check() below re-validates everything the kernels index with.
//
// A pool is (num_pages, page_size, Hkv, D), shared by all sequences. Slot s of
// a pool is row s % page_size of page s / page_size; position p of sequence b
// lives at row p % page_size of page block_table[b, p / page_size].
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "flash_attn.h"
#include "ops.h"

namespace mixkit {

// Token t's k/v go to slot slot_mapping[t]; a negative slot skips the token
// (padding rows of a fixed-shape batch). k, v: (T, Hkv, D) with any token and
// head strides and a contiguous last dim; pools contiguous.
struct PagedAppendArgs {
  DType dtype;
  bool slots_int64;
  const void* slots;  // (T,) int32 or int64
  const void* k;
  const void* v;
  void* k_pages;
  void* v_pages;
  int64_t tokens;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t num_pages;
  int64_t page_size;
  int64_t k_stride[2];  // token, head strides of k, in elements
  int64_t v_stride[2];
};

// Chunked prefill over pages: sequence b owns query rows cu_seqlens_q[b] ..
// cu_seqlens_q[b + 1] (sq of them) and has seqlens_k[b] = sk keys in its
// pages, the chunk's own already appended, so its queries are positions
// sk - sq .. sk - 1 (bottom-right aligned, as in flash_attn). Query at
// position p sees the keys at positions j with j <= p and, with a window W,
// j > p - W (W keys, its own included; CONVENTIONS.md). Only the pages that
// hold a visible key are read, so pages entirely behind every query's window
// may have been freed and reused. A query that sees nothing (sk < sq) gets
// zeros and lse = -inf.
struct PagedPrefillArgs {
  DType dtype;
  const void* q;                // (Tq, H, D), token and head strides, contiguous last dim
  const void* k_pages;          // (num_pages, page_size, Hkv, D), page/row/head strides
  const void* v_pages;
  const int32_t* block_table;   // (batch, max_pages) contiguous
  const int32_t* cu_seqlens_q;  // (batch + 1,)
  const int32_t* seqlens_k;     // (batch,)
  void* out;                    // (Tq, H, D) contiguous
  float* lse;                   // (Tq, H) natural-log log-sum-exp of the scaled scores
  int64_t batch;
  int64_t heads;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t total_q;
  int64_t max_seqlen_q;         // a hint that sizes the GPU grid; the kernels loop past it
  int64_t num_pages;
  int64_t page_size;
  int64_t max_pages;
  int64_t window;               // 0: no window
  float scale;
  // Logit softcap (0: none), applied to the scaled scores before masking,
  // and per-head sink logits ((heads,) float32 or null), as in
  // common/decode.h: the sink joins each row's denominator once, lse
  // includes it, a row with no visible key gets zeros and lse = the sink.
  float softcap;
  const float* sinks;
  int64_t q_stride[2];          // token, head
  int64_t k_stride[3];          // page, row, head
  int64_t v_stride[3];
};

inline void check_pool(int64_t num_pages, int64_t page_size, int64_t kv_heads, int64_t head_dim) {
  require(num_pages >= 1 && page_size >= 1 && num_pages <= ((int64_t(1) << 31) - 1) / page_size,
          "num_pages * page_size must be in [1, 2^31)");
  require(kv_heads >= 1 && kv_heads <= 65535, "kv_heads must be in [1, 65535]");
  require(head_dim >= 1 && head_dim <= 1024, "head_dim must be in [1, 1024]");
}

inline void check(const PagedAppendArgs& a) {
  check_dtype(a.dtype);
  check_pool(a.num_pages, a.page_size, a.kv_heads, a.head_dim);
  require(a.tokens >= 0 && a.tokens <= (int64_t(1) << 31) - 1, "tokens must be in [0, 2^31)");
  require(a.tokens == 0 || (a.slots && a.k && a.v && a.k_pages && a.v_pages), "null tensor pointer");
}

inline void check(const PagedPrefillArgs& a) {
  check_dtype(a.dtype);
  check_pool(a.num_pages, a.page_size, a.kv_heads, a.head_dim);
  require(a.batch >= 0 && a.batch <= 65535, "batch must be in [0, 65535]");
  require(a.heads >= 1 && a.heads % a.kv_heads == 0 && a.heads <= 65535,
          "heads must be a positive multiple of kv_heads");
  require(a.total_q >= 0 && a.total_q <= (int64_t(1) << 31) - 1, "total_q must be in [0, 2^31)");
  require(a.max_seqlen_q >= 0, "max_seqlen_q must be >= 0");
  require(a.max_pages >= 1 && a.max_pages <= ((int64_t(1) << 31) - 1) / a.page_size,
          "max_pages * page_size must be in [1, 2^31)");
  require(a.window >= 0, "window must be >= 1, or 0 for none");
  require(std::isfinite(a.scale) && a.scale > 0.f, "softmax scale must be finite and > 0");
  require(std::isfinite(a.softcap) && a.softcap >= 0.f, "softcap must be finite and > 0, or 0 for none");
  require(a.batch == 0 || (a.block_table && a.cu_seqlens_q && a.seqlens_k), "null tensor pointer");
  require(a.total_q == 0 || (a.q && a.k_pages && a.v_pages && a.out && a.lse), "null tensor pointer");
}

// The keys query position p of a sequence with sk keys sees: [lo, hi),
// empty at 0 for a query before the first key (more queries than keys).
MIXKIT_HD void visible_keys(int64_t p, int64_t sk, int64_t window, int64_t& lo, int64_t& hi) {
  hi = p + 1 < sk ? p + 1 : sk;
  if (hi < 0) hi = 0;
  lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
  if (lo > hi) lo = hi;
}

// ---- backends --------------------------------------------------------------
// The CPU also validates every value the kernels index with (cu_seqlens_q,
// seqlens_k, the slots, the visible block-table entries) and raises; the GPU
// cannot without a host sync and clamps instead, so bad values never read or
// write outside the tensors.
void paged_kv_append_cpu(const PagedAppendArgs& a);
void paged_prefill_attn_cpu(const PagedPrefillArgs& a);

void paged_kv_append_gpu(const PagedAppendArgs& a, int device, void* stream);
void paged_prefill_attn_gpu(const PagedPrefillArgs& a, int device, void* stream);

}  // namespace mixkit
