// The small portability layer that lets csrc/cuda/*.cu compile unchanged as
// CUDA (nvcc) and as HIP (hipcc -x hip). Kernels use only what is named here.
#pragma once

#include <stdexcept>
#include <string>

#if defined(__HIPCC__)
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
#endif

namespace mixkit {

constexpr int kWarpSize = MIXKIT_WARP_SIZE;

// Butterfly exchange within a warp/wavefront; every lane must take part.
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
#if defined(__HIPCC__)
  return __shfl_xor(v, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}

inline void gpu_check(gpuError_t err, const char* what) {
  if (err != gpuSuccess)
    throw std::runtime_error(std::string("mixkit: ") + MIXKIT_BACKEND_NAME + " error in " + what + ": " +
                             gpuGetErrorString(err));
}

// Makes `device` current for the launch and restores the caller's device, so
// a call on cuda:1 neither needs nor leaves a changed current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    gpu_check(gpuGetDevice(&prev_), "getting the current device");
    if (prev_ != device) gpu_check(gpuSetDevice(device), "setting the device");
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) (void)gpuSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// Streaming multiprocessors (NVIDIA) or compute units (AMD) of `device`.
inline int sm_count(int device) {
  int n = 0;
#if defined(__HIPCC__)
  gpu_check(hipDeviceGetAttribute(&n, hipDeviceAttributeMultiprocessorCount, device), "querying the CU count");
#else
  gpu_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "querying the SM count");
#endif
  return n;
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace mixkit
