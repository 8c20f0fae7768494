"""Deterministic image preprocessing: channel adaptation, resizing, per-channel normalisation.

Images enter as float32 ``[C, H, W]`` (or batches ``[N, C, H, W]``) with values in [0, 1].
Nothing here is random: augmentation (random flips) belongs to the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma, the same weights PIL uses for mode "L".
LUMA = (0.299, 0.587, 0.114)
RESIZE_MODES = ("stretch", "crop")


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float tensors are returned as float32 unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def adapt_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Convert ``[..., C, H, W]`` to ``in_chans`` channels: gray -> RGB repeats, RGB -> gray is luma."""
    c = x.shape[-3]
    if c == in_chans:
        return x
    if c == 1 and in_chans == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    if c == 3 and in_chans == 1:
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * w).sum(dim=-3, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {in_chans} channels; supported: 1 <-> 3")


def resize(x: torch.Tensor, size: int, mode: str = "stretch") -> torch.Tensor:
    """Bilinear, antialiased resize of ``[C, H, W]`` or ``[N, C, H, W]`` to ``size x size``.

    ``mode="stretch"`` resizes the whole image to a square (aspect ratio not kept);
    ``mode="crop"`` resizes the shorter side to ``size`` and takes the centre ``size x size`` crop.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    h, w = x.shape[-2:]
    if mode == "stretch" or h == w:
        out_hw = (size, size)
    elif h < w:
        out_hw = (size, max(size, round(w * size / h)))
    else:
        out_hw = (max(size, round(h * size / w)), size)
    if (h, w) != out_hw:
        batched = x.dim() == 4
        xb = x if batched else x.unsqueeze(0)
        xb = F.interpolate(xb, size=out_hw, mode="bilinear", antialias=True, align_corners=False)
        x = xb if batched else xb.squeeze(0)
    oh, ow = out_hw
    if (oh, ow) != (size, size):
        top, left = (oh - size) // 2, (ow - size) // 2
        x = x[..., top : top + size, left : left + size]
    return x


@dataclass
class Preprocess:
    """Raw float image(s) in [0, 1] -> ``[in_chans, img_size, img_size]`` (not yet normalised)."""

    in_chans: int
    img_size: int
    mode: str = "stretch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float01(x)
        # Luma and resize are both linear per pixel, so they commute; do the cheap one first.
        if x.shape[-3] > self.in_chans:
            x = adapt_channels(x, self.in_chans)
            x = resize(x, self.img_size, self.mode)
        else:
            x = resize(x, self.img_size, self.mode)
            x = adapt_channels(x, self.in_chans)
        return x.contiguous()


@dataclass
class Normalize:
    """Per-channel ``(x - mean) / std`` for ``[C, H, W]`` or ``[N, C, H, W]``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} channels but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        self._m = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._s = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != self._m.shape[0]:
            raise ValueError(f"image has {x.shape[-3]} channels, normalisation has {self._m.shape[0]}")
        return (x - self._m) / self._s


class ChannelStats:
    """Streaming per-channel mean / std over pixels of ``[N, C, H, W]`` batches (fp64 sums)."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x = x.detach().float()
        # per-image sums in fp32 (one image is small), accumulated across images in fp64
        s = x.sum(dim=(2, 3)).double().sum(0)
        ss = (x * x).sum(dim=(2, 3)).double().sum(0)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += x.shape[0] * x.shape[2] * x.shape[3]

    def compute(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Return ``(mean, std)``; a constant channel gets std 1 so normalising never divides by 0."""
        if self.s is None or self.n == 0:
            raise ValueError("no images seen: cannot compute normalisation statistics of an empty split")
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def as_stats(values: Sequence[float] | None, chans: int, what: str) -> tuple[float, ...] | None:
    """Validate a user-given mean/std: one value (broadcast) or one per channel."""
    if values is None:
        return None
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * chans
    if len(vals) != chans:
        raise ValueError(f"{what} has {len(vals)} values but the images have {chans} channels")
    return vals
