// Minimal assertion helpers for the host-side ctest executables (no test framework needed).
#pragma once

#include <cmath>
#include <cstdio>

static int g_failures = 0;

#define UF_CHECK(cond)                                                             \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                \
    }                                                                              \
  } while (0)

#define UF_CHECK_CLOSE(a, b, tol)                                                                    \
  do {                                                                                               \
    const double _a = (a), _b = (b);                                                                 \
    if (!(std::fabs(_a - _b) <= (tol) * (1.0 + std::fabs(_b)))) {                                    \
      std::fprintf(stderr, "%s:%d: %s = %.17g, expected %s = %.17g (tol %g)\n", __FILE__, __LINE__, #a, \
                   _a, #b, _b, (double)(tol));                                                       \
      ++g_failures;                                                                                  \
    }                                                                                                \
  } while (0)

#define UF_TEST_MAIN_END()                                     \
  if (g_failures) {                                            \
    std::fprintf(stderr, "%d check(s) failed\n", g_failures); \
    return 1;                                                  \
  }                                                            \
  std::printf("all checks passed\n");                          \
  return 0;

// Deterministic pseudo-random numbers in [-1, 1) (LCG; no <random> distribution differences).
struct Lcg {
  unsigned long long s;
  explicit Lcg(unsigned long long seed) : s(seed * 6364136223846793005ULL + 1442695040888963407ULL) {}
  double next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>((s >> 11) & ((1ULL << 53) - 1)) / static_cast<double>(1ULL << 52) - 1.0;
  }
};
