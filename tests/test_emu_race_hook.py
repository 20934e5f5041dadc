"""The emulated GPU's memory-access hook (csrc/cuda/emu_trace.h) on small kernels.

A test consumer attached to the hook records every access and event of a launch; the
program prints them as JSON and the tests check them against the kernels' source: each
plain load and store of static and dynamic shared memory and of global memory arrives
with its space, kind, width, offset, thread, warp, barrier epoch, line and occurrence
count; a thread's accesses to its own stack (registers) do not; atomicAdd is an atomic;
ldmatrix rows come from the lanes that gave their addresses; cp.async reports its
source, its destination at the issue and again when the wait lands it; wgmma reports
each warp's operand bytes; the MFMA kernels' LDS reads are plain loads; barriers and
collectives are events.
"""
import pytest

from emu_programs import build_runtime_programs, run_json, source_line

pytestmark = pytest.mark.slow  # compiling against the HIP CPU runtime takes a minute

PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>
#include "cuda/compat.cuh"
#if MIXKIT_WARP_SIZE == 32
#include "cuda/mma_sm80.cuh"
#include "cuda/wgmma_sm90.cuh"
#else
#include "cuda/mfma.cuh"
#endif

using namespace mixkit;
namespace tr = mixkit::emu::trace;

// Records a launch's accesses and events as JSON objects.
struct Recorder : tr::Consumer {
  std::mutex mu;
  std::vector<std::string> items;
  std::map<tr::Where, std::string> lines;
  std::string kernel;
  Recorder() { wants_occurrence = true; }
  std::string where(tr::Where w) {
    auto it = lines.find(w);
    if (it == lines.end()) it = lines.emplace(w, tr::describe(w)).first;
    return it->second;
  }
  void launch_begin(const tr::LaunchInfo& l) override { kernel = l.kernel; }
  void* block_begin(const tr::BlockInfo& b) override { return reinterpret_cast<void*>(intptr_t(b.linear)); }
  void access(void* block, const tr::Access& a) override {
    std::lock_guard<std::mutex> lock(mu);
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "{\"block\": %d, \"space\": \"%s\", \"kind\": \"%s\", \"static\": %d, \"offset\": %u, \"addr\": %zu, "
                  "\"bytes\": %u, \"tid\": %d, \"warp\": %d, \"epoch\": %u, \"interval\": %u, \"occ\": %u, \"where\": \"%s\"}",
                  int(intptr_t(block)), a.space == tr::Space::shared ? "shared" : "global", tr::name(a.kind),
                  int(a.static_shared), a.offset, size_t(reinterpret_cast<uintptr_t>(a.addr)), a.bytes, a.tid, a.warp,
                  a.epoch, a.interval, a.occurrence, where(a.where).c_str());
    items.push_back(buf);
  }
  void event(void*, const tr::Event& e) override {
    std::lock_guard<std::mutex> lock(mu);
    static const char* kinds[] = {"barrier", "collective", "instruction", "proxy_fence"};
    char buf[256];
    std::snprintf(buf, sizeof(buf), "{\"event\": \"%s\", \"name\": \"%s\", \"tid\": %d, \"threads\": %d, \"epoch\": %u}",
                  kinds[int(e.kind)], e.name, e.tid, e.threads, e.epoch);
    items.push_back(buf);
  }
  std::string json() {
    std::string s = "{\"kernel\": \"" + kernel + "\", \"items\": [";
    for (size_t i = 0; i < items.size(); ++i) s += (i ? ",\n" : "") + items[i];
    return s + "]}";
  }
};

// Plain accesses: static and dynamic shared memory, global memory, atomics, and a
// register array that must not show.
__global__ void plain(float* g, int* counter) {
  __shared__ float st[64];
  MIXKIT_DYNAMIC_SMEM(smem, 16);
  float* dyn = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  float regs[4];
  for (int i = 0; i < 4; ++i) regs[i] = float(i * t);
  st[t] = float(t);  // @st_store
  dyn[t] = 2.f * t;  // @dyn_store
  __syncthreads();
  const float v = st[(t + 1) % 64] + dyn[(t + 2) % 64] + regs[t % 4];  // @loads
  for (int i = 0; i < 2; ++i) g[64 * i + t] = v + float(i);  // @global_store
  atomicAdd(counter, 1);  // @atomic
}

