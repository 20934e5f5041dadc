// The small portability layer that lets csrc/cuda/*.cu compile unchanged as
// CUDA (nvcc) and as HIP (hipcc -x hip). Kernels use only what is named here.
#pragma once

#include <algorithm>
#include <atomic>
#include <tuple>
#include <type_traits>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(MIXKIT_EMULATE)
// The emulated GPU (tests only): host C++ against the HIP CPU runtime, with
// mixkit's own scheduler and warp model (emu.cuh). MIXKIT_WARP_SIZE (32 or
// 64) comes from the build and picks the NVIDIA or the AMD kernels.
#include "cuda/emu.cuh"
using gpuStream_t = hipStream_t;
using gpuError_t = hipError_t;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#define MIXKIT_BACKEND_NAME "emu"
#if MIXKIT_WARP_SIZE == 64
#define MIXKIT_AMD 1
#else
#define MIXKIT_AMD 0
#endif
#elif defined(__HIPCC__)
#include <hip/hip_runtime.h>
using gpuStream_t = hipStream_t;
using gpuError_t = hipError_t;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#define gpuGetDevice hipGetDevice
#define gpuSetDevice hipSetDevice
#define MIXKIT_BACKEND_NAME "hip"
// CDNA (gfx90a, gfx942) runs wavefronts of 64 lanes.
#ifndef MIXKIT_WARP_SIZE
#define MIXKIT_WARP_SIZE 64
#endif
#define MIXKIT_AMD 1
#else
#include <cuda_runtime.h>
using gpuStream_t = cudaStream_t;
using gpuError_t = cudaError_t;
#define gpuSuccess cudaSuccess
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#define gpuGetDevice cudaGetDevice
#define gpuSetDevice cudaSetDevice
#define MIXKIT_BACKEND_NAME "cuda"
#define MIXKIT_WARP_SIZE 32
#define MIXKIT_AMD 0
#endif

// The dynamic shared memory of a kernel (extern __shared__), as `name`.
#if defined(MIXKIT_EMULATE)
#define MIXKIT_DYNAMIC_SMEM(name, align) unsigned char* name = ::mixkit::emu::dynamic_smem()
#else
#define MIXKIT_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) unsigned char name[]
#endif

namespace mixkit {

constexpr int kWarpSize = MIXKIT_WARP_SIZE;

// Butterfly exchange within a warp/wavefront; every lane must take part.
#if defined(MIXKIT_EMULATE)
// (The emulator also checks that every lane calls it from the same line.)
MIXKIT_EMU_OUTLINE inline float shfl_xor(float v, int lane_mask, int site = __builtin_LINE()) {
  emu::trace::Quiet quiet;
  float* slot = reinterpret_cast<float*>(emu::group_scratch(kWarpSize));
  const int lane = emu::linear_tid() % kWarpSize;
  slot[lane * (emu::kScratchBytes / 4)] = v;
  emu::group_sync(kWarpSize, "shfl_xor", site);
  const float r = slot[(lane ^ lane_mask) * (emu::kScratchBytes / 4)];
  emu::group_sync(kWarpSize, "shfl_xor", site);
  return r;
}
#else
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
#if defined(__HIPCC__)
  return __shfl_xor(v, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}
#endif  // MIXKIT_EMULATE

inline void gpu_check(gpuError_t err, const char* what) {
  if (err != gpuSuccess)
    throw std::runtime_error(std::string("mixkit: ") + MIXKIT_BACKEND_NAME + " error in " + what + ": " +
                             gpuGetErrorString(err));
}

// The one kernel launch of every launcher: `<<<>>>` on CUDA and HIP, the
// scheduler in emu_runtime.cpp on the emulated GPU. Arguments convert to the
// kernel's parameter types here, as they would at a `<<<>>>` call.
template <class... Params, class... Args>
inline void gpu_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, gpuStream_t stream,
                       Args&&... args) {
#if defined(MIXKIT_EMULATE)
  (void)stream;
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  emu::launch(grid, block, smem, [&] { std::apply(kernel, params); }, reinterpret_cast<const void*>(kernel));
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
}

