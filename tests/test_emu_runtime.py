"""The emulated GPU's scheduler (csrc/cuda/emu_runtime.cpp) on small kernels.

A host program is compiled against the emulator (emu_programs.build_runtime_programs)
at warp widths 32 and 64. It checks what the op tests rely on: warps are consecutive
block-linear threads, so a 2-D block reduces each row on its own (HIP-CPU's own
shuffles mix the rows); the order between synchronisation points follows the schedule,
so a missing barrier gives different answers in forward and reverse order while a
correct kernel does not; warps advance independently between barriers (one warp passes
several collectives before the next starts) while a barrier still waits for the block;
a barrier that only some threads reach, or lanes of one warp at different collectives,
is an error rather than a hang; cp.async copies land only at the wait that covers them.
"""
import pytest

from emu_programs import build_runtime_programs, run_json

# Compiling the programs against the HIP CPU runtime takes about a minute.
pytestmark = pytest.mark.slow

PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
#include "cuda/compat.cuh"
#include "cuda/emu_sm80.cuh"

using namespace mixkit;

// Each row of a (tpr, rows) block sums its lanes' values y * 1000 + x.
__global__ void row_sums(float* out) {
  float v = threadIdx.y * 1000.f + threadIdx.x;
  for (int m = blockDim.x / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  if (threadIdx.x == 0) out[threadIdx.y] = v;
}

// Thread t reads what thread t + 1 wrote, with or without the barrier.
template <bool kBarrier>
__global__ void neighbour(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = int(threadIdx.x) + 100;
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
  __syncthreads();
  s[threadIdx.x] = -1;  // stale values for the next launch
}

// Lane 0 of each warp takes a ticket after each of its shuffles, and once more
// after a barrier: the tickets give the order the warps ran in.
constexpr int kSteps = 4;
__global__ void progress(int* counter, int* tickets) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float v = 1.f;
  for (int s = 0; s < kSteps; ++s) {
    v += shfl_xor(v, 1);
    if (lane == 0) tickets[warp * (kSteps + 1) + s] = atomicAdd(counter, 1);
  }
  __syncthreads();
  if (lane == 0) tickets[warp * (kSteps + 1) + kSteps] = atomicAdd(counter, 1);
}

// Half of each warp waits at the barrier, the other half at a shuffle that
// needs the first half: neither can complete.
__global__ void divergent_barrier(int*) {
  if (threadIdx.x % 32 < 16) __syncthreads();
  else shfl_xor(1.f, 1);
}

__global__ void divergent_collective(float* out) {
  float v = 1.f;
  if (threadIdx.x % 2) v = shfl_xor(v, 1);
  else v = shfl_xor(v, 2) + shfl_xor(v, 2);
  out[threadIdx.x] = v;
}

// Reads the destination of a cp.async before and after its wait.
__global__ void async_copy(const float* src, float* out) {
  MIXKIT_DYNAMIC_SMEM(smem, 16);
  float* dst = reinterpret_cast<float*>(smem) + 4 * threadIdx.x;
  for (int i = 0; i < 4; ++i) dst[i] = -1.f;
  emu::sm80::cp_async16(dst, src + 4 * threadIdx.x, 16);
  emu::sm80::cp_async_commit();
  out[threadIdx.x] = dst[0];  // before the wait: still -1
  emu::sm80::cp_async_wait(0);
  out[32 + threadIdx.x] = dst[0];
}

template <class F>
std::string guarded(F&& f) {
  try {
    f();
    return "ok";
  } catch (const std::exception& e) {
    return e.what();
  }
}

std::string quote(const std::string& s) {
  std::string r = "\"";
  for (char c : s) r += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
  return r + "\"";
}

