// CUDA implementations of the CKA ops. The float64 GEMMs go to cuBLAS through ATen (cka_common.h;
// FP64 tensor cores on Hopper run DGEMM at about the FP32 rate, so the statistics stay exact);
// the centring of the accumulated statistics and the unbiased HSIC formula are kernels over the
// shared math:: functions, so the host tests in csrc/tests/ cover what runs here.
// Deterministic: no floating-point atomics; every sum is reduced in a fixed order (per-row partials,
// then a fixed-order pass), and the fused HSIC of cka_common.h is ATen GEMMs and reductions only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../cka_common.h"
#include "../metrics_math.h"

namespace unlearn_fast {
namespace {

constexpr int kSqnormThreads = 128;

// Grid (D1, L2): block (i, b) sums the squared centred entries of row i over the columns of
// column-block b and writes the total to rowpart[i, b]. No atomics: the per-row partials are reduced
// in a fixed order by block_sum_kernel, so two runs give bit-identical results (issue 10 item 3).
__global__ void __launch_bounds__(kSqnormThreads)
    centered_sqnorm_kernel(const double* __restrict__ s, const double* __restrict__ s1, const double* __restrict__ s2,
                           double n, int64_t D2, const int64_t* __restrict__ o2, int64_t L2,
                           double* __restrict__ rowpart) {
  __shared__ double partial[kSqnormThreads / 32];
  const int64_t i = blockIdx.x;
  const int64_t b = blockIdx.y;
  const double si = s1[i];
  const double* row = s + i * D2;
  double acc = 0.0;
  for (int64_t j = o2[b] + threadIdx.x; j < o2[b + 1]; j += blockDim.x) {
    const double c = math::centered_entry(row[j], si, s2[j], n);
    acc += c * c;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kSqnormThreads / 32; ++w) t += partial[w];
    rowpart[i * L2 + b] = t;
  }
}

// One thread per (row block a, column block b): out[a, b] = sum of rowpart[i, b] over the rows i of
// block a, in row order.
__global__ void block_sum_kernel(const double* __restrict__ rowpart, const int64_t* __restrict__ o1, int64_t L1,
                                 int64_t L2, double* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= L1 * L2) return;
  const int64_t a = idx / L2, b = idx % L2;
  double t = 0.0;
  for (int64_t i = o1[a]; i < o1[a + 1]; ++i) t += rowpart[i * L2 + b];
  out[idx] = t;
}

__global__ void hsic_combine_kernel(const double* __restrict__ tr, const double* __restrict__ rowdot,
                                    const double* __restrict__ sums, int64_t M, double n, double* __restrict__ hsic) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * M) return;
  const int64_t a = idx / M, b = idx % M;
  hsic[idx] += math::hsic1_unbiased(tr[idx], sums[a], sums[b], rowdot[idx], n);
}

at::Tensor cka_centered_sqnorm_cuda(const at::Tensor& s_in, const at::Tensor& s1_in, const at::Tensor& s2_in,
                                    double n, at::IntArrayRef offsets1, at::IntArrayRef offsets2) {
  check_sqnorm_inputs(s_in, s1_in, s2_in, n);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const int64_t D1 = s_in.size(0), D2 = s_in.size(1);
  const std::vector<int64_t> o1 = check_offsets(offsets1, D1, "offsets1");
  const std::vector<int64_t> o2 = check_offsets(offsets2, D2, "offsets2");
  const int64_t L1 = static_cast<int64_t>(o1.size()) - 1, L2 = static_cast<int64_t>(o2.size()) - 1;
  const at::Tensor s = s_in.contiguous(), s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  const at::Tensor o1d = at::tensor(o1, at::TensorOptions().dtype(at::kLong)).to(s.device());
  const at::Tensor o2d = at::tensor(o2, at::TensorOptions().dtype(at::kLong)).to(s.device());
  at::Tensor out = at::empty({L1, L2}, s.options());
  at::Tensor rowpart = at::empty({D1, L2}, s.options());
  TORCH_CHECK(L2 <= 65535, "cka_centered_sqnorm: at most 65535 column blocks, got ", L2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(D1), static_cast<unsigned>(L2));
  centered_sqnorm_kernel<<<grid, kSqnormThreads, 0, stream>>>(s.data_ptr<double>(), s1.data_ptr<double>(),
                                                             s2.data_ptr<double>(), n, D2, o2d.data_ptr<int64_t>(),
                                                             L2, rowpart.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 128;
  const int blocks = static_cast<int>((L1 * L2 + threads - 1) / threads);
  block_sum_kernel<<<blocks, threads, 0, stream>>>(rowpart.data_ptr<double>(), o1d.data_ptr<int64_t>(), L1, L2,
                                                   out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void hsic_minibatch_accumulate_cuda(at::TensorList feats, const at::Tensor& hsic_sum) {
  check_hsic_inputs(feats, hsic_sum);
  TORCH_CHECK(hsic_sum.is_contiguous(), "hsic_minibatch_accumulate: hsic_sum must be contiguous");
  const c10::cuda::CUDAGuard guard(hsic_sum.device());
  const int64_t M = static_cast<int64_t>(feats.size());
  const double n = static_cast<double>(feats[0].size(0));
  HsicParts parts = hsic_parts_aten(feats);
  const at::Tensor tr = parts.tr.contiguous(), rd = parts.rowdot.contiguous(), sums = parts.sums.contiguous();
  const int threads = 256;
  const int blocks = static_cast<int>((M * M + threads - 1) / threads);
  hsic_combine_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tr.data_ptr<double>(), rd.data_ptr<double>(), sums.data_ptr<double>(), M, n, hsic_sum.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_fast, CUDA, m) {
  m.impl("cka_accumulate", &cka_accumulate_aten);
  m.impl("cka_centered_sqnorm", &cka_centered_sqnorm_cuda);
  m.impl("hsic_minibatch_accumulate", &hsic_minibatch_accumulate_cuda);
  m.impl("cka_accumulate_cross", &cka_accumulate_cross_aten);
  m.impl("hsic_cross_accumulate", &hsic_cross_accumulate_aten);
}

}  // namespace unlearn_fast
