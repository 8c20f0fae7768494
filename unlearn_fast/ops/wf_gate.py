"""Functional WF gate with backend dispatch (DESIGN §3, §5).

``wf_conv2d`` / ``wf_linear`` have the signatures of :mod:`unlearn_fast.reference.wf_gate`. On CUDA
tensors (``auto``) or with ``UNLEARN_FAST_BACKEND=triton`` they run the fused Triton kernels of
``unlearn_fast.kernels``; otherwise the reference.
"""
from __future__ import annotations

from torch import Tensor

from unlearn_fast.ops.backend import resolve
from unlearn_fast.ops.labels import check_labels, mark_labels_checked
from unlearn_fast.reference import wf_gate as ref

__all__ = ["wf_conv2d", "wf_linear", "check_labels", "mark_labels_checked"]


def _check(x: Tensor, weight: Tensor, alpha_w: Tensor, alpha_b: Tensor | None, labels: Tensor) -> None:
    if alpha_w.dim() != 2 or alpha_w.shape[1] != weight.shape[0]:
        raise ValueError(f"alpha_w must be [N_classes, {weight.shape[0]}], got {tuple(alpha_w.shape)}")
    if alpha_b is not None and alpha_b.shape != alpha_w.shape:
        raise ValueError(f"alpha_b must match alpha_w {tuple(alpha_w.shape)}, got {tuple(alpha_b.shape)}")
    # the range check syncs only for labels not already checked (WFModel checks once per forward)
    check_labels(labels, x.shape[0], alpha_w.shape[0])


def wf_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
              labels: Tensor, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    _check(x, weight, alpha_w, alpha_b, labels)
    if resolve("wf_conv2d", x.device) == "triton" and groups == 1 and not isinstance(padding, str):
        from unlearn_fast.ops.wf_triton import wf_conv2d_triton

        return wf_conv2d_triton(x, weight, bias, alpha_w, alpha_b, labels, stride, padding, dilation)
    return ref.wf_conv2d(x, weight, bias, alpha_w, alpha_b, labels, stride, padding, dilation, groups)


def wf_linear(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
              labels: Tensor) -> Tensor:
    _check(x, weight, alpha_w, alpha_b, labels)
    if resolve("wf_linear", x.device) == "triton":
        from unlearn_fast.ops.wf_triton import wf_linear_triton

        return wf_linear_triton(x, weight, bias, alpha_w, alpha_b, labels)
    return ref.wf_linear(x, weight, bias, alpha_w, alpha_b, labels)
