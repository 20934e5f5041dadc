// The emulated GPU's memory-access hook: every shared- and global-memory
// access that emulated kernel code makes, and the synchronisation it passes,
// delivered to consumers. One hook, several consumers: the race checker
// (emu_racecheck.cpp) is one; a profiler counting bytes, sectors and bank
// wavefronts can be another. MIXKIT_EMULATE builds only.
//
// Where the accesses come from:
// - Plain loads and stores of kernel code (static and dynamic __shared__
//   arrays, global memory): the emulated build compiles the kernels with
//   clang's SanitizerCoverage (-fsanitize-coverage=trace-loads,trace-stores),
//   which calls __sanitizer_cov_load{1,2,4,8,16} / __sanitizer_cov_store* with
//   the address before each load and store; emu_trace.cpp receives them, with
//   the caller's return address as the instruction. The emulator's own code
//   (namespace mixkit::emu, the HIP CPU runtime, the C++ library) is left out
//   of the instrumentation (emu_trace_ignore.txt), and accesses to the calling
//   thread's own stack (registers and local arrays, in GPU terms) are dropped,
//   so what arrives is the kernel's shared and global traffic. A build
//   without the instrumentation (not clang) still reports the models' accesses
//   below, and build_info()["emu_trace"] says which it is.
// - atomicAdd: Kind::atomic, reported by its wrapper (emu.cuh).
// - The instruction models report the bytes they read and write themselves,
//   with the lane that made each access:
//     ldmatrix       each 16-byte row, by the lane that gave its address;
//     cp.async       the global source and the 16-byte shared destination at
//                    the issue (the destination may be written from then on),
//                    and the destination again when the cp.async.wait_group
//                    that covers it lands the copy;
//     wgmma          the shared operand bytes each warp's 16-row slice reads
//                    (its A rows, all of B), at the wgmma.wait_group that
//                    performs it; each byte once per warp and operand, by the
//                    first lane of the warp whose accumulators use it.
//   Shuffles and the MMA / MFMA instructions move registers only: they are
//   Events, not Accesses. On AMD (warp 64) the LDS reads that feed MFMA are
//   the kernels' own plain loads.
//
// Grouping lanes into warp-level requests: the accesses one instruction makes
// for a warp are those of the warp's lanes with equal `where` and equal
// `occurrence` (the how-many-th time the lane made an access at `where` in
// this block; computed only for consumers that ask for it).
//
// A consumer's own loads and stores are not reported, even where it is
// compiled with the instrumentation (better: keep consumers in files that are
// not, as emu_*.cpp are).
//
// Threads: blocks run in parallel on several OS threads. A consumer's
// block_begin, access, event and block_end for one block are called on the
// OS thread running that block, one emulated thread at a time; launch_begin
// and launch_end on the launching thread. Attach and detach between launches.
#pragma once

#include <cstdint>
#include <string>

