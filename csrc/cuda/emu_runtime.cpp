// The emulated GPU's block scheduler (see emu.cuh for why it is mixkit's own).
//
// Each thread of a block is a fiber (HIP-CPU's bundled libco). A fiber runs
// until it reaches a synchronisation point (__syncthreads, or a warp /
// warpgroup collective) or returns. Warps advance independently between
// barriers: the scheduler picks one warp with runnable lanes, runs each of
// them to its next stop, and releases the warp's collective as soon as all
// its lanes (or all the warpgroup's, for a warpgroup collective) are there,
// so one warp can pass several collectives while another has not started.
// Which warp runs next is the schedule: forward keeps running the lowest
// runnable warp (warp 0 runs to its first barrier before warp 1 starts),
// reverse the highest, random a seeded mix of long runs of one warp and
// switches; lanes within a warp run in forward, reverse or shuffled order.
// A barrier is released when every thread of the block waits at it. When
// nothing can run and no barrier is complete the block is deadlocked (a
// barrier or collective in divergent code), which is an error, as is a
// barrier some threads skip by returning, threads at __syncthreads on
// different lines, lanes of one warp at different collectives, and a
// collective some of its lanes returned before. Blocks run in parallel on the
// OpenMP threads, each with its own fibers.
//
// With a trace consumer attached (emu_trace.h), the scheduler tells the
// dispatcher which emulated thread runs, and reports barrier and collective
// releases; the epoch (barriers completed) and each warp's interval
// (collectives completed) it keeps are what the race checker orders accesses by.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/ops.h"
#include "cuda/compat.cuh"
#include "cuda/emu_racecheck.h"
#include "cuda/emu_trace_runtime.h"

#define LIBCO_MP
#if !defined(__clang__)
#define LIBCO_MPROTECT
#endif
#include <external/libco/libco.h>  // HIP-CPU's bundled fibers
#if defined(thread_local)
#undef thread_local
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define MIXKIT_ASAN 1
#endif

namespace mixkit {
namespace emu {
namespace {

namespace tr = trace::detail;

// Kernel frames hold register tiles (an attention warp keeps over 100 floats),
// and AddressSanitizer widens every frame with redzones. Stacks are aligned to
// their size, which lets the trace drop a fiber's accesses to its own stack
// without looking the fiber up (emu_trace_runtime.h).
constexpr unsigned kStackBytes = tr::kFiberStackBytes;
constexpr int kMaxThreads = 1024;
constexpr int kWarp = kWarpSize;

enum class State : uint8_t { ready, barrier, group, done };

struct Fiber {
  cothread_t co = nullptr;
  void* stack = nullptr;
  Index3 tid{};
  State state = State::ready;
  int group = 0;
  const char* tag = nullptr;  // collective: its name; barrier: the file
  int site = 0;               // collective: its call site; barrier: the line
  AsyncQueue async;
};

struct Block {
  Index3 bid{}, bdim{}, gdim{};
  int threads = 0;
  int warps = 0;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char>* scratch = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::string error;
  uint64_t serial = 0;
  const char* kernel = nullptr;  // its name, for errors
  bool traced = false;
  uint32_t epoch = 0;               // barriers completed
  std::vector<uint32_t> intervals;  // per warp: collectives completed
  std::vector<int> ready;           // per warp: lanes in State::ready
};

Schedule g_schedule = Schedule::forward;
uint64_t g_seed = 0;

// Per OS thread: the fibers it runs (reused from block to block), the block
// it is running and which fiber is current.
struct Worker {
  std::vector<Fiber> fibers;
  cothread_t scheduler = nullptr;
  Block* block = nullptr;
  int current = -1;
  const void* main_bottom = nullptr;  // the OS thread's own stack, as AddressSanitizer reported it
  size_t main_size = 0;
  ~Worker() {
    for (Fiber& f : fibers) std::free(f.stack);
  }
};
thread_local Worker t_worker;

Fiber& self() { return t_worker.fibers[size_t(t_worker.current)]; }

// Switches stacks, telling AddressSanitizer so that it tracks the right one.
void switch_to(cothread_t to, const void* bottom, size_t size) {
#ifdef MIXKIT_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, bottom, size);
  co_switch(to);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)bottom;
  (void)size;
  co_switch(to);
#endif
}

// Back to the scheduler, which runs on the OS thread's own stack.
void yield_to_scheduler() {
#ifdef MIXKIT_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t_worker.main_bottom, t_worker.main_size);
  co_switch(t_worker.scheduler);
  __sanitizer_finish_switch_fiber(fake, &t_worker.main_bottom, &t_worker.main_size);
#else
  co_switch(t_worker.scheduler);
#endif
}

void fiber_main() {
#ifdef MIXKIT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &t_worker.main_bottom, &t_worker.main_size);
#endif
  for (;;) {
    (*t_worker.block->body)();
    self().state = State::done;
    yield_to_scheduler();
  }
}

Fiber make_fiber() {
  Fiber f;
  f.stack = std::aligned_alloc(kStackBytes, kStackBytes);
  if (!f.stack) throw std::bad_alloc();
  f.co = co_derive(f.stack, kStackBytes, fiber_main);
  return f;
}

// A fiber left mid-kernel by an aborted block starts over.
void reset_fiber(Fiber& f) {
#ifdef MIXKIT_ASAN
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
  f.co = co_derive(f.stack, kStackBytes, fiber_main);
}

// Which warp runs next, and the order of its lanes (see the top of the file).
class Picker {
 public:
  Picker(int warps, uint64_t block_linear) : warps_(warps), rng_(g_seed * 0x9E3779B97F4A7C15ull ^ (block_linear << 20)) {}

