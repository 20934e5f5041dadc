// Shared by the binding files in csrc/bind/. Each op family binds its
// functions in its own file and registers them with MIXKIT_BIND, so adding a
// family touches no shared file.
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/ops.h"

namespace mixkit {

namespace nb = nanobind;

std::vector<std::string> backends();
[[noreturn]] void missing_backend(const char* name, const char* how);

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
      missing_backend("CUDA", "nvcc on PATH or -DMIXKIT_CUDA=ON");
#endif
    case Backend::hip:
#ifdef MIXKIT_WITH_HIP
      gpu(); return;
#else
      missing_backend("HIP", "hipcc on PATH or -DMIXKIT_HIP=ON");
#endif
    case Backend::emu:
#ifdef MIXKIT_WITH_EMU
      gpu(); return;
#else
      missing_backend("emulated GPU", "-DMIXKIT_EMULATE=ON (a test build)");
#endif
  }
  throw std::invalid_argument("mixkit: unknown backend code " + std::to_string(backend));
}

template <class T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
inline void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

using Binder = void (*)(nb::module_&);
std::vector<Binder>& binders();
struct RegisterBinder {
  explicit RegisterBinder(Binder b) { binders().push_back(b); }
};

}  // namespace mixkit

// MIXKIT_BIND(norm) { m.def(...); } defines and registers a binder.
#define MIXKIT_BIND(family)                                                   \
  static void mixkit_bind_##family(nanobind::module_& m);                      \
  static const ::mixkit::RegisterBinder mixkit_register_##family{mixkit_bind_##family}; \
  static void mixkit_bind_##family(nanobind::module_& m)
