"""``DataBundle``: the three splits of one dataset plus everything needed to reproduce them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from unlearn_fast.data.datasets import ClassSubset

SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    """Train/val/test datasets of ``(x: float32 [in_chans, img_size, img_size] normalised, y: int)``.

    ``split_indices[s]`` are indices into the source's own part ``split_sources[s]`` (``"all"`` when the
    source has no split, else ``"train"`` / ``"val"`` / ``"test"``), in the source's file order, so that
    ``manifest()`` written to a run directory identifies every sample.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    class_names: list[str]
    hflip: bool
    targets: dict[str, torch.Tensor]
    split_indices: dict[str, np.ndarray] = field(default_factory=dict)
    split_sources: dict[str, str] = field(default_factory=dict)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_per_class: int | None = None
    fraction: float | None = None
    resize_mode: str = "stretch"
    root: str | None = None
    native_size: tuple[int, int] | None = None
    native_chans: int | None = None
    source_sizes: dict[str, int] = field(default_factory=dict)

    def split(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def _check_classes(self, classes: Sequence[int] | None, what: str) -> list[int] | None:
        if classes is None:
            return None
        out = [int(c) for c in (classes.tolist() if isinstance(classes, (torch.Tensor, np.ndarray)) else classes)]
        bad = [c for c in out if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"{what} {bad} out of range: {self.name} has classes 0..{self.num_classes - 1}")
        return out

    def class_mask(self, split: str, classes: Sequence[int] | None = None, exclude: Sequence[int] | None = None) -> torch.Tensor:
        """Bool ``[n]`` over ``split``: label in ``classes`` (all when None) and not in ``exclude``."""
        self.split(split)
        y = self.targets[split]
        keep = self._check_classes(classes, "classes")
        drop = self._check_classes(exclude, "exclude")
        mask = torch.ones_like(y, dtype=torch.bool) if keep is None else torch.isin(y, torch.tensor(keep, dtype=torch.int64))
        if drop:
            mask &= ~torch.isin(y, torch.tensor(drop, dtype=torch.int64))
        return mask

    def subset(self, split: str, classes: Sequence[int] | None = None, exclude: Sequence[int] | None = None) -> Dataset:
        """Samples of ``split`` whose label is in ``classes`` (all when None) and not in ``exclude``.

        The result is a :class:`ClassSubset` (a ``torch.utils.data.Subset`` with ``targets``).
        """
        idx = torch.nonzero(self.class_mask(split, classes, exclude)).flatten()
        return ClassSubset(self.split(split), idx.numpy())

    def tensors(
        self, split: str, classes: Sequence[int] | None = None, exclude: Sequence[int] | None = None,
        batch_size: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole (filtered) split as ``(x [n, C, S, S] float32, y [n] int64)``; for small sets / evaluation."""
        ds = self.subset(split, classes, exclude)
        n = len(ds)
        x = torch.empty((n, self.in_chans, self.img_size, self.img_size), dtype=torch.float32)
        for s in range(0, n, batch_size):
            x[s : s + batch_size] = torch.stack([ds[i][0] for i in range(s, min(n, s + batch_size))])
        return x, ds.targets.clone()

    def class_counts(self, split: str) -> torch.Tensor:
        """int64 ``[num_classes]``: samples per class in ``split``."""
        return torch.bincount(self.targets[split], minlength=self.num_classes)

    def manifest(self) -> dict[str, Any]:
        """JSON-serialisable description of the bundle, split indices included (for the run directory)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "resize_mode": self.resize_mode,
            "class_names": list(self.class_names),
            "hflip": self.hflip,
            "mean": list(self.mean),
            "std": list(self.std),
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "max_per_class": self.max_per_class,
            "fraction": self.fraction,
            "source_sizes": dict(self.source_sizes),
            "split_sources": dict(self.split_sources),
            "split_indices": {k: np.asarray(v).astype(int).tolist() for k, v in self.split_indices.items()},
            "sizes": {s: int(self.targets[s].numel()) for s in SPLITS},
        }

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        """Raise ``ValueError`` when ``manifest`` (e.g. read back from a run directory) names other samples.

        The dataset kind, source part sizes and split indices must match; the directory may differ."""
        mine = self.manifest()
        kind = lambda name: str(name).split(":", 1)[0]  # noqa: E731 - the directory may have moved
        if kind(manifest.get("name")) != kind(self.name):
            raise ValueError(f"data manifest is for dataset {manifest.get('name')!r}, loaded {self.name!r}")
        for key in ("num_classes", "source_sizes", "split_sources"):
            if manifest.get(key) != mine[key]:
                raise ValueError(f"data manifest differs in {key!r}: run has {manifest.get(key)!r}, loaded {mine[key]!r}")
        for s in SPLITS:
            want = np.asarray(manifest.get("split_indices", {}).get(s, []), dtype=np.int64)
            if not np.array_equal(want, np.asarray(self.split_indices.get(s, []), dtype=np.int64)):
                raise ValueError(
                    f"the {s} split differs from the run's manifest ({want.size} vs {len(self.split_indices.get(s, []))} "
                    "samples): load with the same seed, fractions and max_per_class"
                )
