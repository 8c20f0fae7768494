// CUDA implementations of the divergence ops. One warp per row of logits: the row is read once
// into registers (C <= 1024) or twice (wider rows), the log-sum-exp of both rows is merged across
// lanes with math::lse_merge, and each lane adds math::js_term / math::sqdiff_term for its classes
// (the same functions the CPU path and the host tests run). All arithmetic is float64, as on the
// CPU path; per-row results are then rounded to the output dtype (float32 for float32/16 logits).
// The streaming op is deterministic (issue 10 item 3): per-row values -> per-(chunk, group) partials
// summed in row order -> per-group totals summed in chunk order; no floating-point atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../metrics_math.h"

namespace unlearn_fast {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ math::LseState<T> warp_lse(math::LseState<T> st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    math::LseState<T> o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off)};
    st = math::lse_merge(st, o);
  }
  return st;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// VPT > 0: each lane keeps VPT elements of each row in registers (C <= 32 * VPT).
// VPT == 0: any C, two passes over global memory. Writes js_out[row], l2_out[row] (out_t).
template <typename scalar_t, typename out_t, int VPT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    divergence_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ q, int64_t B, int64_t C,
                      out_t* __restrict__ js_out, out_t* __restrict__ l2_out) {
  using acc_t = double;  // as the CPU path (math::divergence_row<double>)
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < B;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const scalar_t* pr = p + row * C;
    const scalar_t* qr = q + row * C;
    math::LseState<acc_t> sp = math::lse_init<acc_t>(), sq = math::lse_init<acc_t>();
    acc_t vp[VPT > 0 ? VPT : 1], vq[VPT > 0 ? VPT : 1];
    if constexpr (VPT > 0) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int64_t j = lane + 32 * k;
        vp[k] = j < C ? static_cast<acc_t>(pr[j]) : math::neg_inf<acc_t>();
        vq[k] = j < C ? static_cast<acc_t>(qr[j]) : math::neg_inf<acc_t>();
        sp = math::lse_push(sp, vp[k]);
        sq = math::lse_push(sq, vq[k]);
      }
    } else {
      for (int64_t j = lane; j < C; j += 32) {
        sp = math::lse_push(sp, static_cast<acc_t>(pr[j]));
        sq = math::lse_push(sq, static_cast<acc_t>(qr[j]));
      }
    }
    const acc_t zp = math::lse_value(warp_lse(sp));
    const acc_t zq = math::lse_value(warp_lse(sq));
    acc_t js = acc_t(0), l2 = acc_t(0);
    if constexpr (VPT > 0) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        if (lane + 32 * k < C) {
          js += math::js_term(vp[k] - zp, vq[k] - zq);
          l2 += math::sqdiff_term(vp[k] - zp, vq[k] - zq);
        }
      }
    } else {
      for (int64_t j = lane; j < C; j += 32) {
        const acc_t lp = static_cast<acc_t>(pr[j]) - zp, lq = static_cast<acc_t>(qr[j]) - zq;
        js += math::js_term(lp, lq);
        l2 += math::sqdiff_term(lp, lq);
      }
    }
    js = warp_sum(js);  // fixed butterfly order: deterministic
    l2 = warp_sum(l2);
    if (lane == 0) {
      js_out[row] = static_cast<out_t>(math::js_clamp(js));
      l2_out[row] = static_cast<out_t>(math::uf_sqrt(l2));
    }
  }
}

constexpr int64_t kChunkRows = 1024;
constexpr int kGroupThreads = 128;

// Grid (chunks, ceil(K / kGroupThreads)): thread k of chunk c sums the rows of the chunk whose group
// is k, in row order, into partial[c, k] (js, l2, count).
__global__ void __launch_bounds__(kGroupThreads)
    group_partials_kernel(const double* __restrict__ js, const double* __restrict__ l2,
                          const int64_t* __restrict__ groups, int64_t B, int64_t K, double* __restrict__ pjs,
                          double* __restrict__ pl2, double* __restrict__ pcnt) {
  const int64_t c = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int64_t r1 = (c + 1) * kChunkRows < B ? (c + 1) * kChunkRows : B;
  double sj = 0.0, sl = 0.0, sc = 0.0;
  for (int64_t r = c * kChunkRows; r < r1; ++r) {
    if ((groups ? groups[r] : 0) == k) {
      sj += js[r];
      sl += l2[r];
      sc += 1.0;
    }
  }
  pjs[c * K + k] = sj;
  pl2[c * K + k] = sl;
  pcnt[c * K + k] = sc;
}

// One thread per group: adds the partials of all chunks, in chunk order, to the accumulators.
__global__ void group_final_kernel(const double* __restrict__ pjs, const double* __restrict__ pl2,
                                   const double* __restrict__ pcnt, int64_t chunks, int64_t K,
                                   double* __restrict__ js_sum, double* __restrict__ l2_sum,
                                   double* __restrict__ count) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  double sj = 0.0, sl = 0.0, sc = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sj += pjs[c * K + k];
    sl += pl2[c * K + k];
    sc += pcnt[c * K + k];
  }
  js_sum[k] += sj;
  l2_sum[k] += sl;
  count[k] += sc;
}

