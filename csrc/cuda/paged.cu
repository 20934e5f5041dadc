// Paged KV append and paged chunked prefill for CUDA and HIP (through
// compat.cuh), and the emulated GPU.
//
// paged_prefill_attn_kernel: a block owns R = 16 query rows of one (sequence,
// KV head): consecutive (query, head of the GQA group) pairs, so the heads of
// a group share every K/V tile the block loads. Key tiles are one key per
// lane (BN = the warp width), staged in shared memory through the block
// table; each warp owns R / 4 rows. Per tile and row, lane j scores key j
// against the row's float32 q (a shared-memory broadcast), the warp reduces
// max and sum for the online softmax, and P goes through shared memory to the
// P V product, where each lane owns D / BN output columns. Scores, softmax
// and the sum are float32 in the log2 domain (q pre-scaled by scale *
// log2(e)), as in decode.cu.
//
// It runs on CUDA cores, not tensor cores: a chunk's FLOPs are those of a
// prefill, and a tensor-core version would put the same page gather in front
// of flash_attn_fwd's tile loop. Rows per block and the key range are fixed
// by shapes, and lengths are read on the device, so a launch needs no host
// sync. Only key tiles that intersect the rows' visible range are loaded, so
// pages behind every row's window are never read.
#include <algorithm>
#include <cmath>

#include "common/paged.h"
#include "cuda/compat.cuh"

namespace mixkit {
namespace {

constexpr int kAppendThreads = 256;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int R = 16;                // query rows per block
constexpr int BN = kWarpSize;        // keys per tile: one per lane
constexpr int kRowsPerWarp = R / kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// ============================== kernels ======================================

// One block per token; its threads cover (KV head, vector). A negative slot
// is padding; a slot past the pool (which only the CPU can report) is
// skipped, so nothing outside the pool is written.
template <class T, int VEC, class S>
__global__ void __launch_bounds__(kAppendThreads) paged_kv_append_kernel(PagedAppendArgs a) {
  using V = Pack<T, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t slot = int64_t(static_cast<const S*>(a.slots)[t]);
  if (slot < 0 || slot >= a.num_pages * a.page_size) return;
  const int nvec = int(a.head_dim / VEC);
  const int per_token = int(a.kv_heads) * nvec;
  const T* k = static_cast<const T*>(a.k) + t * a.k_stride[0];
  const T* v = static_cast<const T*>(a.v) + t * a.v_stride[0];
  V* kp = reinterpret_cast<V*>(static_cast<T*>(a.k_pages) + slot * a.kv_heads * a.head_dim);
  V* vp = reinterpret_cast<V*>(static_cast<T*>(a.v_pages) + slot * a.kv_heads * a.head_dim);
  for (int e = threadIdx.x; e < per_token; e += blockDim.x) {
    const int h = e / nvec, j = e % nvec;
    kp[e] = reinterpret_cast<const V*>(k + h * a.k_stride[1])[j];
    vp[e] = reinterpret_cast<const V*>(v + h * a.v_stride[1])[j];
  }
}

// Warp-wide max and sum of one value per lane (every lane gets the result).
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) x = fmaxf(x, shfl_xor(x, mask));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) x += shfl_xor(x, mask);
  return x;
}

// Shared memory: q (R x D float32), one K or V tile (BN x (D + PAD) of T),
// P (R x BN float32). Lane j reads K row j in 16-byte vectors, which the
// hardware serves 8 lanes a phase: PAD makes a row an odd number of 16-byte
// units, so the 8 lanes of a phase hit 8 different groups of 4 banks.
template <class T, int D>
struct Smem {
  static constexpr int PAD = 16 / int(sizeof(T));
  static constexpr int LD = D + PAD;
  static constexpr int bytes = R * D * 4 + R * BN * 4 + BN * LD * int(sizeof(T));
};

