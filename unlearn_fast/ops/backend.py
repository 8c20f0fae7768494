"""Backend selection (DESIGN §5).

``UNLEARN_FAST_BACKEND = auto | triton | cuda | torch``. ``auto`` uses the Triton / CUDA kernels for
CUDA tensors and the reference path otherwise; asking for a backend that is not available raises.
``TRITON_INTERPRET=1`` makes the ``triton`` backend usable on CPU tensors (tests).
"""
from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from typing import Iterator

import torch

log = logging.getLogger("unlearn_fast")

BACKENDS = ("auto", "triton", "cuda", "torch")
_override: str | None = None


def requested_backend() -> str:
    name = (_override or os.environ.get("UNLEARN_FAST_BACKEND", "auto")).lower()
    if name not in BACKENDS:
        raise ValueError(f"UNLEARN_FAST_BACKEND={name!r} is not one of {BACKENDS}")
    return name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily force a backend (``auto``/``triton``/``cuda``/``torch``)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    old, _override = _override, name
    try:
        yield
    finally:
        _override = old


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    log.warning(msg)


def resolve(op: str, device: torch.device, *, has_triton_impl: bool = True, has_cuda_impl: bool = False) -> str:
    """The backend that will run ``op`` for tensors on ``device``: ``triton``, ``cuda`` or ``torch``."""
    name = requested_backend()
    on_cuda = device.type == "cuda"
    if name == "torch":
        return "torch"
    if name == "triton":
        if not has_triton_impl:
            raise RuntimeError(f"op {op} has no Triton kernel; use UNLEARN_FAST_BACKEND=auto or torch")
        if not triton_available():
            raise RuntimeError("UNLEARN_FAST_BACKEND=triton but triton cannot be imported")
        if not on_cuda and not triton_interpret():
            raise RuntimeError(
                f"UNLEARN_FAST_BACKEND=triton needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                "to run the kernels on the CPU, or use UNLEARN_FAST_BACKEND=torch"
            )
        return "triton"
    if name == "cuda":
        from unlearn_fast import _ext

        if not has_cuda_impl:
            raise RuntimeError(f"op {op} has no CUDA kernel; use UNLEARN_FAST_BACKEND=auto or torch")
        if not _ext.HAS_C:
            raise RuntimeError(f"UNLEARN_FAST_BACKEND=cuda but unlearn_fast._C did not load: {_ext.LOAD_ERROR}")
        return "cuda"
    # auto
    if on_cuda and has_triton_impl and triton_available():
        return "triton"
    if on_cuda and has_cuda_impl:
        from unlearn_fast import _ext

        if _ext.HAS_C_CUDA:
            return "cuda"
    if on_cuda:
        _warn_once(f"unlearn_fast: no fast kernel for {op} on {device}; using the reference path")
    return "torch"
