// The emulated GPU's race checker (emu_racecheck.cpp): a consumer of the
// memory-access hook (emu_trace.h), switched on by emu::set_racecheck.
#pragma once

#include "cuda/emu_trace.h"

namespace mixkit {
namespace emu {
namespace racecheck {

trace::Consumer& checker();

}  // namespace racecheck
}  // namespace emu
}  // namespace mixkit
