// KV-cache append and split-KV decode attention (flash-decoding) for CUDA and
// HIP (through compat.cuh).
//
// Decode reads the whole visible KV of every sequence for one query token, so
// it is bound by DRAM bandwidth, and the design is about reading each byte
// once with enough of them in flight:
// - a block owns (sequence, KV head, up to kMaxGroup query heads of its GQA
//   group, one split of the visible keys). Every query head of the group is
//   served from the same K/V registers, so each KV head is read once;
// - LANES = min(D * sizeof(T) / 16, 32) lanes share one key row, EPL = D /
//   LANES elements (one 16-byte vector, two for float32 at D = 256) each;
//   the block's kThreads / LANES lane groups walk different keys, KB keys
//   each per step, with every load of a step issued before any use;
// - scores and the online softmax are float32, in the log2 domain (q is
//   pre-scaled by scale * log2(e), so one exp2 per score);
// - the lane groups merge through shared memory; with one split that merge
//   writes the output, otherwise a float32 partial (o, lse) per split that
//   decode_combine_kernel reduces;
// - softcap: the scaled score becomes c * tanh(s / c) (q is then pre-scaled
//   by scale alone, and the capped score taken to log2 units); sinks: the
//   sink joins the denominator once, where the output is formed: in the
//   merge with one split, in the combine with several (the partials carry
//   none), via flash::finish_row.
// The number of splits depends on shapes and the SM count only (see
// decode_splits_gpu), so the launch is fixed for a CUDA graph; a split that
// falls past a sequence's length writes an empty partial (lse = -inf).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/decode.h"
#include "cuda/compat.cuh"
#include "cuda/flash_attn.cuh"