  int next(const std::vector<int>& ready) {
    if (g_schedule == Schedule::forward) {
      for (int w = 0; w < warps_; ++w)
        if (ready[size_t(w)]) return w;
      return -1;
    }
    if (g_schedule == Schedule::reverse) {
      for (int w = warps_ - 1; w >= 0; --w)
        if (ready[size_t(w)]) return w;
      return -1;
    }
    // Random: stay on the current warp three times in four while it can run,
    // so that warps drift several collectives apart; else any runnable warp.
    if (cur_ >= 0 && ready[size_t(cur_)] && rng_() % 4 != 0) return cur_;
    int n = 0;
    for (int w = 0; w < warps_; ++w) n += ready[size_t(w)] > 0;
    if (n == 0) return -1;
    int k = int(rng_() % uint64_t(n));
    for (int w = 0; w < warps_; ++w)
      if (ready[size_t(w)] && k-- == 0) return cur_ = w;
    return -1;
  }

  void lanes(int first, int count, std::vector<int>& order) {
    order.resize(size_t(count));
    std::iota(order.begin(), order.end(), first);
    if (g_schedule == Schedule::reverse) std::reverse(order.begin(), order.end());
    else if (g_schedule == Schedule::random) std::shuffle(order.begin(), order.end(), rng_);
  }

