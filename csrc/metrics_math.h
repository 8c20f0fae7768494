// Arithmetic shared by the CPU and CUDA metric kernels (DESIGN §4-§5).
//
// Every function here is `__host__ __device__` under nvcc and plain `inline` otherwise, so the
// host-side ctest executables (csrc/tests/, built without torch) exercise exactly the code the
// GPU runs. Nothing in this header depends on torch.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define UF_HD __host__ __device__ __forceinline__
#else
#define UF_HD inline
#endif

namespace unlearn_fast {
namespace math {

constexpr double kLn2 = 0.693147180559945309417232121458176568;

UF_HD float uf_exp(float x) { return expf(x); }
UF_HD double uf_exp(double x) { return exp(x); }
UF_HD float uf_log(float x) { return logf(x); }
UF_HD double uf_log(double x) { return log(x); }
UF_HD float uf_log1p(float x) { return log1pf(x); }
UF_HD double uf_log1p(double x) { return log1p(x); }
UF_HD float uf_expm1(float x) { return expm1f(x); }
UF_HD double uf_expm1(double x) { return expm1(x); }
UF_HD float uf_sqrt(float x) { return sqrtf(x); }
UF_HD double uf_sqrt(double x) { return sqrt(x); }

template <typename T>
UF_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp: a running maximum `m` and the sum `s` of exp(x - m). Pushing the elements
// of a row in any order, or merging partial states (warp lanes, threads), gives the same value
// log(sum exp x) = m + log(s) without overflow for logits of any magnitude.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct LseState {
  T m;
  T s;
};

template <typename T>
UF_HD LseState<T> lse_init() {
  return LseState<T>{neg_inf<T>(), T(0)};
}

template <typename T>
UF_HD LseState<T> lse_push(LseState<T> st, T x) {
  if (x == neg_inf<T>()) return st;  // a masked logit contributes exp(-inf) = 0
  if (x > st.m) {
    st.s = st.s * uf_exp(st.m - x) + T(1);  // exp(-inf) = 0 when st was empty
    st.m = x;
  } else {
    st.s += uf_exp(x - st.m);
  }
  return st;
}

template <typename T>
UF_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  if (b.m == neg_inf<T>()) return a;
  if (a.m == neg_inf<T>()) return b;
  if (a.m >= b.m) return LseState<T>{a.m, a.s + b.s * uf_exp(b.m - a.m)};
  return LseState<T>{b.m, b.s + a.s * uf_exp(a.m - b.m)};
}

// log(sum exp x); -inf for an empty or fully masked row.
template <typename T>
UF_HD T lse_value(LseState<T> st) {
  return st.s > T(0) ? st.m + uf_log(st.s) : neg_inf<T>();
}

// ---------------------------------------------------------------------------------------------
// Divergences between two probability vectors given per-class log-probabilities lp, lq
// (lp = logit - logsumexp(row)). Summing a term over the classes of a row gives the row value.
// ---------------------------------------------------------------------------------------------

// log((exp(a) + exp(b)) / 2) computed as hi + log1p(expm1(lo - hi) / 2): exact (= a) when a == b,
// so JS(p, p) is exactly 0, and no overflow for any finite a, b.
template <typename T>
UF_HD T log_mean_exp2(T a, T b) {
  const T hi = a > b ? a : b;
  const T lo = a > b ? b : a;
  if (hi == neg_inf<T>()) return hi;
  return hi + uf_log1p(T(0.5) * uf_expm1(lo - hi));
}

// One class's contribution to JS(P, Q) = KL(P || M)/2 + KL(Q || M)/2 with M = (P + Q)/2, natural
// log. A class with zero probability in P contributes nothing to KL(P || M) (0 log 0 = 0).
template <typename T>
UF_HD T js_term(T lp, T lq) {
  const T lm = log_mean_exp2(lp, lq);
  T r = T(0);
  if (lp != neg_inf<T>()) r += uf_exp(lp) * (lp - lm);
  if (lq != neg_inf<T>()) r += uf_exp(lq) * (lq - lm);
  return T(0.5) * r;
}

