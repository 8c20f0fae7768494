"""``glyphs``: a generated many-class set, rendered locally from fonts (nothing downloaded).

Classes are characters, in this order (the first ``n_classes`` are used)::

    0-9, A-Z (36), then lower case that differs from its capital: a b d e f g h i j m n q r t y (51),
    then the rest of the lower case: c k l o p s u v w x z (62)

Each image is one character rendered with a random DejaVu face (Debian ``fonts-dejavu-core``:
Sans, Sans Bold, Sans Mono, Sans Mono Bold, Serif, Serif Bold, read from
``/usr/share/fonts/truetype/dejavu``) on a 4x supersampled canvas, moved by a small seeded affine
jitter (rotation +-12 deg, scale 0.8-1.05, shear +-0.15, shift +-8% of the side), box-filtered down to
``GLYPH_SIZE`` (28) px, plus Gaussian pixel noise (sigma 0.04), stored as uint8 ``[n, 1, 28, 28]``.
Without the DejaVu files it falls back to PIL's built-in font (``ImageFont.load_default(size)``, one
face, varied by stroke width) and logs that once; the images then differ from the DejaVu ones.

Determinism: image ``i`` of class ``k`` depends only on ``(k, i)`` and the fonts (its jitter comes from
``numpy.random.default_rng([GLYPH_SEED, k])``), so ``glyphs:48:100`` holds the first 100 images of each
class of ``glyphs:48:300``. Rendered sets are cached per process.

Spec: ``glyphs`` (48 classes x 300 images), ``glyphs:N`` (N in 2..62) or ``glyphs:N:PER_CLASS``.
The default image size is 16 px (load's ``img_size`` resizes from the 28 px render).
"""
from __future__ import annotations

import functools
import logging
import math
import os

import numpy as np
import torch

from unlearn_fast.data.source import RawSource, SourcePart

__all__ = ["GLYPH_CHARS", "DEJAVU_DIR", "DEJAVU_FACES", "parse_glyph_arg", "render_glyphs", "read_glyphs"]

log = logging.getLogger("unlearn_fast")

GLYPH_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abdefghijmnqrty" + "cklopsuvwxz"
DEFAULT_CLASSES = 48
DEFAULT_PER_CLASS = 300
GLYPH_SIZE = 28            # rendered side (px)
SUPERSAMPLE = 4
GLYPH_SEED = 0x61F5
DEJAVU_DIR = "/usr/share/fonts/truetype/dejavu"
# the six faces of Debian's fonts-dejavu-core
DEJAVU_FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
                "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf")


def parse_glyph_arg(arg: str | None) -> tuple[int, int]:
    """``None`` | ``"N"`` | ``"N:PER_CLASS"`` -> ``(n_classes, per_class)``; clear ValueError otherwise."""
    if arg is None or arg == "":
        return DEFAULT_CLASSES, DEFAULT_PER_CLASS
    parts = arg.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or len(nums) != len(parts):
        raise ValueError(f"glyphs spec argument {arg!r} is not 'N' or 'N:PER_CLASS' (integers), e.g. 'glyphs:48:300'")
    n, per = nums[0], (nums[1] if len(nums) == 2 else DEFAULT_PER_CLASS)
    if not 2 <= n <= len(GLYPH_CHARS):
        raise ValueError(f"glyphs: the number of classes must be in 2..{len(GLYPH_CHARS)}, got {n}")
    if per < 1:
        raise ValueError(f"glyphs: images per class must be >= 1, got {per}")
    return n, per


