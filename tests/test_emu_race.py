"""The emulated GPU's race checker (csrc/cuda/emu_racecheck.cpp) and barrier checks on
small kernels, at warp 32 (ldmatrix, wgmma) and 64 (MFMA).

A missing barrier before a tensor-core fragment read (ldmatrix, wgmma, the LDS reads
that feed MFMA) gives a wrong answer in the forward order (one warp runs through its
collectives before another has written its part) and a race report naming the kernel,
the lines and the threads; the same kernel with the barrier gives the right answer in
every order and no report. Also: a cp.async destination read before its wait; a wgmma
operand written without fence.proxy.async; lanes of one warp unordered without a
collective between them; an early-exit warp that skips a barrier; barriers on
different lines; blocks of one launch writing the same global bytes without atomics.
"""
import numpy as np
import pytest

from emu_programs import build_runtime_programs, run_json, source_line

pytestmark = pytest.mark.slow  # compiling against the HIP CPU runtime takes a minute

PROGRAM = r"""
#include <cstdio>
#include <cstring>
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

#if MIXKIT_WARP_SIZE == 32
// Each of 64 threads stores row t of a 64 x 8 tile of 16-bit values; warp w then
// reads the other warp's 32 rows with ldmatrix.x4.
template <bool kBarrier>
__global__ void ldsm_race(const uint16_t* in, uint32_t* out) {
  MIXKIT_DYNAMIC_SMEM(smem, 16);
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem);
  const int t = threadIdx.x, w = t / 32, lane = t % 32;
  for (int i = 0; i < 8; ++i) tile[8 * t + i] = in[8 * t + i];  // @ldsm_store
  if (kBarrier) __syncthreads();
  uint32_t r[4];
  sm80::ldmatrix_x4(r, tile + 8 * (32 * (w ^ 1) + lane));  // @ldsm_read
  for (int i = 0; i < 4; ++i) out[4 * t + i] = r[i];
}

// 256 threads, two warpgroups: thread t stores 16-byte chunk t % 2 of row t / 2 of A
// (t < 128) or B (K-major, 64 rows each, 128-byte swizzle, at 0 and 8192). Both
// warpgroups then compute A B^T with one wgmma m64n64k16: warpgroup 0 reads the B that
// warpgroup 1 stored.
template <bool kBarrier, bool kFence>
__global__ void wgmma_race(const uint16_t* in, float* out) {
  MIXKIT_DYNAMIC_SMEM(smem, 16);
  const int t = threadIdx.x, r = (t % 128) / 2, c = t % 2;
  unsigned char* row = smem + (t >= 128 ? 8192 : 0) + (r / 8) * 1024 + (r % 8) * 128;
  std::memcpy(row + ((c ^ (r % 8)) << 4), in + 8 * t, 16);  // @wgmma_store
  if (kFence) sm90::fence_proxy_async();
  if (kBarrier) __syncthreads();
  float d[32];
  sm90::wgmma_fence();
  sm90::wgmma_ss<bf16, 64>(d, sm90::smem_desc(0, 16, 1024), sm90::smem_desc(8192, 16, 1024), 0);  // @wgmma_read
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) out[32 * t + i] = d[i];
}

// A cp.async destination read before and after the wait that lands it.
template <bool kEarly>
__global__ void async_early(const float* src, float* out) {
  MIXKIT_DYNAMIC_SMEM(smem, 16);
  float* dst = reinterpret_cast<float*>(smem) + 4 * threadIdx.x;
  sm80::cp_async16(dst, src + 4 * threadIdx.x, true);  // @async_issue
  sm80::cp_async_commit();
  if (kEarly) out[threadIdx.x] = dst[0];  // @async_early
  sm80::cp_async_wait<0>();
  out[32 + threadIdx.x] = dst[1];
}
#else
// 128 threads, two wavefronts: wave 0 stores A (32 x 8), wave 1 stores B (8 x 32) in
// LDS; each wave then loads its MFMA operands with plain loads, A from wave 0's
// stores and B from wave 1's.
template <bool kBarrier>
__global__ void mfma_race(const uint16_t* in, float* out) {
  __shared__ uint16_t A[32 * 8], B[8 * 32];
  const int t = threadIdx.x, l = t % 64;
  for (int i = 0; i < 4; ++i) (t < 64 ? A : B)[4 * l + i] = in[4 * t + i];  // @mfma_store
  if (kBarrier) __syncthreads();
  mfma::short4_t a, b;
  for (int e = 0; e < 4; ++e) {
    a[e] = short(A[8 * (l % 32) + 4 * (l / 32) + e]);  // @mfma_read
    b[e] = short(B[32 * (4 * (l / 32) + e) + l % 32]);
  }
  mfma::float16_t acc = {};
  acc = mfma::mma_32x32x8(a, b, acc);
  for (int i = 0; i < 16; ++i) out[16 * t + i] = acc[i];
}
#endif

// Lanes of one warp exchange values through shared memory, with a shuffle between
// the store and the load or without.
template <bool kCollective>
__global__ void lanes(float* out) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = float(t);  // @lanes_store
  float v = 0.f;
  if (kCollective) v = shfl_xor(v, 1);
  out[t] = s[t ^ 1] + v;  // @lanes_read
}

// The last warp returns early: the others wait at a barrier it never reaches.
__global__ void early_exit(int* out) {
  __shared__ int s[4 * 64];
  const int t = threadIdx.x;
  if (t >= 3 * kWarpSize) return;
  s[t] = t;
  __syncthreads();  // @early_barrier
  out[t] = s[(t + kWarpSize) % (3 * kWarpSize)];
}

// Warp 0 waits at one barrier, the others at another.
__global__ void split_barrier(int* out) {
  if (threadIdx.x < kWarpSize) __syncthreads();  // @split_a
  else __syncthreads();  // @split_b
  out[threadIdx.x] = 1;
}

// A pipelined loop's pattern: stage 0 of a two-stage tile is loaded; with kStale the
// loop runs one step too far and reads stage 1, which nothing loaded, at weight 0 (a
// masked key block): right on any run whose stale bytes are finite, NaN on a GPU whose
// SM left NaN bits there. Static (thread-local, reused across blocks) or dynamic.
template <bool kStale, bool kDynamic>
__global__ void stale_tile(const float* in, float* out) {
  __shared__ float stat[2][64];
  MIXKIT_DYNAMIC_SMEM(smem, 16);
  float(*tile)[64] = kDynamic ? reinterpret_cast<float(*)[64]>(smem) : stat;
  const int t = threadIdx.x;
  tile[0][t] = in[t];
  __syncthreads();
  float acc = 0.f;
  for (int s = 0; s < (kStale ? 2 : 1); ++s) acc += (s == 0 ? 1.f : 0.f) * tile[s][t];  // @stale_read
  out[blockIdx.x * 64 + t] = acc;
}

// Every block writes out[t]; or adds to it atomically; or writes its own slots.
__global__ void global_overlap(float* out) { out[threadIdx.x] = float(blockIdx.x); }  // @global_store
__global__ void global_atomic(float* out) { atomicAdd(&out[threadIdx.x], 1.f); }
__global__ void global_disjoint(float* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1.f; }

std::string quote(const std::string& s) {
  std::string r = "\"";
  for (char c : s) r += c == '"' || c == '\\' ? std::string("\\") + c : c == '\n' ? std::string("\\n") : std::string(1, c);
  return r + "\"";
}

// main KERNEL SCHEDULE RACECHECK: runs one launch; prints its error and its output.
int main(int argc, char** argv) {
  const std::string k = argv[1];
  emu::set_schedule(emu::Schedule(std::stoi(argv[2])), 7);
  emu::set_racecheck(std::stoi(argv[3]) != 0);
  std::vector<uint16_t> in(4096);
  for (size_t i = 0; i < in.size(); ++i) in[i] = uint16_t(0x3f80 + 0x80 * (i % 7));  // bf16 1, 2, 3, 4, 6, 8, 12
  std::vector<float> out(256 * 32, -1.f);
  std::vector<uint32_t> out32(64 * 4);
  std::string error;
  bool u32 = false;
  try {
#if MIXKIT_WARP_SIZE == 32
    if (k == "ldsm0") gpu_launch(ldsm_race<false>, dim3(1), dim3(64), 1024, nullptr, in.data(), out32.data()), u32 = true;
    if (k == "ldsm1") gpu_launch(ldsm_race<true>, dim3(1), dim3(64), 1024, nullptr, in.data(), out32.data()), u32 = true;
    if (k == "wgmma0") gpu_launch(wgmma_race<false, true>, dim3(1), dim3(256), 16384, nullptr, in.data(), out.data());
    if (k == "wgmma1") gpu_launch(wgmma_race<true, true>, dim3(1), dim3(256), 16384, nullptr, in.data(), out.data());
    if (k == "wgmma_nofence") gpu_launch(wgmma_race<true, false>, dim3(1), dim3(256), 16384, nullptr, in.data(), out.data());
    std::vector<float> src(128, 7.f);
    if (k == "async0") gpu_launch(async_early<false>, dim3(1), dim3(32), 512, nullptr, src.data(), out.data());
    if (k == "async1") gpu_launch(async_early<true>, dim3(1), dim3(32), 512, nullptr, src.data(), out.data());
#else
    if (k == "mfma0") gpu_launch(mfma_race<false>, dim3(1), dim3(128), 0, nullptr, in.data(), out.data());
    if (k == "mfma1") gpu_launch(mfma_race<true>, dim3(1), dim3(128), 0, nullptr, in.data(), out.data());
#endif
    if (k == "lanes0") gpu_launch(lanes<false>, dim3(1), dim3(kWarpSize), 0, nullptr, out.data());
    if (k == "lanes1") gpu_launch(lanes<true>, dim3(1), dim3(kWarpSize), 0, nullptr, out.data());
    std::vector<int> iout(256);
    if (k == "early_exit") gpu_launch(early_exit, dim3(1), dim3(4 * kWarpSize), 0, nullptr, iout.data());
    if (k == "split_barrier") gpu_launch(split_barrier, dim3(1), dim3(2 * kWarpSize), 0, nullptr, iout.data());
    std::vector<float> stale_in(64, 3.f);
    if (k == "stale0") gpu_launch(stale_tile<false, false>, dim3(4), dim3(64), 0, nullptr, stale_in.data(), out.data());
    if (k == "stale1") gpu_launch(stale_tile<true, false>, dim3(4), dim3(64), 0, nullptr, stale_in.data(), out.data());
    if (k == "stale_dyn0") gpu_launch(stale_tile<false, true>, dim3(4), dim3(64), 512, nullptr, stale_in.data(), out.data());
    if (k == "stale_dyn1") gpu_launch(stale_tile<true, true>, dim3(4), dim3(64), 512, nullptr, stale_in.data(), out.data());
    std::vector<float> g(4 * 64, 0.f);
    if (k == "global_overlap") gpu_launch(global_overlap, dim3(4), dim3(64), 0, nullptr, g.data());
    if (k == "global_atomic") gpu_launch(global_atomic, dim3(4), dim3(64), 0, nullptr, g.data());
    if (k == "global_disjoint") gpu_launch(global_disjoint, dim3(4), dim3(64), 0, nullptr, g.data());
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::printf("{\"error\": %s, \"out\": [", quote(error).c_str());
  if (u32)
    for (size_t i = 0; i < out32.size(); ++i) std::printf("%s%u", i ? ", " : "", out32[i]);
  else
    for (size_t i = 0; i < out.size(); ++i) std::printf("%s%.9g", i ? ", " : "", out[i]);
  std::printf("]}\n");
  (void)argc;
}
"""

