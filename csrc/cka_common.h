// Device-generic parts of the CKA ops, written with ATen so that the CPU build uses MKL/OpenBLAS
// and the CUDA build uses cuBLAS for the GEMMs. All accumulation is float64.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "metrics_math.h"

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

// ---------------------------------------------------------------------------------------------
// Exact statistics of every (layer a of X, layer b of Y) pair without the X-X / Y-Y cross blocks:
// sxy += cat(xs)^T cat(ys) [Dx, Dy] (every block of it is read), but sxx[l] += x_l^T x_l and
// syy[l] += y_l^T y_l only per layer (the diagonal blocks, the only ones the CKA denominators read).
// ---------------------------------------------------------------------------------------------
//
// Precision: float64 features are multiplied in float64. Lower-precision features are shifted by
// their batch mean mu (in float32) and multiplied in float32 (half the cost of float64 GEMMs on a
// CPU, no emulation on a GPU): X^T Y = Xc^T Yc + (1^T Xc + n mu_x) mu_y^T + mu_x (1^T Yc)^T exactly,
// with the rank-1 terms and every accumulation in float64, so the only float32 rounding is relative
// to the *centred* products - the quantity CKA reads - and the float64 streams keep any n exact.
struct CrossTerm {
  at::Tensor c;   // centred features (compute dtype)
  at::Tensor mu;  // float64 [d] shift (zero for float64 features)
  at::Tensor cs;  // float64 [d] column sums of c
};

inline CrossTerm cross_term(const at::Tensor& f) {
  if (f.scalar_type() == at::kDouble)
    return CrossTerm{f, at::zeros({f.size(1)}, f.options()), f.sum(0)};
  const at::Tensor f32 = f.to(at::kFloat);
  const at::Tensor mu = f32.mean(0, /*keepdim=*/true);
  const at::Tensor c = f32 - mu;
  return CrossTerm{c, mu.squeeze(0).to(at::kDouble), c.sum(0, /*keepdim=*/false, at::kDouble)};
}

// s += a^T b with the shift terms of cross_term (n rows).
inline void add_cross(const at::Tensor& s, const CrossTerm& a, const CrossTerm& b, int64_t n) {
  if (a.c.scalar_type() == at::kDouble && b.c.scalar_type() == at::kDouble) {
    s.addmm_(a.c.t(), b.c);
    return;
  }
  const auto ct = at::kFloat;
  s.add_(at::mm(a.c.to(ct).t(), b.c.to(ct)));
  s.addr_(a.cs + static_cast<double>(n) * a.mu, b.mu);
  s.addr_(a.mu, b.cs);
}

inline void cka_accumulate_cross_aten(at::TensorList xs, at::TensorList ys, const at::Tensor& sxy,
                                      at::TensorList sxx, at::TensorList syy, at::TensorList sx, at::TensorList sy) {
  check_cka_cross(xs, ys, sxy, sxx, syy, sx, sy);
  const int64_t n = xs[0].size(0);
  if (n == 0) return;
  auto terms = [](at::TensorList fs) {
    std::vector<CrossTerm> out;
    out.reserve(fs.size());
    for (const at::Tensor& f : fs) out.push_back(cross_term(f));
    return out;
  };
  const std::vector<CrossTerm> tx = terms(xs), ty = terms(ys);
  auto cat = [](const std::vector<CrossTerm>& ts) {
    if (ts.size() == 1) return ts[0];
    std::vector<at::Tensor> c, mu, cs;
    bool all_double = true;
    for (const CrossTerm& t : ts) all_double = all_double && t.c.scalar_type() == at::kDouble;
    for (const CrossTerm& t : ts) {
      c.push_back(all_double ? t.c : t.c.to(at::kFloat));
      mu.push_back(t.mu);
      cs.push_back(t.cs);
    }
    return CrossTerm{at::cat(c, 1), at::cat(mu), at::cat(cs)};
  };
  add_cross(sxy, cat(tx), cat(ty), n);
  for (size_t l = 0; l < tx.size(); ++l) {
    add_cross(sxx[l], tx[l], tx[l], n);
    sx[l].add_(tx[l].cs + static_cast<double>(n) * tx[l].mu);
  }
  for (size_t l = 0; l < ty.size(); ++l) {
    add_cross(syy[l], ty[l], ty[l], n);
    sy[l].add_(ty[l].cs + static_cast<double>(n) * ty[l].mu);
  }
}

