"""Host programs for the emulated GPU's tests.

`build_runtime_programs` compiles a program against the emulator itself (the HIP CPU
runtime from shared/third_party, used in place, and csrc/cuda/emu_*.cpp: the scheduler,
the memory-access hook and the race checker), with the program's own code instrumented
as the emulated build instruments the kernels (clang's SanitizerCoverage), at warp
widths 32 and 64: test_emu_runtime.py and test_emu_race*.py.

The rest of this file runs the instruction models (csrc/cuda/emu_sm80.cuh,
emu_sm90.cuh) on a tiny test-only runtime, for test_emu_sm80.py and test_emu_wgmma.py.

The runtime below is not the emulator's scheduler (emu_runtime.cpp, which needs the HIP
CPU runtime) but works the same way in small: a block's threads are ucontext fibers on
one OS thread, each runs until a collective (group_sync, __syncthreads) or its end, a
group is released when all its running threads wait at the same collective, and
emu::fail ends the launch with the message on stderr and exit status 3. It needs only
a C++17 compiler and POSIX ucontext, so these tests run wherever g++ does;
`hip/hip_runtime.h` is a stub giving dim3.

One executable holds both programs: `host sm80|sm90 IN OUT MUTATION forward|reverse`
reads its input file, sets emu::mutation() and the thread order, and writes its output
file (exit status 3 with emu::fail's message on stderr when the launch failed).
"""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_mfma_layout import _compiler  # the host C++ compiler, not hipcc/nvcc

SRC = Path(os.environ.get("MIXKIT_SOURCE_DIR", Path(__file__).resolve().parents[1])) / "csrc"
HIP_CPU = Path(os.environ.get("MIXKIT_HIP_CPU_DIR", SRC.parents[1] / "shared" / "third_party" / "HIP-CPU"))

# As CMakeLists.txt builds the emulated GPU: -O1, AddressSanitizer, line tables for the
# reports, and the program's code (the kernels) instrumented for the memory-access hook.
_FLAGS = ["-std=c++17", "-O1", "-fopenmp", "-w", "-gline-tables-only", "-DMIXKIT_EMULATE", "-DMIXKIT_EMU_TRACE",
          "-fsanitize=address", "-fno-omit-frame-pointer", "-fsanitize-address-use-after-return=never"]
_TRACE = ["-fsanitize-coverage=edge,trace-loads,trace-stores",
          f"-fsanitize-coverage-ignorelist={SRC / 'cuda' / 'emu_trace_ignore.txt'}",
          "-mllvm", "-asan-memory-access-callback-prefix=__mixkit_asan_"]
_RUNTIME_OBJECTS = {}


def _clang():
    """clang++ 15 or newer (SanitizerCoverage's trace-loads/stores; _Float16 on x86), as the
    emulated build uses: MIXKIT_EMU_CXX, clang++-15, or clang++ if new enough."""
    for name in (os.environ.get("MIXKIT_EMU_CXX"), "clang++-15", "clang++"):
        path = name and shutil.which(name)
        if not path:
            continue
        version = subprocess.run([path, "-dumpversion"], capture_output=True, text=True).stdout.strip()
        if version and int(version.split(".")[0]) >= 15:
            return path
    return None


