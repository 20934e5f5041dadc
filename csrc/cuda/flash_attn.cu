// flash_attn forward and backward on the GPU: the checks only the GPU path
// needs, then dispatch on (head dim, dtype) to the kernels. The forward runs
// the wgmma kernel (flash_attn_fwd_sm90.cuh) on compute capability 9.0 when
// the build has sm_90a, else the sm_80 kernel (flash_attn_fwd_sm80.cuh);
// MIXKIT_FORCE_SM80=1 in the environment forces the sm_80 kernel, which is
// how an H100 validates the A100 path. The backward is sm_80 everywhere.
//
// HIP: the MFMA kernels of flash_attn_{fwd,bwd}_mfma.cuh (gfx90a / gfx94x).
#include <string>

#include "common/flash_attn.h"
#include "cuda/compat.cuh"

#if !MIXKIT_AMD
#include "cuda/flash_attn.cuh"
#else
#include "cuda/flash_attn_bwd_mfma.cuh"
#include "cuda/flash_attn_fwd_mfma.cuh"
#endif

namespace mixkit {
namespace {

void check_gpu(const FlashFwdArgs& a, std::initializer_list<const void*> ptrs,
               std::initializer_list<const int64_t*> strides) {
  require(a.dtype != DType::f32, "the GPU flash attention takes bfloat16 or float16 (float32 runs on the CPU)");
  require(a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256,
          "head_dim " + std::to_string(a.head_dim) + " is not supported on the GPU (supported: 64, 128, 256)");
  // cp.async moves 16-byte chunks: every row start must be 16-byte aligned.
  for (const void* p : ptrs) require(p == nullptr || aligned_to(p, 16), "tensor pointers must be 16-byte aligned");
  for (const int64_t* s : strides)
    require(s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0,
            "batch, token and head strides must be multiples of 8 elements on the GPU");
}

}  // namespace

template <class F>
void dispatch_head_dim_dtype(const FlashFwdArgs& a, F&& f) {
  auto by_dim = [&](auto t) {
    using T = decltype(t);
    if (a.head_dim == 64) f(std::integral_constant<int, 64>{}, t);
    else if (a.head_dim == 128) f(std::integral_constant<int, 128>{}, t);
    else f(std::integral_constant<int, 256>{}, t);
  };
  if (a.dtype == DType::bf16) by_dim(bf16{});
  else by_dim(f16{});
}

// Which forward kernel a call on `device` runs: 90 (wgmma), 80 (mma.sync),
// or 0 on HIP (MFMA; the Python API reports it as no CUDA architecture).
int flash_attn_fwd_arch(int device) {
#if MIXKIT_AMD
  (void)device;
  return 0;
#else
  return hopper_or_sm80(device);
#endif
}

void flash_attn_fwd_gpu(const FlashFwdArgs& a, int device, void* stream) {
  check(a);
  check_gpu(a, {a.q, a.k, a.v, a.out}, {a.q_stride, a.k_stride, a.v_stride, a.o_stride});
  if (a.total_q == 0 || a.batch == 0) return;
  DeviceGuard guard(device);
  const bool hopper = flash_attn_fwd_arch(device) == 90;
  dispatch_head_dim_dtype(a, [&](auto d, auto t) {
    constexpr int D = decltype(d)::value;
    using T = decltype(t);
    const auto s = static_cast<gpuStream_t>(stream);
    (void)hopper;
#if MIXKIT_AMD
    mfma::flash_fwd<D, T>(a, s);
#else
#ifdef MIXKIT_WITH_SM90
    if (hopper) return sm90::flash_fwd<D, T>(a, s);
#endif
    sm80::flash_fwd<D, T>(a, s);
#endif
  });
}

void flash_attn_bwd_gpu(const FlashBwdArgs& a, int device, void* stream) {
  check(a);
  check_gpu(a.f, {a.f.q, a.f.k, a.f.v, a.f.out, a.dout, a.dq, a.dk, a.dv},
            {a.f.q_stride, a.f.k_stride, a.f.v_stride, a.f.o_stride, a.do_stride, a.dq_stride, a.dk_stride,
             a.dv_stride});
  require(a.deterministic || a.f.total_q == 0 || a.dq_accum, "the atomic dQ path needs the dq_accum workspace");
  // dq_convert_kernel reads it in 16-byte vectors.
  require(aligned_to(a.dq_accum, 16), "the dq_accum workspace must be 16-byte aligned");
  if (a.f.batch == 0 || a.f.total_k == 0) return;  // keys no query sees still get zero dK, dV
  DeviceGuard guard(device);
  dispatch_head_dim_dtype(a.f, [&](auto d, auto t) {
#if MIXKIT_AMD
    mfma::flash_bwd<decltype(d)::value, decltype(t)>(a, static_cast<gpuStream_t>(stream));
#else
    sm80::flash_bwd<decltype(d)::value, decltype(t)>(a, static_cast<gpuStream_t>(stream));
#endif
  });
}

}  // namespace mixkit
