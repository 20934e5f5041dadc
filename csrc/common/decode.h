// Decode over a rolling-buffer KV cache (CONVENTIONS.md): argument structs,
// their checks and the backend entry points of kv_cache_append and
// decode_attn. python/mixkit/ops/decode.py validates shapes first; check()
// below re-validates everything the kernels index with.
#pragma once

#include <cstdint>

#include "ops.h"

namespace mixkit {

// Writes the token at absolute position p to slot p % C of each cache.
// k, v: (B, S, Hkv, D) with any batch/token/head strides and a contiguous last
// dim (views into a fused QKV projection need no copy); caches: contiguous
// (B, C, Hkv, D). When S > C only the last C tokens of each sequence are
// written: the earlier ones would be overwritten within the same call.
struct KvAppendArgs {
  DType dtype;
  bool positions_int64;
  const void* positions;  // (B, S) contiguous, int32 or int64
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  int64_t batch;
  int64_t seqlen;     // S, new tokens per sequence
  int64_t kv_heads;
  int64_t head_dim;
  int64_t capacity;   // C
  int64_t k_stride[3];  // batch, token, head strides of k, in elements
  int64_t v_stride[3];
};

// One query token per sequence against the last n = min(seqlen, window, C)
// cached tokens, positions seqlen - n .. seqlen - 1 in slots pos % C, and
// never positions below starts[b] when starts is set (left padding, or a
// Hugging Face static cache whose first slots hold padding). starts lives on
// the device like seqlens, so no host sync is needed to honour it.
// q: (B, H, D) with batch and head strides, contiguous last dim; out:
// contiguous (B, H, D); caches: (B, C, Hkv, D) with any batch, slot and head
// strides and a contiguous last dim (a (B, Hkv, C, D) tensor transposed is
// fine); query head h reads KV head h / (H / Hkv).
//
// Paged variant (block_table set): the caches are pages (num_pages,
// page_size, Hkv, D) shared by all sequences, and position p of sequence b
// lives at row p % page_size of page block_table[b * max_pages + p /
// page_size]; C = max_pages * page_size and nothing wraps. Only the key
// address changes: the ring's slot becomes a page lookup.
struct DecodeArgs {
  DType dtype;
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int32_t* seqlens;  // (B,) tokens seen, the current one included
  const int32_t* starts;   // (B,) first position that may be read, or nullptr for 0
  void* out;
  float* lse;              // (B, H) natural-log sum of exp of the scaled scores; -inf when nothing is visible
  int64_t batch;
  int64_t heads;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t capacity;
  int64_t window;          // 0: no window
  float scale;
  // Logit softcap (0: none) and per-head sink logits ((heads,) float32 or
  // null), as in common/flash_attn.h: the sink joins each row's denominator
  // once, lse includes it, and a row with no visible key gets zeros and
  // lse = sink. With split-KV the partials carry no sink; the combine adds it.
  float softcap;
  const float* sinks;
  int64_t q_stride[2];  // batch, head strides of q, in elements
  int64_t k_stride[3];  // batch (or page), slot (or row in page), head strides of k_cache, in elements
  int64_t v_stride[3];
  // Split-KV (GPU only): `splits` partial results per (b, h), float32,
  // ws_out (B, H, splits, D) and ws_lse (B, H, splits). Unused when splits == 1.
  int64_t splits;
  float* ws_out;
  float* ws_lse;
  // Paged caches (see above); block_table == nullptr for the ring buffer.
  const int32_t* block_table;  // (B, max_pages) contiguous
  int64_t page_size;
  int64_t max_pages;
  int64_t num_pages;
};

inline void check_head_dims(int64_t batch, int64_t kv_heads, int64_t head_dim, int64_t capacity) {
  require(batch >= 0 && batch <= 65535, "batch must be in [0, 65535]");
  require(kv_heads >= 1 && kv_heads <= 65535, "kv_heads must be in [1, 65535]");
  require(head_dim >= 1 && head_dim <= 1024, "head_dim must be in [1, 1024]");
  require(capacity >= 1 && capacity <= (int64_t(1) << 31) - 1, "cache capacity must be in [1, 2^31)");
  require(batch * capacity <= INT64_MAX / (kv_heads * head_dim), "cache size overflows int64");
}

inline void check(const KvAppendArgs& a) {
  check_dtype(a.dtype);
  check_head_dims(a.batch, a.kv_heads, a.head_dim, a.capacity);
  require(a.seqlen >= 0 && a.seqlen <= (int64_t(1) << 31) - 1, "seqlen must be in [0, 2^31)");
  require(a.batch * a.seqlen == 0 || (a.positions && a.k && a.v && a.k_cache && a.v_cache), "null tensor pointer");
}

inline void check(const DecodeArgs& a) {
  check_dtype(a.dtype);
  check_head_dims(a.batch, a.kv_heads, a.head_dim, a.capacity);
  require(a.heads >= 1 && a.heads % a.kv_heads == 0, "heads must be a positive multiple of kv_heads");
  require(a.window >= 0, "window must be >= 1, or 0 for none");
  require(std::isfinite(a.softcap) && a.softcap >= 0.f, "softcap must be finite and > 0, or 0 for none");
  require(a.splits >= 1 && a.splits <= 1024, "splits must be in [1, 1024]");
  require(a.batch == 0 || (a.q && a.k_cache && a.v_cache && a.seqlens && a.out && a.lse), "null tensor pointer");
  require(a.splits == 1 || a.batch == 0 || (a.ws_out && a.ws_lse), "split-KV needs the ws_out/ws_lse workspace");
  if (a.block_table) {
    require(a.page_size >= 1 && a.max_pages >= 1 && a.num_pages >= 1, "page_size, max_pages and num_pages must be >= 1");
    require(a.capacity == a.page_size * a.max_pages, "a paged cache's capacity is max_pages * page_size");
  }
}

// Where position p of sequence b (p in [0, C)) lives: (outer, inner) =
// (b, slot p % C) in the ring, or (page, row in page) through the page table.
// A page number outside [0, num_pages) is clamped on the GPU (it cannot raise
// without a host sync), so a bad table never reads outside the pages.
struct CacheIndex {
  int64_t outer, inner;
};

// Positions and page sizes are below 2^31 (int32 seqlens, checked
// capacities), so the divisions are 32-bit: a GPU does those inline, while a
// 64-bit one is a call whose saved registers the decode kernel spills.
MIXKIT_HD CacheIndex cache_index(const DecodeArgs& a, int64_t b, int64_t p) {
  if (!a.block_table) return {b, int64_t(uint32_t(p) % uint32_t(a.capacity))};
  const uint32_t pp = uint32_t(p), ps = uint32_t(a.page_size);
  int64_t page = a.block_table[b * a.max_pages + pp / ps];
  page = page < 0 ? 0 : (page >= a.num_pages ? a.num_pages - 1 : page);
  return {page, int64_t(pp % ps)};
}

// Element offsets of KV head kvh at an index, in k_cache and v_cache.
MIXKIT_HD int64_t k_offset(const DecodeArgs& a, CacheIndex i, int64_t kvh) {
  return i.outer * a.k_stride[0] + i.inner * a.k_stride[1] + kvh * a.k_stride[2];
}
MIXKIT_HD int64_t v_offset(const DecodeArgs& a, CacheIndex i, int64_t kvh) {
  return i.outer * a.v_stride[0] + i.inner * a.v_stride[1] + kvh * a.v_stride[2];
}

// First visible position of sequence b: the window's (or the ring's) oldest
// token, raised to starts[b]; never above seen, so n = seen - first >= 0.
MIXKIT_HD int64_t first_visible(const DecodeArgs& a, int64_t b, int64_t seen, int64_t keys) {
  int64_t first = seen > keys ? seen - keys : 0;
  if (a.starts) {
    const int64_t s = a.starts[b];
    if (s > first) first = s < seen ? s : seen;
  }
  return first;
}

// ---- backends --------------------------------------------------------------
void kv_cache_append_cpu(const KvAppendArgs& a);
void decode_attn_cpu(const DecodeArgs& a);

void kv_cache_append_gpu(const KvAppendArgs& a, int device, void* stream);
void decode_attn_gpu(const DecodeArgs& a, int device, void* stream);
// Split count for decode_attn_gpu, from shapes only (B, H, Hkv, D, the
// largest visible length min(window, C)), the kernel's occupancy and the SM
// count: no host sync, so a decode step keeps fixed shapes and can be
// captured in a CUDA graph.
int64_t decode_splits_gpu(DType dtype, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                          int64_t capacity, int64_t window, int device);

}  // namespace mixkit
