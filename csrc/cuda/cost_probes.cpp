// Tiny kernels whose costs are known by hand, for tests/test_emu_cost.py:
// the counters of emu_cost.cpp must equal the hand calculation on each.
// Compiled into the emulated GPU only, instrumented like the kernels (and so
// outside namespace mixkit::emu, which the instrumentation leaves out), run
// through _core.emu_cost_probe(name, variant).
//
//   copy        out[i] = in[variant * i], float, 256 threads a block: variant
//               (stride) 1, 2, 32
//   transpose   a 32 x 32 float tile through shared memory, written by rows
//               and read by columns; variant 0 unpadded ([32][32]), 1 padded
//               ([32][33])
//   ldmatrix    ldmatrix.x4 of a 16-row x 64-byte bf16 tile; variant 0 plain
//               rows, 1 with flash::swz<4>'s XOR swizzle (warp 32)
//   wgmma       one m64n64k16 SS wgmma of a warpgroup, both operands K-major
//               [64][64] tiles in the 128-byte swizzle; variant 1 plants the
//               emulator's "swizzle not applied" error (mutation 13), so the
//               same bytes are read as plain 128-byte rows (warp 32)
//   mfma_lds    the MFMA kernels' operand read: each lane of a wavefront
//               reads 16 bytes, lane l row l % 32 at element 8 (l / 32), from
//               a [32][64 + pad] bf16 tile; variant 0 pad 0, 1 pad 8 (the
//               kernels' layout) (warp 64)
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/compat.cuh"
#include "cuda/emu_cost.h"
#include "cuda/flash_attn.cuh"
#if MIXKIT_WARP_SIZE == 32
#include "cuda/mma_sm80.cuh"
#include "cuda/wgmma_sm90.cuh"
#else
#include "cuda/mfma.cuh"
#endif

namespace mixkit {
namespace cost_probes {

__global__ void copy_kernel(const float* in, float* out, int stride) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[int64_t(i) * stride];
}

template <int PITCH>
__global__ void transpose_kernel(const float* in, float* out) {
  __shared__ float tile[32][PITCH];
  tile[threadIdx.y][threadIdx.x] = in[threadIdx.y * 32 + threadIdx.x];
  __syncthreads();
  out[threadIdx.y * 32 + threadIdx.x] = tile[threadIdx.x][threadIdx.y];
}

#if MIXKIT_WARP_SIZE == 32
template <bool SWIZZLE>
__global__ void ldmatrix_kernel(uint32_t* out) {
  MIXKIT_DYNAMIC_SMEM(smem, 128);
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem);
  for (int i = threadIdx.x; i < 16 * 32; i += 32) tile[i] = uint16_t(i);
  __syncthreads();
  // The x4 form of flash_attn_fwd_sm80.cuh's Q read: lanes 0-15 give rows 0-15
  // at chunk 0, lanes 16-31 the same rows at chunk 1.
  const int lane = threadIdx.x, r = lane & 15, c = lane >> 4;
  const int off = SWIZZLE ? flash::swz<4>(r, c) : r * 32 + c * 8;
  uint32_t frag[4];
  sm80::ldmatrix_x4(frag, tile + off);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = frag[i];
}

__global__ void wgmma_kernel(float* out) {
  MIXKIT_DYNAMIC_SMEM(smem_raw, 16);
  unsigned char* smem = smem_raw + ((1024u - (sm80::smem_addr(smem_raw) & 1023u)) & 1023u);
  for (int i = threadIdx.x; i < 2 * 64 * 64; i += 128) reinterpret_cast<uint16_t*>(smem)[i] = 0x3f80;  // bf16 1.0
  sm90::fence_proxy_async();  // generic-proxy stores, read by wgmma (async proxy)
  __syncthreads();
  const uint32_t a = sm80::smem_addr(smem), b = a + 64 * 128;
  float d[32];
  sm90::wgmma_fence();
  sm90::wgmma_ss<bf16, 64>(d, sm90::smem_desc(a, 16, 1024), sm90::smem_desc(b, 16, 1024), 0);
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) out[threadIdx.x * 32 + i] = d[i];
}
#endif

#if MIXKIT_WARP_SIZE == 64
// The kernels' operand fragment: two 4-element steps of one 16-byte read.
struct alignas(16) Frag {
  mfma::short4_t step[2];
};

template <int PAD>
__global__ void mfma_lds_kernel(uint16_t* out) {
  __shared__ __attribute__((aligned(16))) uint16_t tile[32 * (64 + PAD)];
  for (int i = threadIdx.x; i < 32 * (64 + PAD); i += blockDim.x) tile[i] = uint16_t(i);
  __syncthreads();
  const int lane = threadIdx.x;
  const Frag f = *reinterpret_cast<const Frag*>(tile + (lane % 32) * (64 + PAD) + 8 * (lane / 32));
  reinterpret_cast<mfma::short4_t*>(out)[2 * lane] = f.step[0];
  reinterpret_cast<mfma::short4_t*>(out)[2 * lane + 1] = f.step[1];
}
#endif

}  // namespace cost_probes

namespace emu {
namespace cost {
namespace {

using namespace cost_probes;

// Global buffers on 256-byte boundaries, so a 128-byte request is 4 sectors.
struct Buffer {
  explicit Buffer(size_t floats) : p(static_cast<float*>(std::aligned_alloc(256, floats * 4))) {
    if (!p) throw std::bad_alloc();
    std::fill(p, p + floats, 1.f);
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* p;
};

}  // namespace

std::string probe(const std::string& name, int variant) {
  Buffer in(32 * 256), out(32 * 256);
  float* fin = in.p;
  float* fout = out.p;
  start();
  try {
    if (name == "copy") {
      gpu_launch(copy_kernel, dim3(1), dim3(256), 0, nullptr, fin, fout, variant);
    } else if (name == "transpose") {
      if (variant) gpu_launch(transpose_kernel<33>, dim3(1), dim3(32, 32), 0, nullptr, fin, fout);
      else gpu_launch(transpose_kernel<32>, dim3(1), dim3(32, 32), 0, nullptr, fin, fout);
#if MIXKIT_WARP_SIZE == 32
    } else if (name == "ldmatrix") {
      std::vector<uint32_t> out(32 * 4);
      if (variant) gpu_launch(ldmatrix_kernel<true>, dim3(1), dim3(32), 16 * 64, nullptr, out.data());
      else gpu_launch(ldmatrix_kernel<false>, dim3(1), dim3(32), 16 * 64, nullptr, out.data());
    } else if (name == "wgmma") {
      const int saved = mutation();
      mutation() = variant ? 13 : 0;
      try {
        gpu_launch(wgmma_kernel, dim3(1), dim3(128), 2 * 64 * 128 + 1024, nullptr, fout);
      } catch (...) {
        mutation() = saved;
        throw;
      }
      mutation() = saved;
#else
    } else if (name == "mfma_lds") {
      std::vector<uint16_t> out(64 * 8);
      if (variant) gpu_launch(mfma_lds_kernel<8>, dim3(1), dim3(64), 0, nullptr, out.data());
      else gpu_launch(mfma_lds_kernel<0>, dim3(1), dim3(64), 0, nullptr, out.data());
#endif
    } else {
      throw std::invalid_argument("unknown cost probe '" + name + "' at warp " + std::to_string(kWarpSize));
    }
  } catch (...) {
    stop();
    throw;
  }
  return stop();
}

}  // namespace cost
}  // namespace emu
}  // namespace mixkit