def _runtime_objects(tmp_path_factory, cxx, warp):
    """The emulator's own sources compiled once per session and warp width."""
    if warp not in _RUNTIME_OBJECTS:
        d = tmp_path_factory.mktemp(f"emu_runtime{warp}")
        objs = []
        for src in sorted((SRC / "cuda").glob("emu_*.cpp")):
            obj = d / (src.stem + ".o")
            r = subprocess.run([cxx, *_FLAGS, f"-DMIXKIT_WARP_SIZE={warp}", f"-I{SRC}", f"-I{HIP_CPU / 'include'}",
                                f"-I{HIP_CPU}", "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-4000:]
            objs.append(obj)
        _RUNTIME_OBJECTS[warp] = objs
    return _RUNTIME_OBJECTS[warp]


def build_runtime_programs(tmp_path_factory, name: str, source: str, warps=(32, 64)) -> dict:
    """`source` compiled against the emulator at each warp width in `warps` (the program
    instrumented, the emulator not); returns {warp: executable}. Skips cleanly without
    clang++ or the HIP CPU runtime."""
    cxx = _clang()
    if not cxx:
        pytest.skip("the emulator's instrumented programs need clang++ 15 or newer (MIXKIT_EMU_CXX)")
    if not (HIP_CPU / "include" / "hip" / "hip_runtime.h").exists():
        pytest.skip(f"the HIP CPU runtime is not at {HIP_CPU}")
    d = tmp_path_factory.mktemp(name)
    (d / "program.cpp").write_text(source)
    exes = {}
    for warp in warps:
        obj, exe = d / f"program{warp}.o", d / f"program{warp}"
        r = subprocess.run([cxx, *_FLAGS, *_TRACE, f"-DMIXKIT_WARP_SIZE={warp}", f"-I{SRC}", f"-I{HIP_CPU / 'include'}",
                            f"-I{HIP_CPU}", "-c", str(d / "program.cpp"), "-o", str(obj)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        r = subprocess.run([cxx, "-fopenmp", "-fsanitize=address", str(obj),
                            *map(str, _runtime_objects(tmp_path_factory, cxx, warp)),
                            "-o", str(exe)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        exes[warp] = exe
    return exes


def run_json(exe: Path, *args) -> dict:
    """Runs a runtime program (two OpenMP threads) and parses the JSON it prints."""
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "2", "ASAN_OPTIONS": "detect_leaks=0"})
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def source_line(source: str, marker: str) -> int:
    """The 1-based line of `source` that holds `marker` (a comment such as // @store)."""
    lines = [i + 1 for i, line in enumerate(source.splitlines()) if marker in line]
    assert len(lines) == 1, (marker, lines)
    return lines[0]

STUB_HIP = r"""
#pragma once
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// One OS thread runs every emulated thread here: a plain add is atomic.
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
"""

RUNTIME = r"""
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>
#include "cuda/emu.cuh"

// Every block's dynamic shared memory starts as a copy of this image (the rest 0xcd).
std::vector<unsigned char> g_image;

namespace mixkit {
namespace emu {
namespace {
enum class St { ready, waiting, done };
struct TestThread {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  St st = St::ready;
  int group = 0;  // waiting: the collective's group size (the block's size for __syncthreads)
  const char* tag = "";
  Index3 tid{};
  AsyncQueue async;
};
struct TestBlock {
  Index3 bid{}, bdim{}, gdim{};
  int threads = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<unsigned char> scratch;
  std::vector<TestThread> fibers;
  const std::function<void()>* body = nullptr;
  ucontext_t sched;
  std::string error;
};
TestBlock* g_block = nullptr;
bool g_reverse = false;
int g_current = -1;

TestThread& self() { return g_block->fibers[size_t(g_current)]; }
void to_scheduler() { swapcontext(&self().ctx, &g_block->sched); }
void fiber_entry() {
  (*g_block->body)();
  self().st = St::done;
  to_scheduler();
}
void arrive(int group, const char* tag) {
  TestThread& f = self();
  f.st = St::waiting;
  f.group = group;
  f.tag = tag;
  to_scheduler();
}
// Releases every group whose running members all wait at the same collective.
bool release(TestBlock& b) {
  bool any = false;
  for (int i = 0; i < b.threads; ++i) {
    TestThread& f = b.fibers[size_t(i)];
    if (f.st != St::waiting) continue;
    const int first = i / f.group * f.group, last = std::min(b.threads, first + f.group);
    bool complete = true;
    for (int j = first; j < last; ++j) {
      const TestThread& o = b.fibers[size_t(j)];
      if (o.st == St::done) continue;
      if (o.st != St::waiting) complete = false;
      else if (o.group != f.group || std::string(o.tag) != f.tag)
        b.error = std::string("lanes of one group wait at different collectives: ") + f.tag + " and " + o.tag;
    }
    if (!complete || !b.error.empty()) continue;
    for (int j = first; j < last; ++j)
      if (b.fibers[size_t(j)].st == St::waiting) b.fibers[size_t(j)].st = St::ready;
    any = true;
  }
  return any;
}
}  // namespace

Index3 thread_idx() { return self().tid; }
Index3 block_idx() { return g_block->bid; }
Index3 block_dim() { return g_block->bdim; }
Index3 grid_dim() { return g_block->gdim; }
int linear_tid() { return g_current; }
void syncthreads(const char*, int) { arrive(g_block->threads, "__syncthreads"); }
void group_sync(int group, const char* tag, int) {
  if (group > 1) arrive(group, tag);
}
unsigned char* group_scratch(int group) {
  return g_block->scratch.data() + size_t(g_current / group * group) * kScratchBytes;
}
AsyncQueue& async_queue() { return self().async; }
unsigned char* dynamic_smem() { return g_block->smem; }
uint32_t shared_offset(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (!g_block->smem || c < g_block->smem || c > g_block->smem + g_block->smem_bytes)
    fail("a shared-memory address outside the block");
  return uint32_t(c - g_block->smem);
}
void* shared_ptr(uint32_t offset, size_t bytes) {
  if (!g_block->smem || size_t(offset) + bytes > g_block->smem_bytes)
    fail("a shared-memory access past the block's dynamic shared memory");
  return g_block->smem + offset;
}
void fail(const char* what) {
  if (g_block->error.empty()) g_block->error = what;
  self().st = St::done;
  to_scheduler();
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
void set_schedule(Schedule, uint64_t) {}
void set_racecheck(bool) {}
bool racecheck_on() { return false; }
// No memory-access hook here: the models' reports go nowhere.
namespace trace {
void model_access(Kind, const void*, uint32_t, const Site&) {}
void instruction(const char*, const Site&) {}
void proxy_fence(const Site&) {}
bool active() { return false; }
Quiet::Quiet() : was_(false) {}
Quiet::~Quiet() {}
}  // namespace trace
// The blocks one after the other; a block's threads are fibers on this OS thread, run
// in forward (or reverse) order between synchronisation points.
void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body, const void*) {
  constexpr size_t kStack = 256 * 1024;
  const int threads = int(block.x * block.y * block.z);
  std::vector<unsigned char> smem_buf(smem);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        TestBlock b;
        b.bid = Index3{x, y, z};
        b.bdim = Index3{block.x, block.y, block.z};
        b.gdim = Index3{grid.x, grid.y, grid.z};
        b.threads = threads;
        std::fill(smem_buf.begin(), smem_buf.end(), 0xcd);
        std::copy_n(g_image.begin(), std::min(g_image.size(), smem_buf.size()), smem_buf.begin());
        b.smem = smem ? smem_buf.data() : nullptr;
        b.smem_bytes = smem;
        b.scratch.assign(size_t(threads) * kScratchBytes, 0);
        b.body = &body;
        b.fibers.resize(size_t(threads));
        for (int i = 0; i < threads; ++i) {
          TestThread& f = b.fibers[size_t(i)];
          f.tid = Index3{unsigned(i % int(block.x)), unsigned(i / int(block.x) % int(block.y)),
                         unsigned(i / int(block.x * block.y))};
          f.stack.reset(new char[kStack]);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        g_block = &b;
        for (;;) {
          for (int k = 0; k < threads && b.error.empty(); ++k) {
            const int i = g_reverse ? threads - 1 - k : k;
            if (b.fibers[size_t(i)].st != St::ready) continue;
            g_current = i;
            swapcontext(&b.sched, &b.fibers[size_t(i)].ctx);
          }
          g_current = -1;
          if (!b.error.empty()) break;
          if (release(b)) continue;
          if (!b.error.empty()) break;
          bool running = false;
          for (const TestThread& f : b.fibers) running |= f.st != St::done;
          if (!running) break;
          b.error = "deadlock: a collective not every thread reaches";
          break;
        }
        g_block = nullptr;
        if (!b.error.empty()) throw std::runtime_error(b.error);
      }
}
}  // namespace emu
}  // namespace mixkit
"""

RUNTIME_MAIN = r"""
void run_sm80(const std::vector<unsigned char>& in, std::vector<unsigned char>& out);
void run_sm90(const std::vector<unsigned char>& in, std::vector<unsigned char>& out);

int main(int argc, char** argv) {
  if (argc != 6) return 2;
  mixkit::emu::mutation() = std::atoi(argv[4]);
  mixkit::emu::g_reverse = std::string(argv[5]) == "reverse";
  const std::string which = argv[1];
  ++argv;
  std::ifstream f(argv[1], std::ios::binary);
  std::vector<unsigned char> in((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<unsigned char> out;
  try {
    if (which == "sm80") run_sm80(in, out);
    else run_sm90(in, out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 3;
  }
  std::ofstream(argv[2], std::ios::binary).write(reinterpret_cast<const char*>(out.data()), long(out.size()));
  return 0;
}
"""


_BUILT = {}


def host(tmp_path_factory) -> Path:
    """The test program (built once per session; skips cleanly without a C++ compiler)."""
    if "exe" in _BUILT:
        return _BUILT["exe"]
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler to build the emulated-instruction programs")
    if not (SRC / "cuda" / "emu.cuh").is_file():
        pytest.skip(f"mixkit sources not found at {SRC} (set MIXKIT_SOURCE_DIR)")
    d = tmp_path_factory.mktemp("emu_programs")
    (d / "hip").mkdir()
    (d / "hip" / "hip_runtime.h").write_text(STUB_HIP)
    (d / "host.cpp").write_text(RUNTIME + RUNTIME_MAIN + SM80 + SM90)
    exe = d / "host"
    r = subprocess.run([cxx, "-std=c++17", "-O0", "-DMIXKIT_EMULATE", "-DMIXKIT_WARP_SIZE=32",
                        f"-I{d}", f"-I{SRC}", str(d / "host.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    _BUILT["exe"] = exe
    return exe


def run(exe: Path, which: str, data: bytes, mutation: int = 0, reverse: bool = False):
    """Runs program `which` ("sm80" or "sm90") on `data` with planted error `mutation`,
    the threads of a block in reverse order between collectives if `reverse`; returns
    (exit status, output bytes, stderr)."""
    with tempfile.TemporaryDirectory() as t:
        src, dst = Path(t) / "in.bin", Path(t) / "out.bin"
        src.write_bytes(data)
        order = "reverse" if reverse else "forward"
        r = subprocess.run([str(exe), which, str(src), str(dst), str(mutation), order], capture_output=True,
                           text=True, timeout=60)
        out = dst.read_bytes() if r.returncode == 0 else b""
    return r.returncode, out, r.stderr


SM90 = r"""
#include <cstring>
#include "cuda/wgmma_sm90.cuh"

using namespace mixkit;

namespace sm90_test {

struct Header {
  int32_t form, n, bf16, mn, scale_d, mode, smem_bytes, threads;
  uint64_t da, db, da2, db2;
};

using Fn = void (*)(float*, const uint32_t*, uint64_t, uint64_t, int);
template <class T, int N, bool RS, bool MN>
void mma(float* d, const uint32_t* a, uint64_t da, uint64_t db, int scale) {
  float(&dd)[N / 2] = *reinterpret_cast<float(*)[N / 2]>(d);
  if constexpr (RS) {
    (void)da;
    sm90::wgmma_rs<T, N>(dd, *reinterpret_cast<const uint32_t(*)[4]>(a), db, scale);
  } else {
    (void)a;
    sm90::wgmma_ss<T, N, MN>(dd, da, db, scale);
  }
}
template <class T, int N>
Fn pick_n(const Header& h) {
  if (h.form) return mma<T, N, true, true>;
  return h.mn ? mma<T, N, false, true> : mma<T, N, false, false>;
}
template <class T>
Fn pick_t(const Header& h) {
  return h.n == 64 ? pick_n<T, 64>(h) : pick_n<T, 128>(h);
}

}  // namespace sm90_test
using namespace sm90_test;

void run_sm90(const std::vector<unsigned char>& in, std::vector<unsigned char>& out) {
  Header h;
  std::memcpy(&h, in.data(), sizeof(h));
  const int T = h.threads;
  const float* dinit = reinterpret_cast<const float*>(in.data() + sizeof(h));
  const uint32_t* areg = reinterpret_cast<const uint32_t*>(dinit + T * 64);
  const unsigned char* image = reinterpret_cast<const unsigned char*>(areg + T * 8);
  g_image.assign(image, image + h.smem_bytes);
  constexpr int kSnaps = 4;
  std::vector<float> snaps(size_t(kSnaps) * T * 64, -12345.f);
  const Fn f = h.bf16 ? pick_t<bf16>(h) : pick_t<f16>(h);
  emu::launch(dim3(1), dim3(unsigned(T)), size_t(h.smem_bytes), [&] {
    const int t = emu::linear_tid();
    float d[64], d2[64];
    std::memcpy(d, dinit + t * 64, sizeof(d));
    std::memcpy(d2, dinit + t * 64, sizeof(d2));
    const uint32_t *a0 = areg + 8 * t, *a1 = a0 + 4;
    auto snap = [&](int s, const float* v) { std::memcpy(&snaps[(size_t(s) * T + t) * 64], v, sizeof(d)); };
    switch (h.mode) {
      case 0:  // one wgmma
        sm90::wgmma_fence();
        f(d, a0, h.da, h.db, h.scale_d);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        snap(0, d);
        break;
      case 1:  // two k steps into one accumulator, one group
        sm90::wgmma_fence();
        f(d, a0, h.da, h.db, h.scale_d);
        f(d, a1, h.da2, h.db2, 1);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        snap(0, d);
        break;
      case 2:  // two groups, waited one at a time
        sm90::wgmma_fence();
        f(d, a0, h.da, h.db, h.scale_d);
        sm90::wgmma_commit();
        snap(0, d);
        f(d2, a1, h.da2, h.db2, h.scale_d);
        sm90::wgmma_commit();
        sm90::wgmma_wait<1>();
        snap(1, d);
        snap(2, d2);
        sm90::wgmma_wait<0>();
        snap(3, d2);
        break;
      case 3:  // shared memory zeroed between issue and wait
        sm90::wgmma_fence();
        f(d, a0, h.da, h.db, h.scale_d);
        sm90::wgmma_commit();
        __syncthreads();
        if (t == 0) std::memset(emu::dynamic_smem(), 0, size_t(h.smem_bytes));
        __syncthreads();
        sm90::wgmma_wait<0>();
        snap(0, d);
        break;
      case 4:  // no fence
        f(d, a0, h.da, h.db, h.scale_d);
        break;
      case 5:  // one thread's descriptor differs
        sm90::wgmma_fence();
        f(d, a0, h.da, t == 37 ? h.db + 64 : h.db, h.scale_d);
        break;
      case 6:  // no fence after a wait
        sm90::wgmma_fence();
        f(d, a0, h.da, h.db, h.scale_d);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        f(d, a0, h.da, h.db, h.scale_d);
        break;
    }
  });
  out.resize(snaps.size() * 4);
  std::memcpy(out.data(), snaps.data(), out.size());
}
"""

SM80 = r"""
#include <cstring>
#include "cuda/emu_sm80.cuh"

namespace sm80_test {
struct Header {
  int32_t mode, bf16, x, trans, misalign, pad;
};
}  // namespace sm80_test

void run_sm80(const std::vector<unsigned char>& in, std::vector<unsigned char>& out) {
  using namespace mixkit;
  sm80_test::Header h;
  std::memcpy(&h, in.data(), sizeof(h));
  const unsigned char* p = in.data() + sizeof(h);
  if (h.mode == 0) {  // mma.m16n8k16: a[32][4], b[32][2] (u32), d[32][4] (f32) -> d
    const uint32_t* a = reinterpret_cast<const uint32_t*>(p);
    const uint32_t* b = a + 32 * 4;
    const float* d0 = reinterpret_cast<const float*>(b + 32 * 2);
    out.resize(32 * 4 * 4);
    float* res = reinterpret_cast<float*>(out.data());
    emu::launch(dim3(1), dim3(32), 0, [&] {
      const int l = emu::linear_tid();
      uint32_t ra[4];
      float d[4];
      std::memcpy(ra, a + 4 * l, sizeof(ra));
      std::memcpy(d, d0 + 4 * l, sizeof(d));
      if (h.bf16) emu::sm80::mma_m16n8k16<bf16>(d, ra, b[2 * l], b[2 * l + 1]);
      else emu::sm80::mma_m16n8k16<f16>(d, ra, b[2 * l], b[2 * l + 1]);
      std::memcpy(res + 4 * l, d, sizeof(d));
    });
  } else if (h.mode == 1) {  // ldmatrix: addr[32] (shared offsets), image -> r[32][4]
    const uint32_t* addr = reinterpret_cast<const uint32_t*>(p);
    const uint32_t bytes = addr[32];
    g_image.assign(p + 33 * 4, p + 33 * 4 + bytes);
    out.assign(32 * 4 * 4, 0);
    uint32_t* res = reinterpret_cast<uint32_t*>(out.data());
    emu::launch(dim3(1), dim3(32), bytes, [&] {
      const int l = emu::linear_tid();
      const void* row = emu::dynamic_smem() + addr[l];
      if (h.x == 4) {
        uint32_t r[4];
        emu::sm80::ldmatrix(r, row, h.trans != 0);
        std::memcpy(res + 4 * l, r, sizeof(r));
      } else {
        uint32_t r[2];
        emu::sm80::ldmatrix(r, row, h.trans != 0);
        std::memcpy(res + 4 * l, r, sizeof(r));
      }
    });
  } else {  // cp.async: src_bytes[3][32] (i32), global[3][32][16] -> smem chunks seen by each lane [4][32][3][16]
    const int32_t* src_bytes = reinterpret_cast<const int32_t*>(p);
    std::vector<unsigned char> gbuf(3 * 32 * 16 + 16);  // the "global" source, 16-byte aligned
    unsigned char* global = gbuf.data() + (16 - reinterpret_cast<uintptr_t>(gbuf.data()) % 16) % 16;
    std::memcpy(global, p + 3 * 32 * 4, 3 * 32 * 16);
    g_image.clear();
    out.assign(4 * 32 * 3 * 16, 0);
    emu::launch(dim3(1), dim3(32), 3 * 32 * 16 + 16, [&] {
      const int l = emu::linear_tid();
      unsigned char* smem = emu::dynamic_smem();
      auto snap = [&](int s) {
        for (int g = 0; g < 3; ++g) std::memcpy(&out[((s * 32 + l) * 3 + g) * 16], smem + 16 * (32 * g + l), 16);
      };
      for (int g = 0; g < 3; ++g) {
        const int off = 16 * (32 * g + l) + (h.misalign && l == 5 ? 8 : 0);
        emu::sm80::cp_async16(smem + off, global + 16 * (32 * g + l), src_bytes[32 * g + l]);
        emu::sm80::cp_async_commit();
      }
      snap(0);
      emu::sm80::cp_async_wait(2);
      snap(1);
      emu::sm80::cp_async_wait(1);
      snap(2);
      emu::sm80::cp_async_wait(0);
      snap(3);
    });
  }
}
"""
