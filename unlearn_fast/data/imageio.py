"""Decode one image file (JPEG/PNG/PGM/PPM/BMP/TIFF/WebP/GIF) to a float32 ``[C, H, W]`` tensor in [0, 1].

Gray images (``L``, ``LA``, 1-bit, 16-bit) give ``C = 1``; everything else is converted to RGB
(``C = 3``, alpha dropped, palettes expanded).
"""
from __future__ import annotations

import os

import numpy as np
import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read ``path`` -> float32 ``[C, H, W]`` in [0, 1]; raises ``ValueError`` naming the file if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float32) / 65535.0
                arr = np.clip(arr, 0.0, 1.0)[None]
            elif mode == "F":
                arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[None]
            else:
                if mode in ("L", "LA", "1"):
                    img = img.convert("L")
                elif mode != "RGB":
                    img = img.convert("RGB")
                arr = np.asarray(img, dtype=np.uint8)
                arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
                arr = arr.astype(np.float32) / 255.0
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {os.fspath(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"cannot decode image {os.fspath(path)!r} ({type(e).__name__}: {e}); expected a readable "
            f"JPEG/PNG/PGM/PPM/BMP/TIFF/WebP/GIF file"
        ) from e
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"image {os.fspath(path)!r} is empty (size {arr.shape[2]}x{arr.shape[1]})")
    return torch.from_numpy(np.ascontiguousarray(arr))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the header only (no decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {os.fspath(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image header of {os.fspath(path)!r}: {e}") from e
    return h, w
