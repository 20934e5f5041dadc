// Flash attention on the CPU, forward and backward: the GPU kernels' math
// (blocked online softmax, P recomputed from lse in the backward) in float32,
// any head dim, outputs rounded once.
//
// Work is cut into 64 x 64 (query, key) tiles. Each tile of K or V is converted
// to float32 once per tile, K transposed to Kt[d][j], so both tile products run
// over a contiguous, fixed-width inner dimension and auto-vectorise:
//   scores: S[i][j] += Q[i][d] * Kt[d][j]   (j contiguous, 64 wide)
//   accum:  C[i][d] += P[i][j] * V[j][d]    (d contiguous, head dim padded)
// Only key tiles that intersect a query tile's visible range are visited, so
// causal work is about S^2 / 2 and windowed work S * W.
// On 2 cores of a Xeon (baseline x86-64 build, -O3), B=1, S=2048, H=8, Hkv=2,
// D=64, causal float32 or bfloat16 takes 0.13 s forward and 0.37 s backward.
//
// The backward runs in passes that each own their outputs, so it needs no
// atomics and its result does not depend on the thread count: delta per query
// row; dK and dV per (sequence, KV head, key tile), summing the GQA group's
// query heads; dQ per (sequence, head, query tile).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/flash_attn.h"

namespace mixkit {
namespace {

constexpr int64_t kTile = 64;
// Head dims are padded to this in the float32 tiles: accum keeps kDChunk
// columns of C in registers while it streams over j.
constexpr int64_t kDChunk = 16;

const float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) that auto-vectorises (std::exp does not without -ffast-math): Cephes'
// expf, 2^n * e^r with |r| <= ln2 / 2 and a degree-7 polynomial, within 1.4 ulp
// for x >= -87. Float compares and selects would block vectorisation under
// -ftrapping-math (GCC 12: "control flow in loop"), so 2^n is clamped and the
// underflow (x < -87.3, -inf included) zeroed with integer selects; NaN stays NaN.
inline float exp_f32(float x) {
  // Adding 1.5 * 2^23 rounds to an integer without SSE4.1's roundps.
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t ni = int32_t(n);  // INT_MIN for -inf and NaN (cvttps2dq)
  int32_t e = ni + 127;
  e = e < 0 ? 0 : e;
  e = e > 255 ? 255 : e;
  e <<= 23;
  float pow2n, y;
  std::memcpy(&pow2n, &e, 4);
  y = p * pow2n;
  int32_t bits;
  std::memcpy(&bits, &y, 4);
  bits &= -int32_t((ni >= -126) | (x != x));
  std::memcpy(&y, &bits, 4);
  return y;
}

// C[i][j] = sum_d A[i][d] * Bt[d][j] for i < m, j < kTile; A rows hold dp floats.
void tile_scores(const float* A, const float* Bt, float* C, int64_t m, int64_t dp) {
  for (int64_t i = 0; i < m; ++i) {
    const float* a = A + i * dp;
    for (int64_t jc = 0; jc < kTile; jc += 32) {
      float acc[32] = {};
      for (int64_t d = 0; d < dp; ++d) {
        const float ad = a[d];
        const float* b = Bt + d * kTile + jc;
#pragma omp simd
        for (int j = 0; j < 32; ++j) acc[j] += ad * b[j];
      }
      std::memcpy(C + i * kTile + jc, acc, sizeof(acc));
    }
  }
}

// C[i][d] += sum_j A[i][j] * B[j][d] for i < m, j < kTile; C and B rows hold dp
// floats (a multiple of kDChunk). Rows of B past the valid keys must be finite.
void tile_accum(float* C, const float* A, const float* B, int64_t m, int64_t dp) {
  for (int64_t i = 0; i < m; ++i) {
    const float* a = A + i * kTile;
    float* c = C + i * dp;
    for (int64_t dc = 0; dc < dp; dc += kDChunk) {
      float acc[kDChunk];
      for (int d = 0; d < kDChunk; ++d) acc[d] = c[dc + d];
      for (int64_t j = 0; j < kTile; ++j) {
        const float aj = a[j];
        const float* b = B + j * dp + dc;
#pragma omp simd
        for (int d = 0; d < kDChunk; ++d) acc[d] += aj * b[d];
      }
      for (int d = 0; d < kDChunk; ++d) c[dc + d] = acc[d];
    }
  }
}

// dst[r][c] = src[c][r] for a kTile x kTile tile.
void transpose_tile(const float* src, float* dst) {
  for (int64_t r = 0; r < kTile; ++r)
    for (int64_t c = 0; c < kTile; ++c) dst[r * kTile + c] = src[c * kTile + r];
}

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

// Rows [r0, r0 + m) of one head into dst[r][0..dp), times `mul`; the padding
// columns and rows m..kTile are zero, so tile products over them add nothing.
template <class T>
void load_rows(const T* base, int64_t row_stride, int64_t r0, int64_t m, int64_t d, int64_t dp, float mul,
               float* dst) {
  for (int64_t r = 0; r < kTile; ++r) {
    float* o = dst + r * dp;
    if (r < m) {
      const T* src = base + (r0 + r) * row_stride;
      for (int64_t c = 0; c < d; ++c) o[c] = to_f32(src[c]) * mul;
      std::fill(o + d, o + dp, 0.f);
    } else {
      std::fill(o, o + dp, 0.f);
    }
  }
}

// Rows [r0, r0 + m) of one head, transposed into dst[c][r] (dp x kTile), zero padded.
template <class T>
void load_rows_t(const T* base, int64_t row_stride, int64_t r0, int64_t m, int64_t d, int64_t dp, float* dst) {
  std::fill(dst, dst + dp * kTile, 0.f);
  for (int64_t r = 0; r < m; ++r) {
    const T* src = base + (r0 + r) * row_stride;
    for (int64_t c = 0; c < d; ++c) dst[c * kTile + r] = to_f32(src[c]);
  }
}

template <class T>
void store_rows(T* base, int64_t row_stride, int64_t r0, int64_t m, int64_t d, int64_t dp, float mul,
                const float* src) {
  for (int64_t r = 0; r < m; ++r) {
    T* o = base + (r0 + r) * row_stride;
    const float* s = src + r * dp;
    for (int64_t c = 0; c < d; ++c) o[c] = from_f32<T>(s[c] * mul);
  }
}

// P[i][j] = exp(S[i][j] - lse_i) on visible pairs, else 0, for the query tile
// [i0, i0 + m) against the key tile [j0, j0 + n). Rows with lse = -inf see nothing.
void probs_from_lse(const Mask& mk, int64_t i0, int64_t m, int64_t j0, int64_t n, const float* S,
                    const float* lse, float* P) {
  for (int64_t i = 0; i < kTile; ++i) {
    float* p = P + i * kTile;
    std::fill(p, p + kTile, 0.f);
    if (i >= m || lse[i] == kNegInf) continue;
    const int64_t jlo = std::max<int64_t>(mk.lo(i0 + i) - j0, 0);
    const int64_t jhi = std::min<int64_t>(mk.hi(i0 + i) - j0, n);
    const float* s = S + i * kTile;
    const float li = lse[i];
#pragma omp simd
    for (int64_t j = jlo; j < jhi; ++j) p[j] = exp_f32(s[j] - li);
  }
}

// dS[i][j] = P[i][j] * (dP[i][j] - delta_i), in place over dP; rows m..kTile,
// which tile_scores left stale, become zero.
void grad_scores(const float* P, const float* delta, float* dP, int64_t m) {
  std::fill(dP + m * kTile, dP + kTile * kTile, 0.f);
  for (int64_t i = 0; i < m; ++i) {
    const float di = delta[i];
    const float* p = P + i * kTile;
    float* g = dP + i * kTile;
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) g[j] = p[j] * (g[j] - di);
  }
}

