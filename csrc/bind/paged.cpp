// _core.paged_kv_append, paged_prefill_attn: python/mixkit/ops/paged.py.
#include <nanobind/stl/array.h>

#include <array>

#include "bind/bind.h"
#include "common/paged.h"

using namespace mixkit;

MIXKIT_BIND(paged) {
  m.def(
      "paged_kv_append",
      [](int backend, int device, uintptr_t stream, int dtype, bool slots_int64, uintptr_t slots, uintptr_t k,
         uintptr_t v, uintptr_t k_pages, uintptr_t v_pages, int64_t tokens, int64_t kv_heads, int64_t head_dim,
         int64_t num_pages, int64_t page_size, std::array<int64_t, 2> k_stride, std::array<int64_t, 2> v_stride) {
        const PagedAppendArgs a{DType(dtype), slots_int64,  ptr<const void>(slots), ptr<const void>(k),
                                ptr<const void>(v), ptr<void>(k_pages), ptr<void>(v_pages), tokens, kv_heads,
                                head_dim, num_pages, page_size, {k_stride[0], k_stride[1]},
                                {v_stride[0], v_stride[1]}};
        on_backend(backend, [&] { paged_kv_append_cpu(a); },
                   [&] { paged_kv_append_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "paged_prefill_attn",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t q, uintptr_t k_pages, uintptr_t v_pages,
         uintptr_t block_table, uintptr_t cu_seqlens_q, uintptr_t seqlens_k, uintptr_t out, uintptr_t lse,
         int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t total_q, int64_t max_seqlen_q,
         int64_t num_pages, int64_t page_size, int64_t max_pages, int64_t window, float scale, float softcap,
         uintptr_t sinks, std::array<int64_t, 2> q_stride, std::array<int64_t, 3> k_stride, std::array<int64_t, 3> v_stride) {
        PagedPrefillArgs a{};
        a.dtype = DType(dtype);
        a.q = ptr<const void>(q);
        a.k_pages = ptr<const void>(k_pages);
        a.v_pages = ptr<const void>(v_pages);
        a.block_table = ptr<const int32_t>(block_table);
        a.cu_seqlens_q = ptr<const int32_t>(cu_seqlens_q);
        a.seqlens_k = ptr<const int32_t>(seqlens_k);
        a.out = ptr<void>(out);
        a.lse = ptr<float>(lse);
        a.batch = batch;
        a.heads = heads;
        a.kv_heads = kv_heads;
        a.head_dim = head_dim;
        a.total_q = total_q;
        a.max_seqlen_q = max_seqlen_q;
        a.num_pages = num_pages;
        a.page_size = page_size;
        a.max_pages = max_pages;
        a.window = window;
        a.scale = scale;
        a.softcap = softcap;
        a.sinks = ptr<const float>(sinks);
        for (int i = 0; i < 2; ++i) a.q_stride[i] = q_stride[i];
        for (int i = 0; i < 3; ++i) a.k_stride[i] = k_stride[i], a.v_stride[i] = v_stride[i];
        on_backend(backend, [&] { paged_prefill_attn_cpu(a); },
                   [&] { paged_prefill_attn_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());
}