#if MIXKIT_WARP_SIZE == 32
// ldmatrix.x4 over a 32-row tile, cp.async into it first.
__global__ void models_sm80(const uint16_t* src, uint32_t* out) {
  MIXKIT_DYNAMIC_SMEM(smem, 16);
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem);
  const int t = threadIdx.x;
  sm80::cp_async16(tile + 8 * t, src + 8 * t, true);  // @cp_async
  sm80::cp_async_commit();
  sm80::cp_async_wait<0>();  // @wait
  __syncthreads();
  uint32_t r[4];
  sm80::ldmatrix_x4(r, tile + 8 * ((t + 3) % 32));  // @ldmatrix
  for (int i = 0; i < 4; ++i) out[4 * t + i] = r[i];
}

// One wgmma m64n64k16 over zeroed tiles: K-major A (64 rows) at 0 and B (64 rows)
// at 8192, 128-byte rows, SBO 1024.
__global__ void models_sm90(float* out) {
  MIXKIT_DYNAMIC_SMEM(smem, 16);
  const int t = threadIdx.x;
  for (int i = t; i < 16 * 1024; i += 128) smem[i] = 0;
  sm90::fence_proxy_async();  // @fence
  __syncthreads();
  float d[32];
  sm90::wgmma_fence();
  sm90::wgmma_ss<bf16, 64>(d, sm90::smem_desc(0, 16, 1024), sm90::smem_desc(8192, 16, 1024), 0);  // @wgmma
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  out[t] = d[0];
}
#else
// The MFMA kernels read LDS with plain loads, then run the instruction.
__global__ void models_mfma(float* out) {
  __shared__ uint16_t lds[64 * 4];
  const int t = threadIdx.x;
  for (int i = 0; i < 4; ++i) lds[4 * t + i] = 0x3f80;  // bf16 1.0
  __syncthreads();
  mfma::short4_t a, b;
  for (int i = 0; i < 4; ++i) a[i] = short(lds[4 * ((t + 1) % 64) + i]);  // @lds_read
  b = a;
  mfma::float16_t acc = {};
  acc = mfma::mma_32x32x8(a, b, acc);
  out[t] = acc[0];
}
#endif