template <typename scalar_t, typename out_t>
void launch_rows(const at::Tensor& p, const at::Tensor& q, out_t* js_out, out_t* l2_out) {
  const int64_t B = p.size(0), C = p.size(1);
  // No ATen/cuda/CUDAContext.h: it pulls in cuBLAS/cuSPARSE headers that a bare toolkit lacks.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.get_device()));
  const int64_t need = (B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(need, static_cast<int64_t>(sms) * 8)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* pp = p.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
#define UF_LAUNCH(V) \
  divergence_kernel<scalar_t, out_t, V><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(pp, qp, B, C, js_out, l2_out)
  if (C <= 32) UF_LAUNCH(1);
  else if (C <= 64) UF_LAUNCH(2);
  else if (C <= 128) UF_LAUNCH(4);
  else if (C <= 256) UF_LAUNCH(8);
  else if (C <= 512) UF_LAUNCH(16);
  else if (C <= 1024) UF_LAUNCH(32);
  else UF_LAUNCH(0);
#undef UF_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::pair<at::Tensor, at::Tensor> rows_cuda(const at::Tensor& p_in, const at::Tensor& q_in,
                                            at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous(), q = q_in.contiguous();
  const int64_t B = p.size(0);
  at::Tensor js = at::empty({B}, p.options().dtype(out_dtype));
  at::Tensor l2 = at::empty({B}, p.options().dtype(out_dtype));
  if (B == 0) return {js, l2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "divergence_rows_cuda", [&] {
    if (out_dtype == at::kDouble) launch_rows<scalar_t, double>(p, q, js.data_ptr<double>(), l2.data_ptr<double>());
    else launch_rows<scalar_t, float>(p, q, js.data_ptr<float>(), l2.data_ptr<float>());
  });
  return {js, l2};
}

at::Tensor js_divergence_cuda(const at::Tensor& p, const at::Tensor& q) {
  check_logits_pair(p, q, "js_divergence");
  return rows_cuda(p, q, divergence_out_dtype(p)).first;
}

at::Tensor activation_distance_cuda(const at::Tensor& p, const at::Tensor& q) {
  check_logits_pair(p, q, "activation_distance");
  return rows_cuda(p, q, divergence_out_dtype(p)).second;
}

void divergence_accumulate_cuda(const at::Tensor& p_in, const at::Tensor& q_in,
                                const std::optional<at::Tensor>& groups, const at::Tensor& js_sum,
                                const at::Tensor& l2_sum, const at::Tensor& count) {
  check_logits_pair(p_in, q_in, "divergence_accumulate");
  check_divergence_accumulators(p_in, groups, js_sum, l2_sum, count);
  const c10::cuda::CUDAGuard guard(p_in.device());
  const int64_t B = p_in.size(0), K = js_sum.size(0);
  if (B == 0) return;
  at::Tensor g;
  if (groups.has_value()) {
    g = groups->contiguous();
    const auto mm = at::aminmax(g);  // one sync: a label outside [0, K) must not be dropped silently
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < K, "divergence_accumulate: groups must lie in [0, ", K, "), got range [", lo, ", ",
                hi, "]");
  }
  const auto rows = rows_cuda(p_in, q_in, at::kDouble);  // float64 per-row values
  const int64_t chunks = (B + kChunkRows - 1) / kChunkRows;
  at::Tensor parts = at::empty({3, chunks, K}, js_sum.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>((K + kGroupThreads - 1) / kGroupThreads));
  TORCH_CHECK(grid.y <= 65535, "divergence_accumulate: too many groups (", K, ")");
  group_partials_kernel<<<grid, kGroupThreads, 0, stream>>>(
      rows.first.data_ptr<double>(), rows.second.data_ptr<double>(), g.defined() ? g.data_ptr<int64_t>() : nullptr, B,
      K, parts[0].data_ptr<double>(), parts[1].data_ptr<double>(), parts[2].data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_final_kernel<<<static_cast<unsigned>((K + kGroupThreads - 1) / kGroupThreads), kGroupThreads, 0, stream>>>(
      parts[0].data_ptr<double>(), parts[1].data_ptr<double>(), parts[2].data_ptr<double>(), chunks, K,
      js_sum.data_ptr<double>(), l2_sum.data_ptr<double>(), count.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_fast, CUDA, m) {
  m.impl("js_divergence", &js_divergence_cuda);
  m.impl("activation_distance", &activation_distance_cuda);
  m.impl("divergence_accumulate", &divergence_accumulate_cuda);
}

}  // namespace unlearn_fast
