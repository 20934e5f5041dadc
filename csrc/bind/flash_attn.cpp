// _core.flash_attn_fwd, flash_attn_bwd: python/mixkit/ops/flash_attn.py.
// Strides arrive as (batch, token, head) triples, lse strides as (batch, head);
// softcap 0 and sinks 0 (a null pointer) mean none.
#include <nanobind/stl/tuple.h>

#include "bind/bind.h"
#include "common/flash_attn.h"

using namespace mixkit;

namespace {

using Strides = std::tuple<int64_t, int64_t, int64_t>;

void set(int64_t (&dst)[3], const Strides& s) {
  dst[0] = std::get<0>(s);
  dst[1] = std::get<1>(s);
  dst[2] = std::get<2>(s);
}

FlashFwdArgs fwd_args(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                      uintptr_t cu_q, uintptr_t cu_k, int64_t batch, int64_t heads, int64_t kv_heads,
                      int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k, int64_t total_q, int64_t total_k,
                      const Strides& qs, const Strides& ks, const Strides& vs, const Strides& os,
                      const std::tuple<int64_t, int64_t>& ls, bool causal, int64_t window, float scale,
                      float softcap, uintptr_t sinks) {
  FlashFwdArgs a{};
  a.dtype = DType(dtype);
  a.q = ptr<const void>(q);
  a.k = ptr<const void>(k);
  a.v = ptr<const void>(v);
  a.out = ptr<void>(out);
  a.lse = ptr<float>(lse);
  a.cu_seqlens_q = ptr<const int32_t>(cu_q);
  a.cu_seqlens_k = ptr<const int32_t>(cu_k);
  a.batch = batch;
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.head_dim = head_dim;
  a.seqlen_q = seqlen_q;
  a.seqlen_k = seqlen_k;
  a.total_q = total_q;
  a.total_k = total_k;
  set(a.q_stride, qs);
  set(a.k_stride, ks);
  set(a.v_stride, vs);
  set(a.o_stride, os);
  a.lse_stride[0] = std::get<0>(ls);
  a.lse_stride[1] = std::get<1>(ls);
  a.causal = causal;
  a.window = window;
  a.scale = scale;
  a.softcap = softcap;
  a.sinks = ptr<const float>(sinks);
  return a;
}

}  // namespace

MIXKIT_BIND(flash_attn) {
  m.def(
      "flash_attn_fwd",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
         uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k, int64_t batch, int64_t heads, int64_t kv_heads,
         int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k, int64_t total_q, int64_t total_k, Strides qs,
         Strides ks, Strides vs, Strides os, std::tuple<int64_t, int64_t> ls, bool causal, int64_t window,
         float scale, float softcap, uintptr_t sinks) {
        const FlashFwdArgs a = fwd_args(dtype, q, k, v, out, lse, cu_q, cu_k, batch, heads, kv_heads, head_dim,
                                        seqlen_q, seqlen_k, total_q, total_k, qs, ks, vs, os, ls, causal, window,
                                        scale, softcap, sinks);
        on_backend(backend, [&] { flash_attn_fwd_cpu(a); }, [&] { flash_attn_fwd_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "flash_attn_fwd_arch",
      [](int backend, int device) {
        int arch = 0;
        on_backend(backend, [&] {}, [&] { arch = flash_attn_fwd_arch(device); });
        return arch;
      },
      "The forward kernel a GPU call runs: 90 (wgmma), 80 (mma.sync), 0 (CPU or none); MIXKIT_FORCE_SM80=1 "
      "forces 80.");

  m.def(
      "flash_attn_bwd",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
         uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k, int64_t batch, int64_t heads, int64_t kv_heads,
         int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k, int64_t total_q, int64_t total_k, Strides qs,
         Strides ks, Strides vs, Strides os, std::tuple<int64_t, int64_t> ls, bool causal, int64_t window,
         float scale, float softcap, uintptr_t sinks, uintptr_t dout, uintptr_t dq, uintptr_t dk, uintptr_t dv,
         Strides dos, Strides dqs, Strides dks, Strides dvs, uintptr_t delta, uintptr_t dq_accum,
         bool deterministic) {
        FlashBwdArgs a{};
        a.f = fwd_args(dtype, q, k, v, out, lse, cu_q, cu_k, batch, heads, kv_heads, head_dim, seqlen_q, seqlen_k,
                       total_q, total_k, qs, ks, vs, os, ls, causal, window, scale, softcap, sinks);
        a.dout = ptr<const void>(dout);
        a.dq = ptr<void>(dq);
        a.dk = ptr<void>(dk);
        a.dv = ptr<void>(dv);
        set(a.do_stride, dos);
        set(a.dq_stride, dqs);
        set(a.dk_stride, dks);
        set(a.dv_stride, dvs);
        a.delta = ptr<float>(delta);
        a.dq_accum = ptr<float>(dq_accum);
        a.deterministic = deterministic;
        on_backend(backend, [&] { flash_attn_bwd_cpu(a); }, [&] { flash_attn_bwd_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());
}
