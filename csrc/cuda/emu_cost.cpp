// The cost counters of the emulated GPU (see emu_cost.h for what they count
// and the hardware models behind them): a consumer of emu_trace.h.
//
// Per block, accesses wait in warp-level requests keyed by (warp, where,
// occurrence) until every lane that will join has: a request is complete
// once its warp has passed a collective or the block a barrier (the lanes of
// one instruction reach it between the same two synchronisation points), and
// at the block's end. Complete requests are costed and summed into the
// block's counts, which are added to the launch's under a lock at the end of
// the block. Distinct global sectors are kept per launch in a paged bitmap.
#include "cuda/emu_cost.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "cuda/emu.cuh"
#include "cuda/emu_trace.h"

namespace mixkit {
namespace emu {
namespace cost {

using trace::Access;
using trace::Kind;
using trace::Space;

// ---- the models ------------------------------------------------------------

namespace {

int phase_of(int lane, uint32_t width, Phases phases) {
  // ds_read_b128's lane groups within each half wavefront, by lane / 4:
  // {0-3, 20-23}, {4-7, 16-19}, {8-11, 28-31}, {12-15, 24-27}.
  static constexpr int kCdnaRead128[8] = {0, 1, 2, 3, 1, 0, 3, 2};
  if (phases == Phases::by_8) return lane / 8;
  if (width <= 4) return lane / 32;
  if (width <= 8) return lane / 16;
  if (phases == Phases::cdna_load) return (lane / 32) * 4 + kCdnaRead128[(lane % 32) / 4];
  return lane / 8;
}

uint64_t distinct_bytes(std::vector<std::pair<uint64_t, uint32_t>>& ranges) {
  std::sort(ranges.begin(), ranges.end());
  uint64_t total = 0, end = 0;
  bool any = false;
  for (const auto& [a, n] : ranges) {
    const uint64_t b = a + n;
    if (!any || a >= end) {
      total += n;
      end = b;
      any = true;
    } else if (b > end) {
      total += b - end;
      end = b;
    }
  }
  return total;
}

}  // namespace

Wavefronts shared_wavefronts(const std::vector<LaneAccess>& lanes, Phases phases) {
  Wavefronts w;
  if (lanes.empty()) return w;
  uint32_t width = 0;
  for (const LaneAccess& l : lanes) width = std::max(width, l.bytes);
  std::map<int, std::vector<const LaneAccess*>> by_phase;
  for (const LaneAccess& l : lanes) by_phase[phase_of(l.lane, width, phases)].push_back(&l);
  for (const auto& [phase, members] : by_phase) {
    std::array<std::vector<uint32_t>, 32> words;  // distinct 4-byte words per bank
    uint32_t degree = 0;
    for (const LaneAccess* l : members) {
      for (uint32_t word = l->offset / 4; word <= (l->offset + std::max(l->bytes, 1u) - 1) / 4; ++word) {
        std::vector<uint32_t>& bank = words[word % 32];
        if (std::find(bank.begin(), bank.end(), word) == bank.end()) bank.push_back(word);
        degree = std::max(degree, uint32_t(bank.size()));
      }
    }
    w.wavefronts += degree;
    w.degrees.push_back(degree);
  }
  // The data path moves 128 bytes a wavefront to or from the lanes, so the
  // ideal counts what the lanes receive or send, broadcasts included; and
  // each phase with a lane in it takes a wavefront (a 64-lane 16-bit access
  // on CDNA is 2, not 1).
  uint64_t bytes = 0;
  for (const LaneAccess& l : lanes) bytes += l.bytes;
  w.ideal = std::max(uint32_t((bytes + 127) / 128), uint32_t(by_phase.size()));
  return w;
}

Sectors global_sectors(std::vector<std::pair<uint64_t, uint32_t>> ranges) {
  Sectors s;
  s.bytes = distinct_bytes(ranges);  // sorts
  uint64_t last = ~uint64_t(0);
  for (const auto& [a, n] : ranges) {
    for (uint64_t sec = a >> 5; sec <= (a + std::max(n, 1u) - 1) >> 5; ++sec)
      if (sec != last && (last == ~uint64_t(0) || sec > last)) {
        ++s.sectors;
        last = sec;
      }
  }
  s.ideal = uint32_t((s.bytes + 31) / 32);
  return s;
}

// ---- the consumer ------------------------------------------------------------

namespace {

// What a request is counted as.
enum Class : int {
  g_load, g_store, g_atomic, g_cp_async,                          // global
  s_load, s_store, s_atomic, s_ldmatrix, s_cp_async, s_wgmma,     // shared
  kClasses
};
constexpr const char* kClassNames[kClasses] = {"load", "store", "atomic", "cp.async", "load", "store",
                                               "atomic", "ldmatrix", "cp.async", "wgmma"};
bool is_global(int c) { return c < s_load; }

struct Counts {
  uint64_t requests = 0, bytes = 0, units = 0, ideal = 0;  // units: sectors (global) or wavefronts (shared)
  std::map<uint32_t, uint64_t> degrees;                    // shared: phases by conflict degree
  void add(const Counts& o) {
    requests += o.requests;
    bytes += o.bytes;
    units += o.units;
    ideal += o.ideal;
    for (const auto& [d, n] : o.degrees) degrees[d] += n;
  }
};

struct SiteKey {
  trace::Where where;
  int cls;
  bool operator<(const SiteKey& o) const { return where != o.where ? where < o.where : cls < o.cls; }
};

// Distinct 32-byte sectors: one bit each, in 2 MiB pages.
class SectorSet {
 public:
  void add_sorted(const std::vector<uint64_t>& sectors) {
    for (uint64_t s : sectors) {
      auto& page = pages_[s >> 16];
      if (page.empty()) page.assign(1024, 0);
      uint64_t& word = page[(s >> 6) & 1023];
      const uint64_t bit = uint64_t(1) << (s & 63);
      count_ += (word & bit) == 0;
      word |= bit;
    }
  }
  uint64_t count() const { return count_; }

