// Ampere's warp-level tensor-core instructions on the emulated GPU, with
// their architectural semantics (PTX ISA 8.x: "cp.async", "ldmatrix",
// "Matrix fragments for mma.m16n8k16"). Each is warp-collective: every lane
// posts its operands to the warp's exchange area, the warp synchronises, and
// each lane computes its own result from the others' operands, so a lane
// holding the wrong value, or reading from the wrong lane, changes the
// answer exactly as it would on the hardware.
//
// Included by mma_sm80.cuh and flash_attn_bwd_sm80.cuh in MIXKIT_EMULATE
// builds, in place of their inline PTX. tests/test_emu_sm80.py checks
// each one against a simple model of the instruction.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "common/dtype.h"
#include "cuda/emu.cuh"

namespace mixkit {
namespace emu {
namespace sm80 {

constexpr int kWarp = 32;  // these instructions are defined over 32 lanes

inline int lane() { return linear_tid() % kWarp; }

// ---- cp.async -----------------------------------------------------------------
// cp.async.cg.shared.global [dst], [src], 16, src_bytes (0 or 16).
MIXKIT_EMU_OUTLINE inline void cp_async16(void* dst, const void* src, int src_bytes, const trace::Site& site = {}) {
  trace::Quiet quiet;
  if (reinterpret_cast<uintptr_t>(dst) % 16 || (src_bytes && reinterpret_cast<uintptr_t>(src) % 16))
    fail("cp.async.cg of 16 bytes needs 16-byte aligned addresses");
  trace::instruction("cp.async.cg.shared.global", site);
  trace::model_access(trace::Kind::cp_async_src, src, uint32_t(src_bytes), site);
  if (mutation() == 4 && src_bytes == 0) return;  // the zero-fill is lost: stale data stays
  trace::model_access(trace::Kind::cp_async_issue, dst, 16, site);
  async_queue().copies.push_back(AsyncCopy{dst, src, src_bytes, site});
}
MIXKIT_EMU_OUTLINE inline void cp_async_commit() {
  trace::Quiet quiet;
  AsyncQueue& q = async_queue();
  q.group_ends.push_back(q.copies.size());
}
// cp.async.wait_group n: every committed group but the newest n is complete.
MIXKIT_EMU_OUTLINE inline void cp_async_wait(int n) {
  trace::Quiet quiet;
  AsyncQueue& q = async_queue();
  const int groups = int(q.group_ends.size());
  if (groups <= n) return;
  const size_t done = q.group_ends[size_t(groups - n - 1)];
  for (size_t i = 0; i < done; ++i) {
    const AsyncCopy& c = q.copies[i];
    unsigned char tmp[16] = {};
    if (c.bytes) std::memcpy(tmp, c.src, size_t(c.bytes));
    std::memcpy(c.dst, tmp, 16);
    trace::model_access(trace::Kind::cp_async_land, c.dst, 16, c.site);
  }
  q.copies.erase(q.copies.begin(), q.copies.begin() + long(done));
  q.group_ends.erase(q.group_ends.begin(), q.group_ends.begin() + (groups - n));
  for (size_t& e : q.group_ends) e -= done;
}

// ---- ldmatrix -------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: lanes 8i..8i+7 give the
// row addresses of 8x8 matrix i (16 bytes each); register i of lane l
// receives matrix i's elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1),
// or with .trans those of the transposed matrix.
template <int N>
MIXKIT_EMU_OUTLINE inline void ldmatrix(uint32_t (&r)[N], const void* row_addr, bool trans, const trace::Site& site = {}) {
  trace::Quiet quiet;
  unsigned char* scratch = group_scratch(kWarp);
  const int l = lane();
  if (l < 8 * N && reinterpret_cast<uintptr_t>(row_addr) % 16) fail("ldmatrix row addresses must be 16-byte aligned");
  std::memcpy(scratch + l * kScratchBytes, &row_addr, sizeof(row_addr));
  group_sync(kWarp, trans ? "ldmatrix.trans" : "ldmatrix");
  // The rows are read now, each by the lane that gave its address.
  trace::instruction(N == 4 ? (trans ? "ldmatrix.x4.trans" : "ldmatrix.x4") : (trans ? "ldmatrix.x2.trans" : "ldmatrix.x2"),
                     site);
  if (l < 8 * N) trace::model_access(trace::Kind::ldmatrix, row_addr, 16, site);
  auto row = [&](int m, int i) {
    const void* p;
    std::memcpy(&p, scratch + (8 * m + i) * kScratchBytes, sizeof(p));
    return static_cast<const uint16_t*>(p);
  };
  for (int m = 0; m < N; ++m) {
    uint16_t e[2];
    for (int j = 0; j < 2; ++j) {
      const int i = l / 4, c = 2 * (l % 4) + j;
      if (trans && mutation() == 3) e[j] = row(m, i)[c];
      else if (!trans && mutation() == 2) e[j] = row((m + 1) % N, l % 8)[c];
      else e[j] = trans ? row(m, c)[i] : row(m, i)[c];
    }
    r[m] = uint32_t(e[0]) | uint32_t(e[1]) << 16;
  }
  group_sync(kWarp, trans ? "ldmatrix.trans" : "ldmatrix");
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 ------------
// With g = lane / 4 and c = 2 (lane % 4):
//   A (16x16): a0 = (g, c..c+1)  a1 = (g+8, c..c+1)  a2 = (g, c+8..c+9)  a3 = (g+8, c+8..c+9)
//   B (16x8):  b0 = (k c..c+1, n g)  b1 = (k c+8..c+9, n g)
//   C/D:       d0, d1 = (g, c..c+1)  d2, d3 = (g+8, c..c+1)
// Products of 16-bit values are exact in float32; they are summed in k order
// onto the accumulator in float32.
template <class T>
MIXKIT_EMU_OUTLINE inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const trace::Site& site = {}) {
  trace::Quiet quiet;
  trace::instruction("mma.m16n8k16", site);
  unsigned char* scratch = group_scratch(kWarp);
  const int l = lane();
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  if (mutation() == 1) std::swap(mine[1], mine[2]);
  std::memcpy(scratch + l * kScratchBytes, mine, sizeof(mine));
  group_sync(kWarp, "mma.m16n8k16");
  auto reg = [&](int from, int r) {
    uint32_t v;
    std::memcpy(&v, scratch + from * kScratchBytes + 4 * r, 4);
    return v;
  };
  auto half = [](uint32_t v, int j) { return to_f32(T{uint16_t(j ? v >> 16 : v & 0xffffu)}); };
  auto A = [&](int row, int k) {  // the lane and register that hold A[row][k]
    const int r = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half(reg(4 * (row % 8) + (k % 8) / 2, r), k % 2);
  };
  auto B = [&](int k, int n) { return half(reg(4 * n + (k % 8) / 2, k >= 8 ? 5 : 4), k % 2); };
  const int g = l / 4, c = 2 * (l % 4);
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = c + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = acc;
  }
  group_sync(kWarp, "mma.m16n8k16");
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// cvt.rn.{bf16,f16}x2.f32: two floats rounded to nearest even, `lo` in the
// low half.
template <class T>
inline uint32_t pack2(float lo, float hi) {
  return uint32_t(from_f32<T>(lo).bits) | uint32_t(from_f32<T>(hi).bits) << 16;
}

}  // namespace sm80
}  // namespace emu
}  // namespace mixkit