FORWARD, REVERSE, RANDOM = 0, 1, 2


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    return build_runtime_programs(tmp_path_factory, "emu_race", PROGRAM)


def _run(exe, kernel, schedule=FORWARD, racecheck=True):
    return run_json(exe, kernel, schedule, int(racecheck))


def _line(marker):
    return f"program.cpp:{source_line(PROGRAM, '// @' + marker)}"


def _inputs():
    """The program's 16-bit inputs as bf16 bit patterns and their float values."""
    bits = np.array([0x3F80 + 0x80 * (i % 7) for i in range(4096)], dtype=np.uint32)
    return bits, (bits << 16).view(np.float32)


def _expected_ldsm():
    bits, _ = _inputs()
    out = []
    for t in range(64):
        w, lane = divmod(t, 32)
        for m in range(4):
            row = 32 * (w ^ 1) + 8 * m + lane // 4
            c = 2 * (lane % 4)
            out.append(int(bits[8 * row + c]) | int(bits[8 * row + c + 1]) << 16)
    return out


def _expected_wgmma():
    _, vals = _inputs()
    a = vals[: 64 * 16].reshape(64, 16)  # thread t holds k 8 (t % 2) .. of row t / 2
    b = vals[64 * 16: 2 * 64 * 16].reshape(64, 16)
    d = a.astype(np.float64) @ b.T.astype(np.float64)
    out = np.zeros((256, 32))
    for t in range(256):
        w, lane = (t % 128) // 32, t % 32
        g, c = lane // 4, 2 * (lane % 4)
        for i in range(8):
            for h in range(2):
                for j in range(2):
                    out[t, 4 * i + 2 * h + j] = d[16 * w + g + 8 * h, 8 * i + c + j]
    return out.ravel().tolist()


