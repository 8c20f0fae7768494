"""TF32 policy for fp32 GEMMs and convolutions, read and set through torch's current API.

torch >= 2.9 has ``torch.backends.fp32_precision`` and per-backend children
(``torch.backends.cuda.matmul.fp32_precision``, ``torch.backends.cudnn.conv.fp32_precision``), each
``"ieee"``, ``"tf32"`` or ``"none"`` (= inherit from the parent). Once one of them has been set, the
legacy flags (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``) raise on
read, so everything here goes through the new API and touches the legacy flags only on a torch that
lacks it. The Triton kernels follow the same policy as the cuBLAS / cuDNN ops they replace:
``kind="matmul"`` for the linear kernels, ``kind="conv"`` for the conv kernels.

Imports torch only (no triton).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["tf32_enabled", "set_tf32", "tf32_policy", "KINDS"]

KINDS = ("matmul", "conv")


def _new_api() -> bool:
    return hasattr(torch.backends, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _chain(kind: str) -> list[object]:
    """The ``fp32_precision`` holders from the most specific to the root."""
    b = torch.backends
    if kind == "matmul":
        return [b.cuda.matmul, b]
    if kind == "conv":
        return [b.cudnn.conv, b.cudnn, b]
    raise ValueError(f"TF32 kind must be one of {KINDS}, got {kind!r}")


def tf32_enabled(kind: str) -> bool:
    """Whether fp32 ``kind`` ops (``"matmul"`` or ``"conv"``) may use TF32 under torch's current policy."""
    if not _new_api():
        if kind == "matmul":
            return bool(torch.backends.cuda.matmul.allow_tf32)
        if kind == "conv":
            return bool(torch.backends.cudnn.allow_tf32)
        raise ValueError(f"TF32 kind must be one of {KINDS}, got {kind!r}")
    for holder in _chain(kind):
        v = str(getattr(holder, "fp32_precision", "none")).lower()
        if v != "none":
            return v == "tf32"
    return False  # every level "none": torch's default is IEEE


def set_tf32(enabled: bool, kinds: tuple[str, ...] = KINDS) -> None:
    """Set the TF32 policy of ``kinds`` (default: matmul and conv) for torch *and* the Triton kernels."""
    value = "tf32" if enabled else "ieee"
    for kind in kinds:
        holder = _chain(kind)[0]
        if _new_api():
            holder.fp32_precision = value
        elif kind == "matmul":
            torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        else:
            torch.backends.cudnn.allow_tf32 = bool(enabled)


@contextmanager
def tf32_policy(enabled: bool, kinds: tuple[str, ...] = KINDS) -> Iterator[None]:
    """Temporarily set the TF32 policy (restores the previous per-kind values on exit)."""
    if _new_api():
        saved = [(h, h.fp32_precision) for h in (_chain(k)[0] for k in kinds)]
    else:
        saved = [("matmul", torch.backends.cuda.matmul.allow_tf32), ("conv", torch.backends.cudnn.allow_tf32)]
    set_tf32(enabled, kinds)
    try:
        yield
    finally:
        for h, v in saved:
            if isinstance(h, str):
                set_tf32(bool(v), (h,))
            else:
                h.fp32_precision = v