template <class T>
struct Flash {
  const FlashFwdArgs& a;
  int64_t d, dp, group, longest_q, longest_k;

  Flash(const FlashFwdArgs& args, int64_t lq, int64_t lk)
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

  // Query tiles are handed out largest index first: under a causal mask they
  // carry the most keys, and dynamic scheduling then ends with the small ones.
  void task_q(int64_t t, int64_t* b, int64_t* h, int64_t* qt) const {
    const int64_t n = q_tiles();
    *qt = n - 1 - t % n;
    *h = (t / n) % a.heads;
    *b = t / n / a.heads;
  }

  void forward() {
    const int64_t tasks = a.batch * a.heads * q_tiles();
#pragma omp parallel if (work() > kCpuParallelGrain)
    {
      std::vector<float> Q(kTile * dp), Kt(dp * kTile), V(kTile * dp), O(kTile * dp), S(kTile * kTile),
          P(kTile * kTile), m(kTile), l(kTile);
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < tasks; ++t) {
        int64_t b, h, qt;
        task_q(t, &b, &h, &qt);
        const Seq s = sequence(a, b);
        const int64_t i0 = qt * kTile;
        if (i0 >= s.sq) continue;
        const int64_t mq = std::min(kTile, s.sq - i0);
        const Mask mk = mask(s);
        const int64_t kh = h / group;
        load_rows(q_head(b, h, s), a.q_stride[1], i0, mq, d, dp, a.scale, Q.data());
        std::fill(O.begin(), O.end(), 0.f);
        std::fill(m.begin(), m.end(), kNegInf);
        std::fill(l.begin(), l.end(), 0.f);
        const int64_t lo = mk.lo(i0), hi = mk.hi(i0 + mq - 1);
        for (int64_t j0 = lo / kTile * kTile; j0 < hi; j0 += kTile) {
          const int64_t n = std::min(kTile, s.sk - j0);
          load_rows_t(k_head(b, kh, s), a.k_stride[1], j0, n, d, dp, Kt.data());
          load_rows(v_head(b, kh, s), a.v_stride[1], j0, n, d, dp, 1.f, V.data());
          tile_scores(Q.data(), Kt.data(), S.data(), mq, dp);
          for (int64_t i = 0; i < kTile; ++i) {
            float* p = P.data() + i * kTile;
            std::fill(p, p + kTile, 0.f);
            if (i >= mq) continue;
            const int64_t jlo = std::max<int64_t>(mk.lo(i0 + i) - j0, 0);
            const int64_t jhi = std::min<int64_t>(mk.hi(i0 + i) - j0, n);
            if (jlo >= jhi) continue;
            const float* srow = S.data() + i * kTile;
            float mx = m[i];
            for (int64_t j = jlo; j < jhi; ++j) mx = std::max(mx, srow[j]);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = jlo; j < jhi; ++j) {
              p[j] = exp_f32(srow[j] - mx);
              sum += p[j];
            }
            if (m[i] != mx) {  // rescale what earlier tiles accumulated
              const float alpha = std::exp(m[i] - mx);
              float* o = O.data() + i * dp;
#pragma omp simd
              for (int64_t c = 0; c < dp; ++c) o[c] *= alpha;
              l[i] *= alpha;
              m[i] = mx;
            }
            l[i] += sum;
          }
          tile_accum(O.data(), P.data(), V.data(), mq, dp);
        }
        T* out = o_head(b, h, s);
        float* lse = a.lse + lse_off(b, h, s) + i0;
        for (int64_t i = 0; i < mq; ++i) {
          // A query that sees nothing keeps l = 0: zero output, lse = -inf.
          const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
          float* o = O.data() + i * dp;
          T* dst = out + (i0 + i) * a.o_stride[1];
          for (int64_t c = 0; c < d; ++c) dst[c] = from_f32<T>(o[c] * inv);
          lse[i] = l[i] > 0.f ? m[i] + std::log(l[i]) : kNegInf;
        }
      }
    }
  }

  void backward(const FlashBwdArgs& g) {
    const T* dout = static_cast<const T*>(g.dout);
    const int64_t qtasks = a.batch * a.heads * q_tiles();
    const int64_t ktasks = a.batch * a.kv_heads * k_tiles();
    const bool parallel = work() > kCpuParallelGrain;
    auto do_head = [&](int64_t b, int64_t h, const Seq& s) {
      return dout + b * g.do_stride[0] + s.q0 * g.do_stride[1] + h * g.do_stride[2];
    };

    // delta_i = dO_i . O_i, read back in float32 from the rounded output.
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t t = 0; t < qtasks; ++t) {
      int64_t b, h, qt;
      task_q(t, &b, &h, &qt);
      const Seq s = sequence(a, b);
      const int64_t i0 = qt * kTile;
      const int64_t mq = std::min(kTile, s.sq - i0);
      const T* o = o_head(b, h, s);
      const T* go = do_head(b, h, s);
      float* delta = g.delta + lse_off(b, h, s);
      for (int64_t i = i0; i < i0 + mq; ++i) {
        const T* orow = o + i * a.o_stride[1];
        const T* grow = go + i * g.do_stride[1];
        float acc = 0.f;
        for (int64_t c = 0; c < d; ++c) acc += to_f32(orow[c]) * to_f32(grow[c]);
        delta[i] = acc;
      }
    }

    // dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i dS_ij q_i over the GQA
    // group's query heads; Q is loaded pre-scaled, which supplies the scale.