int main(int argc, char** argv) {
  emu::set_schedule(emu::Schedule(std::stoi(argv[1])), 7);
  std::printf("{\"warp\": %d", kWarpSize);
  std::vector<float> sums(4);
  gpu_launch(row_sums, dim3(1), dim3(kWarpSize, 4), 0, nullptr, sums.data());
  std::printf(", \"row_sums\": [%g, %g, %g, %g]", sums[0], sums[1], sums[2], sums[3]);
  for (int barrier = 0; barrier < 2; ++barrier) {
    std::vector<int> out(64);
    if (barrier) gpu_launch(neighbour<true>, dim3(1), dim3(64), 0, nullptr, out.data());
    else gpu_launch(neighbour<false>, dim3(1), dim3(64), 0, nullptr, out.data());
    std::printf(", \"neighbour%d\": [", barrier);
    for (int i = 0; i < 64; ++i) std::printf("%s%d", i ? ", " : "", out[i]);
    std::printf("]");
  }
  int counter = 0;
  std::vector<int> tickets(4 * (kSteps + 1));
  gpu_launch(progress, dim3(1), dim3(4 * kWarpSize), 0, nullptr, &counter, tickets.data());
  std::printf(", \"progress\": [");
  for (size_t i = 0; i < tickets.size(); ++i) std::printf("%s%d", i ? ", " : "", tickets[i]);
  std::printf("]");
  std::printf(", \"divergent_barrier\": %s",
              quote(guarded([] { gpu_launch(divergent_barrier, dim3(2), dim3(64), 0, nullptr, nullptr); })).c_str());
  std::vector<float> dc(64);
  std::printf(", \"divergent_collective\": %s",
              quote(guarded([&] { gpu_launch(divergent_collective, dim3(1), dim3(64), 0, nullptr, dc.data()); }))
                  .c_str());
  std::vector<float> src(128), out(64);
  for (int i = 0; i < 128; ++i) src[i] = float(i);
  gpu_launch(async_copy, dim3(1), dim3(32), 512, nullptr, src.data(), out.data());
  std::printf(", \"async_before\": %g, \"async_after\": [%g, %g]", out[0], out[32], out[33]);
  // After an error the scheduler's fibers start over: a later launch works.
  gpu_launch(row_sums, dim3(3), dim3(kWarpSize, 4), 0, nullptr, sums.data());
  std::printf(", \"after_error\": %g}\n", sums[3]);
}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    return build_runtime_programs(tmp_path_factory, "emu_runtime", PROGRAM)


def _run(exe, schedule):
    return run_json(exe, schedule)


@pytest.mark.parametrize("warp", [32, 64])
def test_warps_are_block_linear_and_two_d_blocks_reduce_per_row(programs, warp):
    for schedule in (0, 1, 2):
        out = _run(programs[warp], schedule)
        assert out["warp"] == warp
        assert out["row_sums"] == [y * 1000 * warp + warp * (warp - 1) / 2 for y in range(4)]
        assert out["after_error"] == 3000 * warp + warp * (warp - 1) / 2


@pytest.mark.parametrize("warp", [32, 64])
def test_schedule_exposes_a_missing_barrier(programs, warp):
    forward, reverse, shuffled = (_run(programs[warp], s) for s in (0, 1, 2))
    expected = [(t + 1) % 64 + 100 for t in range(64)]
    for out in (forward, reverse, shuffled):
        assert out["neighbour1"] == expected  # with the barrier: the same in every order
    # Without it, forward order runs thread t before t + 1 wrote (only thread
    # 63, reading thread 0, sees a written value); reverse order runs t after
    # t + 1 (only thread 63 misses).
    assert forward["neighbour0"][63] == 100 and forward["neighbour0"][:63] != expected[:63]
    assert reverse["neighbour0"][:63] == expected[:63] and reverse["neighbour0"][63] != 100


@pytest.mark.parametrize("warp", [32, 64])
def test_divergence_is_an_error_not_a_hang(programs, warp):
    out = _run(programs[warp], 0)
    assert "deadlock" in out["divergent_barrier"], out["divergent_barrier"]
    assert "different collectives" in out["divergent_collective"], out["divergent_collective"]


def test_async_copies_land_at_the_wait(programs):
    out = _run(programs[32], 0)
    assert out["async_before"] == -1
    assert out["async_after"] == [0, 4]


@pytest.mark.parametrize("warp", [32, 64])
def test_warps_advance_independently_between_barriers(programs, warp):
    steps = 4
    runs = {}
    for schedule, name in ((0, "forward"), (1, "reverse"), (2, "random")):
        t = _run(programs[warp], schedule)["progress"]
        runs[name] = [t[w * (steps + 1):(w + 1) * (steps + 1)] for w in range(4)]
    # Forward: warp 0 passes all its collectives before warp 1 starts, and so on; the
    # barrier still waits for every warp.
    assert runs["forward"] == [list(range(steps * w, steps * w + steps)) + [4 * steps + w] for w in range(4)]
    assert runs["reverse"] == [list(range(steps * (3 - w), steps * (3 - w) + steps)) + [4 * steps + 3 - w]
                               for w in range(4)]
    for warps in runs.values():
        assert max(w[steps - 1] for w in warps) < min(w[steps] for w in warps)
    # Random: a seeded order in which some warp gets at least two collectives ahead of
    # another, yet not always one warp to the end before the next.
    order = sorted((t, w) for w, ticks in enumerate(runs["random"]) for t in ticks[:steps])
    done = [0] * 4
    lead = 0
    for _, w in order:
        done[w] += 1
        lead = max(lead, max(done) - min(done))
    assert lead >= 2
    assert runs["random"] not in (runs["forward"], runs["reverse"])