namespace mixkit {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxGroup = 8;           // query heads per block; larger GQA groups take several blocks
constexpr int kAppendThreads = 256;
constexpr int kCombineThreads = 256;    // decode_combine_kernel: head_dim lanes a row, 256 / head_dim rows a block
constexpr int64_t kMinKeysPerSplit = 128;  // below this a split's fixed cost (q load, merge, partial write) dominates
constexpr int64_t kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
#if defined(MIXKIT_EMULATE)
// A planted error for the emulated GPU's mutation tests (emu::mutation(),
// tests/test_attn_variants.py): the split-KV combine forgets the sink.
constexpr int kMutationCombineDropsSink = 30;
#endif

__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

// ============================== kernels ======================================

// One block per (sequence, new token) row; its threads cover (KV head, vector).
// Positions are wrapped with a non-negative modulo, so a negative position
// (rejected on the CPU, unchecked here to avoid a host sync) still lands in
// the cache rather than outside it.
template <class T, int VEC, class P>
__global__ void __launch_bounds__(kAppendThreads) kv_cache_append_kernel(KvAppendArgs a, int64_t first) {
  using V = Pack<T, VEC>;
  const int64_t tokens = a.seqlen - first;
  const int64_t b = blockIdx.x / tokens, s = first + blockIdx.x % tokens;
  const int64_t p = static_cast<const P*>(a.positions)[b * a.seqlen + s];
  int64_t slot = p % a.capacity;
  if (slot < 0) slot += a.capacity;
  const int nvec = int(a.head_dim / VEC);
  const int per_token = int(a.kv_heads) * nvec;
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride[0] + s * a.k_stride[1];
  const T* v = static_cast<const T*>(a.v) + b * a.v_stride[0] + s * a.v_stride[1];
  const int64_t dst = (b * a.capacity + slot) * a.kv_heads * a.head_dim;
  V* kc = reinterpret_cast<V*>(static_cast<T*>(a.k_cache) + dst);
  V* vc = reinterpret_cast<V*>(static_cast<T*>(a.v_cache) + dst);
  for (int e = threadIdx.x; e < per_token; e += blockDim.x) {
    const int h = e / nvec, j = e % nvec;
    kc[e] = reinterpret_cast<const V*>(k + h * a.k_stride[2])[j];
    vc[e] = reinterpret_cast<const V*>(v + h * a.v_stride[2])[j];
  }
}

// __launch_bounds__'s minimum of 1 block: without it ptxas held several
// instances to 96 registers and spilled around the int64 divisions' calls
// (nvcc 13.0, 4-16 bytes); with it they take 74-247, as before the softcap.
template <class T, int D, int G>
__global__ void __launch_bounds__(kThreads, 1) decode_attn_kernel(DecodeArgs a, int head_chunks) {
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int LANES = D / VEC < 32 ? D / VEC : 32;  // 8..32: always within one warp/wavefront
  constexpr int EPL = D / LANES;                        // elements a lane: VEC, or 2 VEC (float32, D = 256)
  constexpr int GROUPS = kThreads / LANES;  // keys the block reads side by side
  constexpr int KB = G > 4 ? 2 : 4;         // keys per lane group per step; fewer when q/acc take the registers
  static_assert(LANES <= 32 && kThreads % LANES == 0 && EPL % VEC == 0, "a key row must fit one warp");
  // A lane's share of a row: one 16-byte Pack, or two 16-byte aligned ones
  // (float32, D = 256; a Pack of 32 bytes would demand 32-byte alignment).
  struct alignas(16) Wide {
    T v[EPL];
  };
  using V = std::conditional_t<EPL == VEC, Pack<T, VEC>, Wide>;
  __shared__ float sm_acc[GROUPS][G][D];
  __shared__ float sm_m[GROUPS][G], sm_l[GROUPS][G];

  const int split = blockIdx.x;
  const int64_t kvh = blockIdx.y / head_chunks;
  const int h0 = int(blockIdx.y % head_chunks) * G;
  const int64_t b = blockIdx.z;
  const int group_size = int(a.heads / a.kv_heads);
  const int nh = min(G, group_size - h0);
  const int lane = threadIdx.x % LANES, grp = threadIdx.x / LANES;
  const int64_t C = a.capacity;

  // Visible keys: the last n positions seen - n .. seen - 1, split evenly over
  // the splits (rounded to whole block steps) by the runtime length.
  const int64_t keys = a.window > 0 ? min64(a.window, C) : C;
  // mutant-equivalent(flip): at seqlens[b] == 0 both arms give 0.
  const int64_t seen = a.seqlens[b] > 0 ? a.seqlens[b] : 0;  // negative: nothing visible
  const int64_t first = first_visible(a, b, seen, keys);    // position of the oldest visible key
  const int64_t n = seen - first;
  int64_t per_split = (n + a.splits - 1) / a.splits;
  per_split = (per_split + GROUPS - 1) / GROUPS * GROUPS;
  const int64_t begin = min64(n, split * per_split), end = min64(n, begin + per_split);
  const int64_t first_slot = first % C;  // ring: its slot

  const int64_t row0 = b * a.heads + kvh * group_size + h0;  // first query head (row of q/out) of this block
  // Scores in log2 units: q pre-scaled by scale * log2(e), or, under a
  // softcap, by scale alone and the capped score times log2(e).
  const float qscale = a.softcap > 0.f ? a.scale : a.scale * kLog2e;
  float qr[G][EPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    V qv{};
    if (g < nh)
      qv = reinterpret_cast<const V*>(static_cast<const T*>(a.q) + b * a.q_stride[0] +
                                      (kvh * group_size + h0 + g) * a.q_stride[1])[lane];
#pragma unroll
    for (int i = 0; i < EPL; ++i) qr[g][i] = to_f32(qv.v[i]) * qscale;
  }

  float m[G], l[G], acc[G][EPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[g][i] = 0.f;
  }

  const T* kcache = static_cast<const T*>(a.k_cache);
  const T* vcache = static_cast<const T*>(a.v_cache);
  // The trip count is the same for every thread of the block, so the
  // shuffles below always run with all lanes present.
  for (int64_t base = begin; base < end; base += GROUPS * KB) {
    V kv[KB], vv[KB];
    bool ok[KB];
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      const int64_t j = base + k * GROUPS + grp;
      ok[k] = j < end;
      kv[k] = V{};
      vv[k] = V{};  // zeros, not stale registers: p = 0 times NaN would still be NaN
      if (ok[k]) {
        CacheIndex at;
        if (a.block_table) {
          at = cache_index(a, b, min64(first + j, C - 1));  // a seqlen past the page table's end is clamped
        } else {
          int64_t slot = first_slot + j;  // j < n <= C, so one wrap at most
          if (slot >= C) slot -= C;
          at = {b, slot};
        }
        kv[k] = reinterpret_cast<const V*>(kcache + k_offset(a, at, kvh))[lane];
        vv[k] = reinterpret_cast<const V*>(vcache + v_offset(a, at, kvh))[lane];
      }
    }
    float s[KB][G];
#pragma unroll
    for (int k = 0; k < KB; ++k) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) d += qr[g][i] * to_f32(kv[k].v[i]);
#pragma unroll
        for (int mask = LANES / 2; mask > 0; mask >>= 1) d += shfl_xor(d, mask);
        s[k][g] = d;
      }
    }
    // The cap's constants are re-read from the kernel arguments here rather
    // than kept in registers: live across the int64 divisions' calls, they
    // cost saved-register spills (nvcc 13.0).
    if (a.softcap > 0.f) {
#pragma unroll
      for (int k = 0; k < KB; ++k)
#pragma unroll
        for (int g = 0; g < G; ++g)
          s[k][g] = a.softcap * kLog2e * flash::tanh_via_exp2(flash::fast_div(s[k][g], a.softcap));
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int k = 0; k < KB; ++k)
        if (ok[k]) mx = fmaxf(mx, s[k][g]);
      // Until a group sees a key its max is -inf; exp2(-inf - 0) = 0 then
      // instead of the NaN of -inf - -inf.
      const float mref = mx == -INFINITY ? 0.f : mx;
      const float corr = exp2f(m[g] - mref);
      l[g] *= corr;