 private:
  std::unordered_map<uint64_t, std::vector<uint64_t>> pages_;
  uint64_t count_ = 0;
};

struct Launch {
  std::string kernel;
  trace::Dim grid{}, block{};
  size_t dynamic_smem = 0;
  int warp = 0;
  int64_t blocks_run = 0;
  Counts cls[kClasses];
  std::map<SiteKey, Counts> sites;
  SectorSet loaded, stored;
  std::map<unsigned, SectorSet> by_y;  // sampled launches: distinct sectors by blockIdx.y,
  SectorSet any_y;                     // and of every row run
  std::map<std::string, uint64_t> instructions;  // per issuing warp or warpgroup
  uint64_t barriers = 0;
  uint32_t max_static_shared = 0;  // highest static __shared__ byte touched + 1
};

struct Request {
  uint64_t seq = 0;  // creation order: the block's requests are costed in program order
  int cls;
  trace::Where where;
  std::vector<LaneAccess> shared;
  std::vector<std::pair<uint64_t, uint32_t>> global;
  std::unordered_set<uint32_t> rows;  // wgmma: 16-byte rows already listed
};

struct RequestKey {
  int warp;
  uint64_t key;  // the instruction: its source line (plain accesses) or its where (models)
  uint32_t occurrence;
  int cls;
  bool operator==(const RequestKey& o) const {
    return warp == o.warp && key == o.key && occurrence == o.occurrence && cls == o.cls;
  }
};
struct RequestKeyHash {
  size_t operator()(const RequestKey& k) const {
    return std::hash<uint64_t>()(k.key * 0x9E3779B97F4A7C15ull ^ (uint64_t(k.occurrence) << 20) ^
                                 (uint64_t(k.warp) << 8) ^ uint64_t(k.cls));
  }
};

// A vector access being assembled from one thread's pieces (see access()).
struct Open {
  int cls;
  uint64_t key;       // the source line
  uint64_t chunk;     // address / 16
  uint32_t mask = 0;  // bytes of the chunk covered
  Access first;       // the first piece, for its where, offset and thread
};
struct ThreadState {
  std::vector<Open> open;
  std::unordered_map<uint64_t, uint32_t> occurrence;  // by request key
};

struct Block {
  std::vector<ThreadState> threads;
  std::unordered_map<trace::Where, uint64_t> lines;  // where -> source-line key, cached
  std::unordered_map<RequestKey, Request, RequestKeyHash> pending;
  Counts cls[kClasses];
  std::map<SiteKey, Counts> sites;
  std::vector<uint64_t> loaded, stored;  // sectors
  std::unordered_set<uint64_t> written;   // sectors this block stored: its later loads of them hit L2
  uint64_t next_seq = 0;
  std::map<std::string, uint64_t> instructions;
  uint64_t barriers = 0;
  uint32_t max_static_shared = 0;
  int warp_size = 32;
};

int classify(const Access& a) {
  const bool shared = a.space == Space::shared;
  switch (a.kind) {
    case Kind::load: return shared ? s_load : g_load;
    case Kind::store: return shared ? s_store : g_store;
    case Kind::atomic: return shared ? s_atomic : g_atomic;
    case Kind::ldmatrix: return s_ldmatrix;
    case Kind::cp_async_src: return g_cp_async;
    case Kind::cp_async_issue: return s_cp_async;
    case Kind::wgmma: return s_wgmma;
    default: return -1;  // cp.async's landing write: counted at its issue
  }
}

// Tensor-core FLOPs of one instruction (per warp or warpgroup), by the name
// the models give it.
uint64_t instruction_flops(const std::string& name) {
  if (name.rfind("mma.m16n8k16", 0) == 0) return 2ull * 16 * 8 * 16;
  if (name.rfind("v_mfma_f32_32x32x8", 0) == 0) return 2ull * 32 * 32 * 8;
  const size_t n = name.find("m64n");
  if (name.rfind("wgmma", 0) == 0 && n != std::string::npos) return 2ull * 64 * std::stoull(name.substr(n + 4)) * 16;
  return 0;
}

class Profiler final : public trace::Consumer {
 public:
  Profiler(int sample_y, int sample_z, int sample_x)
      : sample_y_(sample_y), sample_z_(sample_z), sample_x_(sample_x) {}

