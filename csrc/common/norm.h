// How the GPU norm kernels (csrc/cuda/norm.cu) lay a row out over a block:
// host code only, shared with the binding so that tests can enumerate every
// configuration the kernels can be launched with (tests/test_norms.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/ops.h"

namespace mixkit {
namespace norm {

constexpr int kMaxThreads = 1024;
constexpr int kMinBlock = 128;

struct Config {
  int vec;    // elements per vector access
  int items;  // vectors each lane keeps in registers
  int tpr;    // lanes per row (blockDim.x)
  int rpb;    // rows per block (blockDim.y)
};

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Register budget: items * vec <= 32 floats per lane, so a row of up to 32768
// 16-bit or 16384 float32 elements stays in registers. Rows whose size or
// pointers do not allow 16-byte accesses take the scalar path (up to 16384).
// Narrow rows share a block along blockDim.y so that blocks keep at least
// 128 threads; a row wider than a warp then spans whole warps (tpr is a power
// of two), and the block-wide reduction gives each row its own slots.
inline Config config(int elem_bytes, int64_t cols, bool aligned) {
  int vec = 16 / elem_bytes;
  if (cols % vec != 0 || !aligned) vec = 1;
  const int64_t nvec = cols / vec;
  const int options_vec[3] = {1, 2, 4}, options_scalar[3] = {1, 4, 16};
  const int* options = vec > 1 ? options_vec : options_scalar;
  for (int o = 0; o < 3; ++o) {
    if (nvec <= int64_t(kMaxThreads) * options[o]) {
      Config c{vec, options[o], 0, 1};
      c.tpr = std::min(kMaxThreads, next_pow2((nvec + c.items - 1) / c.items));
      c.rpb = std::max(1, kMinBlock / c.tpr);
      return c;
    }
  }
  require(false, "hidden size " + std::to_string(cols) + " is too large for the GPU norm kernel (max " +
                     std::to_string(int64_t(kMaxThreads) * options[2] * vec) + " for this dtype and alignment)");
  return {};
}

// Whether row_sum() in norm.cu is correct when a block holds several rows
// that are each wider than a warp (it indexes its shared slots by row).
constexpr bool kMultiRowWideBlocks = true;

}  // namespace norm
}  // namespace mixkit
