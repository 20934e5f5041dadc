// The emulated GPU's block scheduler (see emu.cuh for why it is mixkit's own).
//
// Each thread of a block is a fiber (HIP-CPU's bundled libco). A fiber runs
// until it reaches a synchronisation point (__syncthreads, or a warp /
// warpgroup collective) or returns; then the scheduler runs the next one. When
// every fiber has stopped, the scheduler releases what is complete: a group
// whose running threads all wait at the same collective, or the whole block at
// a barrier. Nothing complete with threads still waiting is a deadlock (a
// barrier in divergent code) and becomes an error. The order in which the
// runnable fibers run in each round is the schedule: forward, reverse, or a
// permutation drawn from (seed, block, round). Blocks run in parallel on the
// OpenMP threads, each with its own fibers.
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

// Kernel frames hold register tiles (an attention warp keeps over 100 floats),
// and AddressSanitizer widens every frame with redzones.
constexpr unsigned kStackBytes = 512 * 1024;
constexpr int kMaxThreads = 1024;

enum class State : uint8_t { ready, barrier, group, done };

struct Fiber {
  cothread_t co = nullptr;
  void* stack = nullptr;
  Index3 tid{};
  State state = State::ready;
  int group = 0;
  const char* tag = nullptr;
  int site = 0;
  AsyncQueue async;
};

struct Block {
  Index3 bid{}, bdim{}, gdim{};
  int threads = 0;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char>* scratch = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::string error;
  uint64_t serial = 0;
};

