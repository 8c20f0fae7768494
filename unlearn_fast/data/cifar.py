"""CIFAR-10 / CIFAR-100 "python version" pickle batches.

CIFAR-10: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` (dicts with ``b'data'``: uint8 ``[n, 3072]``
row-major R, G, B planes of 32x32, and ``b'labels'``) and ``batches.meta`` (``b'label_names'``).
CIFAR-100: ``train``, ``test`` (``b'data'``, ``b'fine_labels'``) and ``meta`` (``b'fine_label_names'``).

The pickles are read with a restricted unpickler that only rebuilds numpy arrays, lists and dicts, so a
tampered batch file cannot run code.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from unlearn_fast.data.source import RawSource, SourcePart

_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}

LAYOUTS = {
    "cifar10": {
        "subdir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "num_classes": 10,
    },
    "cifar100": {
        "subdir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "num_classes": 100,
    },
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch (only numpy arrays)")


def _key(k) -> str:
    return k.decode("latin1") if isinstance(k, bytes) else str(k)


def load_pickle(path: str) -> dict[str, object]:
    """Load one CIFAR pickle -> dict with str keys; ValueError naming the file when it is not one."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ValueError(f"cannot unpickle CIFAR file {path!r} ({type(e).__name__}: {e}); expected a python-version CIFAR batch") from e
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR file {path!r} holds a {type(obj).__name__}; expected a dict")
    return {_key(k): v for k, v in obj.items()}


def _read_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle(path)
    for k in ("data", label_key):
        if k not in d:
            raise ValueError(f"CIFAR batch {path!r} has no key b'{k}' (keys: {sorted(d)}); expected b'data' and b'{label_key}'")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR batch {path!r}: b'data' is {data.dtype} {data.shape}; expected uint8 [n, 3072]")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise ValueError(
            f"CIFAR batch {path!r}: b'{label_key}' has shape {labels.shape} ({labels.dtype}); expected {data.shape[0]} integers"
        )
    return data, labels.astype(np.int64)


def _resolve_root(root: str, layout: dict) -> str:
    needed = layout["train"] + layout["test"] + [layout["meta"]]
    for d in (root, os.path.join(root, layout["subdir"])):
        if all(os.path.isfile(os.path.join(d, n)) for n in needed):
            return d
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"CIFAR directory {root!r} does not exist; expected a folder holding {', '.join(needed)} "
            f"(or its parent containing {layout['subdir']}/)"
        )
    d = os.path.join(root, layout["subdir"]) if os.path.isdir(os.path.join(root, layout["subdir"])) else root
    missing = [n for n in needed if not os.path.isfile(os.path.join(d, n))]
    raise FileNotFoundError(f"CIFAR directory {d!r} lacks {', '.join(missing)}; expected {', '.join(needed)}")


def read_cifar(root: str, kind: str = "cifar10") -> RawSource:
    """Read CIFAR-10 (``kind="cifar10"``) or CIFAR-100 fine labels (``"cifar100"``); keeps train/test."""
    if kind not in LAYOUTS:
        raise ValueError(f"unknown CIFAR kind {kind!r}; expected one of {sorted(LAYOUTS)}")
    layout = LAYOUTS[kind]
    d = _resolve_root(root, layout)
    k = layout["num_classes"]
    parts = {}
    for split in ("train", "test"):
        datas, labs = zip(*(_read_batch(os.path.join(d, n), layout["label_key"]) for n in layout[split]))
        data, labels = np.concatenate(datas), np.concatenate(labs)
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{kind} {split} labels in {d!r} span [{labels.min()}, {labels.max()}]; expected 0..{k - 1}")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        parts[split] = SourcePart(labels=labels, images=images)
    meta_path = os.path.join(d, layout["meta"])
    meta = load_pickle(meta_path)
    names = meta.get(layout["names_key"])
    if names is None or len(names) != k:
        raise ValueError(
            f"CIFAR meta file {meta_path!r} has no b'{layout['names_key']}' list of {k} names (keys: {sorted(meta)})"
        )
    class_names = [_key(n) for n in names]
    return RawSource(
        parts=parts,
        class_names=class_names,
        native_chans=3,
        default_in_chans=3,
        default_img_size=32,
        hflip=True,
        native_size=(32, 32),
        root=os.path.abspath(d),
    )
