"""The emulated GPU's model of v_mfma_f32_32x32x8{bf16_1k,f16} (csrc/cuda/emu_mfma.cuh).

A host C++ program runs the model over a block of two wavefronts (128 OS threads, a
condition-variable barrier per wavefront standing in for the emulator's scheduler) and
is checked against a numpy model written from AMD's CDNA2 description of the
instruction (ISA guide / Matrix Instruction Calculator, element -> lane form):
  A[i][k] -> lane i + 32 * (k // 4), item k % 4
  B[k][j] -> lane j + 32 * (k // 4), item k % 4
  D[i][j] -> lane j + 32 * ((i // 4) % 2), register 4 * (i // 8) + i % 4
with 16-bit inputs whose products are exact in float32, summed in k order onto the
float32 accumulator, subnormal 16-bit inputs and subnormal float32 results flushed to
zero (MI200). Lane-level inputs are random bit patterns, so every register of every
lane is checked, bit for bit.

The program also drives the model through mfma.cuh's own wrapper and its
(lane, register) -> matrix functions (a_row, a_k, b_k, b_col, d_row, d_col), which the
MFMA kernels use: the product must be A @ B + C, so those functions agree with the
ISA model. The runtime mutation codes 20-22 must each change the answer.
"""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_mfma_layout import _compiler  # the host C++ compiler, not hipcc/nvcc

SRC = Path(os.environ.get("MIXKIT_SOURCE_DIR", Path(__file__).resolve().parents[1])) / "csrc"

STUB_HIP = r"""
#pragma once
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
"""