// Copies keys [n0, n0 + BN) ∩ [n0, hi) of one pool into the tile, 16-byte
// vectors from global memory; keys past hi are zeros (their P is 0, and 0 *
// stale could be NaN).
template <class T, int D>
__device__ __forceinline__ void load_tile(T* tile, const T* pool, const int64_t (&stride)[3], const PagedPrefillArgs& a,
                                          const int32_t* table, int64_t kvh, int64_t n0, int64_t hi) {
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int CH = D / VEC;
  using V = Pack<T, VEC>;
  for (int idx = threadIdx.x; idx < BN * CH; idx += kThreads) {
    const int j = idx / CH, c = idx % CH;
    const int64_t p = n0 + j;
    // A store on each side: a vector that is assigned in one branch is kept
    // in scratch memory by hipcc.
    V* dst = reinterpret_cast<V*>(tile + j * Smem<T, D>::LD + c * VEC);
    if (p < hi) {
      const int64_t page = clamp64(table[p / a.page_size], 0, a.num_pages - 1);
      *dst = reinterpret_cast<const V*>(pool + page * stride[0] + (p % a.page_size) * stride[1] + kvh * stride[2])[c];
    } else {
      *dst = V{};
    }
  }
}

// (kThreads, 1): with the default ptxas settled on 128 registers and spilled
// (bf16 D = 256 on sm_90a, f32 D = 128 on sm_80); measured, nvcc 13.0: no
// spills, at most 160 registers.
template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1) paged_prefill_attn_kernel(PagedPrefillArgs a) {
  constexpr int NO = D / BN;  // output columns per lane
  constexpr int LD = Smem<T, D>::LD;
  static_assert(D % BN == 0 && D % (16 / sizeof(T)) == 0, "head_dim must be a multiple of the warp width");
  MIXKIT_DYNAMIC_SMEM(smem_raw, 16);
  float* Qs = reinterpret_cast<float*>(smem_raw);  // [R][D]
  float* Ps = Qs + R * D;                           // [R][BN]
  T* KV = reinterpret_cast<T*>(Ps + R * BN);        // [BN][LD]

  const int64_t b = blockIdx.z, kvh = blockIdx.y;
  const int64_t group = a.heads / a.kv_heads;
  const int64_t q0 = clamp64(a.cu_seqlens_q[b], 0, a.total_q);
  const int64_t sq = clamp64(a.cu_seqlens_q[b + 1], q0, a.total_q) - q0;
  const int64_t sk = clamp64(a.seqlens_k[b], 0, a.max_pages * a.page_size);
  const int32_t* table = a.block_table + b * a.max_pages;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const float qscale = a.scale * kLog2e;
  const int64_t rows = sq * group, tiles = (rows + R - 1) / R;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t r0 = tile * R;
    // Visible keys of the block: from the first row's window start to the
    // last row's own position (positions grow with the row).
    int64_t lo, hi, lo_last, hi_last;
    visible_keys(sk - sq + r0 / group, sk, a.window, lo, hi);
    visible_keys(sk - sq + (min(r0 + R, rows) - 1) / group, sk, a.window, lo_last, hi_last);
    hi = hi_last;

    // mutant-equivalent(barrier): Qs is read only by the scores of a key
    // block, whose end the barrier after them marks before the key loop can
    // end, and each thread stores the same elements of Qs in every tile: no
    // other thread's access lies between that barrier and these stores. Kept
    // (once a tile) so that a read of Qs added after the scores stays safe.
    __syncthreads();  // the previous tile's warps are done with Qs
    for (int idx = threadIdx.x; idx < R * D; idx += kThreads) {
      const int r = idx / D, e = idx % D;
      float x = 0.f;
      if (r0 + r < rows) {
        const int64_t i = (r0 + r) / group, h = kvh * group + (r0 + r) % group;
        x = to_f32(static_cast<const T*>(a.q)[(q0 + i) * a.q_stride[0] + h * a.q_stride[1] + e]) * qscale;
      }
      Qs[idx] = x;
    }

    float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][NO];
    int rlo[kRowsPerWarp], rhi[kRowsPerWarp];  // positions < 2^31 (checked): 32-bit keeps f32 D=128 from spilling
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t r = r0 + warp + rr * kWarps;
      m[rr] = -INFINITY;
      l[rr] = 0.f;
