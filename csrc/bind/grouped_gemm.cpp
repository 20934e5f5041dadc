// _core.grouped_gemm, grouped_wgrad, grouped_swiglu, grouped_bias_grad: python/mixkit/ops/moe_mlp.py.
#include "bind/bind.h"
#include "common/grouped_gemm.h"

using namespace mixkit;

MIXKIT_BIND(grouped_gemm) {
  m.def(
      "grouped_gemm",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t a, uintptr_t b, uintptr_t offsets,
         uintptr_t c, int64_t rows, int64_t k, int64_t n, int64_t experts, bool trans_b, uintptr_t bias) {
        const GroupedGemmArgs g{DType(dtype), ptr<const void>(a), ptr<const void>(b), ptr<const int64_t>(offsets),
                                ptr<void>(c), rows, k, n, experts, trans_b, ptr<const void>(bias)};
        on_backend(backend, [&] { grouped_gemm_cpu(g); },
                   [&] { grouped_gemm_gpu(g, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "grouped_wgrad",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t a, uintptr_t dy, uintptr_t offsets,
         uintptr_t db, int64_t rows, int64_t k, int64_t n, int64_t experts, bool trans_b) {
        const GroupedWgradArgs g{DType(dtype), ptr<const void>(a), ptr<const void>(dy), ptr<const int64_t>(offsets),
                                 ptr<void>(db), rows, k, n, experts, trans_b};
        on_backend(backend, [&] { grouped_wgrad_cpu(g); },
                   [&] { grouped_wgrad_gpu(g, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "grouped_swiglu",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t x, uintptr_t w13, uintptr_t offsets,
         uintptr_t act, uintptr_t h, int64_t rows, int64_t k, int64_t ffn, int64_t experts, bool trans_b,
         bool interleaved, int activation, float alpha, float limit, uintptr_t bias) {
        const GroupedSwigluArgs g{DType(dtype), ptr<const void>(x), ptr<const void>(w13), ptr<const int64_t>(offsets),
                                  ptr<void>(act), ptr<void>(h), rows, k, ffn, experts, trans_b, interleaved,
                                  activation, alpha, limit, ptr<const void>(bias)};
        on_backend(backend, [&] { grouped_swiglu_cpu(g); },
                   [&] { grouped_swiglu_gpu(g, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "grouped_bias_grad",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t dy, uintptr_t offsets, uintptr_t db,
         int64_t rows, int64_t n, int64_t experts) {
        const GroupedBiasGradArgs g{DType(dtype), ptr<const void>(dy), ptr<const int64_t>(offsets), ptr<void>(db),
                                    rows, n, experts};
        on_backend(backend, [&] { grouped_bias_grad_cpu(g); },
                   [&] { grouped_bias_grad_gpu(g, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());
}
