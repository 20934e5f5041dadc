// The memory-access hook's dispatcher (see emu_trace.h): SanitizerCoverage's
// load/store callbacks and the models' reports become trace::Access events
// for the attached consumers. Not instrumented itself (CMakeLists.txt).
#include "cuda/emu_trace.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cuda/emu_trace_runtime.h"

// AddressSanitizer's symbolizer, present when the build runs under ASan.
extern "C" __attribute__((weak)) void __sanitizer_symbolize_pc(void* pc, const char* fmt, char* out, size_t size);

namespace mixkit {
namespace emu {
namespace trace {

namespace detail {
thread_local Running* t_running = nullptr;
}  // namespace detail

namespace {

using detail::Running;

std::vector<Consumer*> g_consumers;
bool g_occurrence = false;
bool g_global_reads = false;

void update_wants() {
  g_occurrence = g_global_reads = false;
  for (Consumer* c : g_consumers) {
    g_occurrence = g_occurrence || c->wants_occurrence;
    g_global_reads = g_global_reads || c->wants_global_reads;
  }
}

constexpr Where kSiteTag = Where(1) << 63;

// Model sites, interned so that a Where names one (file, line) for the run.
struct SiteTable {
  std::mutex mu;
  std::unordered_map<std::string, std::unique_ptr<Site>> by_key;
};
SiteTable& sites() {
  static SiteTable* t = new SiteTable;  // never destroyed: reports may run at exit
  return *t;
}
struct PairHash {
  size_t operator()(const std::pair<const char*, int>& p) const {
    return std::hash<const void*>()(p.first) * 31u + size_t(p.second);
  }
};

Where intern(const Site& s) {
  thread_local std::unordered_map<std::pair<const char*, int>, Where, PairHash> cache;
  const auto key = std::make_pair(s.file, s.line);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  SiteTable& t = sites();
  std::lock_guard<std::mutex> lock(t.mu);
  std::unique_ptr<Site>& slot = t.by_key[std::string(s.file ? s.file : "?") + ":" + std::to_string(s.line)];
  if (!slot) slot = std::make_unique<Site>(s.file, s.line);
  const Where w = Where(reinterpret_cast<uintptr_t>(slot.get())) | kSiteTag;
  cache.emplace(key, w);
  return w;
}

const char* basename_of(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

std::string demangle(const char* name) {
  if (!name) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string r = status == 0 && d ? d : name;
  std::free(d);
  return r;
}

// Symbolizes a code address with `fmt` (%f function, %s file, %l line):
// AddressSanitizer's symbolizer when present, else addr2line on the module
// (the emulated build keeps its symbols and line tables).
std::string symbolize(uintptr_t pc, bool function_only) {
  char buf[2048] = {};
  if (__sanitizer_symbolize_pc) {
    __sanitizer_symbolize_pc(reinterpret_cast<void*>(pc), function_only ? "%f" : "%s:%l (%f)", buf, sizeof(buf));
    if (buf[0] && std::strncmp(buf, "<null>", 6) != 0 && buf[0] != '?') {
      std::string s = buf;
      if (function_only) return s;
      const size_t slash = s.rfind('/', s.find(':'));
      return slash == std::string::npos ? s : s.substr(slash + 1);
    }
  }
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(pc), &info) || !info.dli_fname) return "?";
  const uintptr_t rel = pc - reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::snprintf(buf, sizeof(buf), "addr2line -f -C -e '%s' 0x%zx 2>/dev/null", info.dli_fname, size_t(rel));
  std::string fn, where;
  if (FILE* p = popen(buf, "r")) {
    char line[2048] = {};
    if (std::fgets(line, sizeof(line), p)) fn = line;
    if (std::fgets(line, sizeof(line), p)) where = line;
    pclose(p);
  }
  for (std::string* s : {&fn, &where})
    while (!s->empty() && (s->back() == '\n' || s->back() == ' ')) s->pop_back();
  if (fn.empty() || fn == "??") fn = info.dli_sname ? demangle(info.dli_sname) : "?";
  if (function_only) return fn;
  const size_t slash = where.rfind('/', where.find(':'));
  if (slash != std::string::npos) where = where.substr(slash + 1);
  if (where.empty() || where.rfind("??", 0) == 0) return fn;
  return where + " (" + fn + ")";
}

// The calling OS thread's static TLS block of this module: where the
// kernels' static __shared__ arrays (static thread_local) live.
thread_local char t_probe;
struct TlsBlock {
  uintptr_t lo = 0, bytes = 0;
};
int find_tls(struct dl_phdr_info* info, size_t, void* data) {
  auto* out = static_cast<TlsBlock*>(data);
  if (!info->dlpi_tls_data) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_TLS) continue;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
    const uintptr_t probe = reinterpret_cast<uintptr_t>(&t_probe);
    if (probe - lo < ph.p_memsz) {
      out->lo = lo;
      out->bytes = ph.p_memsz;
      return 1;
    }
  }
  return 0;
}

// Per OS thread: the block it runs and the consumers' states for it.
struct Worker {
  Running running;
  bool tls_found = false;
  std::vector<void*> states;
  std::vector<std::unordered_map<Where, uint32_t>> occurrences;  // per thread
  const BlockInfo* block = nullptr;
};
thread_local Worker t_worker;

void deliver(Worker& w, Access& a) {
  if (g_occurrence) a.occurrence = w.occurrences[size_t(a.tid)][a.where]++;
  w.running.busy = true;  // a consumer built with the instrumentation must not see itself
  for (size_t i = 0; i < g_consumers.size(); ++i) g_consumers[i]->access(w.states[i], a);
  w.running.busy = false;
}

}  // namespace

