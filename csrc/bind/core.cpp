// mixkit._core: the Python boundary. It does not link libtorch, so one build
// works with any torch. Tensors arrive as pointers plus the sizes and strides
// that python/mixkit/ops validated (see common/ops.h for why not DLPack);
// outputs are allocated by the caller and the stream is passed explicitly.
// The op families bind themselves from the other files in this folder.
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bind/bind.h"

namespace mixkit {

std::vector<std::string> backends() {
  std::vector<std::string> b{"cpu"};
#ifdef MIXKIT_WITH_CUDA
  b.push_back("cuda");
#endif
#ifdef MIXKIT_WITH_HIP
  b.push_back("hip");
#endif
#ifdef MIXKIT_WITH_EMU
  b.push_back("emu");
#endif
  return b;
}

void missing_backend(const char* name, const char* how) {
  std::string have;
  for (const auto& b : backends()) have += (have.empty() ? "" : ", ") + b;
  throw std::runtime_error(std::string("mixkit was built without the ") + name + " backend (built: " + have +
                           "); rebuild with " + how);
}

std::vector<Binder>& binders() {
  static std::vector<Binder> all;
  return all;
}

namespace {

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
  // Used only by bench/host_overhead.py to measure what the DLPack boundary
  // would cost against the pointer boundary above.
  m.def("_dlpack_probe", [](nb::ndarray<nb::ro> a) { return a.ndim(); });

  for (Binder bind : binders()) bind(m);
}
