"""Atomic, resumable training-state files (the ``state/`` folder of a run directory).

A checkpoint holds what a loop needs to continue exactly where it stopped: trainable tensors,
optimizer state, accumulated gradients, loop position, early-stopping state and every RNG state
(torch, numpy, python, and the loop's own generators). Files are written to a temporary name and
renamed, so a run killed mid-write keeps its previous checkpoint.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearn_fast.distributed import main_rank_only

__all__ = ["atomic_save", "load_state", "capture_rng", "restore_rng"]


@main_rank_only
def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name, then rename; in a process group rank 0 alone writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none. A corrupt file raises a ValueError saying what to do."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it to start this step over"
        ) from exc


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for k, g in (generators or {}).items():
        state["gen:" + k] = g.get_state()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        g.set_state(state["gen:" + k])
