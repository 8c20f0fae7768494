"""``load(spec)``: parse a dataset spec, read the source, cap, split, preprocess, normalise.

Specs: ``digits`` | ``idx:DIR`` | ``cifar10:DIR`` | ``cifar100:DIR`` | ``folder:DIR`` | ``faces:DIR``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np
import torch

from unlearn_fast.data.bundle import SPLITS, DataBundle
from unlearn_fast.data.datasets import ImageDataset, ImageFileDataset, TensorImageDataset
from unlearn_fast.data.source import RawSource, SourcePart
from unlearn_fast.data.splits import cap_per_class, stratified_split
from unlearn_fast.data.transforms import RESIZE_MODES, Preprocess, as_stats

log = logging.getLogger("unlearn_fast")

STATS_MAX_FILES = 2000  # file-backed train splits: normalisation statistics from a seeded sample this big
DEFAULT_CACHE_MB = 1024  # preprocessed splits are held in memory when they fit (UNLEARN_FAST_DATA_CACHE_MB)


def _digits(_: str | None) -> RawSource:
    from unlearn_fast.data.digits import read_digits

    return read_digits()


def _idx(path: str) -> RawSource:
    from unlearn_fast.data.idx import read_idx_dir

    return read_idx_dir(path)


def _cifar(kind: str) -> Callable[[str], RawSource]:
    def read(path: str) -> RawSource:
        from unlearn_fast.data.cifar import read_cifar

        return read_cifar(path, kind)

    return read


def _folder(path: str) -> RawSource:
    from unlearn_fast.data.folder import read_image_folder

    return read_image_folder(path)


def _faces(path: str) -> RawSource:
    from unlearn_fast.data.folder import read_faces

    return read_faces(path)


def _glyphs(arg: str | None) -> RawSource:
    from unlearn_fast.data.glyphs import read_glyphs

    return read_glyphs(arg)


# name -> (reader, needs a directory, description)
READERS: dict[str, tuple[Callable[[str | None], RawSource], bool, str]] = {
    "digits": (_digits, False, "scikit-learn's bundled 8x8 digits: 1,797 gray images, 10 classes (no files)"),
    "idx": (_idx, True, "MNIST-style IDX files (train-images-idx3-ubyte, ... optionally .gz)"),
    "cifar10": (_cifar("cifar10"), True, "CIFAR-10 python pickles (cifar-10-batches-py)"),
    "cifar100": (_cifar("cifar100"), True, "CIFAR-100 python pickles, fine labels (cifar-100-python)"),
    "folder": (_folder, True, "ImageFolder / ImageNet tree: DIR/train/<class>/*, DIR/val|test/<class>/* or DIR/<class>/*"),
    "faces": (_faces, True, "one folder per person (e.g. AT&T/ORL s1/1.pgm); identities are classes, gray"),
    "glyphs": (_glyphs, False, "generated: characters rendered from the DejaVu fonts, glyphs[:N_CLASSES[:PER_CLASS]] (48 x 300 default, no files)"),
}
# kinds whose optional argument is not a directory (passed to the reader as given)
ARG_KINDS = {"glyphs"}
ALIASES = {"mnist": "idx", "imagefolder": "folder", "imagenet": "folder", "cifar-10": "cifar10", "cifar-100": "cifar100"}


def list_datasets() -> list[str]:
    """Dataset kinds ``load`` accepts; all but ``digits`` take a directory: ``"KIND:DIR"``."""
    return list(READERS)


def describe_datasets() -> dict[str, str]:
    """``{"idx:DIR": description, ...}`` for help texts."""
    return {(k if not needs else f"{k}:DIR"): desc for k, (_, needs, desc) in READERS.items()}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:~/data"`` -> ``("cifar10", "/home/.../data")``; ``"digits"`` -> ``("digits", None)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string like 'digits' or 'cifar10:DIR', got {spec!r}")
    kind, sep, path = spec.strip().partition(":")
    kind = ALIASES.get(kind.lower(), kind.lower())
    known = ", ".join(describe_datasets())
    if kind not in READERS:
        raise ValueError(f"unknown dataset spec {spec!r}; expected one of: {known}")
    if kind in ARG_KINDS:
        return kind, (path.strip() or None)
    needs = READERS[kind][1]
    if needs and not path:
        raise ValueError(f"dataset spec {spec!r} needs a directory: '{kind}:/path/to/data'")
    if not needs and sep:
        raise ValueError(f"dataset {kind!r} takes no directory (got {spec!r}); use '{kind}'")
    return kind, (os.path.abspath(os.path.expanduser(path)) if path else None)


def _plan_splits(
    src: RawSource, *, val_fraction: float, test_fraction: float, seed: int, max_per_class: int | None,
    fraction: float | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Indices (into the source parts) of each split, and which part each split comes from."""
    capped = {k: cap_per_class(p.labels, max_per_class, seed, fraction) for k, p in src.parts.items()}
    if "all" in src.parts:
        lab = src.parts["all"].labels[capped["all"]]
        sp = stratified_split(lab, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        return {s: capped["all"][sp[s]] for s in SPLITS}, {s: "all" for s in SPLITS}
    if "val" in src.parts:  # the source ships all three splits: keep them
        return {s: capped[s] for s in SPLITS}, {s: s for s in SPLITS}
    lab = src.parts["train"].labels[capped["train"]]
    sp = stratified_split(lab, val_fraction=val_fraction, test_fraction=0.0, seed=seed)
    idx = {"train": capped["train"][sp["train"]], "val": capped["train"][sp["val"]], "test": capped["test"]}
    return idx, {"train": "train", "val": "train", "test": "test"}


def _make_dataset(part: SourcePart, idx: np.ndarray, pre: Preprocess) -> ImageDataset:
    targets = torch.from_numpy(part.labels[idx])
    if part.images is not None:
        return TensorImageDataset(part.images, targets, pre, indices=idx)
    return ImageFileDataset([part.files[i] for i in idx], targets, pre)


def _cache_budget() -> int:
    return int(float(os.environ.get("UNLEARN_FAST_DATA_CACHE_MB", DEFAULT_CACHE_MB)) * 2**20)


def load(
    spec: str,
    *,
    img_size: int | None = None,
    in_chans: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_per_class: int | None = None,
    fraction: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: str | None = None,
    cache: bool | None = None,
    workers: int = 0,
) -> DataBundle:
    """Load ``spec`` into a :class:`DataBundle` of seeded, stratified train/val/test splits.

    Args:
        spec: ``digits`` | ``idx:DIR`` | ``cifar10:DIR`` | ``cifar100:DIR`` | ``folder:DIR`` | ``faces:DIR``.
        img_size: side of the square output (bilinear, antialiased); default: the source's own size
            (digits 8, MNIST 28, CIFAR 32, folder 224, faces native if square else 64).
        in_chans: 1 or 3 (gray -> RGB repeats, RGB -> gray is BT.601 luma); default: gray for digits,
            IDX and faces, RGB for CIFAR and folders.
        val_fraction, test_fraction: per-class fractions. A source with its own test split keeps it and
            ``val_fraction`` of its train part becomes val (``test_fraction`` unused); a folder shipping
            train/val/test keeps all three; otherwise both fractions split the whole set.
        seed: drives capping and splitting (per-class numpy generators).
        max_per_class: keep at most this many seeded-random samples per class in each source part.
        fraction: keep this seeded-random fraction of each class in each source part (with max_per_class:
            whichever keeps fewer).
        mean, std: per-channel normalisation; default: computed on the train split (all of it for
            in-memory sources, a seeded sample of ``STATS_MAX_FILES`` images for file trees).
        resize: ``"stretch"`` or ``"crop"`` (shorter side to ``img_size`` + centre crop); default
            ``"crop"`` for folders, ``"stretch"`` elsewhere.
        cache: hold the preprocessed splits in memory; default: when resizing or decoding files is
            needed and they fit in ``UNLEARN_FAST_DATA_CACHE_MB`` (1024); otherwise file-backed splits
            are decoded lazily, per item (``ImageFileDataset``), in the training loop's DataLoader workers.
        workers: processes that decode image files while building the cache and the normalisation
            statistics (0: in this process). The values are the same for every count.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (processes decoding image files), got {workers!r}")
    kind, path = parse_spec(spec)
    src = READERS[kind][0](path)

    in_chans = src.default_in_chans if in_chans is None else int(in_chans)
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    img_size = src.default_img_size if img_size is None else int(img_size)
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    mode = src.resize_mode if resize is None else resize
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    mean_t, std_t = as_stats(mean, in_chans, "mean"), as_stats(std, in_chans, "std")
    if (mean_t is None) != (std_t is None):
        raise ValueError("give both mean and std, or neither (then they are computed on the train split)")

    idx, sources = _plan_splits(
        src, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, max_per_class=max_per_class,
        fraction=fraction,
    )
    if idx["train"].size == 0:
        raise ValueError(f"{spec!r}: the train split is empty; check max_per_class / fractions")
    pre = Preprocess(in_chans=in_chans, img_size=img_size, mode=mode)
    ds = {s: _make_dataset(src.parts[sources[s]], idx[s], pre) for s in SPLITS}

    files = any(p.files is not None for p in src.parts.values())
    resizing = src.native_size != (img_size, img_size)
    nbytes = sum(d.cache_nbytes() for d in ds.values())
    do_cache = cache if cache is not None else ((files or resizing) and nbytes <= _cache_budget())
    if do_cache:
        for s in SPLITS:
            ds[s].cache(progress=files and len(ds[s]) > 2000, workers=workers if files else 0)

    if mean_t is None:
        train = ds["train"]
        sample = None
        if files and not train.is_cached and len(train) > STATS_MAX_FILES:
            rng = np.random.default_rng([seed, 0x57A7])
            sample = np.sort(rng.choice(len(train), size=STATS_MAX_FILES, replace=False))
        mean_t, std_t = train.channel_stats(sample, workers=workers if files else 0)
    for d in ds.values():
        d.set_normalization(mean_t, std_t)

    name = kind if path is None else f"{kind}:{path}"
    return DataBundle(
        name=name,
        train=ds["train"],
        val=ds["val"],
        test=ds["test"],
        num_classes=len(src.class_names),
        in_chans=in_chans,
        img_size=img_size,
        class_names=list(src.class_names),
        hflip=src.hflip,
        targets={s: ds[s].targets for s in SPLITS},
        split_indices=idx,
        split_sources=sources,
        mean=mean_t,
        std=std_t,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_per_class=max_per_class,
        fraction=fraction,
        resize_mode=mode,
        root=src.root,
        native_size=src.native_size,
        native_chans=src.native_chans,
        source_sizes={k: len(p) for k, p in src.parts.items()},
    )