def _expected_mfma():
    _, vals = _inputs()
    a = vals[: 32 * 8].reshape(32, 8)
    b = vals[256: 256 + 8 * 32].reshape(8, 32)
    d = a.astype(np.float64) @ b.astype(np.float64)
    # D[i][j] is register 4 (i / 8) + i % 4 of lane j + 32 ((i / 4) % 2), in both waves.
    out = np.zeros((128, 16))
    for t in range(128):
        for i in range(32):
            for j in range(32):
                if j + 32 * ((i // 4) % 2) == t % 64:
                    out[t, 4 * (i // 8) + i % 4] = d[i, j]
    return out.ravel().tolist()


def _assert_race(err, kernel, *lines, threads=True):
    assert "race" in err or "barrier" in err, err
    assert kernel in err, err
    for line in lines:
        assert line in err, (line, err)
    if threads:
        assert "thread" in err and "warp" in err, err


def _missing_barrier(exe, name, want, kernel, read, store):
    """`name`1 (with the barrier) is right in every order with no report; `name`0 (without)
    gives a wrong answer in the forward order (one warp reads before the other has run)
    and a report naming the kernel and both lines, whatever the order."""
    for s in (FORWARD, REVERSE, RANDOM):
        good = _run(exe, f"{name}1", s)
        assert good["error"] == "" and good["out"][:len(want)] == want
    assert _run(exe, f"{name}0", FORWARD, racecheck=False)["out"][:len(want)] != want
    for s in (FORWARD, REVERSE, RANDOM):
        _assert_race(_run(exe, f"{name}0", s)["error"], kernel, _line(read), _line(store))


def test_missing_barrier_before_ldmatrix(programs):
    _missing_barrier(programs[32], "ldsm", _expected_ldsm(), "ldsm_race<false>", "ldsm_read", "ldsm_store")


def test_missing_barrier_before_wgmma(programs):
    _missing_barrier(programs[32], "wgmma", _expected_wgmma(), "wgmma_race<false, true>", "wgmma_read", "wgmma_store")


def test_missing_barrier_before_mfma_lds_reads(programs):
    _missing_barrier(programs[64], "mfma", _expected_mfma(), "mfma_race<false>", "mfma_read", "mfma_store")


def test_wgmma_operands_need_a_proxy_fence(programs):
    err = _run(programs[32], "wgmma_nofence")["error"]
    _assert_race(err, "wgmma_race<true, false>", "fence.proxy.async", _line("wgmma_store"))


def test_cp_async_destination_read_before_its_wait(programs):
    exe = programs[32]
    assert _run(exe, "async0")["error"] == ""
    err = _run(exe, "async1")["error"]
    _assert_race(err, "async_early<true>", "before the cp.async.wait_group", _line("async_early"), _line("async_issue"))


@pytest.mark.parametrize("warp", [32, 64])
def test_lanes_of_a_warp_are_ordered_only_by_its_collectives(programs, warp):
    for s in (FORWARD, REVERSE):
        assert _run(programs[warp], "lanes1", s)["error"] == ""
        err = _run(programs[warp], "lanes0", s)["error"]
        _assert_race(err, "lanes<false>", _line("lanes_read"), _line("lanes_store"), "no collective of their warp")


@pytest.mark.parametrize("warp", [32, 64])
def test_early_exit_warp_skipping_a_barrier_is_reported(programs, warp):
    err = _run(programs[warp], "early_exit")["error"]
    assert "barrier in divergent code" in err and _line("early_barrier").split(":")[1] in err, err
    assert f"threads {3 * warp}..{4 * warp - 1} returned" in err, err
    err = _run(programs[warp], "split_barrier")["error"]
    assert "different lines" in err and _line("split_a").split(":")[1] in err, err


@pytest.mark.parametrize("warp", [32, 64])
def test_global_writes_of_two_blocks(programs, warp):
    err = _run(programs[warp], "global_overlap")["error"]
    assert "global memory written by two blocks" in err and "global_overlap" in err, err
    assert _line("global_store") in err, err
    assert _run(programs[warp], "global_atomic")["error"] == ""
    assert _run(programs[warp], "global_disjoint")["error"] == ""
    # The checker off: no report, the last block's values stay.
    assert _run(programs[warp], "global_overlap", racecheck=False)["error"] == ""


@pytest.mark.parametrize("warp", [32, 64])
@pytest.mark.parametrize("space", ["static", "dynamic"])
def test_read_of_shared_memory_the_block_never_wrote(programs, warp, space):
    """A block's shared memory starts with whatever the SM held: a read of a byte no
    thread of the block wrote is reported even where its value cannot show (weight 0),
    in the first block of an OS thread (static arrays zeroed) and in later ones
    (another block's values left there)."""
    name = "stale" if space == "static" else "stale_dyn"
    good = _run(programs[warp], f"{name}0")
    assert good["error"] == "" and good["out"][:4 * 64] == [3.0] * (4 * 64)
    err = _run(programs[warp], f"{name}1")["error"]
    assert "never wrote" in err and "stale_tile<true" in err and _line("stale_read") in err, err
    assert ("static __shared__" if space == "static" else "dynamic shared") in err, err
    # Unchecked, the emulator's answer is right: the stale values are finite.
    unchecked = _run(programs[warp], f"{name}1", racecheck=False)
    assert unchecked["error"] == "" and unchecked["out"][:4 * 64] == [3.0] * (4 * 64)
