// The emulated GPU's race checker, the counterpart of compute-sanitizer's
// racecheck (and, with the scheduler's barrier checks, synccheck): a consumer
// of the memory-access hook (emu_trace.h). A race it finds fails the launch.
//
// What orders two accesses of one block (anything else is a race when both
// touch a byte, one writes, and they come from different threads):
// - a __syncthreads between them (the block's epoch differs);
// - lanes of one warp: a collective of that warp between them (shuffle,
//   ldmatrix, mma, a v_mfma, or a wgmma.* instruction of its warpgroup).
//   Lanes of a warp are not ordered by program order: since Volta they may
//   run apart (independent thread scheduling) and need __syncwarp or a
//   .sync.aligned instruction, which the hardware executes converged, between
//   a store of one lane and a load of another. The emulator runs lanes apart
//   the same way. (Warp-synchronous code without such an instruction is a
//   race here, as it is on the hardware.) A warpgroup collective orders each
//   of its warps' lanes, not the warps against each other: wgmma's operands
//   written by another warp need a barrier.
// - atomics against atomics (atomicAdd);
// - accesses of one thread, in program order.
// Asynchronous copies and reads:
// - cp.async writes its destination at some time between the issue and the
//   cp.async.wait_group that covers it: the issue counts as a write against
//   earlier accesses (a write-after-read of another warp in the same epoch),
//   and any access to the destination before the issuing thread's wait is a
//   race; the landing at the wait is the write later readers are ordered
//   against (so another warp needs a barrier after the wait).
// - wgmma reads its shared operands at some time until its wait_group (the
//   emulator reads, and reports, at the wait). Bytes written through the
//   generic proxy (plain stores, cp.async) must be followed by a
//   fence.proxy.async of the writer, or of the reading warp after a barrier
//   that follows the write.
// Uninitialized shared memory: a read (plain, ldmatrix, wgmma, atomic) of a
// shared byte that no thread of the block has written is reported. A GPU
// starts a block's shared memory with what the SM's last block or kernel left
// there, finite or NaN bits, so a kernel that reads it, even to multiply it
// by a zero probability, is wrong on some GPU run.
// Global memory: two blocks of one launch writing the same byte, unless both
// are atomics, is a race (reported after the grid). Blocks within a launch
// have no order; nothing here models the memory model across launches.
//
// Bookkeeping: every shared byte has a Cell (its last write; the reads of the
// current epoch, summarised as one warp or many, and one lane or many in that
// warp's latest interval), per OS thread, for the dynamic shared memory and
// for the static __shared__ arrays (the OS thread's TLS). Epoch numbers run on
// across the blocks an OS thread runs, so a Cell from an earlier block is
// simply old. A shared write-after-read is found for readers from another
// warp in the epoch, or other lanes of the writer's warp since its last
// collective.
#include "cuda/emu_racecheck.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <vector>

