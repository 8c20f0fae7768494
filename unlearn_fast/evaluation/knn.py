"""k-NN on frozen penultimate features (EC App. B.6 "k-NN Downstream Evaluation", EC App. A.1 / Fig. 4;
methods card 12 "k-NN downstream", Kim, Cha, Kim 2026).

* **Downstream** (:func:`knn_downstream`): a user data spec (``knn_data``) is loaded at the run's image
  size / channels and normalised with the run's mean / std (the statistics the backbone was trained
  with), all of its samples pooled, split 80 / 20 with ``torch.utils.data.random_split`` and generator
  seed 2 (card 12), and a k = 5, cosine, uniform-vote k-NN classifier on the *penultimate* features (the
  input of the final classifier: card 12 open question 5 - representations, not logits) is scored on the
  20 %. EC reports the accuracy and its absolute gap to the retrained model; its H-Mean score is
  s_kNN = 100 - |gap|. Vote ties go to the smallest class id (sklearn's ``KNeighborsClassifier``).
* **Retrieval on the forget classes** (:func:`knn_retrieval`): every test sample of a forget class
  queries the train split (all classes); ``knn_forget_retrieval`` is the % of its k nearest neighbours
  (cosine) that belong to a forget class (the original model finds its own class; a model that erased
  the class should not), ``knn_overlap_original`` the % of neighbour ids shared with the original
  model's top-k (EC Fig. 4: DELETE returns the original's images, EC the retrained model's).
  :func:`plot_knn_retrieval` draws EC Fig. 4: a query image and each model's top-k neighbour images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

__all__ = ["cosine_topk", "knn_classify", "knn_split_accuracy", "load_knn_data", "knn_downstream",
           "knn_retrieval", "plot_knn_retrieval", "KNN_K", "KNN_SPLIT_SEED"]

KNN_K = 5
KNN_SPLIT_SEED = 2


def cosine_topk(gallery: Tensor, queries: Tensor, k: int = KNN_K, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Top-``k`` cosine similarities and gallery indices for each query: ``([q, k], [q, k] int64)``,
    most similar first. Float32 matmuls in chunks of ``chunk`` queries (memory O(chunk * n))."""
    if gallery.dim() != 2 or queries.dim() != 2 or gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"cosine_topk: need gallery [n, d] and queries [q, d], got {tuple(gallery.shape)} and "
                         f"{tuple(queries.shape)}")
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"cosine_topk: k = {k} must be in 1..{gallery.shape[0]} (the gallery size)")
    g = F.normalize(gallery.float(), dim=1)
    sims, idx = [], []
    for s in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[s:s + chunk].float().to(g.device), dim=1)
        v, i = (q @ g.t()).topk(k, dim=1)
        sims.append(v)
        idx.append(i)
    if not sims:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(sims), torch.cat(idx)


def knn_classify(train_f: Tensor, train_y: Tensor, query_f: Tensor, k: int = KNN_K,
                 num_classes: int | None = None) -> Tensor:
    """Uniform-vote cosine k-NN labels ``[q]`` (ties: the smallest class id)."""
    _, idx = cosine_topk(train_f, query_f, k)
    train_y = torch.as_tensor(train_y).long().to(idx.device)
    n_cls = int(num_classes if num_classes is not None else int(train_y.max()) + 1)
    votes = F.one_hot(train_y[idx], n_cls).sum(1)
    return votes.argmax(1)  # first maximum = smallest class id


def split_indices(n: int, train_fraction: float = 0.8, seed: int = KNN_SPLIT_SEED) -> tuple[list[int], list[int]]:
    """``random_split(range(n), [train_fraction, 1 - train_fraction], generator seed)`` as index lists."""
    from torch.utils.data import random_split

    a, b = random_split(range(n), [train_fraction, 1 - train_fraction], generator=torch.Generator().manual_seed(seed))
    return list(a.indices), list(b.indices)


def knn_split_accuracy(features: Tensor, labels: Tensor, k: int = KNN_K, train_fraction: float = 0.8,
                       seed: int = KNN_SPLIT_SEED) -> float:
    """Accuracy (%) of the k-NN fitted on the 80 % part and scored on the 20 % part (seed 2 split)."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"k-NN downstream: need at least 2 samples, got {n}")
    tr, te = split_indices(n, train_fraction, seed)
    labels = torch.as_tensor(labels).long()
    pred = knn_classify(features[tr], labels[tr], features[te], min(k, len(tr)), int(labels.max()) + 1)
    return float(100.0 * (pred.cpu() == labels[te]).double().mean())


def load_knn_data(spec: str, data) -> Dataset:
    """All samples of the data spec ``spec`` (train + val + test pooled) at the run's size, channels and
    normalisation (``data``: the run's ``DataBundle``)."""
    from unlearn_fast.data import load

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"knn_data: give a dataset spec string (e.g. 'folder:/data/birds'), got {spec!r}")
    try:
        down = load(spec, img_size=data.img_size, in_chans=data.in_chans, seed=data.seed,
                    mean=tuple(data.mean) or None, std=tuple(data.std) or None)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"knn_data: cannot load the downstream dataset {spec!r}: {exc}") from exc
    ds = ConcatDataset([down.train, down.val, down.test])
    if len(ds) < 2:
        raise ValueError(f"knn_data: the downstream dataset {spec!r} has {len(ds)} samples; need at least 2")
    return ds


