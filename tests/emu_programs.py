"""Host programs that run the emulated GPU's instruction models (csrc/cuda/emu_sm80.cuh,
emu_sm90.cuh) on a tiny test-only runtime, for test_emu_sm80.py and test_emu_wgmma.py.

The runtime below is not the emulator's scheduler (emu_runtime.cpp, which needs the HIP
CPU runtime): every emulated thread is an OS thread, a warp or warpgroup collective is a
condition-variable barrier over its threads, and emu::fail ends the launch with the
message on stderr and exit status 3. It needs only a C++17 compiler, so these tests run
wherever g++ does; `hip/hip_runtime.h` is a stub giving dim3.

One executable holds both programs: `host sm80|sm90 IN OUT MUTATION` reads its input
file, sets emu::mutation(), writes its output file (exit status 3 with emu::fail's message
on stderr when the launch failed).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(os.environ.get("MIXKIT_SOURCE_DIR", Path(__file__).resolve().parents[1])) / "csrc"

STUB_HIP = r"""
#pragma once
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
"""

RUNTIME = r"""
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#include "cuda/emu.cuh"

// Every block's dynamic shared memory starts as a copy of this image (the rest 0xcd).
std::vector<unsigned char> g_image;

namespace mixkit {
namespace emu {
namespace {
struct Abort {};
struct Barrier {
  int arrived = 0;
  long gen = 0;
  std::string tag;
};
struct TestBlock {
  Index3 bid{}, bdim{}, gdim{};
  int threads = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<unsigned char> scratch;
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::pair<int, int>, Barrier> barriers;  // (group size, first thread)
  bool aborted = false;
  std::string error;
};
struct TestThread {
  TestBlock* block = nullptr;
  int linear = -1;
  Index3 tid{};
  AsyncQueue async;
};
thread_local TestThread t_self;

void arrive(int group, const char* tag) {
  TestBlock& b = *t_self.block;
  std::unique_lock<std::mutex> lock(b.mu);
  if (b.aborted) throw Abort{};
  const int first = t_self.linear / group * group;
  const int members = std::min(b.threads, first + group) - first;
  Barrier& bar = b.barriers[{group, first}];
  if (bar.arrived == 0) bar.tag = tag;
  if (bar.tag != tag) {
    b.error = std::string("lanes of one group wait at different collectives: ") + bar.tag + " and " + tag;
    b.aborted = true;
    b.cv.notify_all();
    throw Abort{};
  }
  const long gen = bar.gen;
  if (++bar.arrived == members) {
    bar.arrived = 0;
    ++bar.gen;
    b.cv.notify_all();
    return;
  }
  b.cv.wait(lock, [&] { return bar.gen != gen || b.aborted; });
  if (bar.gen == gen) throw Abort{};
}
}  // namespace

const Index3& thread_idx() { return t_self.tid; }
const Index3& block_idx() { return t_self.block->bid; }
const Index3& block_dim() { return t_self.block->bdim; }
const Index3& grid_dim() { return t_self.block->gdim; }
int linear_tid() { return t_self.linear; }
void syncthreads() { arrive(t_self.block->threads, "__syncthreads"); }
void group_sync(int group, const char* tag) {
  if (group > 1) arrive(group, tag);
}
unsigned char* group_scratch(int group) {
  return t_self.block->scratch.data() + size_t(t_self.linear / group * group) * kScratchBytes;
}
AsyncQueue& async_queue() { return t_self.async; }
unsigned char* dynamic_smem() { return t_self.block->smem; }
uint32_t shared_offset(const void* p) {
  TestBlock& b = *t_self.block;
  const auto* c = static_cast<const unsigned char*>(p);
  if (!b.smem || c < b.smem || c > b.smem + b.smem_bytes) fail("a shared-memory address outside the block");
  return uint32_t(c - b.smem);
}
void* shared_ptr(uint32_t offset, size_t bytes) {
  TestBlock& b = *t_self.block;
  if (!b.smem || size_t(offset) + bytes > b.smem_bytes) fail("a shared-memory access past the block's dynamic shared memory");
  return b.smem + offset;
}
void fail(const char* what) {
  TestBlock& b = *t_self.block;
  {
    std::lock_guard<std::mutex> lock(b.mu);
    if (b.error.empty()) b.error = what;
    b.aborted = true;
  }
  b.cv.notify_all();
  throw Abort{};
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
void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
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
        std::vector<std::thread> pool;
        for (int i = 0; i < threads; ++i)
          pool.emplace_back([&, i] {
            t_self = TestThread{};
            t_self.block = &b;
            t_self.linear = i;
            t_self.tid = Index3{unsigned(i % int(block.x)), unsigned(i / int(block.x) % int(block.y)),
                                unsigned(i / int(block.x * block.y))};
            try {
              body();
            } catch (const Abort&) {
            }
          });
        for (auto& t : pool) t.join();
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
  if (argc != 5) return 2;
  mixkit::emu::mutation() = std::atoi(argv[4]);
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


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name) and "hipcc" not in name and "nvcc" not in name:
            return shutil.which(name)
    return None


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
    r = subprocess.run([cxx, "-std=c++17", "-O0", "-pthread", "-DMIXKIT_EMULATE", "-DMIXKIT_WARP_SIZE=32",
                        f"-I{d}", f"-I{SRC}", str(d / "host.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    _BUILT["exe"] = exe
    return exe


def run(exe: Path, which: str, data: bytes, mutation: int = 0, out_dir: Path | None = None):
    """Runs program `which` ("sm80" or "sm90") on `data` with planted error `mutation`;
    returns (exit status, output bytes, stderr)."""
    import tempfile
    with tempfile.TemporaryDirectory(dir=out_dir) as t:
        src, dst = Path(t) / "in.bin", Path(t) / "out.bin"
        src.write_bytes(data)
        r = subprocess.run([str(exe), which, str(src), str(dst), str(mutation)], capture_output=True, text=True, timeout=60)
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
