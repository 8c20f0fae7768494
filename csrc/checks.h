// Input validation shared by the CPU and CUDA implementations of the metric ops (torch side).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace unlearn_fast {

inline void check_logits_pair(const at::Tensor& p, const at::Tensor& q, const char* op) {
  TORCH_CHECK(p.dim() == 2 && q.dim() == 2, op, ": p_logits and q_logits must be 2-D [B, C], got shapes ",
              p.sizes(), " and ", q.sizes());
  TORCH_CHECK(p.sizes() == q.sizes(), op, ": p_logits ", p.sizes(), " and q_logits ", q.sizes(),
              " must have the same shape [B, C]");
  TORCH_CHECK(p.size(1) >= 1, op, ": need at least one class (C >= 1), got shape ", p.sizes());
  TORCH_CHECK(p.scalar_type() == q.scalar_type(), op, ": p_logits (", p.scalar_type(), ") and q_logits (",
              q.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": logits must be floating point, got ", p.scalar_type());
  TORCH_CHECK(p.device() == q.device(), op, ": p_logits on ", p.device(), " but q_logits on ", q.device());
}

// Per-row results are float32, or float64 for float64 logits.
inline at::ScalarType divergence_out_dtype(const at::Tensor& p) {
  return p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_divergence_accumulators(const at::Tensor& p, const std::optional<at::Tensor>& groups,
                                          const at::Tensor& js_sum, const at::Tensor& l2_sum,
                                          const at::Tensor& count) {
  const char* op = "divergence_accumulate";
  for (const at::Tensor* t : {&js_sum, &l2_sum, &count}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kDouble && t->is_contiguous(), op,
                ": accumulators js_sum, l2_sum, count must be contiguous float64 [K], got ", t->scalar_type(),
                " ", t->sizes());
    TORCH_CHECK(t->size(0) == js_sum.size(0) && t->size(0) >= 1, op,
                ": accumulators must all have the same length K >= 1");
    TORCH_CHECK(t->device() == p.device(), op, ": accumulators on ", t->device(), " but logits on ", p.device());
  }
  if (groups.has_value()) {
    const at::Tensor& g = *groups;
    TORCH_CHECK(g.dim() == 1 && g.size(0) == p.size(0), op, ": groups must be [B]=", p.size(0), ", got ",
                g.sizes());
    TORCH_CHECK(g.scalar_type() == at::kLong, op, ": groups must be int64, got ", g.scalar_type());
    TORCH_CHECK(g.device() == p.device(), op, ": groups on ", g.device(), " but logits on ", p.device());
  } else {
    TORCH_CHECK(js_sum.size(0) == 1, op, ": without groups the accumulators must have length 1, got ",
                js_sum.size(0));
  }
}

inline void check_cka_lists(at::TensorList xs, at::TensorList ys, at::TensorList sxy, at::TensorList sxx,
                            at::TensorList syy, at::TensorList sx, at::TensorList sy) {
  const char* op = "cka_accumulate";
  const size_t L = xs.size();
  TORCH_CHECK(L >= 1, op, ": need at least one layer");
  TORCH_CHECK(ys.size() == L && sxy.size() == L && sxx.size() == L && syy.size() == L && sx.size() == L &&
                  sy.size() == L,
              op, ": xs, ys, sxy, sxx, syy, sx, sy must be lists of the same length L=", L);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& x = xs[l];
    const at::Tensor& y = ys[l];
    TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), op, ": layer ", l,
                ": features must be X [n, d1] and Y [n, d2] with the same n, got ", x.sizes(), " and ", y.sizes(),
                " (pool or flatten feature maps first)");
    TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(y.scalar_type()), op, ": layer ", l,
                ": features must be floating point");
    const int64_t d1 = x.size(1), d2 = y.size(1);
    auto want = [&](const at::Tensor& t, std::initializer_list<int64_t> shape, const char* name) {
      TORCH_CHECK(t.scalar_type() == at::kDouble && t.sizes() == at::IntArrayRef(shape), op, ": layer ", l, ": ",
                  name, " must be float64 ", at::IntArrayRef(shape), ", got ", t.scalar_type(), " ", t.sizes());
      TORCH_CHECK(t.device() == x.device() && y.device() == x.device(), op, ": layer ", l, ": ", name, " on ",
                  t.device(), " but features on ", x.device(), " / ", y.device());
    };
    want(sxy[l], {d1, d2}, "sxy");
    want(sxx[l], {d1, d1}, "sxx");
    want(syy[l], {d2, d2}, "syy");
    want(sx[l], {d1}, "sx");
    want(sy[l], {d2}, "sy");
  }
}

