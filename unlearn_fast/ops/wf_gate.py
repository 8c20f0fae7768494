"""Functional WF gate with backend dispatch (DESIGN §3, §5).

``wf_conv2d`` / ``wf_linear`` have the signatures of :mod:`unlearn_fast.reference.wf_gate`. On CUDA
tensors (``auto``) or with ``UNLEARN_FAST_BACKEND=triton`` they run the fused Triton kernels of
``unlearn_fast.kernels``; otherwise the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from unlearn_fast.ops.backend import resolve
from unlearn_fast.reference import wf_gate as ref

__all__ = ["wf_conv2d", "wf_linear", "check_labels", "mark_labels_checked"]


_CHECKED = "_unlearn_fast_labels_ok"  # attribute on a labels tensor: (its _version, classes it was checked for)


def check_labels(labels: Tensor, batch: int, num_classes: int, *, check_range: bool = True) -> None:
    """Gate labels must be ``[batch]`` integers in ``[0, num_classes)`` (IndexError otherwise, the
    reference's error type, raised before any kernel launches). The range check reads min/max on the
    host - a device sync on CUDA - once per labels tensor: a passing check is remembered on the tensor
    (keyed by its version counter, so an in-place change re-checks), and every later layer of the same
    forward skips it. Skipped while ``torch.compile`` traces (``WFModel`` checks outside the graph)."""
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"forget labels must be [B]={batch} gate rows, got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"forget labels must be an integer tensor, got {labels.dtype}")
    if not check_range or not labels.numel() or torch.compiler.is_compiling():
        return
    ok = getattr(labels, _CHECKED, None)
    if ok is not None and ok[0] == labels._version and num_classes >= ok[1]:
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= num_classes:
        raise IndexError(f"forget labels must lie in [0, {num_classes}), got range [{lo}, {hi}]; "
                         "pass one gate row (class index) per sample")
    mark_labels_checked(labels, hi + 1)


def mark_labels_checked(labels: Tensor, num_classes: int) -> None:
    """Record that ``labels`` lie in ``[0, num_classes)`` (e.g. for labels derived from checked ones by
    ``repeat_interleave``), so :func:`check_labels` skips its host sync for them."""
    try:
        setattr(labels, _CHECKED, (labels._version, int(num_classes)))
    except (AttributeError, RuntimeError):  # e.g. a tensor subclass without __dict__
        pass


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
