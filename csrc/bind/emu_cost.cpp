// _core.emu_cost_*: the emulated GPU's cost counters (csrc/cuda/emu_cost.h),
// for mixkit.bench.emu_cost and tests/test_emu_cost.py. Emulated builds only.
#include "bind/bind.h"

#include <nanobind/stl/string.h>

#ifdef MIXKIT_WITH_EMU
#include "cuda/emu_cost.h"
#endif

using namespace mixkit;

namespace {
[[noreturn]] void no_emu() { missing_backend("emulated GPU", "-DMIXKIT_EMULATE=ON (a test build)"); }
}  // namespace

MIXKIT_BIND(emu_cost) {
  m.def(
      "emu_cost_start",
      [](int sample_y, int sample_z, int sample_x) {
#ifdef MIXKIT_WITH_EMU
        require(sample_y >= 0 && sample_z >= 0 && sample_x >= 0,
                "sample_y, sample_z and sample_x must be >= 0 (0: every block)");
        emu::cost::start(sample_y, sample_z, sample_x);
#else
        (void)sample_y, (void)sample_z, (void)sample_x;
        no_emu();
#endif
      },
      "Starts counting the cost of every emulated launch (memory traffic, coalescing, bank conflicts, "
      "tensor-core instructions, barriers). sample_y, sample_z > 0 run only the blocks with blockIdx.y < "
      "sample_y and blockIdx.z < sample_z, and sample_x > 0 only sample_x blocks along x from grid.x / 2 "
      "where grid.y > sample_y > 0 (their results are then incomplete).",
      nb::arg("sample_y") = 0, nb::arg("sample_z") = 0, nb::arg("sample_x") = 0);
  m.def(
      "emu_cost_stop",
      []() -> std::string {
#ifdef MIXKIT_WITH_EMU
        return emu::cost::stop();
#else
        no_emu();
#endif
      },
      "Stops counting; returns the launches counted since emu_cost_start as a JSON list.");
  m.def(
      "emu_cost_probe",
      [](const std::string& name, int variant) -> std::string {
#ifdef MIXKIT_WITH_EMU
        return emu::cost::probe(name, variant);
#else
        (void)name, (void)variant;
        no_emu();
#endif
      },
      "Runs one of the hand-calculable probe kernels (csrc/cuda/cost_probes.cpp) under the counters; "
      "returns its launches as JSON.",
      nb::arg("name"), nb::arg("variant") = 0);
}
