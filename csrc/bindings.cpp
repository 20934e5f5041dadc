// mixkit._core: the Python boundary. It does not link libtorch, so one build
// works with any torch. Tensors arrive as pointers plus the sizes and strides
// that python/mixkit/ops validated (see common/ops.h for why not DLPack);
// outputs are allocated by the caller and the stream is passed explicitly.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/ops.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mixkit {
namespace {

std::vector<std::string> backends() {
  std::vector<std::string> b{"cpu"};
#ifdef MIXKIT_WITH_CUDA
  b.push_back("cuda");
#endif
#ifdef MIXKIT_WITH_HIP
  b.push_back("hip");
#endif
  return b;
}

[[noreturn]] void missing(const char* name, const char* how) {
  std::string have;
  for (const auto& b : backends()) have += (have.empty() ? "" : ", ") + b;
  throw std::runtime_error(std::string("mixkit was built without the ") + name + " backend (built: " + have +
                           "); rebuild with " + how);
}

// Runs `cpu` or `gpu` for the backend code Python sent, or raises naming the
// backend this build lacks.
template <class Cpu, class Gpu>
void on_backend(int backend, Cpu&& cpu, Gpu&& gpu) {
  switch (Backend(backend)) {
    case Backend::cpu: cpu(); return;
    case Backend::cuda:
#ifdef MIXKIT_WITH_CUDA
      gpu(); return;
#else
      missing("CUDA", "nvcc on PATH or -DMIXKIT_CUDA=ON");
#endif
    case Backend::hip:
#ifdef MIXKIT_WITH_HIP
      gpu(); return;
#else
      missing("HIP", "hipcc on PATH or -DMIXKIT_HIP=ON");
#endif
  }
  throw std::invalid_argument("mixkit: unknown backend code " + std::to_string(backend));
}

template <class T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

nb::dict build_info() {
  nb::dict d;
  d["version"] = MIXKIT_VERSION;
  d["git_commit"] = MIXKIT_GIT_COMMIT;
  d["backends"] = backends();
  d["cuda_archs"] = MIXKIT_CUDA_ARCHS_STR;
  d["cuda_version"] = MIXKIT_CUDA_VERSION_STR;
  d["hip_archs"] = MIXKIT_HIP_ARCHS_STR;
  d["cxx_compiler"] = MIXKIT_CXX_COMPILER;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["warp_size"] = MIXKIT_GPU_WARP_SIZE;
  return d;
}

}  // namespace
}  // namespace mixkit

NB_MODULE(_core, m) {
  using namespace mixkit;
  m.doc() = "mixkit kernels (CPU, CUDA, HIP). Private: call mixkit.ops instead.";

  m.def("backends", &backends, "Backends compiled into this build, e.g. ['cpu', 'cuda'].");
  m.def("build_info", &build_info, "What this build was made for: backends, architectures, versions, commit.");
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
      "rope",
      [](int backend, int device, uintptr_t stream, int dtype, bool positions_int64, uintptr_t positions,
         int64_t tokens, int64_t head_dim, float theta, bool interleaved, bool inverse, uintptr_t q_in,
         uintptr_t q_out, int64_t q_heads, int64_t q_stride_token, int64_t q_stride_head, uintptr_t k_in,
         uintptr_t k_out, int64_t k_heads, int64_t k_stride_token, int64_t k_stride_head) {
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
                         {q_stride_head, k_stride_head}};
        on_backend(backend, [&] { rope_cpu(a); }, [&] { rope_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  // Used only by bench/host_overhead.py to measure what the DLPack boundary
  // would cost against the pointer boundary above.
  m.def("_dlpack_probe", [](nb::ndarray<nb::ro> a) { return a.ndim(); });
}
