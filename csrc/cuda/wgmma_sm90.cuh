// Hopper warpgroup MMA building blocks shared by the sm_90a kernels (flash
// attention forward, grouped GEMM): shared-memory matrix descriptors for the
// 128-byte swizzle, wgmma fence/commit/wait, and wgmma.mma_async m64nNk16
// with float32 accumulators, A from shared memory (SS) or registers (RS).
// Inline PTX for sm_90a only: sm_90 without the "a" lacks wgmma.
//
// Fragment layouts (PTX ISA, "Register Fragments" for wgmma .m64nNk16), warp w
// of the warpgroup owning rows 16w .. 16w + 15, g = lane / 4, c = 2 * (lane % 4):
//   D (f32, N/2 regs):  d[4i + 0, 1] = (g,     8i + c + {0, 1})
//                       d[4i + 2, 3] = (g + 8, 8i + c + {0, 1})
//   A (16-bit, 4 regs): a0 = (g, c..c+1)  a1 = (g+8, c..c+1)  a2 = (g, c+8..)  a3 = (g+8, c+8..)
// i.e. per warp the mma.m16n8k16 layouts of mma_sm80.cuh, so accumulator
// chunks 2k and 2k + 1, packed, are the A fragment of k = 16k .. 16k + 15
// (how attention feeds P to P V without shared memory).
//
// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"):
// bits 0-13 start address >> 4, 16-29 leading-dimension byte offset >> 4,
// 32-45 stride-dimension byte offset >> 4, 49-51 base offset (0: every
// pattern starts on a 1024-byte boundary in our kernels), 62-63 swizzle
// (1 = 128 B). Canonical 128B-swizzle layouts (same section), T = 8 16-bit
// elements:
//   K-major  ((8, m), (T, 2k)) : ((8T, SBO), (1, T))    LBO unused ("assumed 1")
//   MN-major ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))
// Tiles stored as column blocks of [rows][64 elements] (128-byte rows, chunk
// c of row r at chunk c ^ (r % 8)) give SBO = 1024 (8 rows of 128 B) for
// both; MN-major, LBO = the column-block stride (rows * 128 B), which steps
// the M/N index by 64. A K step of 16 inside a 128-byte row (K-major)
// advances the start address by 32 B: the swizzle XORs address bits 4-6 with
// bits 7-9, so the hardware finds chunk (2 ks + j) ^ (r % 8) exactly where
// the loads put it. MN-major, a K step of 16 is 16 rows: 2048 B.
// (Checked against a CPU model of these layouts: /tmp/sm90/emu_lib.py for
// attention, the grouped GEMM's emulator for both B layouts.)
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "wgmma_sm90.cuh uses wgmma: compile it for sm_90a only"
#endif

namespace mixkit {
namespace sm90 {

__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t(1) << 62) | (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         uint64_t((addr & 0x3FFFF) >> 4);
}

}  // namespace sm90
}  // namespace mixkit

#if defined(MIXKIT_EMULATE)
// The emulated GPU: emu_sm90.cuh models the same instructions.
#include "cuda/emu_sm90.cuh"
#else
namespace mixkit {
namespace sm90 {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes (cp.async, st.shared) become visible to the async
// proxy that wgmma reads shared memory through only after this fence.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins accumulators in place: the compiler may not move their reads or
// writes across it, so no ordinary instruction touches them while a wgmma
// that owns them is in flight (ptxas would otherwise serialise the wgmmas).
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

#define MIXKIT_SM90_WGMMA_SS_N64(TY, TB) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
      "%32, %33, p, 1, 1, 0, " TB ";\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),\
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),\
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),\
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "l"(da), "l"(db), "r"(scale_d))

#define MIXKIT_SM90_WGMMA_RS_N64(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),\
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),\
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),\
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))

#define MIXKIT_SM90_WGMMA_SS_N128(TY, TB) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
      "%64, %65, p, 1, 1, 0, " TB ";\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),\
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),\
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),\
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),\
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),\
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),\
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),\
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "l"(da), "l"(db), "r"(scale_d))

#define MIXKIT_SM90_WGMMA_RS_N128(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),\
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),\
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),\
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),\
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),\
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),\
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),\
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))


// d (+)= A B over k16; scale_d = 0 overwrites d. SS: A and B from shared
// memory, A K-major; B K-major, or MN-major with MN_MAJOR_B (the
// instruction's transpose-B bit). RS: A from registers, B MN-major.
template <class T, int N, bool MN_MAJOR_B = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma_ss: N is 64 or 128");
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  if constexpr (N == 64) {
    if constexpr (kBf16) {
      if constexpr (MN_MAJOR_B) MIXKIT_SM90_WGMMA_SS_N64("bf16", "1");
      else MIXKIT_SM90_WGMMA_SS_N64("bf16", "0");
    } else {
      if constexpr (MN_MAJOR_B) MIXKIT_SM90_WGMMA_SS_N64("f16", "1");
      else MIXKIT_SM90_WGMMA_SS_N64("f16", "0");
    }
  } else {
    if constexpr (kBf16) {
      if constexpr (MN_MAJOR_B) MIXKIT_SM90_WGMMA_SS_N128("bf16", "1");
      else MIXKIT_SM90_WGMMA_SS_N128("bf16", "0");
    } else {
      if constexpr (MN_MAJOR_B) MIXKIT_SM90_WGMMA_SS_N128("f16", "1");
      else MIXKIT_SM90_WGMMA_SS_N128("f16", "0");
    }
  }
}
template <class T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  if constexpr (N == 64) {
    if constexpr (kBf16) MIXKIT_SM90_WGMMA_RS_N64("bf16");
    else MIXKIT_SM90_WGMMA_RS_N64("f16");
  } else {
    if constexpr (kBf16) MIXKIT_SM90_WGMMA_RS_N128("bf16");
    else MIXKIT_SM90_WGMMA_RS_N128("f16");
  }
}

#undef MIXKIT_SM90_WGMMA_SS_N64
#undef MIXKIT_SM90_WGMMA_RS_N64
#undef MIXKIT_SM90_WGMMA_SS_N128
#undef MIXKIT_SM90_WGMMA_RS_N128

}  // namespace sm90
}  // namespace mixkit
#endif  // MIXKIT_EMULATE
