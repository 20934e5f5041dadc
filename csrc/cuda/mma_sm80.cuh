// Ampere tensor-core building blocks shared by the sm_80 kernels (grouped
// GEMM, flash attention): cp.async, ldmatrix and mma.sync m16n8k16 with
// float32 accumulators. Inline PTX, so CUDA only: HIP builds never include it;
// the emulated GPU runs emu_sm80.cuh's models of the same instructions.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix fragments for
// mma.m16n8k16"), with g = lane / 4 and c = 2 * (lane % 4):
//   A (16x16, row):  a0 = (g, c..c+1)  a1 = (g+8, c..c+1)  a2 = (g, c+8..)  a3 = (g+8, c+8..)
//   B (16x8, col):   b0 = (k c..c+1, n g)  b1 = (k c+8.., n g)
//   C (16x8, f32):   c0,c1 = (g, c..c+1)   c2,c3 = (g+8, c..c+1)
// so the C fragments of two adjacent n8 tiles are, packed to 16 bits, exactly
// the A fragment of one k16 slice: attention feeds P back without shared memory.
#pragma once

#if defined(__HIPCC__)
#error "mma_sm80.cuh is CUDA-only inline PTX"
#endif

#include <cstdint>

#include "common/dtype.h"
#if defined(MIXKIT_EMULATE)
#include "cuda/emu_sm80.cuh"
#endif

namespace mixkit {
namespace sm80 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(MIXKIT_EMULATE)
// The emulated GPU: the same wrappers over emu_sm80.cuh's models; `site`
// (defaulted) is the kernel line that issues the instruction, for the trace.
using emu::trace::Site;
inline void cp_async16(void* dst, const void* src, bool valid, const Site& site = {}) {
  emu::sm80::cp_async16(dst, src, valid ? 16 : 0, site);
}
inline void cp_async_commit() { emu::sm80::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::sm80::cp_async_wait(N);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, const Site& site = {}) { emu::sm80::ldmatrix(r, p, false, site); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p, const Site& site = {}) {
  emu::sm80::ldmatrix(r, p, true, site);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p, const Site& site = {}) { emu::sm80::ldmatrix(r, p, false, site); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p, const Site& site = {}) {
  emu::sm80::ldmatrix(r, p, true, site);
}
template <class T> struct Mma {
  static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const Site& site = {}) {
    emu::sm80::mma_m16n8k16<T>(d, a, b0, b1, site);
  }
};
template <class T>
inline uint32_t pack2(float lo, float hi) {
  return emu::sm80::pack2<T>(lo, hi);
}
#else

// 16-byte async copy; src_bytes = 0 fills the destination with zeros (rows
// past the expert's end, K and N tails).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

template <class T> struct Mma;
template <> struct Mma<bf16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<f16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Two floats rounded to T (nearest even) and packed into one 32-bit
// register, low half first: one cvt instruction instead of dtype.h's
// portable bit arithmetic, which matters inside attention's inner loop.
template <class T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<bf16>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ uint32_t pack2<f16>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

#endif  // MIXKIT_EMULATE

}  // namespace sm80
}  // namespace mixkit
