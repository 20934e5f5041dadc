// Operand and accumulator layouts of the CDNA matrix-core instructions that
// mixkit's HIP kernels use, and thin wrappers around their builtins.
//
//   v_mfma_f32_32x32x8bf16_1k   (__builtin_amdgcn_mfma_f32_32x32x8bf16_1k)
//   v_mfma_f32_32x32x8f16       (__builtin_amdgcn_mfma_f32_32x32x8f16)
//
// One instruction is a whole wavefront of 64 lanes computing
// D (32x32, f32) = A (32x8) @ B (8x32) + C (32x32, f32). Both have the same
// register layout. Source: AMD's Matrix Instruction Calculator
// (github.com/ROCm/amd_matrix_instruction_calculator, `-a cdna2 -i
// v_mfma_f32_32x32x8bf16_1k -d`, likewise for ..f16); composable_kernel's
// xdlops description of the instruction (4 groups of 4 output rows, 2 input
// blocks of 32 lanes) and IREE's 32x32x8 layouts agree:
//   A[i][k]: lane 32 * floor(k / 4) + i, element k % 4 of the lane's 4-wide
//            operand (2 VGPRs, element 2v + h in bits 16h.. of VGPR v);
//   B[k][j]: lane 32 * floor(k / 4) + j, element k % 4;
//   D[i][j]: lane 32 * floor(i / 4) % 64 + j,
//            register 4 * floor(i / 8) + i % 4 of the lane's 16.
// So a lane supplies 4 consecutive k of one row of A and 4 consecutive k of
// one column of B (lanes 0-31: k 0-3, lanes 32-63: k 4-7), and owns one
// column of D: rows 8q + 4 * (lane / 32) + 0..3 in registers 4q + 0..3.
//
// Numerics (MIOpen's "MI200 MFMA behavior specifics"): on MI200 the f16,
// bf16 and bf16_1k MFMAs flush subnormal inputs and outputs to zero. For
// fp16 operands that drops |x| < 6.1e-5: for inputs of order 1 far below
// the fp16 rounding of the result, but visible to a test with tiny fp16
// inputs (the CPU reference keeps them). bf16 subnormals (< 1.2e-38) and
// f32 subnormal sums hardly matter.
//
// The functions below go from (lane, element/register) to matrix coordinates,
// the direction a kernel needs. They are constexpr host+device code, so
// tests/test_mfma_layout.py checks them on the CPU (compiled with g++ as
// plain C++) against a model written from the element-to-register form above.
//
// NVIDIA has no MFMA: under nvcc or a plain C++ compiler only the constexpr
// layout functions exist. The emulated GPU at warp 64 (MIXKIT_EMULATE,
// MIXKIT_AMD) gets GCC vector types and a wavefront-collective model of the
// instructions from emu_mfma.cuh. The builtin wrappers exist in HIP compiles and
// emit the instruction in device passes for gfx90a and gfx94x (where the
// bf16 one is spelled v_mfma_f32_32x32x8_bf16); other AMD targets are a
// compile error rather than a silent fallback.
#pragma once

#include "common/dtype.h"

#if defined(__HIPCC__) || defined(__CUDACC__)
#define MIXKIT_MFMA_HD __host__ __device__ constexpr
#else
#define MIXKIT_MFMA_HD constexpr
#endif

