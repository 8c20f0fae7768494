"""Loads the compiled extension ``unlearn_fast._C`` if it was built.

``HAS_C`` says whether it loaded. When it did not, one warning is issued and every op falls back
to the pure-PyTorch reference in :mod:`unlearn_fast.reference`.
"""
from __future__ import annotations

import warnings

HAS_C: bool = False
HAS_C_CUDA: bool = False
LOAD_ERROR: str | None = None

try:
    import torch  # noqa: F401  (registers the dispatcher before the ops library loads)

    import importlib

    importlib.import_module("unlearn_fast._C")

    HAS_C = True
    HAS_C_CUDA = bool(getattr(torch.ops.unlearn_fast, "has_cuda", None) and torch.ops.unlearn_fast.has_cuda())
except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "unlearn_fast: the compiled extension unlearn_fast._C is not available "
        f"({LOAD_ERROR}); using the pure-PyTorch reference ops. Rebuild with "
        "`pip install -e .` to get the C++/CUDA ops.",
        RuntimeWarning,
        stacklevel=2,
    )
