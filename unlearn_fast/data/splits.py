"""Seeded, stratified sample selection: per-class caps and train/val/test splits.

Every class draws from its own generator ``numpy.random.default_rng([seed, class, salt])``, so the
split of one class does not depend on which other classes are present. Returned indices are sorted.
"""
from __future__ import annotations

import numpy as np

_SALT_CAP = 0xCA9
_SALT_SPLIT = 0x5B1


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    return labels.astype(np.int64, copy=False)


def _check_seed(seed: int) -> int:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def cap_per_class(labels: np.ndarray, max_per_class: int | None, seed: int, fraction: float | None = None) -> np.ndarray:
    """Indices (sorted) keeping at most ``max_per_class`` seeded-random samples of each class, and at
    most ``fraction`` of each class (rounded, at least 1)."""
    labels = _check_labels(labels)
    if max_per_class is None and fraction is None:
        return np.arange(labels.size, dtype=np.int64)
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"data fraction must be in (0, 1], got {fraction}")
    seed = _check_seed(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        cap = idx.size if max_per_class is None else max_per_class
        if fraction is not None:
            cap = min(cap, max(1, int(round(idx.size * fraction))))
        if idx.size > cap:
            rng = np.random.default_rng([seed, int(c), _SALT_CAP])
            idx = rng.choice(idx, size=cap, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _count(n: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    k = int(round(n * fraction))
    if k == 0 and n >= 3:  # every class with a few samples appears in every split
        k = 1
    return k


def stratified_split(
    labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Split sample indices into ``train`` / ``val`` / ``test`` class by class.

    Per class of ``n`` samples: ``round(n * test_fraction)`` go to test and ``round(n * val_fraction)``
    to val (at least one each when the fraction is > 0 and ``n >= 3``), the rest to train, which always
    keeps at least one sample. Test is drawn first, so the test set of a seed does not change with
    ``val_fraction``.
    """
    labels = _check_labels(labels)
    seed = _check_seed(seed)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 (got {val_fraction} + {test_fraction}): nothing left to train on"
        )
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = idx.size
        n_test, n_val = _count(n, test_fraction), _count(n, val_fraction)
        while n_test + n_val > n - 1 and n_test + n_val > 0:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        perm = np.random.default_rng([seed, int(c), _SALT_SPLIT]).permutation(idx)
        out["test"].append(perm[:n_test])
        out["val"].append(perm[n_test : n_test + n_val])
        out["train"].append(perm[n_test + n_val :])
    return {
        k: (np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, dtype=np.int64))
        for k, v in out.items()
    }
