"""Image trees: ImageFolder / ImageNet layout and per-person face folders (AT&T/ORL ``s1/1.pgm``).

Only file names are scanned at load time; images are decoded lazily (see :class:`ImageFileDataset`).
"""
from __future__ import annotations

import os
import re

import numpy as np

from unlearn_fast.data.imageio import IMG_EXTENSIONS, image_size, is_image_file, read_image
from unlearn_fast.data.source import RawSource, SourcePart



def natural_key(name: str) -> list:
    """``"s10"`` after ``"s9"``: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _subdirs(d: str, natural: bool = False) -> list[str]:
    names = [e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")]
    return sorted(names, key=natural_key) if natural else sorted(names)


def _images_under(d: str) -> list[str]:
    out = []
    for cur, dirs, files in os.walk(d, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out.extend(os.path.join(cur, f) for f in sorted(files) if is_image_file(f) and not f.startswith("."))
    return out


def scan_classes(
    d: str, class_names: list[str] | None = None, what: str = "class", natural: bool = False
) -> tuple[list[str], list[str], np.ndarray]:
    """Scan ``d/<class>/**/<image>`` -> ``(class_names, files, labels)``.

    Classes are the sub-folders in sorted order (torchvision ``ImageFolder`` order), or in natural order
    (``s2`` before ``s10``) with ``natural=True``.
    With ``class_names`` given (the train split's), ``d`` may hold a subset of them; a folder not among
    them is an error. Every class folder must hold at least one image.
    """
    if not os.path.isdir(d):
        raise FileNotFoundError(f"directory {d!r} does not exist; expected one sub-folder of images per {what}")
    found = _subdirs(d, natural)
    if not found:
        loose = [f for f in os.listdir(d) if is_image_file(f)]
        hint = (
            f" It holds {len(loose)} images directly: sort them into one sub-folder per {what}"
            " (e.g. with the ImageNet validation ground-truth file)." if loose else ""
        )
        raise ValueError(f"directory {d!r} has no {what} sub-folders; expected {d}/<{what}>/<image>.{hint}")
    names = found if class_names is None else class_names
    if class_names is not None:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise ValueError(
                f"directory {d!r} has {what} folders not present in the train split: {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}"
            )
    index = {c: i for i, c in enumerate(names)}
    files: list[str] = []
    labels: list[int] = []
    it = found
    if len(found) > 50:
        from tqdm.auto import tqdm

        it = tqdm(found, desc=f"scanning {d}", leave=False)
    for c in it:
        imgs = _images_under(os.path.join(d, c))
        if not imgs:
            raise ValueError(
                f"{what} folder {os.path.join(d, c)!r} is empty; expected at least one image "
                f"({', '.join(IMG_EXTENSIONS)})"
            )
        files.extend(imgs)
        labels.extend([index[c]] * len(imgs))
    return list(names), files, np.asarray(labels, dtype=np.int64)


def _peek_chans(path: str) -> int:
    return int(read_image(path).shape[0])


def read_image_folder(root: str) -> RawSource:
    """``root/train/<class>/...`` with ``root/val`` and/or ``root/test``, or ``root/<class>/...`` (no split).

    With both ``val`` and ``test`` present all three splits are kept as shipped; with only one of them it
    is the test split and validation is carved out of train (ImageNet's ``val`` is its test set).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder {root!r} does not exist; expected {root}/train/<class>/<image> (+ val/ or test/) "
            f"or {root}/<class>/<image>"
        )
    train_dir = os.path.join(root, "train")
    if os.path.isdir(train_dir) and _subdirs(train_dir):
        names, files, labels = scan_classes(train_dir)
        parts = {"train": SourcePart(labels=labels, files=files)}
        held = [s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))]
        if not held:
            raise FileNotFoundError(f"image folder {root!r} has train/ but neither val/ nor test/; expected one of them")
        for s in held:
            _, f, l = scan_classes(os.path.join(root, s), class_names=names)
            parts[s if len(held) == 2 else "test"] = SourcePart(labels=l, files=f)
    else:
        names, files, labels = scan_classes(root)
        parts = {"all": SourcePart(labels=labels, files=files)}
    first = next(iter(parts.values())).files[0]
    return RawSource(
        parts=parts,
        class_names=names,
        native_chans=_peek_chans(first),
        default_in_chans=3,
        default_img_size=224,
        hflip=True,
        resize_mode="crop",
        root=os.path.abspath(root),
    )


def read_faces(root: str) -> RawSource:
    """``root/<person>/<image>`` (PGM/PNG/JPEG): identities are classes (natural order: s1, s2, ..., s10),
    gray by default, no flips.

    Default size: the images' own when all are square and equal, else 64 (whole face resized, not cropped).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"faces folder {root!r} does not exist; expected {root}/<person>/<image>.pgm|png|jpg")
    names, files, labels = scan_classes(root, what="person", natural=True)
    sizes = {image_size(f) for f in files} if len(files) <= 20000 else {image_size(files[0]), (-1, -1)}
    native = next(iter(sizes)) if len(sizes) == 1 else None
    default = native[0] if native is not None and native[0] == native[1] else 64
    return RawSource(
        parts={"all": SourcePart(labels=labels, files=files)},
        class_names=names,
        native_chans=_peek_chans(files[0]),
        default_in_chans=1,
        default_img_size=int(default),
        hflip=False,
        resize_mode="stretch",
        native_size=native,
        root=os.path.abspath(root),
    )
