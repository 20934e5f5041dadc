// The emulated GPU: csrc/cuda/*.cu compiled as host C++ (MIXKIT_EMULATE), for
// tests only. Included by compat.cuh and nowhere else.
//
// The HIP CPU runtime (HIP-CPU, used in place from shared/third_party) gives
// the HIP API surface: dim3, streams and errors, atomics, math. Its kernel
// scheduler does not fit what these tests need, so the block scheduler is
// mixkit's own (emu_runtime.cpp, on HIP-CPU's bundled libco fibers):
// - HIP-CPU passes control around a fixed ring of fibers at each barrier, so
//   the order threads run in never changes and a race cannot show; here the
//   order between two synchronisation points is forward, reverse or seeded
//   random (emu::Schedule).
// - Its warp shuffles are block-wide barriers over lanes `fiber id % 64`,
//   wrong for 2-D blocks, and warpSize is fixed at 64. Here a warp is
//   kWarpSize consecutive block-linear thread ids (32 or 64, chosen at build
//   time), and a warp collective waits for that warp only.
// - Warps advance independently between barriers, in orders that push them
//   apart, so a missing barrier before a warp-collective read shows.
// - A barrier some threads never reach (or skip by returning), or a warp
//   collective whose lanes sit at different call sites, is reported as an
//   error instead of hanging or silently pairing the wrong calls.
// - Every shared- and global-memory access can be traced (emu_trace.h), which
//   the race checker (emu_racecheck.cpp) builds on.
// Everything a kernel shares with other threads (shuffles, mma fragments,
// ldmatrix rows) goes through emu::group_scratch + emu::group_sync, so the
// emulated instructions are warp-collective the way the hardware ones are.
#pragma once

#include <hip/hip_runtime.h>

#include "cuda/emu_trace.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// HIP-CPU defines these to make HIP code compile; here __HIPCC__ keeps
// meaning "compiled by hipcc", and the AMD kernel paths follow MIXKIT_AMD.
#undef __HIPCC__
#undef __HIP__
// Plain host functions: HIP-CPU marks device functions `simd` and kernels
// `flatten`, which multiplies compile time for no use in a test build.
#undef __device__
#define __device__
#undef __global__
#define __global__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __shared__
#define __shared__ static thread_local
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

// The emulator's entry points that kernels call and that touch memory of
// their own (the exchange area, queues, the models' state) stay out of line:
// SanitizerCoverage skips the functions its ignore list names
// (emu_trace_ignore.txt) only as they are after inlining, so an inlined
// model's accesses would be reported as the kernel's.
#define MIXKIT_EMU_OUTLINE __attribute__((noinline))

