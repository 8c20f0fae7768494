"""Map-style datasets returning ``(x: float32 [C, H, W] normalised, y: int)``.

* :class:`TensorImageDataset` - images held in memory as one uint8/float tensor ``[N, C, H, W]``.
* :class:`ImageFileDataset` - one image file per sample, opened with PIL per item (ImageNet-size trees).
* :class:`ClassSubset` - a subset that keeps ``targets``.

Preprocessing (channels, resize) is applied per item, or once for the whole split by
:meth:`ImageDataset.cache` when the result fits in memory. Normalisation is applied on access.
Nothing per item is random, so DataLoader worker processes (which decode :class:`ImageFileDataset`
files off the training thread) give the same batches as loading in process.
``__getitems__`` serves a whole ``DataLoader`` batch with one gather / resize / normalise.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, default_collate

from unlearn_fast.data.imageio import read_image
from unlearn_fast.data.transforms import ChannelStats, Normalize, Preprocess


class ImageDataset(Dataset):
    """Shared machinery: ``targets`` (int64 ``[n]``), lazy preprocessing, optional cache, normalisation."""

    def __init__(self, targets: torch.Tensor, preprocess: Preprocess) -> None:
        self.targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
        self.preprocess = preprocess
        self.normalize: Normalize | None = None
        self._cache: torch.Tensor | None = None

    # subclasses: raw float/uint8 image(s) before preprocessing
    def _raw(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def _processed_batches(self, indices: Sequence[int], batch: int = 512, workers: int = 0) -> Iterator[torch.Tensor]:
        """Preprocessed samples ``indices`` in order, ``[<=batch, C, S, S]`` at a time; ``workers`` > 0
        decodes them in that many DataLoader processes (same values, same order)."""
        if workers > 0 and len(indices) > batch:
            from torch.utils.data import DataLoader

            yield from DataLoader(_Preprocessed(self, indices), batch_size=batch, shuffle=False, num_workers=workers,
                                  collate_fn=_first)
            return
        for s in range(0, len(indices), batch):
            yield torch.stack([self.preprocess(self._raw(int(i))) for i in indices[s : s + batch]])

    def __len__(self) -> int:
        return int(self.targets.numel())

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.preprocess.in_chans, self.preprocess.img_size, self.preprocess.img_size)

    @property
    def is_cached(self) -> bool:
        return self._cache is not None

    def processed(self, i: int) -> torch.Tensor:
        """Sample ``i`` after channel adaptation and resizing, before normalisation: ``[C, S, S]``."""
        if self._cache is not None:
            return self._cache[i]
        return self.preprocess(self._raw(i))

    def cache_nbytes(self) -> int:
        c, h, w = self.sample_shape
        return len(self) * c * h * w * 4

    def cache(self, progress: bool = False, workers: int = 0) -> None:
        """Preprocess every sample once into a float32 ``[n, C, S, S]`` tensor held in memory (decoded in
        ``workers`` processes when > 0)."""
        if self._cache is not None:
            return
        out = torch.empty((len(self), *self.sample_shape), dtype=torch.float32)
        batches = self._processed_batches(range(len(self)), workers=workers)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=(len(self) + 511) // 512, desc="preprocessing", leave=False)
        pos = 0
        for xb in batches:
            out[pos : pos + xb.shape[0]] = xb
            pos += xb.shape[0]
        self._cache = out

    def channel_stats(self, indices: Sequence[int] | None = None,
                      workers: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel pixel mean / std of the preprocessed images (all, or ``indices``; decoded in
        ``workers`` processes when > 0)."""
        stats = ChannelStats()
        idx = range(len(self)) if indices is None else indices
        if self._cache is not None:
            sel = torch.as_tensor(np.asarray(idx, dtype=np.int64))
            for s in range(0, sel.numel(), 4096):
                stats.update(self._cache[sel[s : s + 4096]])
        else:
            for xb in self._processed_batches(idx, workers=workers):
                stats.update(xb)
        return stats.compute()

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.normalize = Normalize(tuple(mean), tuple(std))

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for dataset of size {n}")
        return int(i) % n

    def _processed_many(self, idx: torch.Tensor) -> torch.Tensor:
        """Preprocessed (not normalised) samples ``idx`` (int64 ``[B]``) -> ``[B, C, S, S]``."""
        if self._cache is not None:
            return self._cache[idx]
        return torch.stack([self.processed(int(i)) for i in idx])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = self._check_index(i)
        x = self.processed(i)
        x = self.normalize(x) if self.normalize is not None else x.clone()  # never hand out a cache view
        return x, int(self.targets[i])

    def __getitems__(self, indices: Sequence[int]) -> "SampleBatch":
        """Batched fetch used by ``DataLoader``: one indexing / resize / normalise op for the whole batch."""
        n = len(self)
        idx_t = torch.as_tensor(list(indices), dtype=torch.int64)
        if idx_t.numel() == 0:
            return SampleBatch(torch.empty((0, *self.sample_shape)), torch.zeros(0, dtype=torch.int64))
        if int(idx_t.min()) < -n or int(idx_t.max()) >= n:
            raise IndexError(f"indices span [{int(idx_t.min())}, {int(idx_t.max())}], out of range for size {n}")
        idx_t = idx_t % n
        x = self._processed_many(idx_t)
        if self.normalize is not None:
            x = self.normalize(x)
        return SampleBatch(x, self.targets[idx_t])