void detail::on_access(Running& r, uintptr_t addr, uint32_t bytes, Kind kind, Where where) {
  Access a;
  a.addr = reinterpret_cast<const void*>(addr);
  a.bytes = bytes;
  a.kind = kind;
  a.static_shared = false;
  a.offset = 0;
  if (addr - r.dyn_lo < r.dyn_bytes) {
    a.space = Space::shared;
    a.offset = uint32_t(addr - r.dyn_lo);
  } else if (addr - r.tls_lo < r.tls_bytes) {
    a.space = Space::shared;
    a.static_shared = true;
    a.offset = uint32_t(addr - r.tls_lo);
  } else {
    if (!g_global_reads && !is_write(kind) && kind != Kind::cp_async_issue) return;
    a.space = Space::global;
  }
  a.tid = r.tid;
  a.warp = r.warp;
  a.epoch = *r.epoch;
  a.interval = *r.interval;
  a.where = where;
  a.occurrence = 0;
  deliver(t_worker, a);
}

const char* name(Kind k) {
  switch (k) {
    case Kind::load: return "load";
    case Kind::store: return "store";
    case Kind::atomic: return "atomic";
    case Kind::ldmatrix: return "ldmatrix";
    case Kind::cp_async_src: return "cp.async source read";
    case Kind::cp_async_issue: return "cp.async";
    case Kind::cp_async_land: return "cp.async landing";
    case Kind::wgmma: return "wgmma operand read";
  }
  return "?";
}

std::string describe(Where w) {
  if (w & kSiteTag) {
    const Site* s = reinterpret_cast<const Site*>(uintptr_t(w & ~kSiteTag));
    return std::string(basename_of(s->file)) + ":" + std::to_string(s->line);
  }
  if (!w) return "?";
  // A return address: the access is the call just before it.
  static std::mutex mu;
  static auto* known = new std::unordered_map<Where, std::string>;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known->find(w);
  if (it == known->end()) it = known->emplace(w, symbolize(uintptr_t(w) - 1, false)).first;
  return it->second;
}

void attach(Consumer* c) {
  g_consumers.push_back(c);
  update_wants();
}

void detach(Consumer* c) {
  for (size_t i = 0; i < g_consumers.size(); ++i)
    if (g_consumers[i] == c) g_consumers.erase(g_consumers.begin() + long(i));
  update_wants();
}

bool active() { return detail::t_running != nullptr; }

Quiet::Quiet() {
  Running* r = detail::t_running;
  was_ = r && r->quiet;
  if (r) r->quiet = true;
}
Quiet::~Quiet() {
  // The model may have yielded: the running thread is this one again.
  if (Running* r = detail::t_running) r->quiet = was_;
}

void model_access(Kind k, const void* addr, uint32_t bytes, const Site& site) {
  Running* r = detail::t_running;
  if (!r || r->busy || !bytes) return;
  detail::on_access(*r, reinterpret_cast<uintptr_t>(addr), bytes, k, intern(site));
}

namespace {
void model_event(EventKind kind, const char* what, const Site& site) {
  Running* r = detail::t_running;
  if (!r || r->busy) return;
  Event e{kind, what, r->tid, 1, *r->epoch, intern(site)};
  Worker& w = t_worker;
  r->busy = true;
  for (size_t i = 0; i < g_consumers.size(); ++i) g_consumers[i]->event(w.states[i], e);
  r->busy = false;
}
}  // namespace

void instruction(const char* what, const Site& site) { model_event(EventKind::instruction, what, site); }
void proxy_fence(const Site& site) { model_event(EventKind::proxy_fence, "fence.proxy.async", site); }

