"""``small_cnn``: a small, fast CNN for CPU demos and tests on 8x8 .. 32x32 inputs (e.g. sklearn digits).

Layout (``width`` = w; default :func:`auto_width`: 16 up to 16 classes, then 16 per 16 classes up to
64 - measured on 48 generated glyph classes, w=16 trained an original to 90.0% and w=48 to 98.7%, and
WF kept 6 points more retained accuracy at w=48, docs/wf_fidelity.md; ~24k parameters at w=16)::

    block1: Conv2d(in_chans, w, 3, pad 1, bias) -> BatchNorm2d -> ReLU                 [B, w,  H,   W]
    block2: Conv2d(w, 2w, 3, pad 1, bias) -> BatchNorm2d -> ReLU -> MaxPool2d(2)       [B, 2w, H/2, W/2]
    block3: Conv2d(2w, 4w, 3, pad 1, bias) -> BatchNorm2d -> ReLU -> MaxPool2d(2)      [B, 4w, H/4, W/4]
    pool:   AdaptiveAvgPool2d(1)                                                        [B, 4w, 1, 1]
    fc:     Linear(4w, num_classes)                                                     [B, num_classes]

The convs keep their bias (the WF gate scales it with ``alpha_b``). Inputs must be at least 4x4.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from unlearn_fast.models.registry import register_model


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [
        ("conv", nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True)),
        ("bn", nn.BatchNorm2d(cout)),
        ("relu", nn.ReLU(inplace=True)),
    ]
    if pool:
        layers.append(("pool", nn.MaxPool2d(2)))
    return nn.Sequential(OrderedDict(layers))


class SmallCNN(nn.Module):
    """Three conv blocks + global average pool + linear head. ``[B, in_chans, H, W] -> [B, num_classes]``."""

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"small_cnn: width must be an integer >= 1, got {width!r}")
        self.in_chans = in_chans
        self.block1 = _block(in_chans, width, pool=False)
        self.block2 = _block(width, 2 * width, pool=True)
        self.block3 = _block(2 * width, 4 * width, pool=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or min(x.shape[-2:]) < 4:
            raise ValueError(
                f"small_cnn expects input [B, {self.in_chans}, H, W] with H, W >= 4, got {tuple(x.shape)}"
            )
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _small_cnn_layers(model: nn.Module) -> list[str]:
    return ["block1", "block2", "block3", "pool", "fc"]


def auto_width(num_classes: int) -> int:
    """Default width for ``num_classes``: 16 up to 16 classes, then 16 more per 16 classes, at most 64."""
    return min(64, 16 * max(1, -(-int(num_classes) // 16)))


@register_model("small_cnn", family="cnn", feature_layers=_small_cnn_layers)
def small_cnn(num_classes: int, in_chans: int = 3, img_size: int = 32, width: int | None = None) -> SmallCNN:
    """Small CPU-demo CNN (see module docstring); ``img_size`` must be >= 4 (any size works, 8..32 intended).
    ``width=None``: :func:`auto_width` of the class count (recorded in the model's config)."""
    if img_size < 4:
        raise ValueError(f"small_cnn needs img_size >= 4, got {img_size}")
    model = SmallCNN(num_classes=num_classes, in_chans=in_chans, width=auto_width(num_classes) if width is None else width)
    model.resolved_kwargs = {"width": model.block1.conv.out_channels}
    return model
