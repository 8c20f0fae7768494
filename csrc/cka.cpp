// CPU implementations of the CKA ops. GEMMs through ATen (float64); the centring and the HSIC
// formula are the shared math:: functions that the CUDA kernels also run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cka_common.h"
#include "metrics_math.h"

namespace unlearn_fast {
namespace {

at::Tensor cka_centered_sqnorm_cpu(const at::Tensor& s_in, const at::Tensor& s1_in, const at::Tensor& s2_in,
                                   double n, at::IntArrayRef offsets1, at::IntArrayRef offsets2) {
  check_sqnorm_inputs(s_in, s1_in, s2_in, n);
  const int64_t D1 = s_in.size(0), D2 = s_in.size(1);
  const std::vector<int64_t> o1 = check_offsets(offsets1, D1, "offsets1");
  const std::vector<int64_t> o2 = check_offsets(offsets2, D2, "offsets2");
  const int64_t L1 = static_cast<int64_t>(o1.size()) - 1, L2 = static_cast<int64_t>(o2.size()) - 1;
  const at::Tensor s = s_in.contiguous(), s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  const double* sp = s.data_ptr<double>();
  const double* s1p = s1.data_ptr<double>();
  const double* s2p = s2.data_ptr<double>();
  at::Tensor out = at::zeros({L1, L2}, s.options());
  double* op = out.data_ptr<double>();
  // One row block (layer a) at a time; the column blocks of that row block in parallel.
  for (int64_t a = 0; a < L1; ++a) {
    at::parallel_for(0, L2, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double acc = 0.0;
        for (int64_t i = o1[a]; i < o1[a + 1]; ++i)
          for (int64_t j = o2[b]; j < o2[b + 1]; ++j) {
            const double c = math::centered_entry(sp[i * D2 + j], s1p[i], s2p[j], n);
            acc += c * c;
          }
        op[a * L2 + b] = acc;
      }
    });
  }
  return out;
}

void hsic_minibatch_accumulate_cpu(at::TensorList feats, const at::Tensor& hsic_sum) {
  check_hsic_inputs(feats, hsic_sum);
  TORCH_CHECK(hsic_sum.is_contiguous(), "hsic_minibatch_accumulate: hsic_sum must be contiguous");
  const int64_t M = static_cast<int64_t>(feats.size());
  const double n = static_cast<double>(feats[0].size(0));
  HsicParts parts = hsic_parts_aten(feats);
  const at::Tensor tr = parts.tr.contiguous(), rd = parts.rowdot.contiguous(), sums = parts.sums.contiguous();
  const double* trp = tr.data_ptr<double>();
  const double* rdp = rd.data_ptr<double>();
  const double* sp = sums.data_ptr<double>();
  double* hp = hsic_sum.data_ptr<double>();
  for (int64_t a = 0; a < M; ++a)
    for (int64_t b = 0; b < M; ++b)
      hp[a * M + b] += math::hsic1_unbiased(trp[a * M + b], sp[a], sp[b], rdp[a * M + b], n);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  m.impl("cka_accumulate", &cka_accumulate_aten);
  m.impl("cka_centered_sqnorm", &cka_centered_sqnorm_cpu);
  m.impl("hsic_minibatch_accumulate", &hsic_minibatch_accumulate_cpu);
  m.impl("cka_accumulate_cross", &cka_accumulate_cross_aten);
  m.impl("hsic_cross_accumulate", &hsic_cross_accumulate_aten);
}

}  // namespace unlearn_fast