// ---- the scheduler's side ----------------------------------------------------------
namespace detail {

bool launch_begin(const LaunchInfo& l) {
  for (Consumer* c : g_consumers) c->launch_begin(l);
  return !g_consumers.empty();
}

bool skip_block(const BlockInfo& b) {
  for (Consumer* c : g_consumers)
    if (c->skip_block(b)) return true;
  return false;
}

void block_begin(BlockInfo& b, const unsigned char* dyn, size_t dyn_bytes) {
  Worker& w = t_worker;
  if (!w.tls_found) {
    TlsBlock tls;
    t_probe = 0;  // allocates this thread's TLS block if the module's is dynamic
    dl_iterate_phdr(find_tls, &tls);
    w.running.tls_lo = tls.lo;
    w.running.tls_bytes = tls.bytes;
    w.tls_found = true;
  }
  b.static_shared_bytes = w.running.tls_bytes;
  w.running.dyn_lo = reinterpret_cast<uintptr_t>(dyn);
  w.running.dyn_bytes = dyn ? dyn_bytes : 0;
  w.block = &b;
  w.states.resize(g_consumers.size());
  for (size_t i = 0; i < g_consumers.size(); ++i) w.states[i] = g_consumers[i]->block_begin(b);
  if (g_occurrence) {
    if (w.occurrences.size() < size_t(b.threads)) w.occurrences.resize(size_t(b.threads));
    for (int t = 0; t < b.threads; ++t) w.occurrences[size_t(t)].clear();
  }
}

Running* thread_enter(int tid, int warp, const void* stack, size_t stack_bytes, const uint32_t* epoch,
                      const uint32_t* interval) {
  Running& r = t_worker.running;
  r.tid = tid;
  r.warp = warp;
  r.stack_lo = reinterpret_cast<uintptr_t>(stack);
  r.stack_bytes = stack_bytes;
  r.epoch = epoch;
  r.interval = interval;
  r.busy = r.quiet = false;
  t_running = &r;
  return &r;
}

void thread_leave() { t_running = nullptr; }

void release(EventKind kind, const char* what, int first, int threads, uint32_t epoch, Where where) {
  Worker& w = t_worker;
  Event e{kind, what, first, threads, epoch, where};
  for (size_t i = 0; i < g_consumers.size(); ++i) g_consumers[i]->event(w.states[i], e);
}

Where site_where(const char* file, int line) { return intern(Site(file, line)); }

void block_end(const BlockInfo& b) {
  Worker& w = t_worker;
  t_running = nullptr;
  for (size_t i = 0; i < g_consumers.size(); ++i) g_consumers[i]->block_end(w.states[i], b);
  w.block = nullptr;
}

std::string launch_end(const LaunchInfo& l) {
  std::string error;
  for (Consumer* c : g_consumers) {
    std::string e = c->launch_end(l);
    if (error.empty()) error = std::move(e);
  }
  return error;
}

std::string kernel_name(const void* kernel) {
  if (!kernel) return "";
  static std::mutex mu;
  static auto* names = new std::unordered_map<const void*, std::string>;
  std::lock_guard<std::mutex> lock(mu);
  auto it = names->find(kernel);
  if (it == names->end()) it = names->emplace(kernel, symbolize(reinterpret_cast<uintptr_t>(kernel), true)).first;
  return it->second;
}

}  // namespace detail

bool plain_accesses_traced() {
#if defined(MIXKIT_EMU_TRACE)
  return true;
#else
  return false;
#endif
}

}  // namespace trace
}  // namespace emu
}  // namespace mixkit

// ---- SanitizerCoverage's callbacks ------------------------------------------------------
// Called before every load and store of instrumented code (the kernels): the
// fast path drops everything outside a kernel and the thread's own stack.
namespace {
using mixkit::emu::trace::Kind;
using mixkit::emu::trace::Where;
using mixkit::emu::trace::detail::Running;
using mixkit::emu::trace::detail::t_running;

// Most of a kernel's loads and stores are its own stack (local arrays, spills):
// the fiber's stack is aligned to its size (kFiberStackBytes), so those go
// without a look at the thread-local state.
[[gnu::always_inline]] inline void traced(const void* p, uint32_t bytes, Kind kind, void* ret) {
  using mixkit::emu::trace::detail::kFiberStackBytes;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t frame = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  if (a >= frame && a < (frame | (kFiberStackBytes - 1)) + 1) return;
  Running* r = t_running;
  if (__builtin_expect(r == nullptr, 1) || r->busy || r->quiet) return;
  if (a - r->stack_lo < r->stack_bytes) return;
  mixkit::emu::trace::detail::on_access(*r, a, bytes, kind, Where(reinterpret_cast<uintptr_t>(ret)));
}
}  // namespace