PROGRAM = r"""
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#include "cuda/mfma.cuh"

// ---- a one-block runtime: an OS thread per lane, a barrier per group --------
namespace mixkit {
namespace emu {
namespace {
int g_threads = 0;
std::vector<unsigned char> g_scratch;
std::mutex g_mu;
std::condition_variable g_cv;
struct Barrier {
  int arrived = 0;
  long gen = 0;
  std::string tag;
};
std::vector<Barrier> g_bars;
thread_local int t_linear = -1;
thread_local Index3 t_idx{};
Index3 g_bdim{};
}  // namespace

Index3 thread_idx() { return t_idx; }
Index3 block_dim() { return g_bdim; }
int linear_tid() { return t_linear; }
// No memory-access hook here: the model's reports go nowhere.
namespace trace {
void model_access(Kind, const void*, uint32_t, const Site&) {}
void instruction(const char*, const Site&) {}
Quiet::Quiet() : was_(false) {}
Quiet::~Quiet() {}
}  // namespace trace
void group_sync(int group, const char* tag, int) {
  std::unique_lock<std::mutex> lock(g_mu);
  const int first = t_linear / group * group;
  const int members = std::min(g_threads, first + group) - first;
  Barrier& b = g_bars[size_t(t_linear / group)];
  if (b.arrived == 0) b.tag = tag;
  if (b.tag != tag) {
    std::fprintf(stderr, "lanes wait at different collectives\n");
    std::_Exit(3);
  }
  const long gen = b.gen;
  if (++b.arrived == members) {
    b.arrived = 0;
    ++b.gen;
    g_cv.notify_all();
    return;
  }
  g_cv.wait(lock, [&] { return b.gen != gen; });
}
unsigned char* group_scratch(int group) { return g_scratch.data() + size_t(t_linear / group * group) * kScratchBytes; }
void fail(const char* what) {
  std::fprintf(stderr, "%s\n", what);
  std::_Exit(3);
}
int& mutation() {
  static int m = 0;
  return m;
}
}  // namespace emu
}  // namespace mixkit

using namespace mixkit;

template <class F> void run_block(int threads, F body) {
  emu::g_threads = threads;
  emu::g_bdim = emu::Index3{unsigned(threads), 1, 1};
  emu::g_scratch.assign(size_t(threads) * emu::kScratchBytes, 0);
  emu::g_bars.assign(size_t(threads / 64 + 1), emu::Barrier{});
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i)
    pool.emplace_back([i, &body] {
      emu::t_linear = i;
      emu::t_idx = emu::Index3{unsigned(i), 0, 0};
      body(i);
    });
  for (auto& t : pool) t.join();
}

// argv: mode in out mutation threads.
//  lanes:  in = per case a u32 dtype (0 bf16, 1 f16), then per lane of `threads`
//          4 + 4 u16 (A, B items) and 16 f32 (C); out = per case and lane 16 f32 (D),
//          through the builtin's stand-in.
//  matrix: in = per case a u32 dtype, then per wavefront A (32x8), B (8x32) as u16
//          bits and C (32x32) f32, row-major; out = per case and wavefront D (32x32),
//          placed and read with mfma.cuh's functions, through mma_32x32x8.
int main(int argc, char** argv) {
  if (argc != 6) return 2;
  const std::string mode = argv[1];
  emu::mutation() = std::atoi(argv[4]);
  const int threads = std::atoi(argv[5]);
  const int waves = (threads + 63) / 64;
  std::ifstream f(argv[2], std::ios::binary);
  std::vector<unsigned char> in((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<unsigned char> out;
  size_t pos = 0;
  auto take = [&](void* dst, size_t n) {
    std::memcpy(dst, in.data() + pos, n);
    pos += n;
  };
  while (pos < in.size()) {
    uint32_t dtype;
    take(&dtype, 4);
    if (mode == "lanes") {
      std::vector<uint16_t> a(size_t(threads) * 4), b(size_t(threads) * 4);
      std::vector<float> c(size_t(threads) * 16), d(size_t(threads) * 16);
      for (int l = 0; l < threads; ++l) {
        take(&a[size_t(l) * 4], 8);
        take(&b[size_t(l) * 4], 8);
        take(&c[size_t(l) * 16], 64);
      }
      run_block(threads, [&](int l) {
        mfma::float16_t acc;
        std::memcpy(&acc, &c[size_t(l) * 16], 64);
        if (dtype == 0) {
          mfma::short4_t va, vb;
          std::memcpy(&va, &a[size_t(l) * 4], 8);
          std::memcpy(&vb, &b[size_t(l) * 4], 8);
          acc = mfma::emu_mfma_f32_32x32x8bf16_1k(va, vb, acc, 0, 0, 0);
        } else {
          mfma::half4_t va, vb;
          std::memcpy(&va, &a[size_t(l) * 4], 8);
          std::memcpy(&vb, &b[size_t(l) * 4], 8);
          acc = mfma::emu_mfma_f32_32x32x8f16(va, vb, acc, 0, 0, 0);
        }
        std::memcpy(&d[size_t(l) * 16], &acc, 64);
      });
      const auto* p = reinterpret_cast<const unsigned char*>(d.data());
      out.insert(out.end(), p, p + d.size() * 4);
    } else {
      std::vector<uint16_t> A(size_t(waves) * 256), B(size_t(waves) * 256);
      std::vector<float> C(size_t(waves) * 1024), D(size_t(waves) * 1024);
      for (int w = 0; w < waves; ++w) {
        take(&A[size_t(w) * 256], 512);
        take(&B[size_t(w) * 256], 512);
        take(&C[size_t(w) * 1024], 4096);
      }
      run_block(threads, [&](int t) {
        const int w = t / 64, l = t % 64;
        const uint16_t* Aw = &A[size_t(w) * 256];
        const uint16_t* Bw = &B[size_t(w) * 256];
        const float* Cw = &C[size_t(w) * 1024];
        uint16_t ua[4], ub[4];
        for (int e = 0; e < 4; ++e) {
          ua[e] = Aw[mfma::a_row(l, e) * 8 + mfma::a_k(l, e)];
          ub[e] = Bw[mfma::b_k(l, e) * 32 + mfma::b_col(l, e)];
        }
        mfma::float16_t acc;
        for (int r = 0; r < 16; ++r) acc[r] = Cw[mfma::d_row(l, r) * 32 + mfma::d_col(l, r)];
        if (dtype == 0) {
          mfma::short4_t va, vb;
          std::memcpy(&va, ua, 8);
          std::memcpy(&vb, ub, 8);
          acc = mfma::mma_32x32x8(va, vb, acc);
        } else {
          mfma::half4_t va, vb;
          std::memcpy(&va, ua, 8);
          std::memcpy(&vb, ub, 8);
          acc = mfma::mma_32x32x8(va, vb, acc);
        }
        for (int r = 0; r < 16; ++r) D[size_t(w) * 1024 + mfma::d_row(l, r) * 32 + mfma::d_col(l, r)] = acc[r];
      });
      const auto* p = reinterpret_cast<const unsigned char*>(D.data());
      out.insert(out.end(), p, p + D.size() * 4);
    }
  }
  std::ofstream(argv[3], std::ios::binary).write(reinterpret_cast<const char*>(out.data()), long(out.size()));
  return 0;
}
"""


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler to build the MFMA model program")
    if not (SRC / "cuda" / "emu_mfma.cuh").is_file():
        pytest.skip(f"mixkit sources not found at {SRC} (set MIXKIT_SOURCE_DIR)")
    d = tmp_path_factory.mktemp("emu_mfma")
    (d / "hip").mkdir()
    (d / "hip" / "hip_runtime.h").write_text(STUB_HIP)
    (d / "host.cpp").write_text(PROGRAM)
    r = subprocess.run([cxx, "-std=c++17", "-O1", "-pthread", "-Wall", "-Wextra", "-Werror", "-DMIXKIT_EMULATE",
                        "-DMIXKIT_WARP_SIZE=64", "-DMIXKIT_AMD=1", f"-I{d}", f"-I{SRC}", str(d / "host.cpp"), "-o",
                        str(d / "host")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return d / "host"


def _run(exe, mode, data, mutation=0, threads=128, tmp=None):
    src, dst = tmp / "in.bin", tmp / "out.bin"
    src.write_bytes(data)
    if dst.exists():
        dst.unlink()
    r = subprocess.run([str(exe), mode, str(src), str(dst), str(mutation), str(threads)], capture_output=True,
                       text=True, timeout=60)
    return r.returncode, (dst.read_bytes() if r.returncode == 0 else b""), r.stderr


# ---- the numpy model, from the ISA's element -> lane description -----------------------

_I, _K = np.meshgrid(np.arange(32), np.arange(8), indexing="ij")  # A (32 x 8)
_KB, _J = np.meshgrid(np.arange(8), np.arange(32), indexing="ij")  # B (8 x 32)
_DI, _DJ = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")  # C, D (32 x 32)
A_LANE, A_ITEM = _I + 32 * (_K // 4), _K % 4
B_LANE, B_ITEM = _J + 32 * (_KB // 4), _KB % 4
D_LANE, D_REG = _DJ + 32 * ((_DI // 4) % 2), 4 * (_DI // 8) + _DI % 4


def to_f32(bits, dtype):
    """16-bit patterns -> float32 values, subnormals (and zeros) flushed to +-0 as MI200 does."""
    bits = np.asarray(bits, np.uint16)
    if dtype == "bf16":
        x = (bits.astype(np.uint32) << 16).view(np.float32)
        sub = (bits & 0x7F80) == 0
    else:
        x = bits.view(np.float16).astype(np.float32)
        sub = (bits & 0x7C00) == 0
    return np.where(sub, np.float32(0) * x, x).astype(np.float32)


def flush32(x):
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0) * x, x).astype(np.float32)


def matmul_k_order(a, b, c):
    """c + a @ b in float32, one product at a time in k order (products of 16-bit values are exact)."""
    d = c.astype(np.float32).copy()
    for k in range(a.shape[1]):
        d = (d + np.outer(a[:, k], b[k, :]).astype(np.float32)).astype(np.float32)
    return flush32(d)


def model_lanes(a_items, b_items, c_regs, dtype):
    """One wavefront: a_items, b_items (64, 4) u16; c_regs (64, 16) f32 -> D registers (64, 16)."""
    A = to_f32(a_items[A_LANE, A_ITEM], dtype)
    B = to_f32(b_items[B_LANE, B_ITEM], dtype)
    C = c_regs[D_LANE, D_REG]
    D = matmul_k_order(A, B, C)
    out = np.full((64, 16), np.nan, np.float32)
    out[D_LANE, D_REG] = D
    assert not np.isnan(out).any()  # D's placement covers every register once
    return out


def random_bits(rng, shape, dtype, scale=1.0):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if dtype == "bf16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(np.float16).view(np.uint16)


def lanes_case(rng, dtype, threads=128, subnormals=False):
    a = random_bits(rng, (threads, 4), dtype)
    b = random_bits(rng, (threads, 4), dtype)
    c = rng.standard_normal((threads, 16)).astype(np.float32)
    if subnormals:  # some 16-bit subnormal inputs (flushed) and f32 subnormal C registers
        sub = np.uint16(0x0003)  # the third-smallest positive subnormal of either format
        a[::7, 1] = sub
        b[::5, 2] = sub | np.uint16(0x8000)
        c[3::64, :] = np.float32(1e-39)
    blob = np.uint32(0 if dtype == "bf16" else 1).tobytes()
    for l in range(threads):
        blob += a[l].tobytes() + b[l].tobytes() + c[l].tobytes()
    if threads % 64:
        return blob, None
    expect = np.concatenate([model_lanes(a[w:w + 64], b[w:w + 64], c[w:w + 64], dtype)
                             for w in range(0, threads, 64)])
    return blob, expect


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_lanes_match_the_isa_model(exe, tmp_path, dtype):
    rng = np.random.default_rng(23)
    blob, expect = b"", []
    for sub in (False, False, True):
        bl, ex = lanes_case(rng, dtype, subnormals=sub)
        blob += bl
        expect.append(ex)
    rc, out, err = _run(exe, "lanes", blob, tmp=tmp_path)
    assert rc == 0, err
    got = np.frombuffer(out, np.float32).reshape(len(expect), 128, 16)
    for g, e in zip(got, expect):
        np.testing.assert_array_equal(g.view(np.uint32), e.view(np.uint32))  # bit for bit, signed zeros included


def test_subnormals_are_flushed(exe, tmp_path):
    """f16 inputs of 2^-24 (subnormal) contribute nothing; 2^-14 (normal) do; an f32 subnormal result is 0."""
    for bits, want in ((0x0001, 0.0), (0x0400, 2.0 ** -14 * 8 * 1.0)):
        a = np.full((64, 4), bits, np.uint16)
        b = np.full((64, 4), 0x3C00, np.uint16)  # 1.0
        c = np.zeros((64, 16), np.float32)
        blob = np.uint32(1).tobytes() + b"".join(a[l].tobytes() + b[l].tobytes() + c[l].tobytes() for l in range(64))
        rc, out, err = _run(exe, "lanes", blob, threads=64, tmp=tmp_path)
        assert rc == 0, err
        np.testing.assert_array_equal(np.frombuffer(out, np.float32), np.float32(want))
    c = np.full((64, 16), 1e-39, np.float32)  # f32 subnormal accumulator, zero products
    zero = np.zeros((64, 4), np.uint16)
    blob = np.uint32(0).tobytes() + b"".join(zero[l].tobytes() * 2 + c[l].tobytes() for l in range(64))
    rc, out, err = _run(exe, "lanes", blob, threads=64, tmp=tmp_path)
    assert rc == 0, err
    np.testing.assert_array_equal(np.frombuffer(out, np.float32), 0.0)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_mfma_cuh_layout_agrees_with_the_model(exe, tmp_path, dtype):
    """mfma.cuh's mma_32x32x8 with its (lane, register) -> matrix functions computes C + A @ B."""
    rng = np.random.default_rng(5)
    blob, expect = np.uint32(0 if dtype == "bf16" else 1).tobytes(), []
    for _ in range(2):  # two wavefronts with different matrices
        A = random_bits(rng, (32, 8), dtype)
        B = random_bits(rng, (8, 32), dtype)
        C = rng.standard_normal((32, 32)).astype(np.float32)
        blob += A.tobytes() + B.tobytes() + C.tobytes()
        expect.append(matmul_k_order(to_f32(A, dtype), to_f32(B, dtype), C))
    rc, out, err = _run(exe, "matrix", blob, tmp=tmp_path)
    assert rc == 0, err
    got = np.frombuffer(out, np.float32).reshape(2, 32, 32)
    np.testing.assert_array_equal(got, np.stack(expect))


@pytest.mark.parametrize("mutation", [20, 21, 22])
def test_mutations_change_the_answer(exe, tmp_path, mutation):
    rng = np.random.default_rng(mutation)
    blob, expect = lanes_case(rng, "bf16")
    rc, out, err = _run(exe, "lanes", blob, mutation=mutation, tmp=tmp_path)
    assert rc == 0, err
    got = np.frombuffer(out, np.float32).reshape(128, 16)
    wrong = ~np.isclose(got, expect, rtol=1e-3, atol=1e-3)
    assert wrong.mean() > 0.5, f"mutation {mutation} left {1 - wrong.mean():.0%} of the registers right"


def test_partial_wavefront_is_an_error(exe, tmp_path):
    blob, _ = lanes_case(np.random.default_rng(0), "f16", threads=32)
    rc, _, err = _run(exe, "lanes", blob, threads=32, tmp=tmp_path)
    assert rc == 3 and "multiple of 64" in err
