// CDNA2's matrix-core instructions on the emulated GPU (MIXKIT_EMULATE with
// a 64-lane wavefront), with their architectural semantics:
//
//   v_mfma_f32_32x32x8bf16_1k, v_mfma_f32_32x32x8f16 (cbsz = abid = blgp = 0)
//
// D (32x32, f32) = A (32x8) @ B (8x32) + C (32x32, f32), one instruction a
// wavefront. The operand layout, as AMD's CDNA2 ISA guide and its Matrix
// Instruction Calculator give it for these two instructions (one block,
// K = 8 split over the two lane halves):
//   A[i][k]  is item k % 4 of lane i + 32 * (k / 4)      (i = 0..31, k = 0..7)
//   B[k][j]  is item k % 4 of lane j + 32 * (k / 4)      (j = 0..31)
//   D[i][j]  is register 4 * (i / 8) + i % 4 of lane j + 32 * ((i / 4) % 2)
// (item e of a lane's 4-wide 16-bit operand sits in bits 16 (e % 2) of VGPR
// e / 2; C is laid out as D). The model below keeps that matrix-to-lane form:
// it enumerates the matrix elements and asks where each lives, and never uses
// mfma.cuh's lane-to-matrix functions, so tests/test_emu_mfma.py can check
// those against it.
//
// Numerics, as on MI200 (gfx90a): 16-bit inputs, products exact in f32,
// summed in k order onto the f32 accumulator; subnormal 16-bit inputs and
// subnormal f32 results are flushed to zero (MIOpen's "MI200 MFMA behavior
// specifics"; mfma.cuh has the consequences for the kernels).
//
// Warp-collective like emu_sm80.cuh: every lane posts its A, B and C to its
// slot of the wavefront's exchange area, the wavefront synchronises, each lane
// computes its 16 results from the others' operands, and synchronises again
// before the area can be reused.
//
// Included by mfma.cuh in MIXKIT_EMULATE builds, in place of the clang vector
// types and the __builtin_amdgcn_mfma_* builtins that g++ does not have.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/dtype.h"
#include "cuda/emu.cuh"

// Passing 64-byte vectors by value changes the ABI without AVX-512; these are
// internal to the emulated build, so the note is noise.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mixkit {
namespace mfma {

// The operand and accumulator vectors of the builtins, as GCC vectors (same
// size, element type and subscripting as clang's ext_vector_type).
typedef short short4_t __attribute__((vector_size(8)));
typedef _Float16 half4_t __attribute__((vector_size(8)));
typedef float float16_t __attribute__((vector_size(64)));

}  // namespace mfma

