// Device-generic parts of the CKA ops, written with ATen so that the CPU build uses MKL/OpenBLAS
// and the CUDA build uses cuBLAS for the GEMMs. All accumulation is float64.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace unlearn_fast {

// Adds one batch to per-layer sufficient statistics: sxy += X^T Y, sxx += X^T X, syy += Y^T Y,
// sx += 1^T X, sy += 1^T Y (X, Y cast to float64 once; one GEMM each).
inline void cka_accumulate_aten(at::TensorList xs, at::TensorList ys, at::TensorList sxy, at::TensorList sxx,
                                at::TensorList syy, at::TensorList sx, at::TensorList sy) {
  check_cka_lists(xs, ys, sxy, sxx, syy, sx, sy);
  for (size_t l = 0; l < xs.size(); ++l) {
    if (xs[l].size(0) == 0) continue;
    const at::Tensor x = xs[l].to(at::kDouble);
    const at::Tensor y = ys[l].to(at::kDouble);
    const at::Tensor xt = x.t();
    sxy[l].addmm_(xt, y);
    sxx[l].addmm_(xt, x);
    syy[l].addmm_(y.t(), y);
    sx[l].add_(x.sum(0));
    sy[l].add_(y.sum(0));
  }
}

// Per-minibatch pieces of the unbiased HSIC for all M feature sets at once:
// K_m = F_m F_m^T with a zero diagonal, stacked [M, n, n]; returns {tr [M,M], rowdot [M,M], sums [M]}
// where tr = vec(K) vec(K)^T is a single GEMM over every pair.
struct HsicParts {
  at::Tensor tr, rowdot, sums;
};

inline HsicParts hsic_parts_aten(at::TensorList feats) {
  const int64_t M = static_cast<int64_t>(feats.size());
  const int64_t n = feats[0].size(0);
  at::Tensor K = at::empty({M, n, n}, feats[0].options().dtype(at::kDouble));
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor f = feats[m].to(at::kDouble);
    at::Tensor km = K.select(0, m);
    at::mm_out(km, f, f.t());
  }
  K.diagonal(0, 1, 2).zero_();
  const at::Tensor R = K.sum(2);  // [M, n] row sums K 1
  const at::Tensor V = K.view({M, n * n});
  return HsicParts{at::mm(V, V.t()), at::mm(R, R.t()), R.sum(1)};
}

}  // namespace unlearn_fast