// Blocks of `kernel` (at `threads` threads, `smem` bytes) one SM/CU holds.
template <class Kernel>
inline int occupancy_blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  int n = 0;
#if defined(MIXKIT_EMULATE)
  (void)kernel;
  (void)smem;
  n = emu::device().blocks_per_sm > 0 ? emu::device().blocks_per_sm : std::max(1, 2048 / threads);
#elif defined(__HIPCC__)
  gpu_check(hipOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem), "querying occupancy");
#else
  gpu_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem), "querying occupancy");
#endif
  return n;
}

// Raises a kernel's dynamic shared-memory (LDS) limit.
template <class Kernel>
inline gpuError_t gpuSetMaxDynamicSharedMemory(Kernel kernel, int bytes) {
#if defined(MIXKIT_EMULATE)
  (void)kernel;
  return bytes <= emu::device().max_smem_optin ? gpuSuccess : hipErrorInvalidValue;
#elif defined(__HIPCC__)
  return hipFuncSetAttribute(reinterpret_cast<const void*>(kernel), hipFuncAttributeMaxDynamicSharedMemorySize, bytes);
#else
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
#endif
}

// Makes `device` current for the launch and restores the caller's device, so
// a call on cuda:1 neither needs nor leaves a changed current device.
class DeviceGuard {
 public:
#if defined(MIXKIT_EMULATE)
  explicit DeviceGuard(int) {}
#else
  explicit DeviceGuard(int device) {
    gpu_check(gpuGetDevice(&prev_), "getting the current device");
    if (prev_ != device) gpu_check(gpuSetDevice(device), "setting the device");
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) (void)gpuSetDevice(prev_);
  }
#endif
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// Streaming multiprocessors (NVIDIA) or compute units (AMD) of `device`.
inline int sm_count(int device) {
  int n = 0;
#if defined(MIXKIT_EMULATE)
  (void)device;
  n = emu::device().sm_count;
#elif defined(__HIPCC__)
  gpu_check(hipDeviceGetAttribute(&n, hipDeviceAttributeMultiprocessorCount, device), "querying the CU count");
#else
  gpu_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "querying the SM count");
#endif
  return n;
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// MIXKIT_FORCE_SM80=1 (any value but "0") makes the CUDA kernels that have a
// Hopper variant run their sm_80 one instead: how an H100 validates the A100
// path. Read per call, so tests can switch it.
inline bool force_sm80() {
  const char* v = std::getenv("MIXKIT_FORCE_SM80");
  return v && *v && std::strcmp(v, "0") != 0;
}

// Compute capability as major * 10 + minor (CUDA), cached per device: the
// query is a driver call and the answer never changes.
inline int capability(int device) {
#if defined(MIXKIT_EMULATE)
  (void)device;
  return emu::device().capability;  // settable per test, so never cached
#else
  static std::atomic<int> cache[64];
  const bool cached = device >= 0 && device < 64;
  if (cached && cache[device].load(std::memory_order_relaxed) > 0) return cache[device].load(std::memory_order_relaxed);
  int major = 0, minor = 0;
#if defined(__HIPCC__)
  gpu_check(hipDeviceGetAttribute(&major, hipDeviceAttributeComputeCapabilityMajor, device), "querying the capability");
  gpu_check(hipDeviceGetAttribute(&minor, hipDeviceAttributeComputeCapabilityMinor, device), "querying the capability");
#else
  gpu_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "querying the capability");
  gpu_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "querying the capability");
#endif
  if (cached) cache[device].store(major * 10 + minor, std::memory_order_relaxed);
  return major * 10 + minor;
#endif
}

// The kernel family a GPU call on `device` runs where a Hopper variant
// exists: 90 when this build has the sm_90a kernels (MIXKIT_WITH_SM90) and
// the device is capability 9.0, else 80.
inline int hopper_or_sm80(int device) {
#ifdef MIXKIT_WITH_SM90
  if (!force_sm80() && capability(device) == 90) return 90;
#else
  (void)device;
#endif
  return 80;
}

}  // namespace mixkit
