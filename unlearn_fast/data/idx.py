"""MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST, ...), gzipped or not.

Layout of an IDX file: bytes 0-1 are zero, byte 2 the element type (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64, all big-endian), byte 3 the number of dimensions ``d``, then
``d`` big-endian uint32 sizes, then the data. Images are ``idx3`` (``[n, H, W]`` uint8), labels ``idx1``.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch

from unlearn_fast.data.source import RawSource, SourcePart

IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read IDX file {path!r}: corrupt or truncated gzip stream ({e})") from e


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """Parse one IDX file's bytes -> numpy array of the declared shape and (native-endian) dtype."""
    if len(data) < 4:
        raise ValueError(f"IDX file {path!r} is {len(data)} bytes long; expected at least the 4-byte magic number")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(
            f"IDX file {path!r} has bad magic number {data[:4].hex()}; expected 00 00 <type> <ndim> with type in "
            f"{{{', '.join(f'{t:02x}' for t in IDX_DTYPES)}}} (e.g. 00000803 for images, 00000801 for labels)"
        )
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    if ndim == 0:
        raise ValueError(f"IDX file {path!r} declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path!r} is truncated inside its header ({len(data)} < {header} bytes)")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"IDX file {path!r} is {what}: header declares shape {shape} of {dtype.name} "
            f"({expected} bytes with header) but the file has {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_idx_file(path: str) -> np.ndarray:
    return parse_idx(_read_bytes(path), path)


def _find(root: str, stem: str) -> str | None:
    alt = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for d in (root, os.path.join(root, "raw")):
        for name in (stem, stem + ".gz", alt, alt + ".gz"):
            p = os.path.join(d, name)
            if os.path.isfile(p):
                return p
    return None


def read_idx_dir(root: str) -> RawSource:
    """Read the four MNIST IDX files from ``root`` (or ``root/raw``); keeps the source's train/test split.

    Optional ``classes.txt`` (one name per line) names the classes; otherwise they are "0", "1", ...
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"IDX directory {root!r} does not exist; expected a folder holding {', '.join(IDX_FILES.values())} "
            "(each optionally .gz)"
        )
    paths = {k: _find(root, stem) for k, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"IDX directory {root!r} lacks {', '.join(missing)} (or .gz); expected all of "
            f"{', '.join(IDX_FILES.values())}"
        )
    parts = {}
    size = None
    n_classes = 0
    for split in ("train", "test"):
        ip, lp = paths[f"{split}_images"], paths[f"{split}_labels"]
        images, labels = read_idx_file(ip), read_idx_file(lp)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"IDX image file {ip!r} holds {images.dtype.name} of shape {images.shape}; expected uint8 [n, H, W]"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"IDX label file {lp!r} holds {labels.dtype.name} of shape {labels.shape}; expected 1-D integers")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{ip!r} has {images.shape[0]} images but {lp!r} has {labels.shape[0]} labels")
        if size is not None and images.shape[1:] != size:
            raise ValueError(f"{ip!r} images are {images.shape[1:]} but the train images are {size}")
        size = images.shape[1:]
        if labels.size and labels.min() < 0:
            raise ValueError(f"IDX label file {lp!r} has negative label {labels.min()}")
        n_classes = max(n_classes, int(labels.max()) + 1 if labels.size else 0)
        parts[split] = SourcePart(
            labels=labels.astype(np.int64), images=torch.from_numpy(images.copy()).unsqueeze(1)
        )
    names_file = os.path.join(root, "classes.txt")
    if os.path.isfile(names_file):
        with open(names_file, encoding="utf-8") as f:
            class_names = [line.strip() for line in f if line.strip()]
        if len(class_names) < n_classes:
            raise ValueError(f"{names_file!r} names {len(class_names)} classes but the labels go up to {n_classes - 1}")
    else:
        class_names = [str(c) for c in range(n_classes)]
    return RawSource(
        parts=parts,
        class_names=class_names,
        native_chans=1,
        default_in_chans=1,
        default_img_size=int(max(size)),
        hflip=False,
        native_size=(int(size[0]), int(size[1])),
        root=os.path.abspath(root),
    )
