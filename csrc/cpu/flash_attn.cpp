// Flash attention on the CPU, forward and backward: the GPU kernels' math
// (blocked online softmax, P recomputed from lse in the backward) in float32,
// any head dim, outputs rounded once; logit softcap and attention sinks as
// common/flash_attn.h defines them.
//
// Work is cut into 64 x 64 (query, key) tiles. Each tile of K or V is converted
// to float32 once per tile (K also transposed to Kt[d][j]), and every tile
// product is one register-blocked routine, gemm() in flash_attn_tiles.h:
// kRows rows of C by up to kMaxCV 16-float vectors held in registers while it
// streams over the inner dimension (head dims padded to 16). Only key tiles
// that intersect a query tile's visible range are visited, so causal work is
// about S^2 / 2 and windowed work S * W.
//
// Instruction sets: the tile code is compiled three times, for AVX-512, for
// AVX2 + FMA and for the baseline (SSE2 on x86-64, whatever the compiler
// targets elsewhere), and each call runs the best one the CPU has (or the one
// MIXKIT_CPU_ISA names: avx512, avx2, base). The AVX variants need GCC's
// `#pragma GCC target`; other compilers build the baseline alone. The old
// baseline-only kernel took 1.85x SDPA's time on the quick start's attention;
// AVX-512 takes 0.4x (README, Performance).
//
// The backward needs no atomics and its result does not depend on the thread
// count: delta per query row; then one task per (sequence, KV head, slice of
// its query heads) walks the key tiles in order and owns its dQ rows (float32,
// the whole sequence) and its dK/dV rows; with more than one slice per KV
// head, the slices' float32 dK/dV partials are summed in slice order by a
// last pass. Whether the heads are sliced depends on the shapes alone.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/flash_attn.h"

namespace mixkit {
namespace {

constexpr int64_t kTile = 64;
// Head dims are padded to a whole number of 16-float vectors in the tiles.
constexpr int64_t kDChunk = 16;
// The backward slices each KV head's query heads (one task per query head)
// when there are fewer (sequence, KV head) pairs than this, so that a long
// sequence with few KV heads still keeps the cores busy, unless the float32
// dK/dV partials that costs would pass kMaxPartialBytes.
constexpr int64_t kSliceBelowTasks = 32;
constexpr int64_t kMaxPartialBytes = int64_t(64) << 20;

const float kNegInf = -std::numeric_limits<float>::infinity();

// One sequence: its first row in the token dimension and its lengths.
struct Seq {
  int64_t q0, k0, sq, sk;
};

// Validates cu_seqlens values (check() cannot read them: on the GPU they live in
// device memory) and returns the longest sequence, which sizes the task grid.
int64_t validate_cu(const int32_t* cu, int64_t batch, int64_t total, int64_t max_seqlen, const char* name) {
  const std::string n = name;
  require(cu[0] == 0, n + "[0] must be 0, got " + std::to_string(cu[0]));
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    require(len >= 0, n + " must be non-decreasing, got " + n + "[" + std::to_string(b) + "] = " +
                          std::to_string(cu[b]) + " > " + n + "[" + std::to_string(b + 1) +
                          "] = " + std::to_string(cu[b + 1]));
    longest = std::max(longest, len);
  }
  require(cu[batch] == total, n + "[-1] = " + std::to_string(cu[batch]) + " must equal the total rows " +
                                  std::to_string(total));
  const std::string hint = n == "cu_seqlens_q" ? "max_seqlen_q" : "max_seqlen_k";
  require(longest <= max_seqlen, hint + " = " + std::to_string(max_seqlen) +
                                     " is smaller than the real maximum length " + std::to_string(longest));
  return longest;
}

// Checks the arguments and cu_seqlens values; returns the longest query and key
// sequences. Everything that can throw runs here, before any OpenMP region.
void validate(const FlashFwdArgs& a, int64_t* longest_q, int64_t* longest_k) {
  check(a);
  *longest_q = a.seqlen_q;
  *longest_k = a.seqlen_k;
  if (a.cu_seqlens_q) {
    *longest_q = validate_cu(a.cu_seqlens_q, a.batch, a.total_q, a.seqlen_q, "cu_seqlens_q");
    *longest_k = validate_cu(a.cu_seqlens_k, a.batch, a.total_k, a.seqlen_k, "cu_seqlens_k");
  }
}

Seq sequence(const FlashFwdArgs& a, int64_t b) {
  if (a.cu_seqlens_q) {
    const int64_t q0 = a.cu_seqlens_q[b], k0 = a.cu_seqlens_k[b];
    return {q0, k0, a.cu_seqlens_q[b + 1] - q0, a.cu_seqlens_k[b + 1] - k0};
  }
  return {0, 0, a.seqlen_q, a.seqlen_k};
}

// The mask for one sequence: query i sees keys [lo(i), hi(i)). Both bounds
// grow with i, so a query tile [i0, i1) sees keys [lo(i0), hi(i1 - 1)).
struct Mask {
  int64_t shift;  // sk - sq: query i sits at absolute position i + shift
  int64_t sk;
  bool causal;
  int64_t window;
  int64_t lo(int64_t i) const { return window > 0 ? std::max<int64_t>(0, i + shift - window + 1) : 0; }
  int64_t hi(int64_t i) const { return causal ? std::clamp<int64_t>(i + shift + 1, 0, sk) : sk; }
  // The queries that see some key of [j0, j1), as [first, last) within [0, sq).
  int64_t first_query(int64_t j0) const { return causal ? std::max<int64_t>(0, j0 - shift) : 0; }
  int64_t end_query(int64_t j1, int64_t sq) const {
    return window > 0 ? std::clamp<int64_t>(j1 - 1 - shift + window, 0, sq) : sq;
  }
};


int64_t padded(int64_t d) { return (d + kDChunk - 1) / kDChunk * kDChunk; }

// Shapes, pointers and the task grid of one call.
template <class T>
struct Geometry {
  const FlashFwdArgs& a;
  int64_t d, dp, group, longest_q, longest_k;
  int64_t heads_per_task = 1;  // backward: query heads per task (1 or group)
  float* partials = nullptr;   // backward: [2][total_k][kv_heads][group / heads_per_task][d] float32

