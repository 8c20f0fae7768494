"""Deterministic, resumable data loading.

The order of epoch ``e`` is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))``
(or ``0..n-1`` without shuffling); no global RNG is touched. ``start_batch=k`` skips the first ``k``
batches of that order without loading them, so a trainer resumed mid-epoch sees exactly the rest.

Data-parallel runs (``rank`` / ``world_size``): every rank builds the same global order and global
batch ``b`` is split into ``world_size`` contiguous slices (sizes differ by at most one,
:func:`unlearn_fast.distributed.shard_range`); rank ``r`` loads slice ``r`` only. The number of batches,
the effective batch and ``start_batch`` are those of the 1-process run, so resume stays exact.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from unlearn_fast.data.datasets import SampleBatch, collate

SEED_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * SEED_STRIDE + int(epoch)


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields index batches of one epoch, starting at batch ``start_batch``; ``len`` = remaining batches."""

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, start_batch: int = 0,
        drop_last: bool = False, rank: int = 0, world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n < 0:
            raise ValueError(f"dataset size must be >= 0, got {n}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        self.n, self.batch_size, self.shuffle = int(n), int(batch_size), bool(shuffle)
        self.seed, self.epoch, self.drop_last = int(seed), int(epoch), bool(drop_last)
        total = self.total_batches
        if not 0 <= start_batch <= total:
            raise ValueError(
                f"start_batch={start_batch} is outside [0, {total}]: epoch {epoch} has {total} batches "
                f"({n} samples, batch size {batch_size}, drop_last={drop_last})"
            )
        self.start_batch = int(start_batch)
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size

    @property
    def total_batches(self) -> int:
        """Batches in the full epoch (ignoring ``start_batch``)."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self) -> torch.Tensor:
        """The epoch's full sample order, int64 ``[n]``."""
        if not self.shuffle:
            return torch.arange(self.n, dtype=torch.int64)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g)

    def global_size(self, b: int) -> int:
        """Samples in global batch ``b`` (all ranks together)."""
        return max(0, min(self.batch_size, self.n - b * self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        from unlearn_fast.distributed import shard_range

        order = self.order()
        bs = self.batch_size
        for b in range(self.start_batch, self.total_batches):
            idx = order[b * bs : (b + 1) * bs]
            if self.world_size > 1:
                lo, hi = shard_range(len(idx), self.rank, self.world_size)
                idx = idx[lo:hi]
            yield idx.tolist()

    def __len__(self) -> int:
        return self.total_batches - self.start_batch


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, start_batch: int = 0,
    drop_last: bool = False, num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """A ``DataLoader`` over one epoch of ``dataset`` (see module doc); batches are ``(x [B, ...], y [B])``,
    rank ``rank``'s slice of each global batch when ``world_size`` > 1 (``None`` for an empty slice).

    Workers are started per epoch (not persistent): each epoch's loader is built for its own
    ``(epoch, start_batch)``, which is what keeps resume exact; worker seeds derive from ``(seed, epoch)``."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = ResumableBatchSampler(
        len(dataset), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, start_batch=start_batch,
        drop_last=drop_last, rank=rank, world_size=world_size,
    )
    # The generator only seeds worker processes (base_seed); passing it keeps the global RNG untouched.
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch) ^ 0x5F3759DF)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory, generator=gen, collate_fn=_collate,
    )


def _collate(batch: list):
    """:func:`collate`, and None for the empty slice a rank gets when a global batch has fewer samples than ranks."""
    if not isinstance(batch, SampleBatch) and len(batch) == 0:
        return None
    return collate(batch)