#pragma omp parallel if (parallel)
    {
      std::vector<float> Q(kTile * dp), dO(kTile * dp), Kt(dp * kTile), Vt(dp * kTile), dK(kTile * dp),
          dV(kTile * dp), S(kTile * kTile), P(kTile * kTile), PT(kTile * kTile), lse(kTile), delta(kTile);
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < ktasks; ++t) {
        const int64_t nk = k_tiles();
        const int64_t kt = t % nk, kh = (t / nk) % a.kv_heads, b = t / nk / a.kv_heads;
        const Seq s = sequence(a, b);
        const int64_t j0 = kt * kTile;
        if (j0 >= s.sk) continue;
        const int64_t n = std::min(kTile, s.sk - j0);
        const Mask mk = mask(s);
        load_rows_t(k_head(b, kh, s), a.k_stride[1], j0, n, d, dp, Kt.data());
        load_rows_t(v_head(b, kh, s), a.v_stride[1], j0, n, d, dp, Vt.data());
        std::fill(dK.begin(), dK.end(), 0.f);
        std::fill(dV.begin(), dV.end(), 0.f);
        const int64_t first = mk.first_query(j0), end = mk.end_query(j0 + n, s.sq);
        for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
          const float* lse_h = a.lse + lse_off(b, h, s);
          const float* delta_h = g.delta + lse_off(b, h, s);
          for (int64_t i0 = first / kTile * kTile; i0 < end; i0 += kTile) {
            const int64_t mq = std::min(kTile, s.sq - i0);
            load_rows(q_head(b, h, s), a.q_stride[1], i0, mq, d, dp, a.scale, Q.data());
            load_rows(do_head(b, h, s), g.do_stride[1], i0, mq, d, dp, 1.f, dO.data());
            for (int64_t i = 0; i < kTile; ++i) {
              lse[i] = i < mq ? lse_h[i0 + i] : kNegInf;
              delta[i] = i < mq ? delta_h[i0 + i] : 0.f;
            }
            tile_scores(Q.data(), Kt.data(), S.data(), mq, dp);
            probs_from_lse(mk, i0, mq, j0, n, S.data(), lse.data(), P.data());
            transpose_tile(P.data(), PT.data());
            tile_accum(dV.data(), PT.data(), dO.data(), n, dp);
            tile_scores(dO.data(), Vt.data(), S.data(), mq, dp);
            grad_scores(P.data(), delta.data(), S.data(), mq);
            transpose_tile(S.data(), PT.data());
            tile_accum(dK.data(), PT.data(), Q.data(), n, dp);
          }
        }
        // Every row is written, zeros where no query sees the key.
        T* dk = static_cast<T*>(g.dk) + b * g.dk_stride[0] + s.k0 * g.dk_stride[1] + kh * g.dk_stride[2];
        T* dv = static_cast<T*>(g.dv) + b * g.dv_stride[0] + s.k0 * g.dv_stride[1] + kh * g.dv_stride[2];
        store_rows(dk, g.dk_stride[1], j0, n, d, dp, 1.f, dK.data());
        store_rows(dv, g.dv_stride[1], j0, n, d, dp, 1.f, dV.data());
      }
    }

    // dQ_i = scale * sum_j dS_ij k_j, P recomputed.