// The row sum of js_term is mathematically in [0, ln 2]; rounding can step a few ulp outside.
template <typename T>
UF_HD T js_clamp(T v) {
  const T hi = static_cast<T>(kLn2);
  return v < T(0) ? T(0) : (v > hi ? hi : v);
}

// One class's contribution to ||P - Q||_2^2 (the activation distance is the row sum's sqrt).
template <typename T>
UF_HD T sqdiff_term(T lp, T lq) {
  const T d = uf_exp(lp) - uf_exp(lq);
  return d * d;
}

// ---------------------------------------------------------------------------------------------
// Linear CKA from streamed sufficient statistics (exact form).
//   S = sum_i x_i y_i^T, s1 = sum_i x_i, s2 = sum_i y_i over n samples.
//   Centred cross-product entry: (Xc^T Yc)_{ab} = S_ab - s1_a s2_b / n.
//   CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).
// ---------------------------------------------------------------------------------------------
template <typename T>
UF_HD T centered_entry(T s_ab, T s1_a, T s2_b, T n) {
  return s_ab - s1_a * s2_b / n;
}

// hxy = ||Cxy||_F^2, hxx = ||Cxx||_F^2, hyy = ||Cyy||_F^2 (squared Frobenius norms).
// NaN when either side has zero centred variance (CKA is undefined for a constant feature map).
template <typename T>
UF_HD T cka_from_sqnorms(T hxy, T hxx, T hyy) {
  const T den = uf_sqrt(hxx) * uf_sqrt(hyy);
  if (!(den > T(0))) return static_cast<T>(NAN);
  return hxy / den;
}

// ---------------------------------------------------------------------------------------------
// Unbiased HSIC estimator (Song et al. 2012; minibatch CKA of Nguyen et al. 2021, Eq. 3) for one
// minibatch of n >= 4 samples and Gram matrices K, L with their diagonals set to zero:
//   HSIC_1 = [tr(K L) + (1^T K 1)(1^T L 1) / ((n-1)(n-2)) - 2/(n-2) (K 1)^T (L 1)] / (n (n-3)).
// tr_kl = sum_ij K_ij L_ij (K, L symmetric), sum_k = 1^T K 1, sum_l = 1^T L 1,
// rowdot = (K 1) . (L 1).
// ---------------------------------------------------------------------------------------------
template <typename T>
UF_HD T hsic1_unbiased(T tr_kl, T sum_k, T sum_l, T rowdot, T n) {
  return (tr_kl + sum_k * sum_l / ((n - T(1)) * (n - T(2))) - T(2) / (n - T(2)) * rowdot) /
         (n * (n - T(3)));
}

// Index of the block that holds position i, given cumulative offsets [0, d0, d0+d1, ..., D]
// (nblocks + 1 entries, increasing). Linear scan: the number of layers is small.
UF_HD int64_t block_of(const int64_t* offsets, int64_t nblocks, int64_t i) {
  int64_t b = 0;
  while (b + 1 < nblocks && i >= offsets[b + 1]) ++b;
  return b;
}


// Serial JS divergence and L2 distance of softmax(p) and softmax(q) for one row of C logits
// (any element type convertible to T; two passes). The CPU kernel runs this per row; the CUDA
// kernel runs the same steps split over a warp (lse_merge across lanes).
template <typename T, typename E>
UF_HD void divergence_row(const E* p, const E* q, int64_t C, T* js_out, T* l2_out) {
  LseState<T> sp = lse_init<T>();
  LseState<T> sq = lse_init<T>();
  for (int64_t j = 0; j < C; ++j) {
    sp = lse_push(sp, static_cast<T>(p[j]));
    sq = lse_push(sq, static_cast<T>(q[j]));
  }
  const T zp = lse_value(sp);
  const T zq = lse_value(sq);
  T js = T(0);
  T l2 = T(0);
  for (int64_t j = 0; j < C; ++j) {
    const T lp = static_cast<T>(p[j]) - zp;
    const T lq = static_cast<T>(q[j]) - zq;
    js += js_term(lp, lq);
    l2 += sqdiff_term(lp, lq);
  }
  *js_out = js_clamp(js);
  *l2_out = uf_sqrt(l2);
}

}  // namespace math
}  // namespace unlearn_fast
