// Hopper's warpgroup instructions (wgmma.mma_async with shared-memory
// descriptors, its fence/commit/wait, fence.proxy.async) on the emulated GPU.
// Included by wgmma_sm90.cuh in MIXKIT_EMULATE builds, after smem_desc.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "cuda/emu.cuh"

namespace mixkit {
namespace sm90 {

inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int N>
inline void wgmma_wait() {}
inline void fence_proxy_async() {}
template <int N>
inline void pin(float (&)[N]) {}

template <class T, int N, bool MN_MAJOR_B = false>
inline void wgmma_ss(float (&)[N / 2], uint64_t, uint64_t, int) {
  emu::fail("wgmma is not emulated yet");
}
template <class T, int N>
inline void wgmma_rs(float (&)[N / 2], const uint32_t (&)[4], uint64_t, int) {
  emu::fail("wgmma is not emulated yet");
}

}  // namespace sm90
}  // namespace mixkit
