// The extension module unlearn_fast._C: a trivial Python module whose import registers the
// `unlearn_fast::` operators below with the PyTorch dispatcher (pytorch/extension-cpp pattern).
// Implementations: divergence.cpp / cka.cpp (CPU), cuda/*.cu (CUDA, when compiled in).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing the module only has to load this shared library; the ops register statically.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "unlearn_fast C++/CUDA ops (torch.ops.unlearn_fast.*)",
      -1,  // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace unlearn_fast {

bool has_cuda() {
#ifdef UNLEARN_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(unlearn_fast, m) {
  m.def("has_cuda() -> bool", &has_cuda);
  // Per-row divergences between softmax(p_logits) and softmax(q_logits), [B, C] -> [B].
  m.def("js_divergence(Tensor p_logits, Tensor q_logits) -> Tensor");
  m.def("activation_distance(Tensor p_logits, Tensor q_logits) -> Tensor");
  // Streaming: js_sum[g] += JS(row), l2_sum[g] += ||p - q||_2, count[g] += 1 for each row's group g
  // (all rows in group 0 when groups is None). Accumulators float64 [K].
  m.def(
      "divergence_accumulate(Tensor p_logits, Tensor q_logits, Tensor? groups, Tensor(a!) js_sum, "
      "Tensor(b!) l2_sum, Tensor(c!) count) -> ()");
  // Linear CKA sufficient statistics for L layer pairs (float64 accumulators, in place).
  m.def(
      "cka_accumulate(Tensor[] xs, Tensor[] ys, Tensor(a!)[] sxy, Tensor(b!)[] sxx, Tensor(c!)[] syy, "
      "Tensor(d!)[] sx, Tensor(e!)[] sy) -> ()");
  // Squared Frobenius norms of the centred blocks of S - s1 s2^T / n, blocks given by cumulative
  // offsets: out[a, b] = sum over rows of block a, columns of block b. float64 [L1, L2].
  m.def("cka_centered_sqnorm(Tensor s, Tensor s1, Tensor s2, float n, int[] offsets1, int[] offsets2) -> Tensor");
  // Unbiased minibatch HSIC (Nguyen et al. 2021) of every pair of M feature sets: hsic_sum += H [M, M].
  m.def("hsic_minibatch_accumulate(Tensor[] feats, Tensor(a!) hsic_sum) -> ()");
  // Exact statistics of every (layer of X, layer of Y) pair: sxy over the concatenated widths
  // [Dx, Dy], but sxx / syy per layer only (the diagonal blocks the CKA denominators read).
  m.def(
      "cka_accumulate_cross(Tensor[] xs, Tensor[] ys, Tensor(a!) sxy, Tensor(b!)[] sxx, Tensor(c!)[] syy, "
      "Tensor(d!)[] sx, Tensor(e!)[] sy) -> ()");
  // Fused unbiased minibatch HSIC of X's sets against Y's: hxy [Lx, Ly] (all_pairs) or [L] (pair l with l),
  // hxx [Lx], hyy [Ly] += HSIC_1; no X-X / Y-Y cross pairs are formed.
  m.def(
      "hsic_cross_accumulate(Tensor[] xs, Tensor[] ys, Tensor(a!) hxy, Tensor(b!) hxx, Tensor(c!) hyy, "
      "bool all_pairs) -> ()");
}

}  // namespace unlearn_fast