// Cumulative block offsets [0, ..., D] -> validated copy.
inline std::vector<int64_t> check_offsets(at::IntArrayRef off, int64_t D, const char* name) {
  TORCH_CHECK(off.size() >= 2, "cka_centered_sqnorm: ", name, " needs at least 2 entries [0, ..., D]");
  TORCH_CHECK(off.front() == 0 && off.back() == D, "cka_centered_sqnorm: ", name,
              " must start at 0 and end at the matrix size ", D, ", got ", off);
  for (size_t i = 1; i < off.size(); ++i)
    TORCH_CHECK(off[i] > off[i - 1], "cka_centered_sqnorm: ", name, " must be strictly increasing, got ", off);
  return off.vec();
}

inline void check_sqnorm_inputs(const at::Tensor& s, const at::Tensor& s1, const at::Tensor& s2, double n) {
  const char* op = "cka_centered_sqnorm";
  TORCH_CHECK(s.dim() == 2 && s.scalar_type() == at::kDouble, op, ": s must be float64 [D1, D2], got ",
              s.scalar_type(), " ", s.sizes());
  TORCH_CHECK(s1.dim() == 1 && s1.size(0) == s.size(0) && s1.scalar_type() == at::kDouble, op,
              ": s1 must be float64 [", s.size(0), "], got ", s1.scalar_type(), " ", s1.sizes());
  TORCH_CHECK(s2.dim() == 1 && s2.size(0) == s.size(1) && s2.scalar_type() == at::kDouble, op,
              ": s2 must be float64 [", s.size(1), "], got ", s2.scalar_type(), " ", s2.sizes());
  TORCH_CHECK(s1.device() == s.device() && s2.device() == s.device(), op, ": s, s1, s2 must be on one device");
  TORCH_CHECK(n > 0, op, ": sample count n must be > 0 (no batch was accumulated), got ", n);
}

inline void check_hsic_inputs(at::TensorList feats, const at::Tensor& hsic_sum) {
  const char* op = "hsic_minibatch_accumulate";
  const int64_t M = static_cast<int64_t>(feats.size());
  TORCH_CHECK(M >= 1, op, ": need at least one feature tensor");
  const int64_t n = feats[0].size(0);
  TORCH_CHECK(n >= 4, op, ": the unbiased HSIC estimator needs a minibatch of n >= 4 samples, got n=", n);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(feats[m].dim() == 2 && feats[m].size(0) == n, op, ": feature ", m, " must be [n=", n,
                ", d], got ", feats[m].sizes());
    TORCH_CHECK(at::isFloatingType(feats[m].scalar_type()), op, ": feature ", m, " must be floating point");
    TORCH_CHECK(feats[m].device() == hsic_sum.device(), op, ": feature ", m, " on ", feats[m].device(),
                " but hsic_sum on ", hsic_sum.device());
  }
  TORCH_CHECK(hsic_sum.scalar_type() == at::kDouble && hsic_sum.dim() == 2 && hsic_sum.size(0) == M &&
                  hsic_sum.size(1) == M,
              op, ": hsic_sum must be float64 [M, M] with M=", M, ", got ", hsic_sum.scalar_type(), " ",
              hsic_sum.sizes());
}