#pragma unroll
      for (int c = 0; c < NO; ++c) o[rr][c] = 0.f;
      int64_t lo_r, hi_r;
      visible_keys(sk - sq + r / group, sk, a.window, lo_r, hi_r);
      rlo[rr] = r < rows ? int(lo_r) : 0;  // padding rows see nothing
      rhi[rr] = r < rows ? int(hi_r) : 0;
    }

    // mutant-equivalent(flip): n0 <= hi adds a tile only where n0 reaches hi
    // exactly; load_tile zero-fills keys from hi on and every row masks them
    // (rhi <= hi), so that tile adds probability 0 times zeros.
    for (int64_t n0 = lo; n0 < hi; n0 += BN) {
      __syncthreads();  // the previous tile's P V is done with KV
      load_tile<T, D>(KV, static_cast<const T*>(a.k_pages), a.k_stride, a, table, kvh, n0, hi);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp + rr * kWarps;
        const int64_t p = n0 + lane;
        float s = -INFINITY;
        if (p >= rlo[rr] && p < rhi[rr]) {
          constexpr int VEC = 16 / int(sizeof(T));
          const float* qr = Qs + r * D;
          const auto* kr = reinterpret_cast<const Pack<T, VEC>*>(KV + lane * LD);
          s = 0.f;
#pragma unroll 2
          for (int c = 0; c < D / VEC; ++c) {
            const Pack<T, VEC> kv = kr[c];
#pragma unroll
            for (int i = 0; i < VEC; ++i) s += qr[c * VEC + i] * to_f32(kv.v[i]);
          }
          // The cap acts on the natural-log score: c * tanh(s / c), back in log2 units.
          if (a.softcap > 0.f) s = kLog2e * a.softcap * tanhf(s * kLn2 / a.softcap);
        }
        const float mx = fmaxf(m[rr], warp_max(s));
        // Until a row sees a key its max is -inf: subtract 0 then, so
        // exp2(-inf) = 0 and no inf - inf NaN appears.
        const float base = mx == -INFINITY ? 0.f : mx;
        const float corr = exp2f(m[rr] - base);
        const float pr = exp2f(s - base);
        l[rr] = l[rr] * corr + warp_sum(pr);
#pragma unroll
        for (int c = 0; c < NO; ++c) o[rr][c] *= corr;
        m[rr] = mx;
        Ps[r * BN + lane] = pr;
      }
      __syncthreads();
      load_tile<T, D>(KV, static_cast<const T*>(a.v_pages), a.v_stride, a, table, kvh, n0, hi);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const float* pr = Ps + (warp + rr * kWarps) * BN;
#pragma unroll 4
        for (int j = 0; j < BN; ++j) {
          const float w = pr[j];
#pragma unroll
          for (int c = 0; c < NO; ++c) o[rr][c] += w * to_f32(KV[j * LD + c * BN + lane]);
        }
      }
    }

#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t r = r0 + warp + rr * kWarps;
      if (r >= rows) continue;
      const int64_t h = kvh * group + r % group;
      const int64_t row = (q0 + r / group) * a.heads + h;
      // The sink (log2 units here) joins the denominator once; l == 0 and no
      // sink: no visible key (zeros, lse -inf). A NaN in the cache makes l
      // NaN and reaches the output, as on the CPU.
      const float sink = a.sinks ? a.sinks[h] * kLog2e : -INFINITY;
      float mx = m[rr], lx = l[rr];
      const float rescale = add_sink<true>(sink, mx, lx);
      const float inv = lx != 0.f ? rescale / lx : 0.f;
#pragma unroll
      for (int c = 0; c < NO; ++c) static_cast<T*>(a.out)[row * D + c * BN + lane] = from_f32<T>(o[rr][c] * inv);
      if (lane == 0) a.lse[row] = lx != 0.f ? (mx + log2f(lx)) * kLn2 : -INFINITY;
    }
  }
}

