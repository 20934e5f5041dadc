// Argument structs and the entry points every backend implements.
//
// Tensors cross the Python boundary as raw pointers plus the sizes and strides
// that python/mixkit/ops validated, not as DLPack arrays: importing one torch
// tensor through nb::ndarray costs about 3 us (almost all of it in
// Tensor.__dlpack__), a pointer about 0.25 us, and the norm backward takes seven
// tensors. check_* below re-validates everything a kernel relies on, so a bad
// call from Python raises instead of touching memory it should not.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtype.h"

namespace mixkit {

// Backend codes shared with python/mixkit/_backend.py.
// emu: the GPU kernels compiled for the emulated GPU (MIXKIT_EMULATE builds,
// tests only), on tensors in host memory.
enum class Backend : int32_t { cpu = 0, cuda = 1, hip = 2, emu = 3 };

// RMSNorm (centered = false) and OLMo's non-parametric LayerNorm
// (centered = true, weight == nullptr) share one kernel.
struct NormFwdArgs {
  DType dtype;
  bool centered;
  const void* x;
  const void* residual;  // optional: h = x + residual is normalised and stored
  const void* weight;    // optional
  void* y;
  void* h;               // required with residual
  float* mean;           // optional (centered only), float32 per row
  float* rstd;           // optional, float32 per row
  int64_t rows;
  int64_t cols;
  float eps;
};

struct NormBwdArgs {
  DType dtype;
  bool centered;
  const void* grad_y;
  const void* grad_h;       // optional: gradient flowing into h from the residual stream
  const void* x;            // the normalised input (h for the fused variant)
  const void* weight;       // optional
  const float* mean;        // centered only
  const float* rstd;
  void* grad_x;
  float* grad_w_partial;    // (partials, cols) float32, summed by the caller; null without weight
  int64_t partials;         // number of row groups, each writing one partial row
  int64_t rows;
  int64_t cols;
};

// Rotates q and k in one launch: cos/sin depend only on (token, frequency) and
// are computed once for all q and k heads of a token.
struct RopeArgs {
  DType dtype;
  bool positions_int64;
  const void* positions;  // (tokens,) int32 or int64
  int64_t tokens;
  int64_t head_dim;
  float theta;
  bool interleaved;
  bool inverse;           // rotate by -angle: the backward pass
  const void* in[2];      // q, k: (tokens, heads, head_dim), last dim contiguous
  void* out[2];           // contiguous (tokens, heads, head_dim)
  int64_t heads[2];
  int64_t stride_token[2];  // input strides in elements
  int64_t stride_head[2];
  // Scaled RoPE (linear, YaRN): a (head_dim / 2,) float32 frequency table on
  // the tensors' device, computed in Python as Hugging Face computes it, in
  // place of theta^(-2i/d) (null: the plain frequencies); and the factor that
  // multiplies cos and sin (YaRN's attention factor; 1 otherwise).
  const float* inv_freq;
  float attention_factor;
};

// theta^(-2i/d), computed in double and rounded once, so every backend gets
// the same correctly rounded float32 frequency. Angles are then
// float(position) * inv_freq in float32, as the conventions ask.
MIXKIT_HD float rope_inv_freq(float theta, int64_t i, int64_t d) {
  return float(1.0 / pow(double(theta), double(2 * i) / double(d)));
}

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("mixkit: " + msg);
}

inline void check_dtype(DType d) {
  require(d == DType::f32 || d == DType::f16 || d == DType::bf16, "unsupported dtype code");
}

inline void check(const NormFwdArgs& a) {
  check_dtype(a.dtype);
  require(a.rows >= 0, "rows must be >= 0");
  require(a.cols > 0 && a.cols <= (int64_t(1) << 30), "hidden size must be in [1, 2^30]");
  require(a.rows <= INT64_MAX / a.cols, "rows * hidden overflows int64");
  require(a.rows == 0 || (a.x && a.y), "x and y must not be null");
  require(!a.residual || a.h, "the fused residual variant needs an h output");
  require(!(a.centered && a.weight), "the centered (LayerNorm) path is non-parametric");
  require(a.eps >= 0.f, "eps must be >= 0");
}

inline void check(const NormBwdArgs& a) {
  check_dtype(a.dtype);
  require(a.rows >= 0, "rows must be >= 0");
  require(a.cols > 0 && a.cols <= (int64_t(1) << 30), "hidden size must be in [1, 2^30]");
  require(a.rows <= INT64_MAX / a.cols, "rows * hidden overflows int64");
  require(a.rows == 0 || (a.grad_y && a.x && a.rstd && a.grad_x), "null tensor pointer");
  require(!a.centered || a.mean, "the centered backward needs the saved mean");
  require(!a.weight || (a.grad_w_partial && a.partials >= 1), "weight gradient needs a partials buffer");
}

inline void check(const RopeArgs& a) {
  check_dtype(a.dtype);
  require(a.tokens >= 0, "tokens must be >= 0");
  require(a.head_dim > 0 && a.head_dim % 2 == 0, "head_dim must be even and > 0");
  require(a.head_dim <= 1024, "head_dim must be <= 1024");
  require(a.theta > 0.f, "theta must be > 0");
  require(a.attention_factor > 0.f && a.attention_factor < INFINITY, "attention_factor must be finite and > 0");
  for (int i = 0; i < 2; ++i) {
    require(a.heads[i] >= 0 && a.heads[i] <= 65536, "head count out of range");
    require(a.tokens == 0 || a.heads[i] == 0 || (a.in[i] && a.out[i]), "null tensor pointer");
  }
  require(a.tokens == 0 || a.positions, "null positions pointer");
}

// CPU kernels go parallel only above this many elements, like torch's
// at::internal::GRAIN_SIZE: waking a thread team costs microseconds, and
// milliseconds when the other cores are busy, which decode-sized calls
// cannot afford.
constexpr int64_t kCpuParallelGrain = 32768;

// ---- backends --------------------------------------------------------------
void norm_fwd_cpu(const NormFwdArgs& a);
void norm_bwd_cpu(const NormBwdArgs& a);
void rope_cpu(const RopeArgs& a);

// GPU entry points (CUDA or HIP, from the same sources). `device` is the
// ordinal the tensors live on; `stream` the caller's cudaStream_t/hipStream_t.
void norm_fwd_gpu(const NormFwdArgs& a, int device, void* stream);
void norm_bwd_gpu(const NormBwdArgs& a, int device, void* stream);
// Row groups (weight-gradient partial rows) the GPU backward will use.
int64_t norm_bwd_partials_gpu(DType dtype, int64_t rows, int64_t cols, int device);
void rope_gpu(const RopeArgs& a, int device, void* stream);

}  // namespace mixkit
