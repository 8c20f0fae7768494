"""What a format reader returns: the data as the source ships it, before capping, splitting and preprocessing."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SourcePart:
    """One split as shipped (``"all"`` when the source has none, else ``"train"``, ``"test"``, maybe ``"val"``).

    Exactly one of ``images`` (in memory, uint8 0..255 or float 0..1, ``[n, C, H, W]``) and ``files``
    (one path per sample, read lazily) is set. ``labels``: int64 ``[n]``.
    """

    labels: np.ndarray
    images: torch.Tensor | None = None
    files: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if (self.images is None) == (self.files is None):
            raise ValueError("a SourcePart holds either in-memory images or a file list")
        n = self.images.shape[0] if self.images is not None else len(self.files)
        if n != self.labels.size:
            raise ValueError(f"{n} images but {self.labels.size} labels")

    def __len__(self) -> int:
        return int(self.labels.size)


@dataclass
class RawSource:
    """A dataset as read from disk (or scikit-learn)."""

    parts: dict[str, SourcePart]
    class_names: list[str]
    native_chans: int
    default_in_chans: int
    default_img_size: int
    hflip: bool
    resize_mode: str = "stretch"  # "stretch" (whole image to a square) or "crop" (shorter side + centre crop)
    native_size: tuple[int, int] | None = None  # (H, W) when all images share it
    root: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = set(self.parts)
        if keys not in ({"all"}, {"train", "test"}, {"train", "val", "test"}):
            raise ValueError(f"source parts must be 'all', 'train'+'test' or 'train'+'val'+'test', got {sorted(keys)}")
        k = len(self.class_names)
        for name, part in self.parts.items():
            if len(part) and (part.labels.min() < 0 or part.labels.max() >= k):
                raise ValueError(
                    f"{name} labels span [{part.labels.min()}, {part.labels.max()}] but there are {k} class names"
                )
