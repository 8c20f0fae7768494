"""unlearn_fast: make an image classifier forget whole classes, fast, and prove it.

Entry points: :func:`train` (original / retrain / wf / ec / baselines), :func:`evaluate`,
and the ``unlearn-fast`` command line. See DESIGN.md for the architecture.
"""
from __future__ import annotations

__version__ = "0.1.0"

from unlearn_fast import _ext  # noqa: F401  (loads _C or warns once)
from unlearn_fast._ext import HAS_C  # noqa: F401


def __getattr__(name: str):
    # api imports methods/evaluation (and matplotlib); keep `import unlearn_fast` light.
    if name in ("train", "evaluate", "compare", "TrainResult"):
        from unlearn_fast import api

        return getattr(api, name)
    raise AttributeError(f"module 'unlearn_fast' has no attribute {name!r}")