  bool skip_block(const trace::BlockInfo& b) override {
    if ((sample_y_ > 0 && int64_t(b.idx.y) >= sample_y_) || (sample_z_ > 0 && int64_t(b.idx.z) >= sample_z_))
      return true;
    // Only in the launches that sample_y cuts (heads, N tiles): the others
    // (routing, offsets) make what later launches index with.
    if (sample_x_ <= 0 || sample_y_ <= 0 || int64_t(b.launch->grid.y) <= sample_y_) return false;
    // The middle of the row: away from both ends of a long sequence, where a
    // sliding window's query blocks and key blocks all do the same work.
    const int64_t gx = b.launch->grid.x;
    const int64_t x0 = std::max<int64_t>(0, std::min<int64_t>(gx / 2, gx - sample_x_));
    return int64_t(b.idx.x) < x0 || int64_t(b.idx.x) >= x0 + sample_x_;
  }

  void launch_begin(const trace::LaunchInfo& info) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto l = std::make_unique<Launch>();
    l->kernel = info.kernel ? info.kernel : "";
    l->grid = info.grid;
    l->block = info.block;
    l->dynamic_smem = info.dynamic_smem;
    l->warp = info.warp_size;
    current_ = l.get();
    launches_.push_back(std::move(l));
  }

  void* block_begin(const trace::BlockInfo& info) override {
    auto* b = new Block;
    b->warp_size = info.launch->warp_size;
    b->threads.resize(size_t(info.threads));
    return b;
  }