#pragma unroll
      for (int i = 0; i < EPL; ++i) acc[g][i] *= corr;
#pragma unroll
      for (int k = 0; k < KB; ++k) {
        const float p = ok[k] ? exp2f(s[k][g] - mref) : 0.f;
        l[g] += p;
#pragma unroll
        for (int i = 0; i < EPL; ++i) acc[g][i] += p * to_f32(vv[k].v[i]);
      }
      m[g] = mx;
    }
  }

  // Merge the lane groups' (m, l, acc) through shared memory.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      sm_m[grp][g] = m[g];
      sm_l[grp][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) sm_acc[grp][g][lane * EPL + i] = acc[g][i];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nh * D; e += kThreads) {
    const int g = e / D, dd = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < GROUPS; ++r) mx = fmaxf(mx, sm_m[r][g]);
    const float mref = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int r = 0; r < GROUPS; ++r) {
      const float w = exp2f(sm_m[r][g] - mref);
      sum += sm_l[r][g] * w;
      o += sm_acc[r][g][dd] * w;
    }
    // sum == 0: no visible key (zeros, lse -inf). A NaN score (a NaN in the
    // cache) is skipped by fmaxf but makes sum NaN, and must reach the
    // output as on the CPU, not vanish into the zero case.
    // With one split this is the output, and the sink joins the denominator
    // here; with several, a partial without it.
    const int64_t row = row0 + g;
    const float sink = a.splits == 1 && a.sinks ? a.sinks[kvh * group_size + h0 + g] : -INFINITY;
    const flash::RowEnd end = flash::finish_row(sum != 0.f ? mx * kLn2 : -INFINITY, sum, sink);
    if (a.splits == 1) {
      static_cast<T*>(a.out)[row * D + dd] = from_f32<T>(o * end.inv);
      if (dd == 0) a.lse[row] = end.lse;
    } else {
      a.ws_out[(row * a.splits + split) * D + dd] = o * end.inv;
      if (dd == 0) a.ws_lse[row * a.splits + split] = end.lse;
    }
  }
}

// One (sequence, query head) row per threadIdx.y: out = sum_s w_s o_s / sum_s w_s
// with w_s = exp(lse_s - max lse). Empty splits have w_s = 0; a row with no
// visible key at all gets zeros and lse = -inf. The sink, which no partial
// carries, joins the denominator here, once (flash::finish_row): a row with
// no visible key then gets zeros and lse = sink.
template <class T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(DecodeArgs a) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= a.batch * a.heads) return;
  const int64_t splits = a.splits, d = a.head_dim;
  const float* lse = a.ws_lse + row * splits;
  float mx = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) mx = fmaxf(mx, lse[s]);
  const float mref = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  for (int64_t s = 0; s < splits; ++s) sum += expf(lse[s] - mref);
  // row = b * heads + head < 2^32 (both below 2^16): a 32-bit remainder.
  float sink = a.sinks ? a.sinks[uint32_t(row) % uint32_t(a.heads)] : -INFINITY;