 private:
  int warps_;
  int cur_ = -1;
  std::mt19937_64 rng_;
};

// "a..b, c" for the threads of `b` whose state passes `pick`, at most 8 ranges.
template <class Pick>
std::string threads_where(const Block& b, Pick pick) {
  std::string s;
  int shown = 0;
  for (int i = 0; i < b.threads;) {
    if (!pick(t_worker.fibers[size_t(i)])) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < b.threads && pick(t_worker.fibers[size_t(j + 1)])) ++j;
    if (shown++ == 8) return s + ", ...";
    s += (s.empty() ? "" : ", ") + std::to_string(i) + (j > i ? ".." + std::to_string(j) : "");
    i = j + 1;
  }
  return s;
}

std::string barrier_site(const Fiber& f) {
  const char* slash = std::strrchr(f.tag, '/');
  return std::string(slash ? slash + 1 : f.tag) + ":" + std::to_string(f.site);
}

std::string where_block(const Block& b) {
  return "block (" + std::to_string(b.bid.x) + ", " + std::to_string(b.bid.y) + ", " + std::to_string(b.bid.z) + ") of " +
         std::to_string(b.threads) + " threads" + (b.kernel && *b.kernel ? std::string(" of ") + b.kernel : "");
}

std::string describe(const Block& b, const char* what) {
  std::string s = std::string("mixkit emulator: ") + what + " in " + where_block(b) + ":";
  int shown = 0;
  for (int i = 0; i < b.threads && shown < 8; ++i) {
    const Fiber& f = t_worker.fibers[size_t(i)];
    if (f.state == State::done) continue;
    s += " thread " + std::to_string(i);
    if (f.state == State::barrier) s += " at __syncthreads (" + barrier_site(f) + ")";
    if (f.state == State::group) s += std::string(" at ") + f.tag + " (group of " + std::to_string(f.group) + ")";
    s += ";";
    ++shown;
  }
  return s;
}

bool same_collective(const Fiber& a, const Fiber& b) {
  return a.group == b.group && a.site == b.site && std::strcmp(a.tag, b.tag) == 0;
}

// After warp w ran: releases the collective it waits at if the warp's (or
// the warpgroup's) lanes are all there. Returns false with b.error set when
// the lanes cannot agree: different collectives, or some returned.
bool release_group(Block& b, int w) {
  std::vector<Fiber>& fs = t_worker.fibers;
  const int lo = w * kWarp, hi = std::min(b.threads, lo + kWarp);
  const Fiber* at = nullptr;
  for (int i = lo; i < hi; ++i) {
    const Fiber& f = fs[size_t(i)];
    if (f.state == State::ready) return true;  // still running
    if (f.state != State::group) continue;
    if (!at) at = &f;
    else if (!same_collective(*at, f)) {
      b.error = describe(b, "lanes of one warp wait at different collectives");
      return false;
    }
  }
  if (!at) return true;
  const int g = at->group;
  const int first = lo / g * g, last = std::min(b.threads, first + g);
  if (g < kWarp && (lo % g || kWarp % g)) {
    b.error = describe(b, "a collective over a part of a warp that does not divide it");
    return false;
  }
  int waiting = 0, returned = 0;
  for (int i = first; i < last; ++i) {
    const Fiber& f = fs[size_t(i)];
    if (f.state == State::done) {
      ++returned;
      continue;
    }
    if (f.state != State::group) continue;  // another warp of the warpgroup, not there yet
    if (f.group == g) {
      if (!same_collective(*at, f)) {
        b.error = describe(b, "warps of one warpgroup wait at different collectives");
        return false;
      }
      ++waiting;
    }
  }
  if (returned && waiting + returned == last - first) {
    b.error = describe(b, (std::string("a collective (") + at->tag + ") some of its lanes returned before: threads " +
                           threads_where(b, [&](const Fiber& f) {
                             const int i = int(&f - fs.data());
                             return i >= first && i < last && f.state == State::done;
                           }) + " of the group")
                              .c_str());
    return false;
  }
  if (waiting != last - first) return true;
  for (int i = first; i < last; ++i) fs[size_t(i)].state = State::ready;
  for (int v = first / kWarp; v < (last + kWarp - 1) / kWarp; ++v) {
    ++b.intervals[size_t(v)];
    b.ready[size_t(v)] = std::min(b.threads, (v + 1) * kWarp) - v * kWarp;
  }
  if (b.traced) tr::release(trace::EventKind::collective, at->tag, first, last - first, b.epoch, 0);
  return true;
}

// Every running thread waits at a barrier: releases it, unless some threads
// returned without reaching it or the threads wait on different lines.
bool release_barrier(Block& b) {
  std::vector<Fiber>& fs = t_worker.fibers;
  const Fiber* at = nullptr;
  bool returned = false, split = false;
  for (int i = 0; i < b.threads; ++i) {
    const Fiber& f = fs[size_t(i)];
    if (f.state == State::done) {
      returned = true;
      continue;
    }
    if (!at) at = &f;
    else if (f.site != at->site || std::strcmp(f.tag, at->tag) != 0) split = true;
  }
  const std::string site = barrier_site(*at);
  if (returned) {
    b.error = "mixkit emulator: a barrier in divergent code in " + where_block(b) + ": threads " +
              threads_where(b, [](const Fiber& f) { return f.state == State::done; }) +
              " returned without reaching the __syncthreads at " + site + " that threads " +
              threads_where(b, [](const Fiber& f) { return f.state == State::barrier; }) + " wait at";
    return false;
  }
  if (split) {
    b.error = "mixkit emulator: a barrier in divergent code in " + where_block(b) +
              ": the threads wait at __syncthreads on different lines: " + site + " (threads " +
              threads_where(b, [&](const Fiber& f) { return f.site == at->site && std::strcmp(f.tag, at->tag) == 0; }) +
              ") and others (threads " +
              threads_where(b, [&](const Fiber& f) { return f.site != at->site || std::strcmp(f.tag, at->tag) != 0; }) +
              ")";
    return false;
  }
  for (int i = 0; i < b.threads; ++i) fs[size_t(i)].state = State::ready;
  ++b.epoch;
  for (int v = 0; v < b.warps; ++v) {
    ++b.intervals[size_t(v)];
    b.ready[size_t(v)] = std::min(b.threads, (v + 1) * kWarp) - v * kWarp;
  }
  if (b.traced)
    tr::release(trace::EventKind::barrier, "__syncthreads", 0, b.threads, b.epoch, tr::site_where(at->tag, at->site));
  return true;
}

std::atomic<uint64_t> g_block_serial{0};

void run_block(Block& b, uint64_t block_linear) {
  Worker& w = t_worker;
  b.serial = ++g_block_serial;
  if (!w.scheduler) w.scheduler = co_active();
  while (int(w.fibers.size()) < b.threads) w.fibers.push_back(make_fiber());
  w.block = &b;
  b.warps = (b.threads + kWarp - 1) / kWarp;
  b.intervals.assign(size_t(b.warps), 0);
  b.ready.assign(size_t(b.warps), 0);
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = w.fibers[size_t(i)];
    f.state = State::ready;
    f.async.clear();
    f.tid = Index3{unsigned(i % int(b.bdim.x)), unsigned(i / int(b.bdim.x) % int(b.bdim.y)),
                   unsigned(i / int(b.bdim.x * b.bdim.y))};
    ++b.ready[size_t(i / kWarp)];
  }
  Picker picker(b.warps, block_linear);
  std::vector<int> order;
  bool aborted = false;
  for (;;) {
    const int warp = picker.next(b.ready);
    if (warp >= 0) {
      picker.lanes(warp * kWarp, std::min(b.threads, (warp + 1) * kWarp) - warp * kWarp, order);
      for (int i : order) {
        Fiber& f = w.fibers[size_t(i)];
        if (f.state != State::ready) continue;
        w.current = i;
        if (b.traced) tr::thread_enter(i, warp, f.stack, kStackBytes, &b.epoch, &b.intervals[size_t(warp)]);
        switch_to(f.co, f.stack, kStackBytes);
        if (b.traced) tr::thread_leave();
        if (!b.error.empty()) break;
      }
      w.current = -1;
      b.ready[size_t(warp)] = 0;
      if (!b.error.empty() || !release_group(b, warp)) {
        aborted = true;
        break;
      }
      continue;
    }
    int running = 0, at_barrier = 0;
    for (int i = 0; i < b.threads; ++i) {
      const State s = w.fibers[size_t(i)].state;
      running += s != State::done;
      at_barrier += s == State::barrier;
    }
    if (running == 0) break;
    if (at_barrier == running) {
      if (!release_barrier(b)) {
        aborted = true;
        break;
      }
      continue;
    }
    b.error = describe(b, "deadlock (a barrier or collective not every thread reaches)");
    aborted = true;
    break;
  }
  if (aborted)
    for (int i = 0; i < b.threads; ++i)
      if (w.fibers[size_t(i)].state != State::done) reset_fiber(w.fibers[size_t(i)]);
  w.block = nullptr;
}