#pragma omp parallel if (parallel)
    {
      std::vector<float> Q(kTile * dp), dO(kTile * dp), Kt(dp * kTile), Vt(dp * kTile), K(kTile * dp),
          dQ(kTile * dp), S(kTile * kTile), P(kTile * kTile), lse(kTile), delta(kTile);
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < qtasks; ++t) {
        int64_t b, h, qt;
        task_q(t, &b, &h, &qt);
        const Seq s = sequence(a, b);
        const int64_t i0 = qt * kTile;
        if (i0 >= s.sq) continue;
        const int64_t mq = std::min(kTile, s.sq - i0);
        const Mask mk = mask(s);
        const int64_t kh = h / group;
        load_rows(q_head(b, h, s), a.q_stride[1], i0, mq, d, dp, a.scale, Q.data());
        load_rows(do_head(b, h, s), g.do_stride[1], i0, mq, d, dp, 1.f, dO.data());
        const float* lse_h = a.lse + lse_off(b, h, s);
        const float* delta_h = g.delta + lse_off(b, h, s);
        for (int64_t i = 0; i < kTile; ++i) {
          lse[i] = i < mq ? lse_h[i0 + i] : kNegInf;
          delta[i] = i < mq ? delta_h[i0 + i] : 0.f;
        }
        std::fill(dQ.begin(), dQ.end(), 0.f);
        const int64_t lo = mk.lo(i0), hi = mk.hi(i0 + mq - 1);
        for (int64_t j0 = lo / kTile * kTile; j0 < hi; j0 += kTile) {
          const int64_t n = std::min(kTile, s.sk - j0);
          load_rows_t(k_head(b, kh, s), a.k_stride[1], j0, n, d, dp, Kt.data());
          load_rows_t(v_head(b, kh, s), a.v_stride[1], j0, n, d, dp, Vt.data());
          load_rows(k_head(b, kh, s), a.k_stride[1], j0, n, d, dp, 1.f, K.data());
          tile_scores(Q.data(), Kt.data(), S.data(), mq, dp);
          probs_from_lse(mk, i0, mq, j0, n, S.data(), lse.data(), P.data());
          tile_scores(dO.data(), Vt.data(), S.data(), mq, dp);
          grad_scores(P.data(), delta.data(), S.data(), mq);
          tile_accum(dQ.data(), S.data(), K.data(), mq, dp);
        }
        T* dq = static_cast<T*>(g.dq) + b * g.dq_stride[0] + s.q0 * g.dq_stride[1] + h * g.dq_stride[2];
        store_rows(dq, g.dq_stride[1], i0, mq, d, dp, a.scale, dQ.data());
      }
    }
  }
};

}  // namespace

void flash_attn_fwd_cpu(const FlashFwdArgs& a) {
  int64_t lq, lk;
  validate(a, &lq, &lk);
  dispatch_dtype(a.dtype, [&](auto t) { Flash<decltype(t)>(a, lq, lk).forward(); });
}

// dq_accum and deterministic serve the GPU's atomic dQ path; this backend is
// always deterministic and needs no workspace beyond delta.
void flash_attn_bwd_cpu(const FlashBwdArgs& a) {
  check(a);
  int64_t lq, lk;
  validate(a.f, &lq, &lk);
  dispatch_dtype(a.f.dtype, [&](auto t) { Flash<decltype(t)>(a.f, lq, lk).backward(a); });
}

}  // namespace mixkit
