// _core.kv_cache_append, decode_attn, decode_splits: python/mixkit/ops/decode.py.
#include <nanobind/stl/array.h>

#include <array>

#include "bind/bind.h"
#include "common/decode.h"

using namespace mixkit;

MIXKIT_BIND(decode) {
  m.def(
      "kv_cache_append",
      [](int backend, int device, uintptr_t stream, int dtype, bool positions_int64, uintptr_t positions,
         uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, int64_t batch, int64_t seqlen,
         int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t k_stride_batch, int64_t k_stride_token,
         int64_t k_stride_head, int64_t v_stride_batch, int64_t v_stride_token, int64_t v_stride_head) {
        const KvAppendArgs a{DType(dtype),
                             positions_int64,
                             ptr<const void>(positions),
                             ptr<const void>(k),
                             ptr<const void>(v),
                             ptr<void>(k_cache),
                             ptr<void>(v_cache),
                             batch,
                             seqlen,
                             kv_heads,
                             head_dim,
                             capacity,
                             {k_stride_batch, k_stride_token, k_stride_head},
                             {v_stride_batch, v_stride_token, v_stride_head}};
        on_backend(backend, [&] { kv_cache_append_cpu(a); },
                   [&] { kv_cache_append_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "decode_attn",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache,
         uintptr_t seqlens, uintptr_t starts, uintptr_t out, uintptr_t lse, int64_t batch, int64_t heads,
         int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t window, float scale, float softcap,
         uintptr_t sinks, std::array<int64_t, 2> q_stride, std::array<int64_t, 3> k_stride, std::array<int64_t, 3> v_stride,
         int64_t splits, uintptr_t ws_out, uintptr_t ws_lse, uintptr_t block_table, int64_t page_size,
         int64_t max_pages, int64_t num_pages) {
        DecodeArgs a{};
        a.dtype = DType(dtype);
        a.q = ptr<const void>(q);
        a.k_cache = ptr<const void>(k_cache);
        a.v_cache = ptr<const void>(v_cache);
        a.seqlens = ptr<const int32_t>(seqlens);
        a.starts = ptr<const int32_t>(starts);
        a.out = ptr<void>(out);
        a.lse = ptr<float>(lse);
        a.batch = batch;
        a.heads = heads;
        a.kv_heads = kv_heads;
        a.head_dim = head_dim;
        a.capacity = capacity;
        a.window = window;
        a.scale = scale;
        a.softcap = softcap;
        a.sinks = ptr<const float>(sinks);
        for (int i = 0; i < 2; ++i) a.q_stride[i] = q_stride[i];
        for (int i = 0; i < 3; ++i) a.k_stride[i] = k_stride[i], a.v_stride[i] = v_stride[i];
        a.splits = splits;
        a.ws_out = ptr<float>(ws_out);
        a.ws_lse = ptr<float>(ws_lse);
        a.block_table = ptr<const int32_t>(block_table);
        a.page_size = page_size;
        a.max_pages = max_pages;
        a.num_pages = num_pages;
        on_backend(backend, [&] { decode_attn_cpu(a); }, [&] { decode_attn_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "decode_splits",
      [](int backend, int device, int dtype, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
         int64_t capacity, int64_t window) -> int64_t {
        int64_t splits = 1;
        on_backend(
            backend, [&] { require(batch >= 0 && kv_heads >= 1 && capacity >= 1, "bad decode shape"); },
            [&] { splits = decode_splits_gpu(DType(dtype), batch, heads, kv_heads, head_dim, capacity, window, device); });
        return splits;
      },
      "KV splits decode_attn will use (1 on the CPU): sizes its float32 workspace.");
}