  Geometry(const FlashFwdArgs& args, int64_t lq, int64_t lk)
      : a(args), d(args.head_dim), dp(padded(args.head_dim)), group(args.heads / args.kv_heads),
        longest_q(lq), longest_k(lk) {}

  Mask mask(const Seq& s) const { return {s.sk - s.sq, s.sk, a.causal, a.window}; }
  int64_t q_tiles() const { return (longest_q + kTile - 1) / kTile; }
  int64_t k_tiles() const { return (longest_k + kTile - 1) / kTile; }

  // Multiply-adds of the attention itself, to decide whether threads pay off.
  int64_t work() const {
    const int64_t keys = a.window > 0 ? std::min(a.window, longest_k) : longest_k;
    return a.total_q * a.heads * keys * d;
  }

  const T* q_head(int64_t b, int64_t h, const Seq& s) const {
    return static_cast<const T*>(a.q) + b * a.q_stride[0] + s.q0 * a.q_stride[1] + h * a.q_stride[2];
  }
  const T* k_head(int64_t b, int64_t kh, const Seq& s) const {
    return static_cast<const T*>(a.k) + b * a.k_stride[0] + s.k0 * a.k_stride[1] + kh * a.k_stride[2];
  }
  const T* v_head(int64_t b, int64_t kh, const Seq& s) const {
    return static_cast<const T*>(a.v) + b * a.v_stride[0] + s.k0 * a.v_stride[1] + kh * a.v_stride[2];
  }
  T* o_head(int64_t b, int64_t h, const Seq& s) const {
    return static_cast<T*>(a.out) + b * a.o_stride[0] + s.q0 * a.o_stride[1] + h * a.o_stride[2];
  }
  int64_t lse_off(int64_t b, int64_t h, const Seq& s) const {
    return b * a.lse_stride[0] + h * a.lse_stride[1] + s.q0;
  }
  const T* do_head(const FlashBwdArgs& g, int64_t b, int64_t h, const Seq& s) const {
    return static_cast<const T*>(g.dout) + b * g.do_stride[0] + s.q0 * g.do_stride[1] + h * g.do_stride[2];
  }
  T* dq_head(const FlashBwdArgs& g, int64_t b, int64_t h, const Seq& s) const {
    return static_cast<T*>(g.dq) + b * g.dq_stride[0] + s.q0 * g.dq_stride[1] + h * g.dq_stride[2];
  }
  T* dk_head(const FlashBwdArgs& g, int64_t b, int64_t kh, const Seq& s) const {
    return static_cast<T*>(g.dk) + b * g.dk_stride[0] + s.k0 * g.dk_stride[1] + kh * g.dk_stride[2];
  }
  T* dv_head(const FlashBwdArgs& g, int64_t b, int64_t kh, const Seq& s) const {
    return static_cast<T*>(g.dv) + b * g.dv_stride[0] + s.k0 * g.dv_stride[1] + kh * g.dv_stride[2];
  }
  // The float32 partial of key row j of sequence b (which: 0 = dK, 1 = dV).
  float* part(const FlashBwdArgs&, int which, int64_t b, const Seq& s, int64_t j, int64_t kh, int64_t sub) const {
    const int64_t row = (a.cu_seqlens_k ? s.k0 : b * a.seqlen_k) + j;
    const int64_t slices = group / heads_per_task;
    return partials + (((which * a.total_k + row) * a.kv_heads + kh) * slices + sub) * d;
  }