inline void check_feature_list(at::TensorList fs, const char* op, const char* name, int64_t n,
                               const at::Device& dev) {
  for (size_t l = 0; l < fs.size(); ++l) {
    TORCH_CHECK(fs[l].dim() == 2 && fs[l].size(0) == n, op, ": ", name, "[", l, "] must be [n=", n,
                ", d], got ", fs[l].sizes(), " (pool or flatten feature maps first)");
    TORCH_CHECK(at::isFloatingType(fs[l].scalar_type()), op, ": ", name, "[", l, "] must be floating point, got ",
                fs[l].scalar_type());
    TORCH_CHECK(fs[l].device() == dev, op, ": ", name, "[", l, "] on ", fs[l].device(), " but the accumulators on ",
                dev);
  }
}

inline void check_f64(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name,
                      const at::Device& dev) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.sizes() == shape && t.is_contiguous(), op, ": ", name,
              " must be a contiguous float64 tensor of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " on ", t.device(), " but the features on ", dev);
}

inline void check_cka_cross(at::TensorList xs, at::TensorList ys, const at::Tensor& sxy, at::TensorList sxx,
                            at::TensorList syy, at::TensorList sx, at::TensorList sy) {
  const char* op = "cka_accumulate_cross";
  TORCH_CHECK(!xs.empty() && !ys.empty(), op, ": need at least one layer on each side");
  TORCH_CHECK(sxx.size() == xs.size() && sx.size() == xs.size() && syy.size() == ys.size() && sy.size() == ys.size(),
              op, ": sxx, sx need one entry per xs (", xs.size(), ") and syy, sy one per ys (", ys.size(), ")");
  const int64_t n = xs[0].size(0);
  const at::Device dev = sxy.device();
  check_feature_list(xs, op, "xs", n, dev);
  check_feature_list(ys, op, "ys", n, dev);
  int64_t Dx = 0, Dy = 0;
  for (size_t l = 0; l < xs.size(); ++l) {
    const int64_t d = xs[l].size(1);
    check_f64(sxx[l], {d, d}, op, "sxx[l]", dev);
    check_f64(sx[l], {d}, op, "sx[l]", dev);
    Dx += d;
  }
  for (size_t l = 0; l < ys.size(); ++l) {
    const int64_t d = ys[l].size(1);
    check_f64(syy[l], {d, d}, op, "syy[l]", dev);
    check_f64(sy[l], {d}, op, "sy[l]", dev);
    Dy += d;
  }
  TORCH_CHECK(sxy.scalar_type() == at::kDouble && sxy.dim() == 2 && sxy.size(0) == Dx && sxy.size(1) == Dy, op,
              ": sxy must be float64 [Dx, Dy] = [", Dx, ", ", Dy, "] (summed widths), got ", sxy.scalar_type(), " ",
              sxy.sizes());
}

inline void check_hsic_cross(at::TensorList xs, at::TensorList ys, const at::Tensor& hxy, const at::Tensor& hxx,
                             const at::Tensor& hyy, bool all_pairs) {
  const char* op = "hsic_cross_accumulate";
  TORCH_CHECK(!xs.empty() && !ys.empty(), op, ": need at least one feature set on each side");
  const int64_t n = xs[0].size(0);
  TORCH_CHECK(n >= 4, op, ": the unbiased HSIC estimator needs a minibatch of n >= 4 samples, got n=", n);
  const at::Device dev = hxy.device();
  check_feature_list(xs, op, "xs", n, dev);
  check_feature_list(ys, op, "ys", n, dev);
  const int64_t Lx = static_cast<int64_t>(xs.size()), Ly = static_cast<int64_t>(ys.size());
  if (all_pairs) {
    check_f64(hxy, {Lx, Ly}, op, "hxy", dev);
  } else {
    TORCH_CHECK(Lx == Ly, op, ": all_pairs=False pairs xs[l] with ys[l]: need as many xs as ys, got ", Lx, " and ",
                Ly);
    check_f64(hxy, {Lx}, op, "hxy", dev);
  }
  check_f64(hxx, {Lx}, op, "hxx", dev);
  check_f64(hyy, {Ly}, op, "hyy", dev);
}

}  // namespace unlearn_fast