#if defined(MIXKIT_EMULATE)
  if (emu::mutation() == kMutationCombineDropsSink) sink = -INFINITY;
#endif
  // NaN propagates, as in decode_attn_kernel.
  const flash::RowEnd end = flash::finish_row(sum != 0.f ? mx : -INFINITY, sum, sink);
  const float* part = a.ws_out + row * splits * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float o = 0.f;
    for (int64_t s = 0; s < splits; ++s) o += expf(lse[s] - mref) * part[s * d + i];
    static_cast<T*>(a.out)[row * d + i] = from_f32<T>(o * end.inv);
  }
  if (threadIdx.x == 0) a.lse[row] = end.lse;
}

// ============================== launchers ====================================

// Query heads per block for a GQA group: the group itself, padded to a
// power of two up to kMaxGroup (3 -> 4, 5..7 -> 8); larger groups take
// ceil(group / 8) blocks, each reading the KV head again (mostly from L2).
int group_tile(int64_t group_size) {
  return group_size > 4 ? kMaxGroup : group_size > 2 ? 4 : int(group_size);
}

template <class T>
bool append_vector_ok(const KvAppendArgs& a) {
  constexpr int kVec = 16 / int(sizeof(T));
  if (a.head_dim % kVec) return false;
  for (const void* p : {a.k, a.v, static_cast<const void*>(a.k_cache), static_cast<const void*>(a.v_cache)})
    if (!aligned_to(p, 16)) return false;
  for (int i = 0; i < 3; ++i)
    if (a.k_stride[i] % kVec || a.v_stride[i] % kVec) return false;
  return true;
}

template <class T, int VEC>
void launch_append(const KvAppendArgs& a, int64_t first, gpuStream_t stream) {
  const int64_t rows = a.batch * (a.seqlen - first);
  require(rows <= 0x7fffffff, "too many tokens for one kv_cache_append launch");
  const int64_t per_token = a.kv_heads * (a.head_dim / VEC);
  const int threads = int(std::min<int64_t>(kAppendThreads, (per_token + 31) / 32 * 32));
  if (a.positions_int64)
    gpu_launch(kv_cache_append_kernel<T, VEC, int64_t>, unsigned(rows), threads, 0, stream, a, first);
  else
    gpu_launch(kv_cache_append_kernel<T, VEC, int32_t>, unsigned(rows), threads, 0, stream, a, first);
}

// Turns the runtime (head_dim, head tile) into the kernel instance in this
// one place, for the launch and for the occupancy query.
template <class T, int D, class F>
void with_tile(int tile, F&& f) {
  switch (tile) {
    case 1: return f(decode_attn_kernel<T, D, 1>);
    case 2: return f(decode_attn_kernel<T, D, 2>);
    case 4: return f(decode_attn_kernel<T, D, 4>);
    default: return f(decode_attn_kernel<T, D, kMaxGroup>);
  }
}
template <class T, class F>
void with_decode_kernel(int64_t head_dim, int tile, F&& f) {
  if (head_dim == 64) return with_tile<T, 64>(tile, f);
  if (head_dim == 128) return with_tile<T, 128>(tile, f);
  with_tile<T, 256>(tile, f);
}

bool gpu_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256; }

template <class T>
void launch_decode(const DecodeArgs& a, gpuStream_t stream) {
  const int64_t group_size = a.heads / a.kv_heads;
  const int tile = group_tile(group_size);
  const int64_t chunks = (group_size + tile - 1) / tile;
  require(a.kv_heads * chunks <= 65535, "too many KV heads for one decode launch");
  const dim3 grid{unsigned(a.splits), unsigned(a.kv_heads * chunks), unsigned(a.batch)};
  with_decode_kernel<T>(a.head_dim, tile,
                        [&](auto kernel) { gpu_launch(kernel, grid, kThreads, 0, stream, a, int(chunks)); });
  gpu_check(gpuGetLastError(), "launching decode_attn_kernel");
  if (a.splits == 1) return;
  const int d = int(a.head_dim);
  const int rows_per_block = kCombineThreads / d;
  const int64_t rows = a.batch * a.heads;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  require(blocks <= 0x7fffffff, "too many rows for one decode combine launch");
  gpu_launch(decode_combine_kernel<T>, unsigned(blocks), dim3(d, rows_per_block), 0, stream, a);
  gpu_check(gpuGetLastError(), "launching decode_combine_kernel");
}

}  // namespace