class _Preprocessed(Dataset):
    """Position ``p`` -> ``ds``'s preprocessed sample ``indices[p]``; whole batches via ``__getitems__``."""

    def __init__(self, ds: ImageDataset, indices: Sequence[int]) -> None:
        self.ds, self.indices = ds, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, pos: Sequence[int]) -> list[torch.Tensor]:
        return [torch.stack([self.ds.preprocess(self.ds._raw(int(self.indices[p]))) for p in pos])]


def _first(batch: list) -> torch.Tensor:
    return batch[0]


class SampleBatch(list):
    """A list of ``(x_i, y_i)`` samples (what ``default_collate`` expects) that also carries the batch
    already stacked: ``x [B, C, S, S]``, ``y [B]`` int64, so :func:`collate` need not re-stack it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(zip(x.unbind(0), y.tolist()))
        self.x, self.y = x, y


def collate(batch: list) -> list[torch.Tensor]:
    """``default_collate`` with a fast path for :class:`SampleBatch`; returns ``[x, y]``."""
    if isinstance(batch, SampleBatch):
        return [batch.x, batch.y]
    return default_collate(batch)


class TensorImageDataset(ImageDataset):
    """In-memory images ``images[indices]`` (uint8 0..255 or float 0..1, ``[N, C, H, W]``)."""

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, preprocess: Preprocess, indices: np.ndarray | None = None
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        self.images = images
        self.indices = (
            torch.arange(images.shape[0]) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        )
        super().__init__(targets, preprocess)
        if self.targets.numel() != self.indices.numel():
            raise ValueError(f"{self.indices.numel()} images but {self.targets.numel()} targets")

    def _raw(self, i: int) -> torch.Tensor:
        return self.images[self.indices[i]]

    def _processed_many(self, idx: torch.Tensor) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[idx]
        return self.preprocess(self.images[self.indices[idx]])

    def _processed_batches(self, indices: Sequence[int], batch: int = 2048, workers: int = 0) -> Iterator[torch.Tensor]:
        # in memory already: one vectorised op per batch, no workers
        sel = self.indices[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        for s in range(0, sel.numel(), batch):
            yield self.preprocess(self.images[sel[s : s + batch]])


class ImageFileDataset(ImageDataset):
    """One image file per sample, decoded with PIL on access (``files[i]`` has label ``targets[i]``)."""

    def __init__(self, files: Sequence[str], targets: torch.Tensor, preprocess: Preprocess) -> None:
        self.files = list(files)
        super().__init__(targets, preprocess)
        if len(self.files) != self.targets.numel():
            raise ValueError(f"{len(self.files)} files but {self.targets.numel()} targets")

    def _raw(self, i: int) -> torch.Tensor:
        return read_image(self.files[i])


class ClassSubset(Subset):
    """``torch.utils.data.Subset`` that also exposes ``targets`` (int64 ``[len]``) and ``indices``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        super().__init__(dataset, idx.tolist())
        self.targets = getattr(dataset, "targets")[idx] if len(idx) else torch.zeros(0, dtype=torch.int64)
