// The hot half of the CPU flash attention (csrc/cpu/flash_attn.cpp): tile
// products, the softmax pieces and one forward or backward task. No include
// guard: flash_attn.cpp includes this file once per instruction set, each time
// inside its own namespace and `#pragma GCC target` region, after defining
//   kVecFloats - floats per native vector (16 zmm, 8 ymm, 4 xmm),
//   kRows      - rows of C per register block,
//   kMaxCV     - 16-float columns per register block,
// sized so that the kRows x kMaxCV accumulators plus the loaded B columns
// fit the register file (AVX-512: 32 zmm; AVX2: 16 ymm; SSE2: 16 xmm).

// One native vector of kVecFloats floats (zmm, ymm or xmm). Tile columns
// come in 16-float units (head dims are padded to 16), kSub native vectors
// each. `acc += b * a` with a scalar a broadcasts it and contracts to an FMA
// where the target has one (gnu++17: -ffp-contract=fast).
typedef float vn __attribute__((vector_size(kVecFloats * 4)));
constexpr int kSub = 16 / kVecFloats;

inline vn vload(const float* p) {
  vn v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vn v) { std::memcpy(p, &v, sizeof v); }

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

// tanh(x) = 1 - 2 / (e^2x + 1), through exp_f32 so that it vectorises:
// within about 1e-7 absolute (relative accuracy is lost near 0, where the
// capped score c * tanh(s / c) ~ s is then off by c * 1e-7, far below the
// score's own float32 rounding at the magnitudes that matter). +-inf and
// large |x| give +-1 exactly; NaN stays NaN.
inline float tanh_f32(float x) { return 1.f - 2.f / (exp_f32(2.f * x) + 1.f); }

// Logit softcap on rows < m and columns < n of a kTile-pitch score tile:
// S = c * tanh(S / c). With `grad`, also grad[i][j] = 1 - tanh^2, the factor
// the backward multiplies dS by.
void softcap_tile(float* S, int64_t m, int64_t n, float c, float* grad) {
  const float inv = 1.f / c;
  for (int64_t i = 0; i < m; ++i) {
    float* s = S + i * kTile;
    float* gr = grad ? grad + i * kTile : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float t = tanh_f32(s[j] * inv);
      s[j] = c * t;
      if (gr) gr[j] = 1.f - t * t;
    }
  }
}

// C[r][c] (+)= sum_k A(r, k) * B[k][c] over CV 16-float columns, rows < `rows`
// (a multiple of kRows), k < `inner`. A(r, k) = A[r * ars + k * aks], so one
// routine serves A and A^T; B and C rows are bs and cs floats apart.
template <int CV, bool kAdd>
void gemm_block(float* C, int64_t cs, const float* A, int64_t ars, int64_t aks, const float* B, int64_t bs,
                int64_t rows, int64_t inner) {
  constexpr int NV = CV * kSub;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    vn acc[kRows][NV];
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < NV; ++c) acc[r][c] = kAdd ? vload(C + (r0 + r) * cs + c * kVecFloats) : vn{};
    const float* a = A + r0 * ars;
    for (int64_t k = 0; k < inner; ++k) {
      vn b[NV];
      for (int c = 0; c < NV; ++c) b[c] = vload(B + k * bs + c * kVecFloats);
      for (int r = 0; r < kRows; ++r) {
        const float ar = a[r * ars + k * aks];
        for (int c = 0; c < NV; ++c) acc[r][c] += b[c] * ar;
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < NV; ++c) vstore(C + (r0 + r) * cs + c * kVecFloats, acc[r][c]);
  }
}

// gemm_block over `nvec` column vectors, kMaxCV at a time.
template <bool kAdd>
void gemm(float* C, int64_t cs, const float* A, int64_t ars, int64_t aks, const float* B, int64_t bs, int64_t rows,
          int64_t inner, int64_t nvec) {
  int64_t c = 0;
  for (; c + kMaxCV <= nvec; c += kMaxCV)
    gemm_block<kMaxCV, kAdd>(C + c * 16, cs, A, ars, aks, B + c * 16, bs, rows, inner);
  switch (nvec - c) {
    case 1: gemm_block<1, kAdd>(C + c * 16, cs, A, ars, aks, B + c * 16, bs, rows, inner); break;
    case 2: gemm_block<2, kAdd>(C + c * 16, cs, A, ars, aks, B + c * 16, bs, rows, inner); break;
    case 3: gemm_block<3, kAdd>(C + c * 16, cs, A, ars, aks, B + c * 16, bs, rows, inner); break;
    default: break;
  }
}