  // Plain accesses narrower than 16 bytes are pieces of a vector access when
  // the host compiler split one: a thread's pieces from one source line that
  // fall in one aligned 16-byte chunk, before its next synchronisation, are
  // one access (what nvcc and hipcc emit for a Pack copy, or an unrolled
  // contiguous loop, with the alignment known). The instruction models report
  // whole accesses and pass straight through.
  void access(void* state, const Access& a) override {
    Block& b = *static_cast<Block*>(state);
    const int cls = classify(a);
    if (cls < 0 || a.bytes == 0) return;
    ThreadState& t = b.threads[size_t(a.tid)];
    const bool plain = a.kind == Kind::load || a.kind == Kind::store || a.kind == Kind::atomic;
    const uint64_t addr = reinterpret_cast<uint64_t>(a.addr);
    const uint64_t lo = addr & 15, hi = lo + a.bytes;
    if (!plain || hi > 16) {
      emit(b, t, cls, plain ? line_of(b, a.where) : a.where, a);
      return;
    }
    const uint64_t key = line_of(b, a.where), chunk = addr >> 4;
    const uint32_t bits = uint32_t(((1u << a.bytes) - 1) << lo);
    for (size_t i = 0; i < t.open.size(); ++i) {
      Open& v = t.open[i];
      if (v.cls != cls || v.key != key || v.chunk != chunk) continue;
      if (!(v.mask & bits)) {
        v.mask |= bits;
        return;
      }
      close(b, t, i);  // the same bytes again: a new instruction
      break;
    }
    if (t.open.size() >= 8) close(b, t, 0);
    t.open.push_back(Open{cls, key, chunk, bits, a});
  }

  void event(void* state, const trace::Event& e) override {
    Block& b = *static_cast<Block*>(state);
    switch (e.kind) {
      case trace::EventKind::barrier:
        ++b.barriers;
        close_all(b, 0, int(b.threads.size()));
        flush(b, -1);
        break;
      case trace::EventKind::collective:
        // Releases of warp collectives complete that warp's requests; a
        // warpgroup's, its four warps'.
        close_all(b, e.tid, e.tid + e.threads);
        for (int t = e.tid; t < e.tid + e.threads; t += b.warp_size) flush(b, t / b.warp_size);
        break;
      case trace::EventKind::instruction: {
        // One lane's issue; the instruction is its warp's (or warpgroup's)
        // once: counted at the group's first lane.
        const std::string name = e.name ? e.name : "";
        const int group = name.rfind("wgmma", 0) == 0 ? 128 : b.warp_size;
        if (e.tid % group == 0) ++b.instructions[name];
        break;
      }
      default:
        break;
    }
  }

  void block_end(void* state, const trace::BlockInfo& info) override {
    std::unique_ptr<Block> b(static_cast<Block*>(state));
    close_all(*b, 0, int(b->threads.size()));
    flush(*b, -1);
    for (auto* v : {&b->loaded, &b->stored}) {
      std::sort(v->begin(), v->end());
      v->erase(std::unique(v->begin(), v->end()), v->end());
    }
    std::lock_guard<std::mutex> lock(mu_);
    Launch& l = *current_;
    ++l.blocks_run;
    for (int c = 0; c < kClasses; ++c) l.cls[c].add(b->cls[c]);
    for (const auto& [k, v] : b->sites) l.sites[k].add(v);
    l.loaded.add_sorted(b->loaded);
    l.stored.add_sorted(b->stored);
    if (sample_y_ > 0) {  // a sampled launch: which sectors each row of the grid touched
      for (SectorSet* set : {&l.by_y[info.idx.y], &l.any_y}) {
        set->add_sorted(b->loaded);
        set->add_sorted(b->stored);
      }
    }
    for (const auto& [k, v] : b->instructions) l.instructions[k] += v;
    l.barriers += b->barriers;
    l.max_static_shared = std::max(l.max_static_shared, b->max_static_shared);
  }

  std::string json();

 private:
  // The source line of a plain access's instruction, as a key (its where
  // when the line is unknown).
  uint64_t line_of(Block& b, trace::Where w) {
    auto it = b.lines.find(w);
    if (it != b.lines.end()) return it->second;
    uint64_t key;
    {
      std::lock_guard<std::mutex> lock(lines_mu_);
      auto g = lines_.find(w);
      if (g == lines_.end()) {
        const std::string d = trace::describe(w);
        const std::string line = d.substr(0, d.find(' '));
        const bool known = line.find(':') != std::string::npos && line.find('?') == std::string::npos;
        g = lines_.emplace(w, known ? (std::hash<std::string>()(line) | 1) : w).first;
      }
      key = g->second;
    }
    b.lines.emplace(w, key);
    return key;
  }

