// Host tests of the CKA / HSIC arithmetic in metrics_math.h (what the CUDA kernels run).
#include <cmath>
#include <vector>

#include "check.h"
#include "metrics_math.h"

using namespace unlearn_fast::math;
using Mat = std::vector<std::vector<double>>;

static Mat random_mat(Lcg& rng, int n, int d, double shift) {
  Mat X(n, std::vector<double>(d));
  for (auto& r : X)
    for (auto& v : r) v = rng.next() + shift;
  return X;
}

// Sufficient statistics as the streaming op accumulates them, in batches of `batch` rows.
struct Stats {
  Mat s;
  std::vector<double> s1, s2;
  double n = 0;
};
static Stats accumulate(const Mat& X, const Mat& Y, int batch) {
  const int n = static_cast<int>(X.size()), d1 = static_cast<int>(X[0].size()), d2 = static_cast<int>(Y[0].size());
  Stats st{Mat(d1, std::vector<double>(d2, 0.0)), std::vector<double>(d1, 0.0), std::vector<double>(d2, 0.0), 0};
  for (int b0 = 0; b0 < n; b0 += batch) {
    for (int i = b0; i < std::min(n, b0 + batch); ++i) {
      for (int a = 0; a < d1; ++a) {
        st.s1[a] += X[i][a];
        for (int b = 0; b < d2; ++b) st.s[a][b] += X[i][a] * Y[i][b];
      }
      for (int b = 0; b < d2; ++b) st.s2[b] += Y[i][b];
      st.n += 1;
    }
  }
  return st;
}
static double sqnorm(const Stats& st) {
  double acc = 0;
  for (size_t a = 0; a < st.s.size(); ++a)
    for (size_t b = 0; b < st.s[a].size(); ++b) {
      const double c = centered_entry(st.s[a][b], st.s1[a], st.s2[b], st.n);
      acc += c * c;
    }
  return acc;
}
static double cka_stream(const Mat& X, const Mat& Y, int batch) {
  return cka_from_sqnorms(sqnorm(accumulate(X, Y, batch)), sqnorm(accumulate(X, X, batch)),
                          sqnorm(accumulate(Y, Y, batch)));
}
// Direct two-pass CKA (centre first) for comparison.
static double cka_direct(Mat X, Mat Y) {
  const int n = static_cast<int>(X.size());
  for (Mat* M : {&X, &Y}) {
    for (size_t a = 0; a < (*M)[0].size(); ++a) {
      double m = 0;
      for (int i = 0; i < n; ++i) m += (*M)[i][a];
      m /= n;
      for (int i = 0; i < n; ++i) (*M)[i][a] -= m;
    }
  }
  auto cross = [&](const Mat& A, const Mat& B) {
    double acc = 0;
    for (size_t a = 0; a < A[0].size(); ++a)
      for (size_t b = 0; b < B[0].size(); ++b) {
        double c = 0;
        for (int i = 0; i < n; ++i) c += A[i][a] * B[i][b];
        acc += c * c;
      }
    return acc;
  };
  return cross(X, Y) / std::sqrt(cross(X, X) * cross(Y, Y));
}

static void test_cka() {
  Lcg rng(3);
  for (int n : {5, 17, 64}) {
    for (int d1 : {1, 3, 9}) {
      const Mat X = random_mat(rng, n, d1, 2.0);  // non-zero mean: exercises the centring
      const Mat Y = random_mat(rng, n, 4, -1.0);
      const double direct = cka_direct(X, Y);
      UF_CHECK_CLOSE(cka_stream(X, Y, n), direct, 1e-12);
      UF_CHECK_CLOSE(cka_stream(X, Y, 3), direct, 1e-12);  // uneven batches
      UF_CHECK_CLOSE(cka_stream(Y, X, 5), direct, 1e-12);  // symmetry
      UF_CHECK_CLOSE(cka_stream(X, X, 4), 1.0, 1e-12);
      Mat Z = X;  // a X + b
      for (auto& r : Z)
        for (auto& v : r) v = -3.5 * v + 11.0;
      UF_CHECK_CLOSE(cka_stream(X, Z, 6), 1.0, 1e-12);
      UF_CHECK(direct >= 0.0 && direct <= 1.0 + 1e-12);
    }
  }
  UF_CHECK(std::isnan(cka_from_sqnorms(1.0, 0.0, 2.0)));
  UF_CHECK_CLOSE(cka_from_sqnorms(2.0, 4.0, 1.0), 1.0, 1e-15);
}

static double hsic1_naive(Mat K, Mat L) {
  const int n = static_cast<int>(K.size());
  for (int i = 0; i < n; ++i) K[i][i] = 0, L[i][i] = 0;
  double tr = 0, sk = 0, sl = 0, kl1 = 0;  // tr(KL), 1'K1, 1'L1, 1'KL1
  std::vector<double> l1(n, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) tr += K[i][j] * L[j][i], sk += K[i][j], sl += L[i][j], l1[i] += L[i][j];
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) kl1 += K[i][j] * l1[j];
  return (tr + sk * sl / ((n - 1.0) * (n - 2.0)) - 2.0 / (n - 2.0) * kl1) / (n * (n - 3.0));
}

static void test_hsic() {
  Lcg rng(5);
  for (int n : {4, 5, 13, 40}) {
    const Mat X = random_mat(rng, n, 6, 0.5), Y = random_mat(rng, n, 3, 0.0);
    Mat K(n, std::vector<double>(n)), L(n, std::vector<double>(n));
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        K[i][j] = L[i][j] = 0;
        for (size_t a = 0; a < X[0].size(); ++a) K[i][j] += X[i][a] * X[j][a];
        for (size_t a = 0; a < Y[0].size(); ++a) L[i][j] += Y[i][a] * Y[j][a];
      }
    // the op's decomposition: zero diagonals, tr = <K, L>, rowdot = (K1).(L1)
    double tr = 0, sk = 0, sl = 0, rowdot = 0;
    for (int i = 0; i < n; ++i) {
      double rk = 0, rl = 0;
      for (int j = 0; j < n; ++j) {
        if (i == j) continue;
        tr += K[i][j] * L[i][j];
        rk += K[i][j];
        rl += L[i][j];
      }
      sk += rk;
      sl += rl;
      rowdot += rk * rl;
    }
    UF_CHECK_CLOSE(hsic1_unbiased(tr, sk, sl, rowdot, static_cast<double>(n)), hsic1_naive(K, L), 1e-12);
  }
}

static void test_block_of() {
  const int64_t off[] = {0, 3, 4, 10};
  const int64_t want[] = {0, 0, 0, 1, 2, 2, 2, 2, 2, 2};
  for (int64_t i = 0; i < 10; ++i) UF_CHECK(block_of(off, 3, i) == want[i]);
  const int64_t one[] = {0, 5};
  for (int64_t i = 0; i < 5; ++i) UF_CHECK(block_of(one, 1, i) == 0);
}

int main() {
  test_cka();
  test_hsic();
  test_block_of();
  UF_TEST_MAIN_END()
}