namespace emu {
namespace mfma {

constexpr int kWave = 64;  // the instruction is defined over 64 lanes

// Where the ISA puts each matrix element (the form above).
struct Place {
  int lane, item;
};
constexpr Place a_place(int i, int k) { return {i + 32 * (k / 4), k % 4}; }
constexpr Place b_place(int k, int j) { return {j + 32 * (k / 4), k % 4}; }
constexpr Place d_place(int i, int j) { return {j + 32 * ((i / 4) % 2), 4 * (i / 8) + i % 4}; }

// The runtime mutation codes of this file (emu.cuh lists them):
//   20  A: the two lane halves swapped (lane l supplies row/k of lane l ^ 32)
//   21  C/D: registers 4q .. 4q + 3 in reverse row order
//   22  B: the 4 items of a lane in reverse k order
inline Place a_src(int i, int k, int mut) {
  Place p = a_place(i, k);
  if (mut == 20) p.lane ^= 32;
  return p;
}
inline Place b_src(int k, int j, int mut) {
  Place p = b_place(k, j);
  if (mut == 22) p.item = 3 - p.item;
  return p;
}
inline Place d_dst(int i, int j, int mut) {
  Place p = d_place(i, j);
  if (mut == 21) p.item = 4 * (p.item / 4) + 3 - p.item % 4;
  return p;
}

// The D elements (i, j) each lane holds, found once by asking d_place where
// every element of the 32x32 matrix lives.
struct Owned {
  int8_t i[kWave][16], j[kWave][16];
  int8_t count[kWave] = {};
};
inline const Owned& owned() {
  static const Owned table = [] {
    Owned t;
    for (int i = 0; i < 32; ++i)
      for (int j = 0; j < 32; ++j) {
        const Place d = d_place(i, j);
        const int n = t.count[d.lane]++;
        if (n < 16) t.i[d.lane][n] = int8_t(i), t.j[d.lane][n] = int8_t(j);
      }
    return t;
  }();
  return table;
}

// 16-bit operand bits -> float, with MI200's flush of subnormal inputs.
template <class T>
inline float input(uint16_t bits) {
  const uint16_t exponent = std::is_same<T, f16>::value ? 0x7c00u : 0x7f80u;
  return (bits & exponent) == 0 ? 0.f * to_f32(T{bits}) : to_f32(T{bits});  // +-0 for zero and subnormals
}
inline float flush(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? 0.f * x : x; }

// What a lane posts: its A and B items as bits, then its 16 C registers.
struct Post {
  uint16_t a[4], b[4];
  float c[16];
};
static_assert(sizeof(Post) <= kScratchBytes, "a lane's operands fit its slot");

// One v_mfma_f32_32x32x8 (T = bf16: the bf16_1k form; T = f16) of the
// calling lane: a, b its operand items as 16-bit patterns, acc its C/D.
template <class T>
MIXKIT_EMU_OUTLINE inline void mfma_32x32x8(const uint16_t (&a)[4], const uint16_t (&b)[4], float (&acc)[16]) {
  trace::Quiet quiet;
  trace::instruction(std::is_same<T, f16>::value ? "v_mfma_f32_32x32x8f16" : "v_mfma_f32_32x32x8bf16_1k", trace::Site());
  unsigned char* scratch = group_scratch(kWave);
  const int l = linear_tid() % kWave;
  if (block_dim().x * block_dim().y * block_dim().z % kWave)
    fail("v_mfma needs whole wavefronts: the block size must be a multiple of 64");
  Post mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, acc, sizeof(mine.c));
  std::memcpy(scratch + l * kScratchBytes, &mine, sizeof(mine));
  group_sync(kWave, "v_mfma_f32_32x32x8");
  auto post = [&](int lane) -> const Post& { return *reinterpret_cast<const Post*>(scratch + lane * kScratchBytes); };
  const Owned& own = owned();
  if (own.count[l] != 16) fail("v_mfma model: a lane must own 16 accumulators");
  const int mut = mutation();
  float out[16];
  for (int n = 0; n < 16; ++n) {
    const int i = own.i[l][n], j = own.j[l][n];
    const Place c = d_place(i, j);  // C is read in the ISA's layout
    float sum = post(c.lane).c[c.item];
    for (int k = 0; k < 8; ++k) {
      const Place pa = a_src(i, k, mut), pb = b_src(k, j, mut);
      sum += input<T>(post(pa.lane).a[pa.item]) * input<T>(post(pb.lane).b[pb.item]);
    }
    out[d_dst(i, j, mut).item] = flush(sum);
  }
  group_sync(kWave, "v_mfma_f32_32x32x8");
  std::memcpy(acc, out, sizeof(out));
}

}  // namespace mfma
}  // namespace emu

namespace mfma {

// The builtins' signatures (__builtin_amdgcn_mfma_f32_32x32x8{bf16_1k,f16}):
// (A, B, C, cbsz, abid, blgp).
inline float16_t emu_mfma(const uint16_t (&a)[4], const uint16_t (&b)[4], float16_t acc, bool f16_inputs) {
  float c[16];
  std::memcpy(c, &acc, sizeof(c));
  if (f16_inputs) emu::mfma::mfma_32x32x8<f16>(a, b, c);
  else emu::mfma::mfma_32x32x8<bf16>(a, b, c);
  std::memcpy(&acc, c, sizeof(c));
  return acc;
}
inline float16_t emu_mfma_f32_32x32x8bf16_1k(short4_t a, short4_t b, float16_t acc, int cbsz, int abid, int blgp) {
  if (cbsz || abid || blgp) emu::fail("v_mfma model: only cbsz = abid = blgp = 0");
  uint16_t ua[4], ub[4];
  std::memcpy(ua, &a, 8);
  std::memcpy(ub, &b, 8);
  return emu_mfma(ua, ub, acc, false);
}
inline float16_t emu_mfma_f32_32x32x8f16(half4_t a, half4_t b, float16_t acc, int cbsz, int abid, int blgp) {
  if (cbsz || abid || blgp) emu::fail("v_mfma model: only cbsz = abid = blgp = 0");
  uint16_t ua[4], ub[4];
  std::memcpy(ua, &a, 8);
  std::memcpy(ub, &b, 8);
  return emu_mfma(ua, ub, acc, true);
}

}  // namespace mfma
}  // namespace mixkit

// HIP's global_atomic_add_f32 form of atomicAdd.
inline void unsafeAtomicAdd(float* p, float v, const mixkit::emu::trace::Site& site = {}) {
  mixkit::emu::atomic_add(p, v, site);
}