namespace mixkit {
namespace emu {
namespace racecheck {
namespace {

using namespace trace;

constexpr uint16_t kMany = 0xffff;
constexpr size_t kMaxReports = 3;
constexpr const char* kUninitialized = "reads a byte this block never wrote (on a GPU: stale or uninitialized)";

struct Cell {
  Where w_where, r_where;
  uint32_t w_epoch;     // epoch of the last write (an old block's: smaller than its base)
  uint32_t w_interval;  // its warp's interval then
  uint32_t r_epoch;     // epoch of the reads below
  uint32_t r_interval;  // latest interval of r_warp's reads
  uint16_t w_tid;
  uint16_t w_fence;     // the writer's fence.proxy.async count at the write
  uint16_t r_warp;      // the warp that read in r_epoch, or kMany
  uint16_t r_tid;       // the lane that read in r_interval, or kMany
  Kind w_kind, r_kind;
};

// Cells for one shared region, from an anonymous mapping: untouched pages
// cost nothing, and a fresh mapping reads as "never written".
class Shadow {
 public:
  ~Shadow() { release(); }
  Cell* cells(size_t bytes) {
    if (bytes > n_) {
      release();
      const size_t want = std::max(bytes, size_t(64) << 10);
      void* p = mmap(nullptr, want * sizeof(Cell), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      cells_ = static_cast<Cell*>(p);
      n_ = want;
    }
    return cells_;
  }

 private:
  void release() {
    if (cells_) munmap(cells_, n_ * sizeof(Cell));
    cells_ = nullptr;
    n_ = 0;
  }
  Cell* cells_ = nullptr;
  size_t n_ = 0;
};

struct Span {
  uintptr_t lo, hi;
  Where where;
  int tid;
  bool atomic;
  int64_t block;
};

struct BlockState {
  const BlockInfo* info = nullptr;
  uint32_t base = 0;       // this block's epoch e is base + e
  uint32_t last = 0;       // the largest epoch seen
  Cell* dyn = nullptr;
  Cell* stat = nullptr;
  size_t dyn_bytes = 0, stat_bytes = 0;
  std::vector<uint16_t> fences;         // per thread: fence.proxy.async count
  std::vector<uint32_t> fence_epochs;   // per thread: epoch of its last fence
  std::vector<Span> writes;             // global writes, coalesced as they come
  int warp_size = 32;
};

struct Worker {
  Shadow dyn, stat;
  uint32_t next_epoch = 1;
  BlockState block;
};
thread_local Worker t_worker;

std::string block_name(const Dim& d) {
  return "block (" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

std::string thread_name(int tid, int warp_size) {
  return "thread " + std::to_string(tid) + " (warp " + std::to_string(tid / warp_size) + ")";
}

class Checker : public Consumer {
 public:
  Checker() { wants_global_reads = false; }

  void launch_begin(const LaunchInfo&) override {
    spans_.clear();
    reports_.clear();
    shared_.clear();
    keys_.clear();
    races_ = 0;
  }

  void* block_begin(const BlockInfo& b) override {
    Worker& w = t_worker;
    BlockState& s = w.block;
    s.info = &b;
    s.base = w.next_epoch;
    s.last = 0;
    s.warp_size = b.launch->warp_size;
    s.dyn_bytes = b.launch->dynamic_smem;
    s.stat_bytes = b.static_shared_bytes;
    s.dyn = w.dyn.cells(s.dyn_bytes + 16);
    s.stat = w.stat.cells(s.stat_bytes + 16);
    s.fences.assign(size_t(b.threads), 0);
    s.fence_epochs.assign(size_t(b.threads), 0);
    s.writes.clear();
    return &s;
  }

  void access(void* p, const Access& a) override {
    BlockState& s = *static_cast<BlockState*>(p);
    if (a.epoch > s.last) s.last = a.epoch;
    if (a.space == Space::shared) shared(s, a);
    else if (is_write(a.kind)) global(s, a);
  }

  void event(void* p, const Event& e) override {
    BlockState& s = *static_cast<BlockState*>(p);
    if (e.epoch > s.last) s.last = e.epoch;
    if (e.kind == EventKind::proxy_fence) {
      ++s.fences[size_t(e.tid)];
      s.fence_epochs[size_t(e.tid)] = s.base + e.epoch;
    }
  }

  void block_end(void* p, const BlockInfo& b) override {
    BlockState& s = *static_cast<BlockState*>(p);
    t_worker.next_epoch = s.base + s.last + 1;
    // This block's global writes as disjoint spans (plain and atomic apart).
    std::vector<Span>& v = s.writes;
    std::sort(v.begin(), v.end(), [](const Span& x, const Span& y) {
      return x.atomic != y.atomic ? x.atomic < y.atomic : x.lo < y.lo;
    });
    size_t n = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      if (n && v[n - 1].atomic == v[i].atomic && v[i].lo <= v[n - 1].hi) v[n - 1].hi = std::max(v[n - 1].hi, v[i].hi);
      else v[n++] = v[i];
    }
    v.resize(n);
    for (Span& x : v) x.block = b.linear;
    std::lock_guard<std::mutex> lock(mu_);
    spans_.insert(spans_.end(), v.begin(), v.end());
  }

  std::string launch_end(const LaunchInfo& l) override {
    for (const SharedRace& x : shared_) reports_.push_back(word(x));
    shared_.clear();
    std::sort(spans_.begin(), spans_.end(), [](const Span& x, const Span& y) { return x.lo < y.lo; });
    const Span* open = nullptr;
    for (const Span& x : spans_) {
      if (open && x.lo < open->hi && x.block != open->block && !(x.atomic && open->atomic)) {
        ++races_;
        if (reports_.size() < kMaxReports) reports_.push_back(global_report(l, *open, x));
      }
      if (!open || x.hi > open->hi) open = &x;
    }
    spans_.clear();
    if (!races_) return {};
    std::string r = "mixkit emulator: race check failed in " + std::string(*l.kernel ? l.kernel : "a kernel") + ": ";
    for (size_t i = 0; i < reports_.size(); ++i) r += (i ? "\n  " : "") + reports_[i];
    if (races_ > reports_.size()) r += "\n  (and " + std::to_string(races_ - reports_.size()) + " more)";
    return r;
  }

 private:
  // ---- shared memory --------------------------------------------------------------
  void shared(BlockState& s, const Access& a) {
    Cell* cells = a.static_shared ? s.stat : s.dyn;
    const size_t size = a.static_shared ? s.stat_bytes : s.dyn_bytes;
    if (a.offset >= size) return;  // past the region: AddressSanitizer's to report
    const uint32_t n = uint32_t(std::min<size_t>(a.bytes, size - a.offset));
    const uint32_t E = s.base + a.epoch;
    for (uint32_t i = 0; i < n; ++i) {
      Cell& c = cells[a.offset + i];
      const char* problem = nullptr;
      switch (a.kind) {
        case Kind::load:
        case Kind::ldmatrix:
        case Kind::wgmma:
          problem = read(s, c, a, E);
          break;
        case Kind::store:
        case Kind::cp_async_land:
          problem = write(s, c, a, E);
          break;
        case Kind::atomic:
          problem = read(s, c, a, E);
          if (!problem) problem = write(s, c, a, E);
          break;
        case Kind::cp_async_issue:
          problem = write(s, c, a, E);
          break;
        case Kind::cp_async_src:
          break;
      }
      if (problem) {
        shared_report(s, a, c, i, problem);
        return;  // one report per access
      }
    }
  }

  bool pending(const BlockState& s, const Cell& c) const { return c.w_kind == Kind::cp_async_issue && c.w_epoch >= s.base; }

  // Whether the last write of c and an access by a (epoch E) are unordered.
  bool unordered_with_write(const BlockState& s, const Cell& c, const Access& a, uint32_t E) const {
    if (c.w_epoch != E || c.w_tid == a.tid) return false;
    if (c.w_kind == Kind::atomic && a.kind == Kind::atomic) return false;
    if (c.w_tid / s.warp_size != a.tid / s.warp_size) return true;
    return c.w_interval == a.interval;
  }

  const char* read(BlockState& s, Cell& c, const Access& a, uint32_t E) {
    // Shared memory starts each block with whatever the SM's previous block or
    // kernel left there: finite values or NaN bits, never zeros to rely on.
    if (c.w_epoch < s.base) return kUninitialized;
    if (pending(s, c)) return "reads a cp.async destination before the cp.async.wait_group that lands it";
    if (unordered_with_write(s, c, a, E)) return "read-after-write";
    if (a.kind == Kind::wgmma && (c.w_kind == Kind::store || c.w_kind == Kind::cp_async_land)) {
      const bool writer_fenced = s.fences[c.w_tid] != c.w_fence;
      const bool reader_fenced = s.fence_epochs[size_t(a.tid)] > c.w_epoch;
      if (!writer_fenced && !reader_fenced)
        return "wgmma reads bytes written through the generic proxy with no fence.proxy.async after the write";
    }
    if (a.kind == Kind::atomic) return nullptr;  // recorded as the write
    const uint16_t warp = uint16_t(a.tid / s.warp_size);
    if (c.r_epoch != E) {
      c.r_epoch = E;
      c.r_warp = warp;
      c.r_interval = a.interval;
      c.r_tid = uint16_t(a.tid);
      c.r_where = a.where;
      c.r_kind = a.kind;
    } else if (c.r_warp != kMany && c.r_warp != warp) {
      c.r_warp = kMany;
    } else if (c.r_warp == warp) {
      if (c.r_interval != a.interval) {
        c.r_interval = a.interval;
        c.r_tid = uint16_t(a.tid);
        c.r_where = a.where;
        c.r_kind = a.kind;
      } else if (c.r_tid != a.tid) {
        c.r_tid = kMany;
      }
    }
    return nullptr;
  }

  const char* write(BlockState& s, Cell& c, const Access& a, uint32_t E) {
    const bool landing = a.kind == Kind::cp_async_land;
    if (pending(s, c) && !(landing && c.w_tid == a.tid))
      return "writes a cp.async destination before the cp.async.wait_group that lands it";
    if (!landing) {
      if (unordered_with_write(s, c, a, E)) return "write-after-write";
      if (c.r_epoch == E) {
        const uint16_t warp = uint16_t(a.tid / s.warp_size);
        if (c.r_warp == kMany || c.r_warp != warp) return "write-after-read";
        if (c.r_interval == a.interval && c.r_tid != a.tid) return "write-after-read";
      }
    }
    c.w_epoch = E;
    c.w_interval = a.interval;
    c.w_tid = uint16_t(a.tid);
    c.w_fence = s.fences[size_t(a.tid)];
    c.w_where = a.where;
    c.w_kind = a.kind;
    return nullptr;
  }

  // Keeps what a report needs; launch_end words it (symbolizing there, on the
  // launching thread, not inside a block).
  void shared_report(BlockState& s, const Access& a, const Cell& c, uint32_t i, const char* problem) {
    SharedRace r{s.info->idx, a, c, a.offset + i, problem, s.warp_size};
    const Where other = r.war() ? c.r_where : c.w_where;
    std::lock_guard<std::mutex> lock(mu_);
    ++races_;
    if (shared_.size() < kMaxReports && keys_.insert(a.where * 31 + other).second) shared_.push_back(r);
  }

  struct SharedRace {
    Dim block;
    Access a;
    Cell c;
    uint32_t offset;
    const char* problem;
    int warp_size;
    bool war() const { return std::string(problem) == "write-after-read"; }
  };

  static std::string word(const SharedRace& x) {
    const Access& a = x.a;
    const Cell& c = x.c;
    const int ws = x.warp_size;
    const std::string race = x.problem;
    std::string r = std::string(x.problem == kUninitialized ? "uninitialized shared-memory read" : "shared-memory race") +
                    " in " + block_name(x.block) + ": " + thread_name(a.tid, ws) + " " + name(a.kind) +
                    " at " + describe(a.where) + " touches " + (a.static_shared ? "static __shared__" : "dynamic shared") +
                    " byte " + std::to_string(x.offset);
    if (race == "read-after-write" || race == "write-after-write") {
      r += " (" + race + "): " + thread_name(c.w_tid, ws) + " wrote it (" + name(c.w_kind) + " at " + describe(c.w_where) +
           ")";
    } else if (x.war()) {
      const bool many = c.r_tid == kMany || c.r_warp == kMany;
      r += " (write-after-read): " + (many ? std::string("several threads, one") : thread_name(c.r_tid, ws)) + " at " +
           describe(c.r_where) + ", read it (" + name(c.r_kind) + ")";
    } else if (x.problem == kUninitialized) {
      return r + ": " + race;
    } else if (race.rfind("wgmma", 0) == 0) {
      return r + ": " + race + " (" + thread_name(c.w_tid, ws) + ", " + name(c.w_kind) + " at " + describe(c.w_where) + ")";
    } else {
      return r + ": " + race + " (issued by " + thread_name(c.w_tid, ws) + " at " + describe(c.w_where) + ")";
    }
    const int other = x.war() ? (c.r_warp == kMany ? -1 : c.r_tid) : c.w_tid;
    const bool same_warp = other >= 0 && other != kMany && other / ws == a.tid / ws;
    return r + (same_warp ? ", with no collective of their warp between (lanes of a warp are ordered only by its "
                            "collectives: shuffles, ldmatrix, mma, wgmma, v_mfma)"
                          : ", with no __syncthreads between");
  }

  // ---- global memory --------------------------------------------------------------
  void global(BlockState& s, const Access& a) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(a.addr), hi = lo + a.bytes;
    const bool atomic = a.kind == Kind::atomic;
    if (!s.writes.empty()) {
      Span& last = s.writes.back();
      if (last.atomic == atomic && lo <= last.hi && hi >= last.lo) {
        last.lo = std::min(last.lo, lo);
        last.hi = std::max(last.hi, hi);
        return;
      }
    }
    s.writes.push_back(Span{lo, hi, a.where, a.tid, atomic, 0});
  }