  // One access (whole, or an assembled vector) joins its warp's request.
  void emit(Block& b, ThreadState& t, int cls, uint64_t key, const Access& a) {
    // wgmma operands: one request per warpgroup read (B, which every warp
    // reports, once), so the key is the warpgroup's and no occurrence.
    const int warp = cls == s_wgmma ? a.tid / 128 : a.warp;
    const uint32_t occ = cls == s_wgmma ? 0 : t.occurrence[key]++;
    Request& r = b.pending[RequestKey{warp, key, occ, cls}];
    if (r.seq == 0) r.seq = ++b.next_seq;
    r.cls = cls;
    r.where = a.where;
    if (is_global(cls)) {
      r.global.emplace_back(reinterpret_cast<uint64_t>(a.addr), a.bytes);
      return;
    }
    if (a.static_shared) b.max_static_shared = std::max(b.max_static_shared, a.offset + a.bytes);
    if (cls == s_wgmma) {
      for (uint32_t o = a.offset & ~15u; o < a.offset + a.bytes; o += 16)
        if (r.rows.insert(o).second) r.shared.push_back(LaneAccess{int(r.shared.size()), o, 16});
    } else {
      r.shared.push_back(LaneAccess{a.tid % b.warp_size, a.offset, a.bytes});
    }
  }

  // Ends open vector i of thread t: it becomes one access.
  void close(Block& b, ThreadState& t, size_t i) {
    const Open v = t.open[i];
    t.open.erase(t.open.begin() + long(i));
    const int first = __builtin_ctz(v.mask), last = 31 - __builtin_clz(v.mask);
    Access a = v.first;
    const uint64_t addr = v.chunk * 16 + uint64_t(first);
    a.offset = uint32_t(int64_t(a.offset) + int64_t(addr - reinterpret_cast<uint64_t>(a.addr)));
    a.addr = reinterpret_cast<const void*>(addr);
    a.bytes = uint32_t(last - first + 1);
    emit(b, t, v.cls, v.key, a);
  }
  void close_all(Block& b, int from, int to) {
    for (int i = from; i < to && i < int(b.threads.size()); ++i)
      while (!b.threads[size_t(i)].open.empty()) close(b, b.threads[size_t(i)], 0);
  }

  // Costs the pending requests of `warp` (-1: all) and drops them.
  void flush(Block& b, int warp) {
    std::vector<Request> done;
    for (auto it = b.pending.begin(); it != b.pending.end();) {
      if (warp >= 0 && it->first.warp != warp && !(it->second.cls == s_wgmma && it->first.warp == warp / 4)) {
        ++it;
        continue;
      }
      done.push_back(std::move(it->second));
      it = b.pending.erase(it);
    }
    std::sort(done.begin(), done.end(), [](const Request& x, const Request& y) { return x.seq < y.seq; });
    for (Request& r : done) cost(b, r);
  }

  void cost(Block& b, Request& r) {
    Counts c;
    c.requests = 1;
    if (is_global(r.cls)) {
      // DRAM with a perfect L2 within the launch: a sector is read once unless
      // this block wrote it first, written once; an atomic reads and writes.
      for (const auto& [a, n] : r.global)
        for (uint64_t s = a >> 5; s <= (a + std::max(n, 1u) - 1) >> 5; ++s) {
          if (r.cls != g_store && !b.written.count(s)) b.loaded.push_back(s);
          if (r.cls == g_store || r.cls == g_atomic) {
            b.stored.push_back(s);
            b.written.insert(s);
          }
        }
      const Sectors s = global_sectors(std::move(r.global));
      c.bytes = s.bytes;
      c.units = s.sectors;
      c.ideal = s.ideal;
    } else {
      const Phases phases = r.cls == s_ldmatrix || r.cls == s_wgmma ? Phases::by_8
                            : b.warp_size == 64 ? (r.cls == s_load ? Phases::cdna_load : Phases::cdna_store)
                                                : Phases::nvidia;
      const Wavefronts w = shared_wavefronts(r.shared, phases);
      // A wgmma's request is the warpgroup's operand read: one per core
      // matrix, so that wavefronts per request reads as for the other kinds.
      if (r.cls == s_wgmma) c.requests = w.degrees.size();
      for (const LaneAccess& l : r.shared) c.bytes += l.bytes;
      c.units = w.wavefronts;
      c.ideal = w.ideal;
      for (uint32_t d : w.degrees) ++c.degrees[d];
    }
    b.cls[r.cls].add(c);
    b.sites[SiteKey{r.where, r.cls}].add(c);
  }

