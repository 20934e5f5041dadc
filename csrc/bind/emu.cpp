// _core.emu_configure: what the emulated GPU pretends to be and how it
// schedules threads (MIXKIT_EMULATE builds; tests/conftest.py sets it).
#include "bind/bind.h"

#ifdef MIXKIT_WITH_EMU
#include "cuda/emu.cuh"
#endif

using namespace mixkit;

MIXKIT_BIND(emu) {
  m.def(
      "emu_configure",
      [](int sm_count, int capability, int blocks_per_sm, int schedule, uint64_t seed, int mutation, bool racecheck,
         int64_t max_grid) {
#ifdef MIXKIT_WITH_EMU
        require(sm_count >= 1 && capability >= 0 && blocks_per_sm >= 0, "bad emulated device");
        require(schedule >= 0 && schedule <= 2, "schedule must be 0 (forward), 1 (reverse) or 2 (random)");
        require(max_grid >= 0, "max_grid must be >= 0");
        emu::device().sm_count = sm_count;
        emu::device().capability = capability;
        emu::device().blocks_per_sm = blocks_per_sm;
        emu::set_schedule(emu::Schedule(schedule), seed);
        emu::mutation() = mutation;
        emu::set_racecheck(racecheck);
        emu::device().max_grid = max_grid;
#else
        (void)sm_count, (void)capability, (void)blocks_per_sm, (void)schedule, (void)seed, (void)mutation,
            (void)racecheck, (void)max_grid;
        missing_backend("emulated GPU", "-DMIXKIT_EMULATE=ON (a test build)");
#endif
      },
      "Sets the emulated GPU's SM count, capability (major * 10 + minor), occupancy answer (0: 2048 threads "
      "per SM), thread schedule (0 forward, 1 reverse, 2 random with `seed`), planted instruction error "
      "(`mutation`, emu.cuh; 0: none), whether the race checker runs (`racecheck`: a race fails the launch) "
      "and a cap on the grids of the grid-stride launchers that read it (`max_grid`; 0: their own).",
      nb::arg("sm_count") = 132, nb::arg("capability") = 90, nb::arg("blocks_per_sm") = 0, nb::arg("schedule") = 0,
      nb::arg("seed") = 0, nb::arg("mutation") = 0, nb::arg("racecheck") = false,
      nb::arg("max_grid") = 0);
  m.def(
      "emu_trace_info",
      [] {
        nb::dict d;
#ifdef MIXKIT_WITH_EMU
        d["plain_accesses_traced"] = emu::trace::plain_accesses_traced();
        d["racecheck"] = emu::racecheck_on();
#else
        missing_backend("emulated GPU", "-DMIXKIT_EMULATE=ON (a test build)");
#endif
        return d;
      },
      "Whether the emulated kernels' plain loads and stores are traced (a clang build) and the race checker is on.");
}