  std::string global_report(const LaunchInfo& l, const Span& x, const Span& y) {
    auto block = [&](int64_t i) {
      const int64_t gx = l.grid.x, gy = l.grid.y;
      return block_name(Dim{unsigned(i % gx), unsigned(i / gx % gy), unsigned(i / (gx * gy))});
    };
    const uintptr_t lo = std::max(x.lo, y.lo), hi = std::min(x.hi, y.hi);
    return "global memory written by two blocks without atomics (" + std::to_string(hi - lo) + " bytes at 0x" +
           [&] {
             char b[32];
             std::snprintf(b, sizeof(b), "%zx", size_t(lo));
             return std::string(b);
           }() +
           "): " + block(x.block) + " " + thread_name(x.tid, l.warp_size) + " at " + describe(x.where) + (x.atomic ? " (atomic)" : "") +
           ", and " + block(y.block) + " " + thread_name(y.tid, l.warp_size) + " at " + describe(y.where) +
           (y.atomic ? " (atomic)" : "");
  }

  std::mutex mu_;
  std::vector<Span> spans_;
  std::vector<std::string> reports_;
  std::vector<SharedRace> shared_;
  std::set<Where> keys_;
  size_t races_ = 0;
};

}  // namespace

Consumer& checker() {
  static Checker* c = new Checker;
  return *c;
}

}  // namespace racecheck
}  // namespace emu
}  // namespace mixkit