int main(int argc, char** argv) {
  Recorder rec;
  tr::attach(&rec);
  const std::string which = argv[1];
  std::vector<float> g(2 * 64 * 4);
  int counter = 0;
  if (which == "plain") {
    gpu_launch(plain, dim3(2), dim3(64), 256, nullptr, g.data(), &counter);
  }
#if MIXKIT_WARP_SIZE == 32
  else if (which == "sm80") {
    std::vector<uint16_t> src(32 * 8, 0x3f80);
    std::vector<uint32_t> out(32 * 4);
    gpu_launch(models_sm80, dim3(1), dim3(32), 512, nullptr, src.data(), out.data());
  } else if (which == "sm90") {
    gpu_launch(models_sm90, dim3(1), dim3(128), 16 * 1024, nullptr, g.data());
  }
#else
  else if (which == "mfma") {
    gpu_launch(models_mfma, dim3(1), dim3(64), 0, nullptr, g.data());
  }
#endif
  tr::detach(&rec);
  std::printf("%s\n", rec.json().c_str());
  std::printf("%s", "");
  (void)argc;
  return counter == 128 || which != "plain" ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    return build_runtime_programs(tmp_path_factory, "emu_trace", PROGRAM)


def _line(marker):
    return f"program.cpp:{source_line(PROGRAM, '// @' + marker)}"


def _accesses(out, **match):
    return [a for a in out["items"] if "event" not in a and all(a[k] == v for k, v in match.items())]


@pytest.mark.parametrize("warp", [32, 64])
def test_plain_accesses(programs, warp):
    out = _run(programs[warp], "plain")
    assert out["kernel"].startswith("plain("), out["kernel"]
    for block in (0, 1):
        st = _accesses(out, block=block, kind="store", space="shared", static=1)
        assert sorted(a["tid"] for a in st) == list(range(64))
        assert all(a["bytes"] == 4 and a["epoch"] == 0 and a["where"].startswith(_line("st_store")) for a in st)
        assert all(a["warp"] == a["tid"] // warp for a in st)
        base = min(a["offset"] for a in st)
        assert sorted(a["offset"] - base for a in st) == [4 * t for t in range(64)]
        dyn = _accesses(out, block=block, kind="store", space="shared", static=0)
        assert sorted((a["tid"], a["offset"]) for a in dyn) == [(t, 4 * t) for t in range(64)]
        assert all(a["where"].startswith(_line("dyn_store")) for a in dyn)
        loads = _accesses(out, block=block, kind="load", space="shared")
        # One static and one dynamic load per thread after the barrier; the register
        # array (the thread's stack) is not there.
        assert len(loads) == 128 and all(a["epoch"] == 1 and a["where"].startswith(_line("loads")) for a in loads)
        assert sorted(a["offset"] for a in loads if not a["static"]) == sorted(4 * ((t + 2) % 64) for t in range(64))
        gs = _accesses(out, block=block, kind="store", space="global")
        assert sorted((a["tid"], a["occ"]) for a in gs) == [(t, i) for t in range(64) for i in range(2)]
        assert all(a["where"].startswith(_line("global_store")) for a in gs)
        atomics = _accesses(out, block=block, kind="atomic")
        assert len(atomics) == 64 and all(a["space"] == "global" and a["bytes"] == 4 for a in atomics)
        assert len({a["addr"] for a in atomics}) == 1 and all(a["where"].startswith(_line("atomic")) for a in atomics)
    # Global loads are delivered (this consumer wants them): none here but the stack's.
    assert not _accesses(out, kind="load", space="global")
    barriers = [e for e in out["items"] if e.get("event") == "barrier"]
    assert len(barriers) == 2 and all(e["threads"] == 64 and e["epoch"] == 1 for e in barriers)


def test_sm80_models(programs):
    out = _run(programs[32], "sm80")
    issue = _accesses(out, kind="cp.async")
    land = _accesses(out, kind="cp.async landing")
    src = _accesses(out, kind="cp.async source read")
    for group in (issue, land):
        assert sorted((a["tid"], a["offset"], a["bytes"]) for a in group) == [(t, 16 * t, 16) for t in range(32)]
        assert all(a["space"] == "shared" and a["where"].startswith(_line("cp_async")) for a in group)
    assert all(a["epoch"] == 0 for a in land) and len(src) == 32 and all(a["space"] == "global" for a in src)
    rows = _accesses(out, kind="ldmatrix")
    # Each lane reads the row whose address it gave, once the warp has met.
    assert sorted((a["tid"], a["offset"]) for a in rows) == [(t, 16 * ((t + 3) % 32)) for t in range(32)]
    assert all(a["bytes"] == 16 and a["epoch"] == 1 and a["where"].startswith(_line("ldmatrix")) for a in rows)
    assert all(a["interval"] >= 2 for a in rows)  # after the barrier and the ldmatrix's own collective
    names = [e["name"] for e in out["items"] if e.get("event") == "instruction"]
    assert names.count("ldmatrix.x4") == 32 and names.count("cp.async.cg.shared.global") == 32


def test_wgmma_reads_each_warps_operands(programs):
    out = _run(programs[32], "sm90")
    reads = _accesses(out, kind="wgmma operand read")
    assert reads and all(a["bytes"] == 16 and a["where"].startswith(_line("wgmma")) for a in reads)
    for w in range(4):
        mine = [a for a in reads if a["warp"] == w]
        assert {a["tid"] for a in mine} == {32 * w}  # lane 0 reports its warp's slice
        covered = {a["offset"] + i for a in mine for i in range(16)}
        a_bytes = {o for o in covered if o < 8192}
        b_bytes = {o - 8192 for o in covered if o >= 8192}
        # A: the warp's 16 rows of 32 bytes (K-major: row r at 128 (r % 8) + 1024 (r / 8));
        # B: all 64 rows.
        assert len(a_bytes) == 16 * 32 and len(b_bytes) == 64 * 32
        assert {o // 1024 * 8 + o % 1024 // 128 for o in a_bytes} == set(range(16 * w, 16 * w + 16))
        assert {o // 1024 * 8 + o % 1024 // 128 for o in b_bytes} == set(range(64))
    fences = [e for e in out["items"] if e.get("event") == "proxy_fence"]
    assert len(fences) == 128
    names = [e["name"] for e in out["items"] if e.get("event") == "instruction"]
    assert names.count("wgmma.mma_async.m64n64k16") == 128 and names.count("wgmma.wait_group") == 128


def test_mfma_lds_reads_are_plain_loads(programs):
    out = _run(programs[64], "mfma")
    reads = _accesses(out, kind="load", space="shared")
    # 8 bytes a lane (the compiler may merge the four 2-byte reads).
    assert sum(a["bytes"] for a in reads) == 64 * 8 and all(a["static"] for a in reads)
    base = min(a["offset"] for a in reads)
    assert {(a["tid"], a["offset"] - base + i) for a in reads for i in range(a["bytes"])} == {
        (t, 8 * ((t + 1) % 64) + i) for t in range(64) for i in range(8)}
    assert all(a["where"].startswith(_line("lds_read")) and a["warp"] == 0 for a in reads)
    names = [e["name"] for e in out["items"] if e.get("event") == "instruction"]
    assert names.count("v_mfma_f32_32x32x8bf16_1k") == 64


def _run(exe, which):
    return run_json(exe, which)
