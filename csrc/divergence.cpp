// CPU implementations of the divergence ops (JS divergence, activation distance, streaming sums).
// The per-row arithmetic is math::divergence_row from metrics_math.h (float64 accumulation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "metrics_math.h"

namespace unlearn_fast {
namespace {

// js, l2: float64 [B] per-row results.
void divergence_rows_cpu(const at::Tensor& p_in, const at::Tensor& q_in, double* js, double* l2) {
  const at::Tensor p = p_in.contiguous();
  const at::Tensor q = q_in.contiguous();
  const int64_t B = p.size(0), C = p.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "divergence_rows_cpu", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / C), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        math::divergence_row<double>(pp + b * C, qp + b * C, C, js + b, l2 + b);
    });
  });
}

std::pair<at::Tensor, at::Tensor> rows(const at::Tensor& p, const at::Tensor& q) {
  const int64_t B = p.size(0);
  at::Tensor js = at::empty({B}, p.options().dtype(at::kDouble));
  at::Tensor l2 = at::empty({B}, p.options().dtype(at::kDouble));
  if (B > 0) divergence_rows_cpu(p, q, js.data_ptr<double>(), l2.data_ptr<double>());
  return {js, l2};
}

at::Tensor js_divergence_cpu(const at::Tensor& p, const at::Tensor& q) {
  check_logits_pair(p, q, "js_divergence");
  return rows(p, q).first.to(divergence_out_dtype(p));
}

at::Tensor activation_distance_cpu(const at::Tensor& p, const at::Tensor& q) {
  check_logits_pair(p, q, "activation_distance");
  return rows(p, q).second.to(divergence_out_dtype(p));
}

void divergence_accumulate_cpu(const at::Tensor& p, const at::Tensor& q, const std::optional<at::Tensor>& groups,
                               const at::Tensor& js_sum, const at::Tensor& l2_sum, const at::Tensor& count) {
  check_logits_pair(p, q, "divergence_accumulate");
  check_divergence_accumulators(p, groups, js_sum, l2_sum, count);
  const int64_t B = p.size(0), K = js_sum.size(0);
  if (B == 0) return;
  auto r = rows(p, q);
  const double* js = r.first.data_ptr<double>();
  const double* l2 = r.second.data_ptr<double>();
  double* js_acc = js_sum.data_ptr<double>();
  double* l2_acc = l2_sum.data_ptr<double>();
  double* cnt = count.data_ptr<double>();
  at::Tensor g;
  const int64_t* gp = nullptr;
  if (groups.has_value()) {
    g = groups->contiguous();
    gp = g.data_ptr<int64_t>();
  }
  for (int64_t b = 0; b < B; ++b) {  // serial: deterministic order of the float64 sums
    const int64_t k = gp ? gp[b] : 0;
    TORCH_CHECK(k >= 0 && k < K, "divergence_accumulate: groups must lie in [0, ", K, "), got ", k, " at row ", b);
    js_acc[k] += js[b];
    l2_acc[k] += l2[b];
    cnt[k] += 1.0;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  m.impl("js_divergence", &js_divergence_cpu);
  m.impl("activation_distance", &activation_distance_cpu);
  m.impl("divergence_accumulate", &divergence_accumulate_cpu);
}

}  // namespace unlearn_fast