namespace mixkit {
namespace mfma {

// ---- the 32x32x8 instruction ------------------------------------------------
constexpr int kWave = 64;     // lanes per wavefront: the instruction needs all 64
constexpr int kM = 32, kN = 32, kK = 8;
constexpr int kOperandElems = 4;  // 16-bit A (or B) values per lane
constexpr int kAccRegs = 16;      // f32 accumulators per lane

// A (32 x 8): element e (0-3) of lane `lane` holds A[a_row][a_k].
MIXKIT_MFMA_HD int a_row(int lane, int /*e*/) { return lane % 32; }
MIXKIT_MFMA_HD int a_k(int lane, int e) { return 4 * (lane / 32) + e; }

// B (8 x 32): element e of lane `lane` holds B[b_k][b_col].
MIXKIT_MFMA_HD int b_k(int lane, int e) { return 4 * (lane / 32) + e; }
MIXKIT_MFMA_HD int b_col(int lane, int /*e*/) { return lane % 32; }

// C/D (32 x 32): accumulator register r (0-15) of lane `lane` holds D[d_row][d_col].
MIXKIT_MFMA_HD int d_row(int lane, int r) { return 8 * (r / 4) + 4 * (lane / 32) + r % 4; }
MIXKIT_MFMA_HD int d_col(int lane, int /*r*/) { return lane % 32; }

// ---- two instructions per 16-byte read ------------------------------------
// A sum over k does not care which physical k feeds which instruction k, as
// long as A and B agree. So a lane reads 8 consecutive 16-bit values (one
// 16-byte LDS read) of its A row and of its B column, and feeds elements 0-3
// to instruction `step` 0 and 4-7 to step 1: over a 16-wide k chunk, lane
// half h = lane / 32 covers physical k 8h .. 8h + 7. This halves the LDS
// reads against one 8-byte read per instruction.
constexpr int kPairK = 2 * kK;  // physical k covered by the two instructions

// Physical k (0-15, within the chunk) fed to instruction `step` (0, 1) as
// element e by lane `lane`, for A and B alike.
MIXKIT_MFMA_HD int pair_k(int lane, int step, int e) { return 8 * (lane / 32) + 4 * step + e; }
// Which element of the lane's 8-value read that is.
MIXKIT_MFMA_HD int pair_elem(int step, int e) { return 4 * step + e; }

// ---- builtin wrappers ---------------------------------------------------------
// Declared in both passes of a HIP compile (the host pass parses kernel
// bodies too); only the device pass for gfx90a / gfx94x emits the instruction.
#if MIXKIT_AMD
#if defined(__HIP_DEVICE_COMPILE__) && !(defined(__gfx90a__) || defined(__gfx940__) || defined(__gfx941__) || \
                                         defined(__gfx942__))
#error "mixkit's MFMA kernels need gfx90a or gfx94x (set MIXKIT_HIP_ARCHS accordingly)"
#endif

#if defined(MIXKIT_EMULATE)
}  // namespace mfma
}  // namespace mixkit
#include "cuda/emu_mfma.cuh"  // the same vector types (GCC's) and a model of the instructions
namespace mixkit {
namespace mfma {
#else
typedef short short4_t __attribute__((ext_vector_type(4)));
typedef _Float16 half4_t __attribute__((ext_vector_type(4)));
typedef float float16_t __attribute__((ext_vector_type(16)));
#endif

// The operand as the builtin takes it: 4 bf16 bit patterns as shorts, or 4 halves.
template <class T> struct Operand;
template <> struct Operand<bf16> { using type = short4_t; };
template <> struct Operand<f16> { using type = half4_t; };

// acc + A @ B for one 32x32x8 step, the operands in the layout above.
// cbsz = abid = blgp = 0: no A broadcast, no lane permutation of B.
__device__ __forceinline__ float16_t mma_32x32x8(short4_t a, short4_t b, float16_t acc) {
#if defined(MIXKIT_EMULATE)
  return emu_mfma_f32_32x32x8bf16_1k(a, b, acc, 0, 0, 0);
#elif defined(__HIP_DEVICE_COMPILE__)
  return __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(a, b, acc, 0, 0, 0);
#else
  return acc;
#endif
}
__device__ __forceinline__ float16_t mma_32x32x8(half4_t a, half4_t b, float16_t acc) {
#if defined(MIXKIT_EMULATE)
  return emu_mfma_f32_32x32x8f16(a, b, acc, 0, 0, 0);
#elif defined(__HIP_DEVICE_COMPILE__)
  return __builtin_amdgcn_mfma_f32_32x32x8f16(a, b, acc, 0, 0, 0);
#else
  return acc;
#endif
}
#endif  // MIXKIT_AMD

}  // namespace mfma
}  // namespace mixkit