int64_t round_rows(int64_t m) { return (m + kRows - 1) / kRows * kRows; }
int64_t vecs(int64_t n) { return (n + 15) / 16; }

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
void probs_from_lse(const Mask& mk, int64_t i0, int64_t m, int64_t j0, int64_t n, const float* S, const float* lse,
                    float* P) {
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

// dS[i][j] = P[i][j] * (dP[i][j] - delta_i), in place over dP, for rows < m
// and columns < cols; rows m..kTile become zero. With a softcap, times the
// cap's derivative cap[i][j] = 1 - tanh^2 (softcap_tile).
void grad_scores(const float* P, const float* delta, const float* cap, float* dP, int64_t m, int64_t cols) {
  std::fill(dP + m * kTile, dP + kTile * kTile, 0.f);
  for (int64_t i = 0; i < m; ++i) {
    const float di = delta[i];
    const float* p = P + i * kTile;
    float* g = dP + i * kTile;
    if (cap) {
      const float* f = cap + i * kTile;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) g[j] = p[j] * (g[j] - di) * f[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) g[j] = p[j] * (g[j] - di);
    }
  }
}

// ---- forward: one (sequence, head, query tile) ---------------------------------

template <class T>
void forward_task(const Geometry<T>& g, int64_t t, FwdScratch& w) {
  const FlashFwdArgs& a = g.a;
  const int64_t d = g.d, dp = g.dp;
  int64_t b, h, qt;
  g.task_q(t, &b, &h, &qt);
  const Seq s = sequence(a, b);
  const int64_t i0 = qt * kTile;
  if (i0 >= s.sq) return;
  const int64_t mq = std::min(kTile, s.sq - i0), rm = round_rows(mq);
  const Mask mk = g.mask(s);
  const int64_t kh = h / g.group;
  float *Q = w.Q.data(), *Kt = w.Kt.data(), *V = w.V.data(), *O = w.O.data(), *S = w.S.data(), *P = w.P.data();
  float *m = w.m.data(), *l = w.l.data();
  load_rows(g.q_head(b, h, s), a.q_stride[1], i0, mq, d, dp, a.scale, Q);
  std::fill(O, O + kTile * dp, 0.f);
  std::fill(m, m + kTile, kNegInf);
  std::fill(l, l + kTile, 0.f);
  const int64_t lo = mk.lo(i0), hi = mk.hi(i0 + mq - 1);
  for (int64_t j0 = lo / kTile * kTile; j0 < hi; j0 += kTile) {
    const int64_t n = std::min(kTile, s.sk - j0);
    load_rows_t(g.k_head(b, kh, s), a.k_stride[1], j0, n, d, dp, Kt);
    load_rows(g.v_head(b, kh, s), a.v_stride[1], j0, n, d, dp, 1.f, V);
    gemm<false>(S, kTile, Q, dp, 1, Kt, kTile, rm, dp, vecs(n));
    if (a.softcap > 0.f) softcap_tile(S, mq, n, a.softcap, nullptr);
    for (int64_t i = 0; i < kTile; ++i) {
      float* p = P + i * kTile;
      std::fill(p, p + kTile, 0.f);
      if (i >= mq) continue;
      const int64_t jlo = std::max<int64_t>(mk.lo(i0 + i) - j0, 0);
      const int64_t jhi = std::min<int64_t>(mk.hi(i0 + i) - j0, n);
      if (jlo >= jhi) continue;
      const float* srow = S + i * kTile;
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
        float* o = O + i * dp;
#pragma omp simd
        for (int64_t c = 0; c < dp; ++c) o[c] *= alpha;
        l[i] *= alpha;
        m[i] = mx;
      }
      l[i] += sum;
    }
    gemm<true>(O, dp, P, kTile, 1, V, dp, rm, n, dp / 16);
  }
  T* out = g.o_head(b, h, s);
  float* lse = a.lse + g.lse_off(b, h, s) + i0;
  const float sink = a.sinks ? a.sinks[h] : kNegInf;
  for (int64_t i = 0; i < mq; ++i) {
    // The sink joins the denominator: the max moves to it when it is larger
    // (always, for a row that saw nothing, which then outputs zeros with
    // lse = sink). Without a sink such a row keeps l = 0: zeros, lse = -inf.
    float mi = m[i], li = l[i];
    const float rescale = add_sink<false>(sink, mi, li);
    const float inv = li > 0.f ? rescale / li : 0.f;
    const float* o = O + i * dp;
    T* dst = out + (i0 + i) * a.o_stride[1];
    for (int64_t c = 0; c < d; ++c) dst[c] = from_f32<T>(o[c] * inv);
    lse[i] = li > 0.f ? mi + std::log(li) : kNegInf;
  }
}