#define MIXKIT_COV(fn, T, n, kind)                                        \
  extern "C" __attribute__((visibility("hidden"), noinline)) void fn(T* p) { \
    traced(p, n, kind, __builtin_return_address(0));                         \
  }
MIXKIT_COV(__sanitizer_cov_load1, uint8_t, 1, Kind::load)
MIXKIT_COV(__sanitizer_cov_load2, uint16_t, 2, Kind::load)
MIXKIT_COV(__sanitizer_cov_load4, uint32_t, 4, Kind::load)
MIXKIT_COV(__sanitizer_cov_load8, uint64_t, 8, Kind::load)
MIXKIT_COV(__sanitizer_cov_load16, __int128, 16, Kind::load)
MIXKIT_COV(__sanitizer_cov_store1, uint8_t, 1, Kind::store)
MIXKIT_COV(__sanitizer_cov_store2, uint16_t, 2, Kind::store)
MIXKIT_COV(__sanitizer_cov_store4, uint32_t, 4, Kind::store)
MIXKIT_COV(__sanitizer_cov_store8, uint64_t, 8, Kind::store)
MIXKIT_COV(__sanitizer_cov_store16, __int128, 16, Kind::store)
#undef MIXKIT_COV

// ---- AddressSanitizer's memory-intrinsic callbacks ----------------------------------------
// SanitizerCoverage sees loads and stores, not memcpy / memmove / memset (a
// struct or array copied whole, which the compiler keeps as one call), nor
// accesses of unusual sizes. In the ASan build the kernels' AddressSanitizer
// calls these instead of __asan_* (-mllvm -asan-memory-access-callback-prefix,
// CMakeLists.txt): they report the bytes, then do what ASan's own would.
#if defined(__SANITIZE_ADDRESS__) || (defined(__has_feature) && __has_feature(address_sanitizer))
extern "C" {
void* __asan_memcpy(void* dst, const void* src, size_t n);
void* __asan_memmove(void* dst, const void* src, size_t n);
void* __asan_memset(void* dst, int c, size_t n);
void __asan_loadN(uintptr_t p, size_t n);
void __asan_storeN(uintptr_t p, size_t n);
#define MIXKIT_ASAN_FORWARD(n)                                                                   \
  void __asan_load##n(uintptr_t p);                                                              \
  void __asan_store##n(uintptr_t p);                                                             \
  __attribute__((visibility("hidden"))) void __mixkit_asan_load##n(uintptr_t p) { __asan_load##n(p); } \
  __attribute__((visibility("hidden"))) void __mixkit_asan_store##n(uintptr_t p) { __asan_store##n(p); }
// Loads and stores of 1-16 bytes: SanitizerCoverage reported them already (ASan
// calls these only in its call mode, for very large functions).
MIXKIT_ASAN_FORWARD(1)
MIXKIT_ASAN_FORWARD(2)
MIXKIT_ASAN_FORWARD(4)
MIXKIT_ASAN_FORWARD(8)
MIXKIT_ASAN_FORWARD(16)
#undef MIXKIT_ASAN_FORWARD

__attribute__((visibility("hidden"), noinline)) void __mixkit_asan_loadN(uintptr_t p, size_t n) {
  traced(reinterpret_cast<const void*>(p), uint32_t(n), Kind::load, __builtin_return_address(0));
  __asan_loadN(p, n);
}
__attribute__((visibility("hidden"), noinline)) void __mixkit_asan_storeN(uintptr_t p, size_t n) {
  traced(reinterpret_cast<const void*>(p), uint32_t(n), Kind::store, __builtin_return_address(0));
  __asan_storeN(p, n);
}
__attribute__((visibility("hidden"), noinline)) void* __mixkit_asan_memcpy(void* dst, const void* src, size_t n) {
  traced(src, uint32_t(n), Kind::load, __builtin_return_address(0));
  traced(dst, uint32_t(n), Kind::store, __builtin_return_address(0));
  return __asan_memcpy(dst, src, n);
}
__attribute__((visibility("hidden"), noinline)) void* __mixkit_asan_memmove(void* dst, const void* src, size_t n) {
  traced(src, uint32_t(n), Kind::load, __builtin_return_address(0));
  traced(dst, uint32_t(n), Kind::store, __builtin_return_address(0));
  return __asan_memmove(dst, src, n);
}
__attribute__((visibility("hidden"), noinline)) void* __mixkit_asan_memset(void* dst, int c, size_t n) {
  traced(dst, uint32_t(n), Kind::store, __builtin_return_address(0));
  return __asan_memset(dst, c, n);
}
}  // extern "C"
#endif

