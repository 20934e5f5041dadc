// _core.norm_fwd, norm_bwd, norm_bwd_partials: python/mixkit/ops/norm.py.
#include <algorithm>

#include <nanobind/stl/tuple.h>

#include "bind/bind.h"
#include "common/norm.h"

using namespace mixkit;

MIXKIT_BIND(norm) {
  m.def(
      "norm_fwd",
      [](int backend, int device, uintptr_t stream, int dtype, bool centered, uintptr_t x, uintptr_t residual,
         uintptr_t weight, uintptr_t y, uintptr_t h, uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t cols,
         float eps) {
        const NormFwdArgs a{DType(dtype), centered,     ptr<const void>(x), ptr<const void>(residual),
                            ptr<const void>(weight), ptr<void>(y), ptr<void>(h), ptr<float>(mean),
                            ptr<float>(rstd),        rows,         cols,         eps};
        on_backend(backend, [&] { norm_fwd_cpu(a); }, [&] { norm_fwd_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "norm_bwd",
      [](int backend, int device, uintptr_t stream, int dtype, bool centered, uintptr_t grad_y, uintptr_t grad_h,
         uintptr_t x, uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t grad_x, uintptr_t grad_w_partial,
         int64_t partials, int64_t rows, int64_t cols) {
        const NormBwdArgs a{DType(dtype),         centered,           ptr<const void>(grad_y),
                            ptr<const void>(grad_h), ptr<const void>(x), ptr<const void>(weight),
                            ptr<const float>(mean),  ptr<const float>(rstd), ptr<void>(grad_x),
                            ptr<float>(grad_w_partial), partials,     rows,
                            cols};
        on_backend(backend, [&] { norm_bwd_cpu(a); }, [&] { norm_bwd_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "norm_bwd_partials",
      [](int backend, int device, int dtype, int64_t rows, int64_t cols) -> int64_t {
        check_dtype(DType(dtype));
        require(rows >= 0 && cols > 0, "bad norm size");
        int64_t p = 1;
        on_backend(
            backend,
            [&] {
              // Chunks of rows, not threads: the CPU result does not depend on
              // how many threads run.
              p = std::max<int64_t>(1, std::min<int64_t>(rows, 64));
            },
            [&] { p = norm_bwd_partials_gpu(DType(dtype), rows, cols, device); });
        return p;
      },
      "Rows of the float32 weight-gradient buffer that norm_bwd fills.");

  m.def(
      "norm_gpu_config",
      [](int dtype, int64_t cols, bool aligned) {
        check_dtype(DType(dtype));
        const int bytes = DType(dtype) == DType::f32 ? 4 : 2;
        const norm::Config c = norm::config(bytes, cols, aligned);
        return std::make_tuple(c.vec, c.items, c.tpr, c.rpb);
      },
      "The (vec, items, tpr, rpb) block layout the GPU norm kernels use for a row of `cols` elements.");
  m.attr("norm_multirow_wide_blocks") = norm::kMultiRowWideBlocks;

}