def _faces(px: int) -> tuple[list, bool]:
    """(fonts at ``px`` px with their stroke widths, whether DejaVu was found)."""
    from PIL import ImageFont

    paths = [os.path.join(DEJAVU_DIR, f) for f in DEJAVU_FACES if os.path.exists(os.path.join(DEJAVU_DIR, f))]
    if paths:
        return [(ImageFont.truetype(p, px), 0) for p in paths], True
    font = ImageFont.load_default(px)
    return [(font, 0), (font, max(1, px // 24)), (font, max(2, px // 12))], False


@functools.lru_cache(maxsize=4)
def render_glyphs(n_classes: int, per_class: int) -> tuple[torch.Tensor, np.ndarray, bool]:
    """Render the set: (uint8 images ``[n_classes * per_class, 1, 28, 28]``, int64 labels, used DejaVu)."""
    from PIL import Image, ImageDraw

    big = GLYPH_SIZE * SUPERSAMPLE
    faces, dejavu = _faces(int(big * 0.62))
    if not dejavu:
        log.warning("glyphs: DejaVu fonts not found in %s (Debian: apt-get install fonts-dejavu-core); "
                    "rendering with PIL's built-in font instead", DEJAVU_DIR)
    out = np.empty((n_classes * per_class, 1, GLYPH_SIZE, GLYPH_SIZE), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    c = big / 2.0
    pos = 0
    for k in range(n_classes):
        rng = np.random.default_rng([GLYPH_SEED, k])
        # one row of parameters per image, drawn in a fixed order: image i depends only on (k, i)
        params = rng.random((per_class, 6))
        noise_rng = np.random.default_rng([GLYPH_SEED, k, 1])
        noise = noise_rng.standard_normal((per_class, GLYPH_SIZE, GLYPH_SIZE)) * 0.04
        drawn = []  # the character in each face, drawn once
        for font, stroke in faces:
            img = Image.new("L", (big, big), 0)
            ImageDraw.Draw(img).text((c, c), GLYPH_CHARS[k], fill=255, font=font, anchor="mm",
                                     stroke_width=stroke, stroke_fill=255)
            drawn.append(img)
        for i in range(per_class):
            u = params[i]
            img = drawn[int(u[0] * len(faces)) % len(faces)]
            theta = math.radians((u[1] * 2 - 1) * 12.0)
            scale = 0.8 + 0.25 * u[2]
            shear = (u[3] * 2 - 1) * 0.15
            tx, ty = ((u[4] * 2 - 1) * 0.08 * big, (u[5] * 2 - 1) * 0.08 * big)
            # forward map p' = c + A (p - c) + t with A = scale * R(theta) * [[1, shear], [0, 1]];
            # PIL wants the inverse: p = c + A^-1 (p' - c - t)
            cos, sin = math.cos(theta), math.sin(theta)
            a = scale * np.array([[cos, cos * shear - sin], [sin, sin * shear + cos]])
            inv = np.linalg.inv(a)
            off = np.array([c, c]) - inv @ np.array([c + tx, c + ty])
            img = img.transform((big, big), Image.AFFINE, (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                                resample=Image.BILINEAR)
            out[pos + i, 0] = np.asarray(img.reduce(SUPERSAMPLE))  # box filter down to GLYPH_SIZE
        block = out[pos:pos + per_class, 0].astype(np.float64) / 255.0 + noise
        out[pos:pos + per_class, 0] = np.clip(np.rint(block * 255.0), 0, 255).astype(np.uint8)
        pos += per_class
    return torch.from_numpy(out), labels, dejavu


def read_glyphs(arg: str | None) -> RawSource:
    """The ``glyphs[:N[:PER_CLASS]]`` source: one ``"all"`` part, gray, default 16 px."""
    n, per = parse_glyph_arg(arg)
    images, labels, dejavu = render_glyphs(n, per)
    return RawSource(
        parts={"all": SourcePart(labels=labels.copy(), images=images)},
        class_names=list(GLYPH_CHARS[:n]),
        native_chans=1,
        default_in_chans=1,
        default_img_size=16,
        hflip=False,
        native_size=(GLYPH_SIZE, GLYPH_SIZE),
        extra={"fonts": "dejavu" if dejavu else "pil-default", "per_class": per},
    )