  int sample_y_, sample_z_, sample_x_;
  std::mutex mu_;
  std::mutex lines_mu_;
  std::unordered_map<trace::Where, uint64_t> lines_;
  std::vector<std::unique_ptr<Launch>> launches_;
  Launch* current_ = nullptr;
};

std::string quoted(const std::string& s) {
  std::string o = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      o += buf;
    } else {
      o += ch;
    }
  }
  return o + "\"";
}

void counts_json(std::ostringstream& o, const Counts& c, bool shared) {
  o << "{\"requests\": " << c.requests << ", \"bytes\": " << c.bytes << ", \"" << (shared ? "wavefronts" : "sectors")
    << "\": " << c.units << ", \"ideal\": " << c.ideal;
  if (shared) {
    o << ", \"degrees\": {";
    bool first = true;
    for (const auto& [d, n] : c.degrees) {
      o << (first ? "" : ", ") << "\"" << d << "\": " << n;
      first = false;
    }
    o << "}";
  }
  o << "}";
}

std::string Profiler::json() {
  std::lock_guard<std::mutex> lock(mu_);
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < launches_.size(); ++i) {
    const Launch& l = *launches_[i];
    o << (i ? ",\n" : "") << "{\"kernel\": " << quoted(l.kernel) << ", \"grid\": [" << l.grid.x << ", " << l.grid.y
      << ", " << l.grid.z << "], \"block\": [" << l.block.x << ", " << l.block.y << ", " << l.block.z
      << "], \"dynamic_smem\": " << l.dynamic_smem << ", \"warp\": " << l.warp << ", \"blocks_run\": " << l.blocks_run
      << ", \"static_smem_touched\": " << l.max_static_shared << ", \"barriers\": " << l.barriers
      << ", \"unique_load_sectors\": " << l.loaded.count() << ", \"unique_store_sectors\": " << l.stored.count()
      << ", \"unique_sectors_by_y\": [";
    for (auto it = l.by_y.begin(); it != l.by_y.end(); ++it)
      o << (it == l.by_y.begin() ? "" : ", ") << it->second.count();
    o << "], \"unique_sectors_any_y\": " << l.any_y.count();
    for (const char* space : {"global", "shared"}) {
      const bool shared = space[0] == 's';
      o << ", \"" << space << "\": {";
      bool first = true;
      for (int c = 0; c < kClasses; ++c) {
        if (is_global(c) == shared) continue;
        o << (first ? "" : ", ") << "\"" << kClassNames[c] << "\": ";
        counts_json(o, l.cls[c], shared);
        first = false;
      }
      o << "}";
    }
    o << ", \"instructions\": {";
    bool first = true;
    for (const auto& [name, n] : l.instructions) {
      o << (first ? "" : ", ") << quoted(name) << ": {\"count\": " << n << ", \"flops\": " << n * instruction_flops(name)
        << "}";
      first = false;
    }
    o << "}, \"sites\": [";
    first = true;
    for (const auto& [k, c] : l.sites) {
      o << (first ? "" : ", ") << "{\"where\": " << quoted(trace::describe(k.where)) << ", \"space\": \""
        << (is_global(k.cls) ? "global" : "shared") << "\", \"class\": \"" << kClassNames[k.cls] << "\", \"counts\": ";
      counts_json(o, c, !is_global(k.cls));
      o << "}";
      first = false;
    }
    o << "]}";
  }
  o << "]";
  return o.str();
}

std::unique_ptr<Profiler> g_profiler;

}  // namespace

void start(int sample_y, int sample_z, int sample_x) {
  if (g_profiler) trace::detach(g_profiler.get());
  g_profiler = std::make_unique<Profiler>(sample_y, sample_z, sample_x);
  trace::attach(g_profiler.get());
}

std::string stop() {
  if (!g_profiler) return "[]";
  trace::detach(g_profiler.get());
  std::string out = g_profiler->json();
  g_profiler.reset();
  return out;
}

bool running() { return g_profiler != nullptr; }

bool unswizzled() { return mutation() == 30; }

}  // namespace cost
}  // namespace emu
}  // namespace mixkit
