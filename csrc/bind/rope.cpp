// _core.rope: python/mixkit/ops/rope.py.
#include "bind/bind.h"

using namespace mixkit;

MIXKIT_BIND(rope) {
  m.def(
      "rope",
      [](int backend, int device, uintptr_t stream, int dtype, bool positions_int64, uintptr_t positions,
         int64_t tokens, int64_t head_dim, float theta, bool interleaved, bool inverse, uintptr_t q_in,
         uintptr_t q_out, int64_t q_heads, int64_t q_stride_token, int64_t q_stride_head, uintptr_t k_in,
         uintptr_t k_out, int64_t k_heads, int64_t k_stride_token, int64_t k_stride_head, uintptr_t inv_freq,
         float attention_factor) {
        const RopeArgs a{DType(dtype),
                         positions_int64,
                         ptr<const void>(positions),
                         tokens,
                         head_dim,
                         theta,
                         interleaved,
                         inverse,
                         {ptr<const void>(q_in), ptr<const void>(k_in)},
                         {ptr<void>(q_out), ptr<void>(k_out)},
                         {q_heads, k_heads},
                         {q_stride_token, k_stride_token},
                         {q_stride_head, k_stride_head},
                         ptr<const float>(inv_freq),
                         attention_factor};
        on_backend(backend, [&] { rope_cpu(a); }, [&] { rope_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

}