Block& current_block() {
  if (!t_worker.block || t_worker.current < 0) {
    std::fprintf(stderr, "mixkit emulator: a device function ran outside a kernel\n");
    std::abort();
  }
  return *t_worker.block;
}

void wait(State s, int group, const char* tag, int site) {
  Fiber& f = self();
  f.state = s;
  f.group = group;
  f.tag = tag;
  f.site = site;
  // The trace's state of this thread (inside a model or not) outlives the switch.
  tr::Running* r = tr::t_running;
  const bool quiet = r && r->quiet;
  yield_to_scheduler();
  if ((r = tr::t_running)) r->quiet = quiet;
}

bool g_racecheck = false;

}  // namespace

Index3 thread_idx() { return self().tid; }
Index3 block_idx() { return current_block().bid; }
Index3 block_dim() { return current_block().bdim; }
Index3 grid_dim() { return current_block().gdim; }
int linear_tid() { return t_worker.current; }
uint64_t block_serial() { return current_block().serial; }

void syncthreads(const char* file, int line) {
  current_block();
  wait(State::barrier, 0, file, line);
}

void group_sync(int group, const char* tag, int site) {
  if (group <= 1) return;
  wait(State::group, group, tag, site);
}

unsigned char* group_scratch(int group) {
  Block& b = current_block();
  return b.scratch->data() + size_t(t_worker.current / group * group) * kScratchBytes;
}

