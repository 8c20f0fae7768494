"""Gate-label checks shared by every backend of the WF gate (the reference path, the Triton ops and
``nn``): shape, dtype and range, with the range check's host sync done once per labels tensor."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_labels", "mark_labels_checked"]


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