// Per-minibatch pieces of the unbiased HSIC for the Lx sets of X against the Ly sets of Y, fused:
//   txy [Lx, Ly] (or [L] when !all_pairs) = tr(K~_a L~_b), txx [Lx] = tr(K~_a K~_a), tyy [Ly],
//   rx [Lx, n] = K~_a 1, ry [Ly, n] = L~_b 1   (K~ = Gram with a zero diagonal), all float64.
// Only the pairs that are read are formed: no X-X or Y-Y cross pairs. Each set is centred over the
// minibatch first (HSIC_1 is invariant to it, and it keeps the Gram entries small next to their
// rounding); the Grams are built in row blocks of their strictly lower triangle only (K~ is symmetric
// with a zero diagonal: tr(K~ L~) = 2 <tril K, tril L>, K~ 1 = row sums + column sums of tril K), in the
// features' precision (float32, float64 for float64 features), and every sum over them is float64.
// Deterministic: fixed block order, no atomics.
struct HsicCross {
  at::Tensor txy, txx, tyy, rx, ry;
};

// Rows per block: about 1/8 of n (the triangle then costs ~56% of a full Gram), at least 128 (thinner
// GEMMs lose more speed than the triangle saves: ResNet-18 widths, one CPU thread, n = 256: 32-row
// blocks 0.123 s, 128-row blocks 0.089 s, the full Gram 0.117 s), and at most what keeps the float64
// block of all sets under ~64 MiB.
inline int64_t hsic_block_rows(int64_t n, int64_t sets) {
  const int64_t cap = std::max<int64_t>(1, (int64_t(64) << 20) / (8 * std::max<int64_t>(1, sets * n)));
  const int64_t want = std::max<int64_t>(128, (n + 7) / 8);
  return std::max<int64_t>(1, std::min<int64_t>({n, want, cap}));
}

// The centred copies of all sets live in one buffer. On the CPU it is kept per thread between calls
// (up to 1 GiB): a fresh allocation of that size is page-faulted in on every minibatch, which costs
// about a quarter of the Gram GEMMs on one core. CUDA tensors use the caching allocator instead.
inline at::Tensor hsic_workspace(int64_t numel, const at::TensorOptions& opt) {
  if (opt.device().is_cpu() && numel * static_cast<int64_t>(c10::elementSize(opt.dtype().toScalarType())) <=
                                   (int64_t(1) << 30)) {
    static thread_local at::Tensor ws;
    if (!ws.defined() || ws.scalar_type() != opt.dtype().toScalarType() || ws.numel() < numel)
      ws = at::empty({numel}, opt);
    return ws.narrow(0, 0, numel);
  }
  return at::empty({numel}, opt);
}

inline HsicCross hsic_cross_parts_aten(at::TensorList xs, at::TensorList ys, bool all_pairs) {
  const int64_t Lx = static_cast<int64_t>(xs.size()), Ly = static_cast<int64_t>(ys.size());
  const int64_t M = Lx + Ly;
  const int64_t n = xs[0].size(0);
  std::vector<at::Tensor> src(xs.begin(), xs.end());
  src.insert(src.end(), ys.begin(), ys.end());
  bool all_double = true;
  int64_t total = 0;
  for (const at::Tensor& f : src) {
    all_double = all_double && f.scalar_type() == at::kDouble;
    total += n * f.size(1);
  }
  // float64 Grams only when every set is float64 (mixed inputs: float32 Grams, float64 sums)
  const auto ct = all_double ? at::kDouble : at::kFloat;
  at::Tensor ws = hsic_workspace(total, src[0].options().dtype(ct));
  std::vector<at::Tensor> F;
  F.reserve(M);
  int64_t off = 0;
  for (const at::Tensor& f : src) {
    const int64_t d = f.size(1);
    at::Tensor out = ws.narrow(0, off, n * d).view({n, d});
    const at::Tensor fc = f.to(ct);
    at::sub_out(out, fc, fc.mean(0, /*keepdim=*/true));  // HSIC_1 is invariant to a common row shift
    F.push_back(out);
    off += n * d;
  }
  const auto dopt = F[0].options().dtype(at::kDouble);
  at::Tensor rows = at::zeros({M, n}, dopt);
  at::Tensor txy = all_pairs ? at::zeros({Lx, Ly}, dopt) : at::zeros({Lx}, dopt);
  at::Tensor txx = at::zeros({Lx}, dopt), tyy = at::zeros({Ly}, dopt);
  const int64_t bs = hsic_block_rows(n, M);
  for (int64_t i0 = 0; i0 < n; i0 += bs) {
    const int64_t i1 = std::min(n, i0 + bs), r = i1 - i0;
    at::Tensor V = at::empty({M, r, i1}, dopt);
    for (int64_t m = 0; m < M; ++m) {
      at::Tensor G = at::mm(F[m].narrow(0, i0, r), F[m].narrow(0, 0, i1).t());  // [r, i1]: rows i0..i1 of K
      at::Tensor sq = G.narrow(1, i0, r);
      sq.copy_(sq.tril(-1));  // keep j < i only (strictly lower triangle)
      at::Tensor v = V.select(0, m);
      v.copy_(G);
      rows.select(0, m).narrow(0, i0, r).add_(v.sum(1));
      rows.select(0, m).narrow(0, 0, i1).add_(v.sum(0));
    }
    const at::Tensor Vf = V.view({M, r * i1});
    const at::Tensor Vx = Vf.narrow(0, 0, Lx), Vy = Vf.narrow(0, Lx, Ly);
    if (all_pairs) txy.addmm_(Vx, Vy.t());
    else txy.add_((Vx * Vy).sum(1));
    txx.add_((Vx * Vx).sum(1));
    tyy.add_((Vy * Vy).sum(1));
  }
  return HsicCross{txy.mul_(2.0), txx.mul_(2.0), tyy.mul_(2.0), rows.narrow(0, 0, Lx), rows.narrow(0, Lx, Ly)};
}