AsyncQueue& async_queue() {
  current_block();
  return self().async;
}

unsigned char* dynamic_smem() { return current_block().smem; }

uint32_t shared_offset(const void* p) {
  Block& b = current_block();
  const auto* c = static_cast<const unsigned char*>(p);
  if (!b.smem || c < b.smem || c > b.smem + b.smem_bytes)
    fail("a shared-memory address outside the block's dynamic shared memory");
  return uint32_t(c - b.smem);
}

void* shared_ptr(uint32_t offset, size_t bytes) {
  Block& b = current_block();
  if (!b.smem || size_t(offset) + bytes > b.smem_bytes) fail("a shared-memory access past the block's dynamic shared memory");
  return b.smem + offset;
}

void fail(const char* what) {
  Block& b = current_block();
  if (b.error.empty()) b.error = describe(b, what);
  self().state = State::done;
  yield_to_scheduler();
  std::abort();  // never resumed
}

Device& device() {
  static Device d;
  return d;
}

int& mutation() {
  static int m = 0;
  return m;
}

void set_schedule(Schedule s, uint64_t seed) {
  g_schedule = s;
  g_seed = seed;
}

void set_racecheck(bool on) {
  if (on == g_racecheck) return;
  if (on) trace::attach(&racecheck::checker());
  else trace::detach(&racecheck::checker());
  g_racecheck = on;
}
bool racecheck_on() { return g_racecheck; }

void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body, const void* kernel) {
  const int threads = int(block.x * block.y * block.z);
  require(threads >= 1 && threads <= kMaxThreads, "emulated launch with " + std::to_string(threads) + " threads per block");
  require(smem <= size_t(device().max_smem_optin), "emulated launch asks for more shared memory than the device has");
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  const std::string kernel_name = tr::kernel_name(kernel);
  trace::LaunchInfo info{kernel_name.c_str(), {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem, kWarp};
  const bool traced = tr::launch_begin(info);
  std::mutex mu;
  std::string error;
#pragma omp parallel
  {
    std::vector<unsigned char> scratch(size_t(threads) * kScratchBytes);
    // Exactly `smem` bytes on the heap, so AddressSanitizer sees accesses
    // past the dynamic shared memory the launch asked for.
    std::unique_ptr<unsigned char[]> smem_buf(smem ? new unsigned char[smem] : nullptr);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nblocks; ++i) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!error.empty()) continue;
      }
      Block b;
      b.bid = Index3{unsigned(i % grid.x), unsigned(i / grid.x % grid.y), unsigned(i / (int64_t(grid.x) * grid.y))};
      if (traced && tr::skip_block(trace::BlockInfo{&info, {b.bid.x, b.bid.y, b.bid.z}, i, threads, 0, false})) continue;
      b.bdim = Index3{block.x, block.y, block.z};
      b.gdim = Index3{grid.x, grid.y, grid.z};
      b.threads = threads;
      b.body = &body;
      b.scratch = &scratch;
      b.smem = smem_buf.get();
      b.smem_bytes = smem;
      b.traced = traced;
      b.kernel = kernel_name.c_str();
      if (smem) std::memset(smem_buf.get(), 0xcd, smem);  // stale data, never zeros a kernel could rely on
      trace::BlockInfo bi{&info, {b.bid.x, b.bid.y, b.bid.z}, i, threads, 0, false};
      if (traced) tr::block_begin(bi, b.smem, smem);
      run_block(b, uint64_t(i));
      if (traced) {
        bi.aborted = !b.error.empty();
        tr::block_end(bi);
      }
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> lock(mu);
        if (error.empty()) error = b.error;
      }
    }
  }
  if (traced) {
    std::string e = tr::launch_end(info);
    if (error.empty() && !e.empty()) error = std::move(e);
  }
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace emu
}  // namespace mixkit