// ============================== launchers ====================================

template <class T>
bool append_vector_ok(const PagedAppendArgs& a) {
  constexpr int kVec = 16 / int(sizeof(T));
  if (a.head_dim % kVec) return false;
  for (const void* p : {a.k, a.v, static_cast<const void*>(a.k_pages), static_cast<const void*>(a.v_pages)})
    if (!aligned_to(p, 16)) return false;
  for (int i = 0; i < 2; ++i)
    if (a.k_stride[i] % kVec || a.v_stride[i] % kVec) return false;
  return true;
}

template <class T, int VEC>
void launch_append(const PagedAppendArgs& a, gpuStream_t stream) {
  const int64_t per_token = a.kv_heads * (a.head_dim / VEC);
  const int threads = int(std::min<int64_t>(kAppendThreads, (per_token + 31) / 32 * 32));
  if (a.slots_int64)
    gpu_launch(paged_kv_append_kernel<T, VEC, int64_t>, unsigned(a.tokens), threads, 0, stream, a);
  else
    gpu_launch(paged_kv_append_kernel<T, VEC, int32_t>, unsigned(a.tokens), threads, 0, stream, a);
}

template <class T, int D>
void launch_prefill(const PagedPrefillArgs& a, gpuStream_t stream) {
  constexpr int smem = Smem<T, D>::bytes;
  const int64_t group = a.heads / a.kv_heads;
  const int64_t tiles = std::max<int64_t>(1, (a.max_seqlen_q * group + R - 1) / R);
  const auto kernel = paged_prefill_attn_kernel<T, D>;
  gpu_check(gpuSetMaxDynamicSharedMemory(kernel, smem), "setting paged_prefill_attn_kernel's shared memory");
  const dim3 grid{unsigned(std::min<int64_t>(tiles, 0x7fffffff)), unsigned(a.kv_heads), unsigned(a.batch)};
  gpu_launch(kernel, grid, kThreads, smem, stream, a);
}

}  // namespace

void paged_kv_append_gpu(const PagedAppendArgs& a, int device, void* stream) {
  check(a);
  if (a.tokens == 0) return;
  DeviceGuard guard(device);
  const gpuStream_t s = static_cast<gpuStream_t>(stream);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (append_vector_ok<T>(a)) launch_append<T, 16 / int(sizeof(T))>(a, s);
    else launch_append<T, 1>(a, s);
  });
  gpu_check(gpuGetLastError(), "launching paged_kv_append_kernel");
}

void paged_prefill_attn_gpu(const PagedPrefillArgs& a, int device, void* stream) {
  check(a);
  const int64_t d = a.head_dim;
  require(d == 64 || d == 128 || d == 256,
          "the GPU paged prefill supports head_dim 64, 128 and 256, got " + std::to_string(d));
  require(!(a.dtype == DType::f32 && d == 256), "the GPU paged prefill takes head_dim 256 in bfloat16/float16 only");
  if (a.batch == 0 || a.total_q == 0) return;
  for (const void* p : {a.q, a.k_pages, a.v_pages})
    require(aligned_to(p, 16), "q, k_pages and v_pages must be 16-byte aligned on the GPU");
  const int64_t vec = a.dtype == DType::f32 ? 4 : 8;
  for (int64_t st : {a.k_stride[0], a.k_stride[1], a.k_stride[2], a.v_stride[0], a.v_stride[1], a.v_stride[2]})
    require(st % vec == 0, "page strides must be multiples of 16 bytes on the GPU");
  DeviceGuard guard(device);
  const gpuStream_t s = static_cast<gpuStream_t>(stream);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (d == 64) launch_prefill<T, 64>(a, s);
    else if (d == 128) launch_prefill<T, 128>(a, s);
    else if constexpr (sizeof(T) == 2) launch_prefill<T, 256>(a, s);
  });
  gpu_check(gpuGetLastError(), "launching paged_prefill_attn_kernel");
}

}  // namespace mixkit