namespace mixkit {
namespace emu {

struct Index3 {
  unsigned x, y, z;
};

// The calling emulated thread's coordinates (valid inside a kernel only), by
// value: a kernel's reads of them are not memory accesses, as on the GPU.
Index3 thread_idx();
Index3 block_idx();
Index3 block_dim();
Index3 grid_dim();
int linear_tid();
// A number unique to this run of this block (per process): state an
// instruction model keeps per block (pending wgmma groups) keys on it, so a
// block aborted mid-kernel leaves nothing a later block could pick up.
uint64_t block_serial();

// __syncthreads() at file:line.
void syncthreads(const char* file, int line);
// A collective point of the `group` consecutive block-linear threads this
// thread belongs to (a warp, or a Hopper warpgroup): returns once every
// running thread of the group has arrived at a point with the same tag.
// `site` tells apart calls of one collective from different places (a
// shuffle's caller line): lanes at different sites are an error too.
void group_sync(int group, const char* tag, int site = 0);
// This thread's group's exchange area: `group` slots of kScratchBytes, slot
// i for the group's i-th thread. (A collective some lanes returned before is
// an error.)
constexpr int kScratchBytes = 512;
unsigned char* group_scratch(int group);

// This thread's cp.async copies not yet waited for, by commit group. The
// emulator performs a copy only at the cp.async.wait that covers it, which is
// the latest the hardware may: a read of the destination before the wait sees
// stale data, as a missing wait would on the GPU.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;  // copied from src; the rest of the 16 are zero-filled
  trace::Site site;
};
struct AsyncQueue {
  std::vector<AsyncCopy> copies;
  std::vector<size_t> group_ends;  // copies[0, group_ends[i]) belong to groups 0..i
  void clear() {
    copies.clear();
    group_ends.clear();
  }
};
AsyncQueue& async_queue();

// Dynamic shared memory of this block (extern __shared__), and the 32-bit
// shared-window addresses of PTX (cvta.to.shared): offsets into it.
unsigned char* dynamic_smem();
uint32_t shared_offset(const void* p);
void* shared_ptr(uint32_t offset, size_t bytes);

// Reports a kernel-side error (bad shared address, misuse of an emulated
// instruction): the launch raises it once the grid is done.
[[noreturn]] void fail(const char* what);

// The device an emulated call pretends to be, and how blocks are scheduled.
struct Device {
  int sm_count = 132;
  int capability = 90;        // major * 10 + minor; gfx90a reports 90 too
  int max_smem_optin = 232448;
  int blocks_per_sm = 0;      // occupancy answer; 0: 2048 threads per SM
  // A lower cap on the grids of the grid-stride launchers that read it (0:
  // their own): a test sets it so that their loops run more than once.
  int64_t max_grid = 0;
};
enum class Schedule : int { forward = 0, reverse = 1, random = 2 };
Device& device();
// A planted error in one emulated instruction (0: none), so a test can show
// that the kernel tests notice a wrong fragment layout. Codes:
//   1  mma.m16n8k16: registers a1 and a2 of A swapped
//   2  ldmatrix: lanes read row l % 8 of the next matrix
//   3  ldmatrix.trans: the transpose is dropped
//   4  cp.async: the zero-fill of src_bytes = 0 is dropped (stale data stays)
//   10 wgmma: descriptors' stride byte offset (SBO) read as half its value
//   11 wgmma: MN-major B's 8x8 core matrices read untransposed (n % 8 and
//      k % 8 exchanged)
//   12 wgmma: accumulators d[4i + 1] and d[4i + 2] swapped (rows g, g + 8 mixed)
//   13 wgmma: the 128-byte swizzle not applied to operand addresses
//   14 wgmma (RS): registers a1 and a2 of A swapped
//   15 wgmma: descriptors' leading byte offset (LBO) read as 0 (MN-major
//      columns 64.. read the first 64)
//   20 v_mfma_f32_32x32x8: A's lane halves swapped (lane l supplies lane l ^ 32's A)
//   21 v_mfma_f32_32x32x8: accumulator registers 4q .. 4q + 3 in reverse row order
//   22 v_mfma_f32_32x32x8: B's 4 items of a lane in reverse k order
// (the models: emu_sm80.cuh, emu_sm90.cuh, emu_mfma.cuh.)
int& mutation();
void set_schedule(Schedule s, uint64_t seed);
// The race checker (emu_racecheck.cpp) on or off for the launches that follow.
void set_racecheck(bool on);
bool racecheck_on();

// Runs `body` for every thread of every block, then raises the first error
// a thread reported (or the race checker's report). `kernel` names the
// kernel in reports.
void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body, const void* kernel = nullptr);

}  // namespace emu
}  // namespace mixkit

#define threadIdx (::mixkit::emu::thread_idx())
#define blockIdx (::mixkit::emu::block_idx())
#define blockDim (::mixkit::emu::block_dim())
#define gridDim (::mixkit::emu::grid_dim())
#define __syncthreads() ::mixkit::emu::syncthreads(__FILE__, __LINE__)

// atomicAdd, reported to the trace as an atomic (HIP-CPU's own does the add).
namespace mixkit {
namespace emu {
template <class T>
MIXKIT_EMU_OUTLINE T atomic_add(T* p, T v, const trace::Site& site = {}) {
  trace::model_access(trace::Kind::atomic, p, sizeof(T), site);
  trace::Quiet quiet;
  return (::atomicAdd)(p, v);
}
}  // namespace emu
}  // namespace mixkit
#define atomicAdd(p, v) ::mixkit::emu::atomic_add((p), (v))

// CUDA's device-side min/max, which take mixed integer types.
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline uint32_t __cvta_generic_to_shared(const void* p) { return ::mixkit::emu::shared_offset(p); }
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
