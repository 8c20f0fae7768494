"""Batch augmentations driven by an explicit ``torch.Generator`` (so a resumed run draws the same)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_view"]


def random_view(x: Tensor, gen: torch.Generator, shift: float, hflip: bool) -> Tensor:
    """One augmented view of ``x [B, C, H, W]``: per-sample integer translation by up to ``shift * H``
    (resp. W) pixels with zero fill, and a horizontal flip with probability 1/2 when ``hflip``."""
    b, _, h, w = x.shape
    mh, mw = int(round(shift * h)), int(round(shift * w))
    dy = torch.randint(-mh, mh + 1, (b,), generator=gen)
    dx = torch.randint(-mw, mw + 1, (b,), generator=gen)
    flip = (torch.rand(b, generator=gen) < 0.5) if hflip else torch.zeros(b, dtype=torch.bool)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0)
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * dx / w
    theta[:, 1, 2] = -2.0 * dy / h
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