// ---- backward: one (sequence, KV head, slice of its query heads) ---------------
//
// Key tiles in order; for each, every query tile of the slice's heads that
// sees it: S = Q K^T (capped: c tanh(S / c)), P from lse, dP = dO V^T,
// dS = P (dP - delta) (times 1 - tanh^2 with a cap), then
// dV += P^T dO, dK += dS^T Q and dQ += dS K, five tile products per pair.
// dQ of the whole sequence accumulates in float32 in w.dQ, so it needs no
// second pass; dK and dV of a key tile are complete when its query tiles are
// done and go to the output (one slice per KV head) or to the float32
// partials `part` that reduce() sums over the slices.
template <class T>
void backward_task(const Geometry<T>& g, const FlashBwdArgs& ga, int64_t t, BwdScratch& w) {
  const FlashFwdArgs& a = g.a;
  const int64_t d = g.d, dp = g.dp, hpt = g.heads_per_task, slices = g.group / hpt;
  const int64_t sub = t % slices, kh = (t / slices) % a.kv_heads, b = t / slices / a.kv_heads;
  const Seq s = sequence(a, b);
  const Mask mk = g.mask(s);
  const int64_t h_first = kh * g.group + sub * hpt;
  const int64_t q_rows = (s.sq + kTile - 1) / kTile * kTile;
  float *Q = w.Q.data(), *dO = w.dO.data(), *Kt = w.Kt.data(), *K = w.K.data(), *Vt = w.Vt.data();
  float *dK = w.dK.data(), *dV = w.dV.data(), *S = w.S.data(), *P = w.P.data(), *dQ = w.dQ.data();
  float *lse = w.lse.data(), *delta = w.delta.data();
  float* cap = a.softcap > 0.f ? w.cap.data() : nullptr;
  std::fill(dQ, dQ + hpt * q_rows * dp, 0.f);
  for (int64_t j0 = 0; j0 < s.sk; j0 += kTile) {
    const int64_t n = std::min(kTile, s.sk - j0), rn = round_rows(n), nv = vecs(n);
    std::fill(dK, dK + kTile * dp, 0.f);
    std::fill(dV, dV + kTile * dp, 0.f);
    const int64_t first = mk.first_query(j0), end = mk.end_query(j0 + n, s.sq);
    if (first < end) {
      load_rows_t(g.k_head(b, kh, s), a.k_stride[1], j0, n, d, dp, Kt);
      load_rows(g.k_head(b, kh, s), a.k_stride[1], j0, n, d, dp, 1.f, K);
      load_rows_t(g.v_head(b, kh, s), a.v_stride[1], j0, n, d, dp, Vt);
    }
    for (int64_t hh = 0; hh < hpt && first < end; ++hh) {
      const int64_t h = h_first + hh;
      const float* lse_h = a.lse + g.lse_off(b, h, s);
      const float* delta_h = ga.delta + g.lse_off(b, h, s);
      for (int64_t i0 = first / kTile * kTile; i0 < end; i0 += kTile) {
        const int64_t mq = std::min(kTile, s.sq - i0), rm = round_rows(mq);
        load_rows(g.q_head(b, h, s), a.q_stride[1], i0, mq, d, dp, a.scale, Q);
        load_rows(g.do_head(ga, b, h, s), ga.do_stride[1], i0, mq, d, dp, 1.f, dO);
        for (int64_t i = 0; i < kTile; ++i) {
          lse[i] = i < mq ? lse_h[i0 + i] : kNegInf;
          delta[i] = i < mq ? delta_h[i0 + i] : 0.f;
        }
        gemm<false>(S, kTile, Q, dp, 1, Kt, kTile, rm, dp, nv);
        if (cap) softcap_tile(S, mq, n, a.softcap, cap);
        probs_from_lse(mk, i0, mq, j0, n, S, lse, P);
        gemm<false>(S, kTile, dO, dp, 1, Vt, kTile, rm, dp, nv);
        grad_scores(P, delta, cap, S, mq, nv * 16);
        gemm<true>(dV, dp, P, 1, kTile, dO, dp, rn, mq, dp / 16);
        gemm<true>(dK, dp, S, 1, kTile, Q, dp, rn, mq, dp / 16);
        gemm<true>(dQ + (hh * q_rows + i0) * dp, dp, S, kTile, 1, K, dp, rm, n, dp / 16);
      }
    }
    // Every key row is written, zeros where no query sees the key.
    if (slices == 1) {
      store_rows(g.dk_head(ga, b, kh, s), ga.dk_stride[1], j0, n, d, dp, 1.f, dK);
      store_rows(g.dv_head(ga, b, kh, s), ga.dv_stride[1], j0, n, d, dp, 1.f, dV);
    } else {
      for (int64_t r = 0; r < n; ++r) {
        float* pk = g.part(ga, 0, b, s, j0 + r, kh, sub);
        float* pv = g.part(ga, 1, b, s, j0 + r, kh, sub);
        std::memcpy(pk, dK + r * dp, d * sizeof(float));
        std::memcpy(pv, dV + r * dp, d * sizeof(float));
      }
    }
  }
  for (int64_t hh = 0; hh < hpt; ++hh) {
    T* dq = g.dq_head(ga, b, h_first + hh, s);
    store_rows(dq, ga.dq_stride[1], 0, s.sq, d, dp, a.scale, dQ + hh * q_rows * dp);
  }
}
