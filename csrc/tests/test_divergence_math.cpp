// Host tests of the divergence arithmetic in metrics_math.h (what the CUDA warp kernel runs).
#include <cmath>
#include <vector>

#include "check.h"
#include "metrics_math.h"

using namespace unlearn_fast::math;

// Naive float64 JS / L2 with explicit softmax (safe for moderate logits only).
static void naive(const std::vector<double>& p, const std::vector<double>& q, double* js, double* l2) {
  double mp = -INFINITY, mq = -INFINITY;
  for (size_t j = 0; j < p.size(); ++j) mp = std::fmax(mp, p[j]), mq = std::fmax(mq, q[j]);
  double zp = 0, zq = 0;
  for (size_t j = 0; j < p.size(); ++j) zp += std::exp(p[j] - mp), zq += std::exp(q[j] - mq);
  double kl_pm = 0, kl_qm = 0, d2 = 0;
  for (size_t j = 0; j < p.size(); ++j) {
    const double a = std::exp(p[j] - mp) / zp, b = std::exp(q[j] - mq) / zq, m = 0.5 * (a + b);
    if (a > 0) kl_pm += a * std::log(a / m);
    if (b > 0) kl_qm += b * std::log(b / m);
    d2 += (a - b) * (a - b);
  }
  *js = 0.5 * kl_pm + 0.5 * kl_qm;
  *l2 = std::sqrt(d2);
}

static void test_lse() {
  Lcg rng(1);
  for (int C : {1, 2, 7, 33, 1000}) {
    std::vector<double> x(C);
    double m = -INFINITY;
    for (auto& v : x) v = 30.0 * rng.next(), m = std::fmax(m, v);
    double s = 0;
    for (double v : x) s += std::exp(v - m);
    const double want = m + std::log(s);
    // serial push
    LseState<double> st = lse_init<double>();
    for (double v : x) st = lse_push(st, v);
    UF_CHECK_CLOSE(lse_value(st), want, 1e-13);
    // 32 "lanes" pushed separately, then merged in a butterfly like the warp shuffle
    std::vector<LseState<double>> lanes(32, lse_init<double>());
    for (int j = 0; j < C; ++j) lanes[j % 32] = lse_push(lanes[j % 32], x[j]);
    for (int off = 16; off > 0; off >>= 1) {
      std::vector<LseState<double>> next(lanes);
      for (int l = 0; l < 32; ++l) next[l] = lse_merge(lanes[l], lanes[l ^ off]);
      lanes = next;
    }
    for (int l = 0; l < 32; ++l) UF_CHECK_CLOSE(lse_value(lanes[l]), want, 1e-13);
    // float version agrees to float precision
    LseState<float> sf = lse_init<float>();
    for (double v : x) sf = lse_push(sf, static_cast<float>(v));
    UF_CHECK_CLOSE(lse_value(sf), want, 1e-5);
  }
  // saturated logits and masked (-inf) entries
  LseState<float> st = lse_init<float>();
  for (float v : {1e4f, -1e4f, -INFINITY, 1e4f}) st = lse_push(st, v);
  UF_CHECK_CLOSE(lse_value(st), 1e4 + std::log(2.0), 1e-6);
  UF_CHECK(lse_value(lse_init<float>()) == -INFINITY);
}

static void test_log_mean_exp2() {
  for (double a : {-1e4, -3.0, 0.0, 2.5, 1e4}) {
    UF_CHECK(log_mean_exp2(a, a) == a);
    UF_CHECK(log_mean_exp2(static_cast<float>(a), static_cast<float>(a)) == static_cast<float>(a));
    for (double b : {-7.0, 0.0, 1.0}) {
      UF_CHECK_CLOSE(log_mean_exp2(a, b), log_mean_exp2(b, a), 0.0);
      if (std::fabs(a) < 100) UF_CHECK_CLOSE(log_mean_exp2(a, b), std::log(0.5 * (std::exp(a) + std::exp(b))), 1e-14);
    }
  }
  UF_CHECK_CLOSE(log_mean_exp2(-double(INFINITY), 0.0), -std::log(2.0), 1e-15);
  UF_CHECK(log_mean_exp2(-double(INFINITY), -double(INFINITY)) == -INFINITY);
}

static void test_rows() {
  Lcg rng(7);
  for (int C : {1, 2, 3, 10, 31, 100, 1000}) {
    for (double scale : {0.1, 3.0, 20.0}) {
      std::vector<double> p(C), q(C);
      for (int j = 0; j < C; ++j) p[j] = scale * rng.next(), q[j] = scale * rng.next();
      double js, l2, js_n, l2_n, js_r, l2_r, js_s, l2_s;
      divergence_row<double>(p.data(), q.data(), C, &js, &l2);
      naive(p, q, &js_n, &l2_n);
      UF_CHECK_CLOSE(js, js_n, 1e-11);
      UF_CHECK_CLOSE(l2, l2_n, 1e-11);
      divergence_row<double>(q.data(), p.data(), C, &js_r, &l2_r);  // symmetry
      UF_CHECK_CLOSE(js_r, js, 1e-13);
      UF_CHECK_CLOSE(l2_r, l2, 1e-13);
      UF_CHECK(js >= 0 && js <= kLn2);
      divergence_row<double>(p.data(), p.data(), C, &js_s, &l2_s);  // identity
      UF_CHECK(js_s == 0.0 && l2_s == 0.0);
      // float accumulation (the GPU path) stays close
      std::vector<float> pf(p.begin(), p.end()), qf(q.begin(), q.end());
      float jsf, l2f;
      divergence_row<float>(pf.data(), qf.data(), C, &jsf, &l2f);
      UF_CHECK(std::fabs(jsf - js) <= 2e-5 * (1 + C / 100.0));
      UF_CHECK(std::fabs(l2f - l2) <= 2e-5 * (1 + C / 100.0));
    }
  }
  // saturated logits: disjoint one-hots reach ln 2 and sqrt 2, no NaN
  for (int C : {2, 10, 1000}) {
    std::vector<float> p(C, -1e4f), q(C, -1e4f);
    p[0] = 1e4f;
    q[C - 1] = 1e4f;
    float js, l2;
    divergence_row<float>(p.data(), q.data(), C, &js, &l2);
    UF_CHECK(!std::isnan(js) && !std::isnan(l2));
    UF_CHECK_CLOSE(js, kLn2, 1e-6);
    UF_CHECK_CLOSE(l2, std::sqrt(2.0), 1e-6);
    divergence_row<float>(p.data(), p.data(), C, &js, &l2);
    UF_CHECK(js == 0.0f && l2 == 0.0f);
  }
  UF_CHECK(js_clamp(-1e-9) == 0.0 && js_clamp(1.0) == kLn2 && js_clamp(0.25) == 0.25);
}

int main() {
  test_lse();
  test_log_mean_exp2();
  test_rows();
  UF_TEST_MAIN_END()
}
