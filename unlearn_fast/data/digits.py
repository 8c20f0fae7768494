"""The embedded default: scikit-learn's bundled 8x8 digits (1,797 gray images, 10 classes, no files needed)."""
from __future__ import annotations

import numpy as np
import torch

from unlearn_fast.data.source import RawSource, SourcePart


def read_digits() -> RawSource:
    """Pixel values 0..16 are scaled to [0, 1]; images ``[1797, 1, 8, 8]`` float32, one ``"all"`` part."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = np.asarray(d.target, dtype=np.int64)
    return RawSource(
        parts={"all": SourcePart(labels=labels, images=images)},
        class_names=[str(c) for c in range(10)],
        native_chans=1,
        default_in_chans=1,
        default_img_size=8,
        hflip=False,
        native_size=(8, 8),
    )