  // Query tiles are handed out largest index first: under a causal mask they
  // carry the most keys, and dynamic scheduling then ends with the small ones.
  void task_q(int64_t t, int64_t* b, int64_t* h, int64_t* qt) const {
    const int64_t n = q_tiles();
    *qt = n - 1 - t % n;
    *h = (t / n) % a.heads;
    *b = t / n / a.heads;
  }
};

// Per-thread float32 tiles.
struct FwdScratch {
  std::vector<float> Q, Kt, V, O, S, P, m, l;
  explicit FwdScratch(int64_t dp)
      : Q(kTile * dp), Kt(dp * kTile), V(kTile * dp), O(kTile * dp), S(kTile * kTile), P(kTile * kTile),
        m(kTile), l(kTile) {}
};

struct BwdScratch {
  std::vector<float> Q, dO, Kt, K, Vt, dK, dV, S, P, cap, lse, delta, dQ;
  BwdScratch(int64_t dp, int64_t dq_floats, bool softcap)
      : Q(kTile * dp), dO(kTile * dp), Kt(dp * kTile), K(kTile * dp), Vt(dp * kTile), dK(kTile * dp),
        dV(kTile * dp), S(kTile * kTile), P(kTile * kTile), cap(softcap ? kTile * kTile : 0), lse(kTile),
        delta(kTile), dQ(dq_floats) {}
};

// ---- the tile code, once per instruction set ------------------------------------
// The 64-byte vector type never crosses a call between instruction sets, so
// GCC's note that its calling convention differs between them does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace base {
constexpr int kVecFloats = 4;
constexpr int kRows = 2;
constexpr int kMaxCV = 1;
#include "cpu/flash_attn_tiles.h"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MIXKIT_CPU_X86_ISAS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int kVecFloats = 8;
constexpr int kRows = 4;
constexpr int kMaxCV = 1;
#include "cpu/flash_attn_tiles.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace avx512 {
constexpr int kVecFloats = 16;
constexpr int kRows = 4;
constexpr int kMaxCV = 4;
#include "cpu/flash_attn_tiles.h"
}  // namespace avx512
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

enum class Isa { base, avx2, avx512 };

bool cpu_has(Isa isa) {
#ifdef MIXKIT_CPU_X86_ISAS
  switch (isa) {
    case Isa::base: return true;
    case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && cpu_has(Isa::avx2);
  }
  return false;
#else
  return isa == Isa::base;
#endif
}

// The best instruction set this CPU runs, or MIXKIT_CPU_ISA's choice (avx512,
// avx2 or base), which must be one the CPU has.
Isa choose_isa() {
  const char* env = std::getenv("MIXKIT_CPU_ISA");
  if (env && *env) {
    const std::string name = env;
    Isa want = Isa::base;
    if (name == "avx512") want = Isa::avx512;
    else if (name == "avx2") want = Isa::avx2;
    else if (name == "base") want = Isa::base;
    else require(false, "MIXKIT_CPU_ISA must be avx512, avx2 or base, got '" + name + "'");
    require(cpu_has(want), "MIXKIT_CPU_ISA=" + name + ": this CPU (or this build) cannot run it");
    return want;
  }
  static const Isa best = cpu_has(Isa::avx512) ? Isa::avx512 : cpu_has(Isa::avx2) ? Isa::avx2 : Isa::base;
  return best;
}

template <class T>
struct Tasks {
  void (*forward)(const Geometry<T>&, int64_t, FwdScratch&);
  void (*backward)(const Geometry<T>&, const FlashBwdArgs&, int64_t, BwdScratch&);
};

template <class T>
Tasks<T> tasks_for(Isa isa) {
#ifdef MIXKIT_CPU_X86_ISAS
  if (isa == Isa::avx512) return {avx512::forward_task<T>, avx512::backward_task<T>};
  if (isa == Isa::avx2) return {avx2::forward_task<T>, avx2::backward_task<T>};
#endif
  (void)isa;
  return {base::forward_task<T>, base::backward_task<T>};
}

