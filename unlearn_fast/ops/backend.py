"""Backend selection (DESIGN §5).

``UNLEARN_FAST_BACKEND = auto | triton | cuda | torch``. ``auto`` uses the Triton / CUDA kernels for
CUDA tensors and the reference path otherwise; asking for a backend that is not available raises.
``TRITON_INTERPRET=1`` makes the ``triton`` backend usable on CPU tensors (tests).

A GPU the fast kernels cannot run on falls back to the reference ops with one warning (``auto``) or
raises (an explicit ``triton`` / ``cuda`` request): Triton kernels need compute capability >= 8.0
(TF32 / bf16 ``tl.dot``); the CUDA part of ``unlearn_fast._C`` is built for ``8.0;8.6;8.9;9.0+PTX`` by
default (``setup.py``), and whether it has a kernel for a GPU is probed once per device on first use
(:func:`cuda_ext_usable`; the metrics ops consult it too). The TF32 policy that the Triton kernels
follow is set / read with :func:`set_tf32` / :func:`tf32_enabled` (torch's ``fp32_precision`` API).
"""
from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from typing import Iterator

import torch

from unlearn_fast.kernels._tf32 import set_tf32, tf32_enabled, tf32_policy  # noqa: F401  (public here)

log = logging.getLogger("unlearn_fast")

TRITON_MIN_CAPABILITY = (8, 0)

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


def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def triton_supported(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (CPU: only under ``TRITON_INTERPRET=1``)."""
    if device.type != "cuda":
        return triton_interpret()
    return triton_available() and _capability(device) >= TRITON_MIN_CAPABILITY


def arch_list_covers(capability: tuple[int, int], arch_list: str) -> bool:
    """Whether a CUDA build for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax, e.g. ``"8.0;8.6;9.0+PTX"``)
    runs on a GPU of ``capability``: a cubin for ``X.y`` runs on ``X.z`` with ``z >= y``; PTX for ``X.y``
    is JIT-compiled for any newer capability."""
    ok = False
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        base = item.replace("+PTX", "")
        suffix = base[-1] if base[-1] in "af" else ""
        major, minor = (int(v) for v in base.rstrip("af").split("."))
        if ptx and not suffix and capability >= (major, minor):
            ok = True
        if suffix == "a" and capability == (major, minor):  # arch-specific: that GPU only
            ok = True
        if suffix != "a" and capability[0] == major and capability[1] >= minor:
            ok = True
    return ok


def _is_no_kernel_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "no kernel image" in msg or "invalid device function" in msg or "unsupported ptx" in msg


@functools.lru_cache(maxsize=None)
def cuda_ext_usable(device: torch.device) -> bool:
    """Whether the CUDA part of ``unlearn_fast._C`` has a kernel for ``device``: one tiny op is run once
    per device; a GPU without a kernel image logs one warning and gets the reference ops."""
    from unlearn_fast import _ext

    if device.type != "cuda" or not _ext.HAS_C_CUDA:
        return False
    try:
        p = torch.zeros(1, 2, device=device)
        torch.ops.unlearn_fast.js_divergence(p, p)
        torch.cuda.synchronize(device)
        return True
    except RuntimeError as exc:
        if not _is_no_kernel_error(exc):
            raise
        _warn_once(f"unlearn_fast: unlearn_fast._C has no CUDA kernel for {torch.cuda.get_device_name(device)} "
                   f"(capability {_capability(device)}); using the reference ops. Rebuild with "
                   "TORCH_CUDA_ARCH_LIST including this GPU (`pip install --no-build-isolation -e .`)")
        return False


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
        if on_cuda and not triton_supported(device):
            raise RuntimeError(f"UNLEARN_FAST_BACKEND=triton: the Triton kernels need compute capability >= "
                               f"{TRITON_MIN_CAPABILITY}, {device} has {_capability(device)}; use auto or torch")
        return "triton"
    if name == "cuda":
        from unlearn_fast import _ext

        if not has_cuda_impl:
            raise RuntimeError(f"op {op} has no CUDA kernel; use UNLEARN_FAST_BACKEND=auto or torch")
        if not _ext.HAS_C:
            raise RuntimeError(f"UNLEARN_FAST_BACKEND=cuda but unlearn_fast._C did not load: {_ext.LOAD_ERROR}")
        if on_cuda and not cuda_ext_usable(device):
            raise RuntimeError(f"UNLEARN_FAST_BACKEND=cuda: unlearn_fast._C has no CUDA kernel for {device}; "
                               "rebuild with TORCH_CUDA_ARCH_LIST covering it, or use auto")
        return "cuda"
    # auto
    if on_cuda and has_triton_impl and triton_supported(device):
        return "triton"
    if on_cuda and has_cuda_impl and cuda_ext_usable(device):
        return "cuda"
    if on_cuda:
        _warn_once(f"unlearn_fast: no fast kernel for {op} on {device}; using the reference path")
    return "torch"