namespace mixkit {
namespace emu {
namespace trace {

enum class Space : uint8_t { shared, global };

enum class Kind : uint8_t {
  load,            // a plain load of kernel code
  store,           // a plain store
  atomic,          // atomicAdd: a read-modify-write
  ldmatrix,        // read: one 16-byte row of ldmatrix
  cp_async_src,    // read: cp.async's global source (the bytes it copies; none with src_bytes = 0)
  cp_async_issue,  // cp.async's shared destination at the issue: written some time until the wait
  cp_async_land,   // write: the same destination, at the cp.async.wait_group that completes it
  wgmma,           // read: wgmma operand bytes in shared memory, at the wait that performs it
};
const char* name(Kind k);
inline bool is_write(Kind k) { return k == Kind::store || k == Kind::atomic || k == Kind::cp_async_land; }

// A kernel's call of an instruction model: the kernel-facing wrappers take it
// as a defaulted last argument, so it is the line in the kernel (or in the
// kernel's helper) that issues the instruction.
struct Site {
  const char* file;
  int line;
  Site(const char* f = __builtin_FILE(), int l = __builtin_LINE()) : file(f), line(l) {}
};

// The instruction that made an access: for plain accesses the code address
// of the load or store in the kernel; for the models an interned Site, with
// bit 63 set. Equal values: the same instruction. describe() gives
// "file:line (function)" for reports.
using Where = uint64_t;
std::string describe(Where w);

struct Access {
  const void* addr;      // host address of the first byte
  uint32_t bytes;        // width (plain: 1, 2, 4, 8, 16; models: see above)
  Space space;
  Kind kind;
  bool static_shared;    // shared: a static __shared__ array, else the dynamic shared memory
  uint32_t offset;       // shared: offset from the start of that region (dynamic: the PTX shared-window offset)
  int tid;               // block-linear thread that made it
  int warp;              // tid / warp size
  uint32_t epoch;        // __syncthreads the block had completed before the access
  uint32_t interval;     // collectives (warp or warpgroup) the thread's warp had completed in this block
  Where where;
  uint32_t occurrence;   // with Consumer::wants_occurrence: earlier accesses by this thread at `where`
};

enum class EventKind : uint8_t {
  barrier,      // a __syncthreads released: every thread of the block passed it
  collective,   // a warp or warpgroup collective released (shuffle, ldmatrix, mma, wgmma.*, v_mfma)
  instruction,  // one lane issued a modelled instruction (`name`: its PTX/ISA name)
  proxy_fence,  // fence.proxy.async by one thread
};

struct Event {
  EventKind kind;
  const char* name;  // collective: its tag; instruction: the instruction; barrier: "__syncthreads"
  int tid;           // instruction, proxy_fence: the thread; releases: the group's first thread
  int threads;       // releases: the threads of the group (the block's for a barrier); else 1
  uint32_t epoch;    // barriers completed, counting this one
  Where where;       // instruction, proxy_fence, barrier: the site; collective: 0
};

struct Dim {
  unsigned x, y, z;
};

struct LaunchInfo {
  const char* kernel;   // demangled name of the kernel function ("" if unknown)
  Dim grid, block;
  size_t dynamic_smem;
  int warp_size;
};

struct BlockInfo {
  const LaunchInfo* launch;
  Dim idx;
  int64_t linear;       // x + grid.x * (y + grid.y * z)
  int threads;
  size_t static_shared_bytes;  // the size of the region static_shared offsets index
  bool aborted;                // block_end: the block stopped on an error
};

class Consumer {
 public:
  virtual ~Consumer() = default;
  virtual void launch_begin(const LaunchInfo&) {}
  // Returns this consumer's state for the block, passed back below.
  virtual void* block_begin(const BlockInfo&) { return nullptr; }
  virtual void access(void* /*block*/, const Access&) {}
  virtual void event(void* /*block*/, const Event&) {}
  virtual void block_end(void* /*block*/, const BlockInfo&) {}
  // After every block; a non-empty answer fails the launch with that message.
  virtual std::string launch_end(const LaunchInfo&) { return {}; }
  // Before a block: true leaves it out of the launch, unrun (a consumer that
  // samples blocks; the launch's results are then incomplete).
  virtual bool skip_block(const BlockInfo&) { return false; }
  bool wants_occurrence = false;
  // Global-memory reads (plain loads, cp.async sources) are the bulk of the
  // traffic; a consumer that does not need them says so, and when none does
  // they are not delivered at all.
  bool wants_global_reads = true;
};

void attach(Consumer* c);
void detach(Consumer* c);
// Whether the kernels' plain loads and stores are instrumented in this build.
bool plain_accesses_traced();

// Reported by the instruction models and wrappers, for the calling emulated
// thread (no-ops outside a kernel or with no consumer attached).
void model_access(Kind k, const void* addr, uint32_t bytes, const Site& site);
void instruction(const char* name, const Site& site);
void proxy_fence(const Site& site);
// Whether anything is listening (models may skip computing what they report).
bool active();

// Held by an instruction model while it runs: the loads, stores and copies
// the model makes itself (its exchange area, queues) are not the kernel's.
// (The models are out of line and skipped by the instrumentation; this covers
// what AddressSanitizer's memcpy callbacks still see in them.)
class Quiet {
 public:
  Quiet();
  ~Quiet();
  Quiet(const Quiet&) = delete;
  Quiet& operator=(const Quiet&) = delete;

 private:
  bool was_;
};

}  // namespace trace
}  // namespace emu
}  // namespace mixkit
