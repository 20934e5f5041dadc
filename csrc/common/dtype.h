// Element types shared by every backend.
//
// bf16 and fp16 are stored as raw 16-bit words and converted by hand, so the
// CPU, CUDA and HIP backends round identically (round-to-nearest-even, NaN kept
// quiet) and no backend depends on cuda_bf16.h vs hip_bfloat16.h, which differ
// between ROCm 5.2 and current releases.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MIXKIT_HD __host__ __device__ __forceinline__
#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#else
#include <cuda_fp16.h>
#endif
#else
#define MIXKIT_HD inline
#endif

namespace mixkit {

// Codes shared with python/mixkit/_backend.py.
enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2 };

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define MIXKIT_DEVICE_PASS 1
#endif

MIXKIT_HD float bits_to_f32(uint32_t u) {
#ifdef MIXKIT_DEVICE_PASS
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}
MIXKIT_HD uint32_t f32_to_bits(float f) {
#ifdef MIXKIT_DEVICE_PASS
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

MIXKIT_HD float to_f32(float v) { return v; }
MIXKIT_HD float to_f32(bf16 v) { return bits_to_f32(uint32_t(v.bits) << 16); }
MIXKIT_HD float to_f32(f16 v) {
#ifdef MIXKIT_DEVICE_PASS
  return __half2float(__ushort_as_half(v.bits));  // the hardware conversion: same result, fewer registers
#endif
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in float32
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return bits_to_f32(sign | f32_to_bits(mag));
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <class T> MIXKIT_HD T from_f32(float f);
template <> MIXKIT_HD float from_f32<float>(float f) { return f; }
template <> MIXKIT_HD bf16 from_f32<bf16>(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}
template <> MIXKIT_HD f16 from_f32<f16>(float f) {
#ifdef MIXKIT_DEVICE_PASS
  return f16{__half_as_ushort(__float2half_rn(f))};
#endif
  uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return f16{uint16_t(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (u >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds past 65504
  if (u < 0x38800000u) {
    // Below the smallest normal 2^-14: the subnormal mantissa is |f| * 2^24
    // rounded to nearest even; 1024 correctly encodes the smallest normal.
    const float scaled = bits_to_f32(u) * 16777216.0f;
    return f16{uint16_t(sign | uint32_t(rintf(scaled)))};
  }
  u += 0xc8000fffu + ((u >> 13) & 1u);  // rebias exponent 127 -> 15 and round
  return f16{uint16_t(sign | (u >> 13))};
}

// N elements loaded or stored as one aligned access (16 bytes at most).
#if !defined(MIXKIT_EMULATE)
template <class T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };
#else
// On the emulated GPU a copy is one vector load and store of the whole pack,
// as on the GPU: the host compiler would make a plain struct copy a memcpy,
// which the memory-access hook (cuda/emu_trace.h) does not see, and the race
// checker and cost counters would miss its bytes.
template <class T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
  Pack() = default;
  Pack(const Pack& o) { bits() = o.bits(); }
  Pack& operator=(const Pack& o) {
    bits() = o.bits();
    return *this;
  }

 private:
  typedef unsigned char Bits __attribute__((vector_size(sizeof(T) * N), may_alias));
  Bits& bits() { return *reinterpret_cast<Bits*>(v); }
  const Bits& bits() const { return *reinterpret_cast<const Bits*>(v); }
};
#endif

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "unknown";
}

// Runs f(T{}) with T the storage type for `dtype` (flash-attention's static
// switch idea: the runtime value becomes a template parameter in one place).
template <class F> void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(f16{}); return;
    case DType::bf16: f(bf16{}); return;
  }
}

}  // namespace mixkit