void kv_cache_append_gpu(const KvAppendArgs& a, int device, void* stream) {
  check(a);
  const int64_t first = std::max<int64_t>(0, a.seqlen - a.capacity);  // only the last C tokens survive the call
  if (a.batch == 0 || a.seqlen == 0) return;
  DeviceGuard guard(device);
  const gpuStream_t s = static_cast<gpuStream_t>(stream);
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (append_vector_ok<T>(a)) launch_append<T, 16 / int(sizeof(T))>(a, first, s);
    else launch_append<T, 1>(a, first, s);
  });
  gpu_check(gpuGetLastError(), "launching kv_cache_append_kernel");
}

// The split count fills the GPU with one wave: as many blocks as can be
// resident at once (the occupancy of this exact kernel instance, times the
// SM count), divided among the B * Hkv * head-tiles blocks of one split.
// Rounding down keeps every block resident, so the splits finish together;
// rounding up would leave a second, partial wave that costs as long as the
// first (for B = 8 on 132 SMs, 9 splits instead of 6 would run 1.45 waves of
// work in 2 waves of time). Splits also keep at least kMinKeysPerSplit keys.
int64_t decode_splits_gpu(DType dtype, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                          int64_t capacity, int64_t window, int device) {
  check_dtype(dtype);
  require(batch >= 0 && kv_heads >= 1 && heads >= kv_heads && capacity >= 1 && window >= 0, "bad decode shape");
  require(gpu_head_dim(head_dim),
          "the GPU decode kernel supports head_dim 64, 128 and 256, got " + std::to_string(head_dim));
  const int64_t keys = window > 0 ? std::min(window, capacity) : capacity;
  const int64_t group_size = heads / kv_heads;
  const int tile = group_tile(group_size);
  const int64_t blocks = std::max<int64_t>(1, batch * kv_heads * ((group_size + tile - 1) / tile));
  int resident = 0;
  DeviceGuard guard(device);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    with_decode_kernel<T>(head_dim, tile,
                          [&](auto kernel) { resident = occupancy_blocks_per_sm(kernel, kThreads, 0); });
  });
  const int64_t slots = int64_t(std::max(resident, 1)) * sm_count(device);
  const int64_t by_occupancy = slots / blocks;
  const int64_t by_length = (keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  return std::clamp<int64_t>(std::min(by_occupancy, by_length), 1, kMaxSplits);
}

void decode_attn_gpu(const DecodeArgs& a, int device, void* stream) {
  check(a);
  require(gpu_head_dim(a.head_dim),
          "the GPU decode kernel supports head_dim 64, 128 and 256, got " + std::to_string(a.head_dim));
  if (a.batch == 0) return;
  for (const void* p : {a.q, a.k_cache, a.v_cache, static_cast<const void*>(a.out)})
    require(aligned_to(p, 16), "q, k_cache, v_cache and out must be 16-byte aligned on the GPU");
  // The kernel reads 16-byte vectors: every stride must keep rows 16-byte aligned.
  const int64_t vec = a.dtype == DType::f32 ? 4 : 8;
  for (int64_t st : {a.q_stride[0], a.q_stride[1], a.k_stride[0], a.k_stride[1], a.k_stride[2], a.v_stride[0],
                     a.v_stride[1], a.v_stride[2]})
    require(st % vec == 0, "q and cache strides must be multiples of 16 bytes on the GPU");
  DeviceGuard guard(device);
  const gpuStream_t s = static_cast<gpuStream_t>(stream);
  dispatch_dtype(a.dtype, [&](auto t) { launch_decode<decltype(t)>(a, s); });
}

}  // namespace mixkit