struct Launch {
  std::mutex mu;
  std::string error;
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
  f.stack = std::malloc(kStackBytes);
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

std::vector<int> round_order(int n, uint64_t block_linear, uint64_t round) {
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  if (g_schedule == Schedule::reverse) {
    std::reverse(order.begin(), order.end());
  } else if (g_schedule == Schedule::random) {
    std::mt19937_64 rng(g_seed * 0x9E3779B97F4A7C15ull ^ (block_linear << 20) ^ round);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

std::string describe(const Block& b, const char* what) {
  std::string s = std::string("mixkit emulator: ") + what + " in block (" + std::to_string(b.bid.x) + ", " +
                  std::to_string(b.bid.y) + ", " + std::to_string(b.bid.z) + ") of " + std::to_string(b.threads) +
                  " threads:";
  int shown = 0;
  for (int i = 0; i < b.threads && shown < 8; ++i) {
    const Fiber& f = t_worker.fibers[size_t(i)];
    if (f.state == State::done) continue;
    s += " thread " + std::to_string(i) + (f.state == State::barrier ? " at __syncthreads" : "");
    if (f.state == State::group) s += std::string(" at ") + f.tag + " (group of " + std::to_string(f.group) + ")";
    s += ";";
    ++shown;
  }
  return s;
}

// Releases every group whose running members all wait at the same
// collective; returns false on members waiting at different call sites.
bool release_groups(Block& b, bool& released) {
  std::vector<Fiber>& fs = t_worker.fibers;
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = fs[size_t(i)];
    if (f.state != State::group) continue;
    const int g = f.group, first = i / g * g, last = std::min(b.threads, first + g);
    bool complete = true;
    for (int j = first; j < last; ++j) {
      const Fiber& o = fs[size_t(j)];
      if (o.state == State::done) continue;
      if (o.state != State::group) {
        complete = false;
        continue;
      }
      if (o.group != g || o.site != f.site || std::strcmp(o.tag, f.tag) != 0) {
        b.error = describe(b, "lanes of one group wait at different collectives");
        return false;
      }
    }
    if (!complete) continue;
    unsigned char* scratch = b.scratch->data();
    for (int j = first; j < last; ++j) {
      if (fs[size_t(j)].state == State::done) std::memset(scratch + size_t(j) * kScratchBytes, 0xff, kScratchBytes);
      else fs[size_t(j)].state = State::ready;
    }
    released = true;
  }
  return true;
}

std::atomic<uint64_t> g_block_serial{0};

void run_block(Block& b, uint64_t block_linear) {
  Worker& w = t_worker;
  b.serial = ++g_block_serial;
  if (!w.scheduler) w.scheduler = co_active();
  while (int(w.fibers.size()) < b.threads) w.fibers.push_back(make_fiber());
  w.block = &b;
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = w.fibers[size_t(i)];
    f.state = State::ready;
    f.async.clear();
    f.tid = Index3{unsigned(i % int(b.bdim.x)), unsigned(i / int(b.bdim.x) % int(b.bdim.y)),
                   unsigned(i / int(b.bdim.x * b.bdim.y))};
  }
  bool aborted = false;
  for (uint64_t round = 0;; ++round) {
    for (int i : round_order(b.threads, block_linear, round)) {
      Fiber& f = w.fibers[size_t(i)];
      if (f.state != State::ready) continue;
      w.current = i;
      switch_to(f.co, f.stack, kStackBytes);
      if (!b.error.empty()) break;
    }
    w.current = -1;
    if (!b.error.empty()) {
      aborted = true;
      break;
    }
    bool released = false;
    if (!release_groups(b, released)) {
      aborted = true;
      break;
    }
    if (released) continue;
    int running = 0, at_barrier = 0;
    for (int i = 0; i < b.threads; ++i) {
      const State s = w.fibers[size_t(i)].state;
      running += s != State::done;
      at_barrier += s == State::barrier;
    }
    if (running == 0) break;
    if (at_barrier == running) {
      // Threads that returned count as arrived, as on the hardware.
      for (int i = 0; i < b.threads; ++i)
        if (w.fibers[size_t(i)].state == State::barrier) w.fibers[size_t(i)].state = State::ready;
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

void wait(State s, int group, const char* tag, int site = 0) {
  Fiber& f = self();
  f.state = s;
  f.group = group;
  f.tag = tag;
  f.site = site;
  yield_to_scheduler();
}

}  // namespace

const Index3& thread_idx() { return self().tid; }
const Index3& block_idx() { return current_block().bid; }
const Index3& block_dim() { return current_block().bdim; }
const Index3& grid_dim() { return current_block().gdim; }
int linear_tid() { return t_worker.current; }
uint64_t block_serial() { return current_block().serial; }

void syncthreads() { wait(State::barrier, 0, "__syncthreads"); }

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

void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int threads = int(block.x * block.y * block.z);
  require(threads >= 1 && threads <= kMaxThreads, "emulated launch with " + std::to_string(threads) + " threads per block");
  require(smem <= size_t(device().max_smem_optin), "emulated launch asks for more shared memory than the device has");
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  Launch l;
#pragma omp parallel
  {
    std::vector<unsigned char> scratch(size_t(threads) * kScratchBytes);
    // Exactly `smem` bytes on the heap, so AddressSanitizer sees accesses
    // past the dynamic shared memory the launch asked for.
    std::unique_ptr<unsigned char[]> smem_buf(smem ? new unsigned char[smem] : nullptr);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nblocks; ++i) {
      {
        std::lock_guard<std::mutex> lock(l.mu);
        if (!l.error.empty()) continue;
      }
      Block b;
      b.bid = Index3{unsigned(i % grid.x), unsigned(i / grid.x % grid.y), unsigned(i / (int64_t(grid.x) * grid.y))};
      b.bdim = Index3{block.x, block.y, block.z};
      b.gdim = Index3{grid.x, grid.y, grid.z};
      b.threads = threads;
      b.body = &body;
      b.scratch = &scratch;
      b.smem = smem_buf.get();
      b.smem_bytes = smem;
      if (smem) std::memset(smem_buf.get(), 0xcd, smem);  // stale data, never zeros a kernel could rely on
      run_block(b, uint64_t(i));
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> lock(l.mu);
        if (l.error.empty()) l.error = b.error;
      }
    }
  }
  if (!l.error.empty()) throw std::runtime_error(l.error);
}

}  // namespace emu
}  // namespace mixkit
