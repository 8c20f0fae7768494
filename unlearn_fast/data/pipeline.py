"""How a dataset is fed: which data is decoded lazily (per item, in DataLoader workers), how many worker
processes to use by default, and the DataLoader that evaluation passes use.

Lazily decoded data is a file-backed split (``folder:`` / ``faces:``, :class:`ImageFileDataset`) that was
not cached in memory at load time: every epoch decodes its files again, so on a GPU that work belongs
in worker processes, off the training thread. In-memory sets (digits, IDX, CIFAR, glyphs, and file
sets small enough to cache) are tensors already: workers would only add start-up and copy costs.

Workers never change results: the per-item pipeline (decode, channel adaptation, resize, normalise)
has no randomness (augmentation is applied by the trainer on whole batches, from its own
``torch.Generator``), and ``DataLoader`` yields batches in sampler order for any worker count.
"""
from __future__ import annotations

import contextvars
import os

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from unlearn_fast.data.datasets import ImageFileDataset, collate

__all__ = ["base_dataset", "lazily_decoded", "default_workers", "load_workers", "eval_loader", "eval_workers",
           "set_eval_workers", "MAX_DEFAULT_WORKERS"]

MAX_DEFAULT_WORKERS = 8

# Worker processes of evaluation passes over lazily decoded data (set per run by RunContext.apply_run_options).
_EVAL_WORKERS: contextvars.ContextVar[int] = contextvars.ContextVar("unlearn_fast_eval_workers", default=0)


def base_dataset(ds: Dataset) -> Dataset:
    """The dataset under any chain of ``torch.utils.data.Subset`` views."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def lazily_decoded(ds: Dataset | None) -> bool:
    """True when ``ds`` (or the dataset under its subset views) decodes image files on every access."""
    base = base_dataset(ds) if ds is not None else None
    return isinstance(base, ImageFileDataset) and not base.is_cached


def default_workers(ds: Dataset | None, device: torch.device | str) -> int:
    """Default DataLoader workers: ``min(8, CPU count)`` for lazily decoded data on CUDA, else 0."""
    if torch.device(device).type != "cuda" or not lazily_decoded(ds):
        return 0
    return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))


def load_workers(workers: int | None, device: torch.device | str) -> int:
    """Processes decoding files while ``data.load`` builds its cache / statistics: ``workers`` when given,
    else ``min(8, CPU count)`` on CUDA and 0 on the CPU."""
    if workers is not None:
        return workers
    return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)) if torch.device(device).type == "cuda" else 0


def set_eval_workers(n: int) -> None:
    """Worker processes for :func:`eval_loader` over lazily decoded data from now on (0: in process)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"eval workers must be an integer >= 0, got {n!r}")
    _EVAL_WORKERS.set(n)


def eval_workers() -> int:
    return _EVAL_WORKERS.get()


def eval_loader(ds: Dataset, batch_size: int) -> DataLoader:
    """An in-order, unshuffled ``DataLoader`` over ``ds`` for evaluation; batches ``(x [B, C, S, S], y [B])``.

    Lazily decoded data gets :func:`set_eval_workers` worker processes; anything else loads in process.
    The batches are identical for every worker count."""
    n = eval_workers() if lazily_decoded(ds) else 0
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=n, collate_fn=collate)