def knn_downstream(model: nn.Module, dataset: Dataset, *, k: int = KNN_K, seed: int = KNN_SPLIT_SEED,
                   device: torch.device | str | None = None, batch_size: int = 512) -> float:
    """k-NN accuracy (%) of ``model``'s frozen penultimate features on ``dataset`` (80/20, seed 2)."""
    from unlearn_fast.evaluation.features import penultimate_features

    device = torch.device(device) if device is not None else next(model.parameters()).device
    f, y = penultimate_features(model, dataset, device, batch_size)
    return knn_split_accuracy(f, y, k, seed=seed)


def knn_retrieval(train_f: Tensor, train_y: Tensor, query_f: Tensor, query_y: Tensor, forget: Sequence[int],
                  k: int = KNN_K, reference_idx: Tensor | None = None) -> dict[str, Any]:
    """Retrieval of forget-class queries among the train features (see the module docstring).

    Returns ``{"knn_forget_retrieval": %, "knn_same_class": %, "knn_overlap_original": % or None,
    "neighbors": [q, k] int64}``; ``reference_idx``: the original model's ``neighbors``."""
    _, idx = cosine_topk(train_f, query_f, k)
    idx = idx.cpu()
    ny = torch.as_tensor(train_y).long()[idx]
    ft = torch.tensor(sorted(int(c) for c in forget))
    nan = float("nan")
    out = {"knn_forget_retrieval": float(100 * torch.isin(ny, ft).double().mean()) if len(idx) else nan,
           "knn_same_class": float(100 * (ny == torch.as_tensor(query_y).long()[:, None]).double().mean()) if len(idx) else nan,
           "knn_overlap_original": None, "neighbors": idx}
    if reference_idx is not None and len(idx):
        ref = torch.as_tensor(reference_idx)
        shared = (idx[:, :, None] == ref[:, None, :]).any(2).double().mean()
        out["knn_overlap_original"] = float(100 * shared)
    return out


def _image(x: Tensor, mean: Sequence[float], std: Sequence[float]):
    import numpy as np

    x = x.detach().float().cpu()
    if mean and std:
        x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    x = (x - x.min()) / (x.max() - x.min() + 1e-12)
    img = x.permute(1, 2, 0).numpy()
    return img[:, :, 0] if img.shape[2] == 1 else np.clip(img, 0, 1)


def plot_knn_retrieval(query: tuple[Tensor, int], neighbors: dict[str, list[tuple[Tensor, int]]],
                       forget: Sequence[int], class_names: Sequence[str], path: Path,
                       mean: Sequence[float] = (), std: Sequence[float] = ()) -> Path:
    """EC Fig. 4: one row per model - the forget-class query image, then its top-k neighbour images
    (train split) labelled with their class; neighbours of a forget class are framed in red.

    ``query = (image [C, H, W], class)``; ``neighbors[model] = [(image, class), ...]`` (most similar first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unlearn_fast.evaluation.plots import save_figure

    forget = {int(c) for c in forget}
    k = max(len(v) for v in neighbors.values())
    rows = len(neighbors)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.35 * (k + 1) + 0.8, 1.45 * rows + 0.3), squeeze=False)
    name = lambda c: str(class_names[c]) if c < len(class_names) else str(c)  # noqa: E731
    for r, (model_name, items) in enumerate(neighbors.items()):
        ax = axes[r][0]
        ax.imshow(_image(query[0], mean, std), cmap="gray")
        ax.set_title(f"query: {name(query[1])}", fontsize=7)
        ax.set_ylabel(model_name, fontsize=8, rotation=0, ha="right", va="center")
        for j in range(k):
            ax = axes[r][j + 1]
            if j < len(items):
                img, c = items[j]
                ax.imshow(_image(img, mean, std), cmap="gray")
                ax.set_title(f"top-{j + 1}: {name(c)}", fontsize=7, color="red" if c in forget else "black")
                if c in forget:
                    for s in ax.spines.values():
                        s.set_edgecolor("red")
                        s.set_linewidth(2.5)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("k-NN retrieval for a forget-class query (red: neighbour from a forget class)", fontsize=9)
    return save_figure(fig, Path(path))
