"""Datasets: the embedded ``digits`` set and real on-disk formats (IDX, CIFAR pickles, image folders,
face folders), seeded stratified splits, and a deterministic resumable loader.

    bundle = load("cifar10:/data/cifar", img_size=32)
    loader = make_loader(bundle.train, 128, shuffle=True, seed=0, epoch=3, start_batch=17)

File trees (``folder:`` / ``faces:``) too big for the in-memory cache are decoded per item, in DataLoader
worker processes when asked (``num_workers``; :mod:`unlearn_fast.data.pipeline` has the defaults);
results never depend on the worker count.
"""
from __future__ import annotations

from unlearn_fast.data.bundle import SPLITS, DataBundle
from unlearn_fast.data.datasets import ClassSubset, ImageDataset, ImageFileDataset, TensorImageDataset
from unlearn_fast.data.loader import ResumableBatchSampler, epoch_seed, make_loader
from unlearn_fast.data.pipeline import default_workers, eval_loader, lazily_decoded
from unlearn_fast.data.registry import describe_datasets, list_datasets, load, parse_spec
from unlearn_fast.data.splits import cap_per_class, stratified_split

__all__ = [
    "SPLITS",
    "ClassSubset",
    "DataBundle",
    "ImageDataset",
    "ImageFileDataset",
    "ResumableBatchSampler",
    "TensorImageDataset",
    "cap_per_class",
    "default_workers",
    "describe_datasets",
    "epoch_seed",
    "eval_loader",
    "lazily_decoded",
    "list_datasets",
    "load",
    "make_loader",
    "parse_spec",
    "stratified_split",
]