// hxy += HSIC_1 of each read pair, hxx += HSIC_1(K_a, K_a), hyy += HSIC_1(L_b, L_b), from the parts
// (the [Lx, Ly] scalars are combined on the host with math::hsic1_unbiased, the function the host
// tests check; one small device-to-host copy per minibatch).
inline void hsic_cross_accumulate_aten(at::TensorList xs, at::TensorList ys, const at::Tensor& hxy,
                                       const at::Tensor& hxx, const at::Tensor& hyy, bool all_pairs) {
  check_hsic_cross(xs, ys, hxy, hxx, hyy, all_pairs);
  const double n = static_cast<double>(xs[0].size(0));
  const HsicCross p = hsic_cross_parts_aten(xs, ys, all_pairs);
  const at::Tensor sx = p.rx.sum(1), sy = p.ry.sum(1);
  const at::Tensor dxy = all_pairs ? at::mm(p.rx, p.ry.t()) : (p.rx * p.ry).sum(1);
  const at::Tensor dxx = (p.rx * p.rx).sum(1), dyy = (p.ry * p.ry).sum(1);
  auto host = [](const at::Tensor& t) { return t.to(at::kCPU).contiguous(); };
  const at::Tensor txy = host(p.txy), txx = host(p.txx), tyy = host(p.tyy), hsx = host(sx), hsy = host(sy),
                   hdxy = host(dxy), hdxx = host(dxx), hdyy = host(dyy);
  const int64_t Lx = static_cast<int64_t>(xs.size()), Ly = static_cast<int64_t>(ys.size());
  at::Tensor oxy = at::empty(txy.sizes(), txy.options()), oxx = at::empty({Lx}, txx.options()),
             oyy = at::empty({Ly}, tyy.options());
  const double *a = hsx.data_ptr<double>(), *b = hsy.data_ptr<double>();
  for (int64_t i = 0; i < Lx; ++i) {
    oxx.data_ptr<double>()[i] =
        math::hsic1_unbiased(txx.data_ptr<double>()[i], a[i], a[i], hdxx.data_ptr<double>()[i], n);
    if (all_pairs) {
      for (int64_t j = 0; j < Ly; ++j)
        oxy.data_ptr<double>()[i * Ly + j] = math::hsic1_unbiased(
            txy.data_ptr<double>()[i * Ly + j], a[i], b[j], hdxy.data_ptr<double>()[i * Ly + j], n);
    } else {
      oxy.data_ptr<double>()[i] =
          math::hsic1_unbiased(txy.data_ptr<double>()[i], a[i], b[i], hdxy.data_ptr<double>()[i], n);
    }
  }
  for (int64_t j = 0; j < Ly; ++j)
    oyy.data_ptr<double>()[j] =
        math::hsic1_unbiased(tyy.data_ptr<double>()[j], b[j], b[j], hdyy.data_ptr<double>()[j], n);
  hxy.add_(oxy.to(hxy.device()));
  hxx.add_(oxx.to(hxx.device()));
  hyy.add_(oyy.to(hyy.device()));
}

}  // namespace unlearn_fast