template <class T>
void forward(const FlashFwdArgs& a, int64_t lq, int64_t lk, Isa isa) {
  const Geometry<T> g(a, lq, lk);
  const Tasks<T> run = tasks_for<T>(isa);
  const int64_t tasks = a.batch * a.heads * g.q_tiles();
#pragma omp parallel if (g.work() > kCpuParallelGrain)
  {
    FwdScratch w(g.dp);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) run.forward(g, t, w);
  }
}

template <class T>
void backward(const FlashBwdArgs& ga, int64_t lq, int64_t lk, Isa isa) {
  const FlashFwdArgs& a = ga.f;
  Geometry<T> g(a, lq, lk);
  const Tasks<T> run = tasks_for<T>(isa);
  const bool parallel = g.work() > kCpuParallelGrain;

  // delta_i = dO_i . O_i, read back in float32 from the rounded output.
  const int64_t qtasks = a.batch * a.heads * g.q_tiles();
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < qtasks; ++t) {
    int64_t b, h, qt;
    g.task_q(t, &b, &h, &qt);
    const Seq s = sequence(a, b);
    const int64_t i0 = qt * kTile;
    const int64_t mq = std::min(kTile, s.sq - i0);
    const T* o = g.o_head(b, h, s);
    const T* go = g.do_head(ga, b, h, s);
    float* delta = ga.delta + g.lse_off(b, h, s);
    for (int64_t i = i0; i < i0 + mq; ++i) {
      const T* orow = o + i * a.o_stride[1];
      const T* grow = go + i * ga.do_stride[1];
      float acc = 0.f;
      for (int64_t c = 0; c < g.d; ++c) acc += to_f32(orow[c]) * to_f32(grow[c]);
      delta[i] = acc;
    }
  }

  // One query head per task for few (sequence, KV head) pairs, when the
  // partials stay small; else the whole group. The shapes alone decide.
  const int64_t partial_bytes = 2 * a.total_k * a.heads * g.d * int64_t(sizeof(float));
  const bool slice = g.group > 1 && a.batch * a.kv_heads < kSliceBelowTasks && partial_bytes <= kMaxPartialBytes;
  g.heads_per_task = slice ? 1 : g.group;
  const int64_t slices = g.group / g.heads_per_task;
  std::vector<float> partials(slices > 1 ? partial_bytes / sizeof(float) : 0);
  g.partials = partials.data();
  const int64_t dq_floats = g.heads_per_task * g.q_tiles() * kTile * g.dp;
  const int64_t tasks = a.batch * a.kv_heads * slices;
#pragma omp parallel if (parallel)
  {
    BwdScratch w(g.dp, dq_floats, a.softcap > 0.f);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) run.backward(g, ga, t, w);
  }
  if (slices == 1) return;

  // dK, dV = the slices' partials summed in slice order.
  const int64_t ktasks = a.batch * a.kv_heads * g.k_tiles();
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < ktasks; ++t) {
    const int64_t nk = g.k_tiles();
    const int64_t kt = t % nk, kh = (t / nk) % a.kv_heads, b = t / nk / a.kv_heads;
    const Seq s = sequence(a, b);
    const int64_t j0 = kt * kTile;
    T* dk = g.dk_head(ga, b, kh, s);
    T* dv = g.dv_head(ga, b, kh, s);
    for (int64_t j = j0; j < std::min(j0 + kTile, s.sk); ++j) {
      for (int which = 0; which < 2; ++which) {
        const float* p = g.part(ga, which, b, s, j, kh, 0);
        T* dst = (which == 0 ? dk + j * ga.dk_stride[1] : dv + j * ga.dv_stride[1]);
        for (int64_t c = 0; c < g.d; ++c) {
          float acc = p[c];
          for (int64_t sub = 1; sub < slices; ++sub) acc += p[sub * g.d + c];
          dst[c] = from_f32<T>(acc);
        }
      }
    }
  }
}

}  // namespace

void flash_attn_fwd_cpu(const FlashFwdArgs& a) {
  int64_t lq, lk;
  validate(a, &lq, &lk);
  const Isa isa = choose_isa();
  dispatch_dtype(a.dtype, [&](auto t) { forward<decltype(t)>(a, lq, lk, isa); });
}

// dq_accum and deterministic serve the GPU's atomic dQ path; this backend is
// always deterministic and needs no workspace beyond delta.
void flash_attn_bwd_cpu(const FlashBwdArgs& a) {
  check(a);
  int64_t lq, lk;
  validate(a.f, &lq, &lk);
  const Isa isa = choose_isa();
  dispatch_dtype(a.f.dtype, [&](auto t) { backward<decltype(t)>(a, lq, lk, isa); });
}

}  // namespace mixkit
