// The scheduler's side of the memory-access hook (emu_trace.h): how
// emu_runtime.cpp tells the dispatcher (emu_trace.cpp) which emulated thread
// runs, and where its block's shared memory and its stack are. Not for
// kernels or consumers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/emu_trace.h"

namespace mixkit {
namespace emu {
namespace trace {
namespace detail {

// Every fiber's stack: this many bytes, aligned to as many, so the stack an
// address above the current frame belongs to ends at the next multiple.
constexpr size_t kFiberStackBytes = 512 * 1024;

// The emulated thread running on this OS thread.
struct Running {
  uintptr_t stack_lo = 0, stack_bytes = 0;  // its own stack: never reported
  uintptr_t dyn_lo = 0, dyn_bytes = 0;      // the block's dynamic shared memory
  uintptr_t tls_lo = 0, tls_bytes = 0;      // this OS thread's static __shared__ arrays
  int tid = -1, warp = -1;
  bool busy = false;                   // a consumer runs: its own accesses are not the kernel's
  bool quiet = false;                  // an instruction model runs (trace::Quiet): likewise
  const uint32_t* epoch = nullptr;     // the block's completed barriers
  const uint32_t* interval = nullptr;  // the warp's completed collectives
};
// Non-null while an emulated thread runs with a consumer attached.
extern thread_local Running* t_running;

void on_access(Running& r, uintptr_t addr, uint32_t bytes, Kind kind, Where where);

// Whether any consumer listens to this launch.
bool launch_begin(const LaunchInfo& l);
// Whether a consumer leaves this block out.
bool skip_block(const BlockInfo& b);
// Fills b.static_shared_bytes.
void block_begin(BlockInfo& b, const unsigned char* dyn, size_t dyn_bytes);
// Around each run of an emulated thread (the scheduler switching to it and back).
Running* thread_enter(int tid, int warp, const void* stack, size_t stack_bytes, const uint32_t* epoch,
                      const uint32_t* interval);
void thread_leave();
// A barrier or collective released.
void release(EventKind kind, const char* what, int first, int threads, uint32_t epoch, Where where);
Where site_where(const char* file, int line);
void block_end(const BlockInfo& b);
// The first consumer's error, or "".
std::string launch_end(const LaunchInfo& l);
std::string kernel_name(const void* kernel);

}  // namespace detail
}  // namespace trace
}  // namespace emu
}  // namespace mixkit
