"""Figures of a WF-Net run: per-class accuracies, alpha heat map, insertion/deletion curves and the
filter-class association chart of WF-Net Fig. 3."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from unlearn_fast.distributed import main_rank_only  # noqa: E402

__all__ = ["save_figure", "plot_accuracy_bars", "plot_alpha_heatmap", "plot_insertion_deletion", "plot_filter_class",
           "filter_class_links"]


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG (folders created; rank 0 alone in a process group) and close it."""
    _write_png(fig, path)
    plt.close(fig)
    return path


@main_rank_only
def _write_png(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_accuracy_bars(metrics: dict[str, Any], path: Path) -> Path:
    """Per-class Acc_r / Acc_f (test) of WF-Net beside the original and retrained models."""
    t = metrics["splits"]["test"]
    names = metrics["class_names"]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(names) + 4), 3.6), sharey=True)
    models = [m for m in ("original", "retrained", "wf") if m in t]
    w = 0.8 / len(models)
    for ax, key, title in zip(axes, ("acc_r", "acc_f"), ("Acc_r (retain, %) - higher is better", "Acc_f (forget, %) - lower is better")):
        for i, m in enumerate(models):
            ax.bar(x + (i - (len(models) - 1) / 2) * w, t[m][key], w, label={"wf": "WF-Net"}.get(m, m))
        ax.set_xticks(x, names, rotation=45 if len(names) > 10 else 0, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Per-class accuracy with gate row c (test split)")
    return save_figure(fig, path)


def _layer_alphas(alpha_state: dict[str, torch.Tensor]) -> list[tuple[str, np.ndarray]]:
    return [(k[: -len(".alpha_w")].replace("model.", "", 1).replace(".inner", ""), torch.sigmoid(v.float()).numpy())
            for k, v in alpha_state.items() if k.endswith("alpha_w")]


def plot_alpha_heatmap(alpha_state: dict[str, torch.Tensor], class_names: Sequence[str], path: Path) -> Path:
    """Left: fraction of closed gates (sigmoid(alpha) < 0.5) per class and layer. Right: the gates of
    the last gated layer, classes x channels."""
    layers = _layer_alphas(alpha_state)
    frac = np.stack([(g < 0.5).mean(1) for _, g in layers], 1)  # [N, L]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * len(class_names) + 2.5),
                             gridspec_kw={"width_ratios": [max(1, len(layers)) / 4 + 2, 4]})
    im = axes[0].imshow(frac, aspect="auto", cmap="magma")
    axes[0].set_yticks(range(len(class_names)), class_names, fontsize=7)
    axes[0].set_xticks(range(len(layers)), [n for n, _ in layers], rotation=90, fontsize=6)
    axes[0].set_title("closed gates per layer (fraction)", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.04)
    name, g = layers[-1]
    im2 = axes[1].imshow(g, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_yticks(range(len(class_names)), class_names, fontsize=7)
    axes[1].set_xlabel("output channel")
    axes[1].set_title(f"sigmoid(alpha) of {name}", fontsize=9)
    fig.colorbar(im2, ax=axes[1], fraction=0.04)
    return save_figure(fig, path)


def plot_insertion_deletion(ins_del: dict[str, Any], class_names: Sequence[str], path: Path) -> Path:
    f = np.asarray(ins_del["fractions"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, kind in zip(axes, ("insertion", "deletion")):
        cur = np.asarray(ins_del["curves"][kind])
        oth = np.asarray(ins_del["curves"][kind + "_other"])
        for row in cur:
            ax.plot(f, row, color="tab:blue", alpha=0.15, lw=0.8)
        ax.plot(f, np.nanmean(cur, 0), color="tab:blue", lw=2, label="unlearned class")
        ax.plot(f, np.nanmean(oth, 0), color="tab:orange", lw=2, label="other classes")
        score = ins_del[f"{kind}_mean"]
        ax.set_title(f"{kind} (AUC {score:.3f}, {'higher' if kind == 'insertion' else 'lower'} is better)", fontsize=10)
        ax.set_xlabel("fraction of alphas " + ("re-opened" if kind == "insertion" else "closed"))
        ax.set_ylabel("confidence / original confidence")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def filter_class_links(gates: np.ndarray, top_k: int = 10, min_classes: int = 2) -> tuple[list[int], list[tuple[int, int, float]]]:
    """WF-Net Fig. 3 selection: per class the ``top_k`` filters with the largest ``1 - sigmoid(alpha)``;
    keep the filters chosen by at least ``min_classes`` classes. Returns (filters, links (class, filter, weight))."""
    inv = 1.0 - gates  # [N, O]
    k = min(top_k, inv.shape[1])
    top = np.argsort(-inv, axis=1)[:, :k]
    counts = np.bincount(top.reshape(-1), minlength=inv.shape[1])
    keep = sorted(int(f) for f in np.nonzero(counts >= min_classes)[0])
    keep_set = set(keep)
    links = [(c, int(f), float(inv[c, f])) for c in range(inv.shape[0]) for f in top[c] if int(f) in keep_set]
    return keep, links


def plot_filter_class(alpha_state: dict[str, torch.Tensor], class_names: Sequence[str], path: Path,
                      top_k: int = 10, min_classes: int = 2, n_layers: int = 3) -> Path:
    """Parallel-categories chart (WF-Net Fig. 3) for the first, middle and last gated layers."""
    layers = _layer_alphas(alpha_state)
    pick = sorted({0, len(layers) // 2, len(layers) - 1})[:n_layers]
    fig, axes = plt.subplots(1, len(pick), figsize=(5 * len(pick), 0.35 * len(class_names) + 2.5))
    axes = np.atleast_1d(axes)
    for ax, li in zip(axes, pick):
        name, g = layers[li]
        filters, links = filter_class_links(g, top_k, min_classes)
        n = len(class_names)
        cy = {c: 1 - (c + 0.5) / n for c in range(n)}
        fy = {f: 1 - (i + 0.5) / max(1, len(filters)) for i, f in enumerate(filters)}
        cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
        for c, f, wgt in links:
            ax.plot([0, 1], [cy[c], fy[f]], color=cmap(c % cmap.N), lw=0.5 + 4 * wgt, alpha=0.6)
        for c in range(n):
            ax.text(-0.02, cy[c], class_names[c], ha="right", va="center", fontsize=7)
        for f in filters:
            ax.text(1.02, fy[f], f"#{f}", ha="left", va="center", fontsize=7)
        ax.set_xlim(-0.3, 1.3)
        ax.set_ylim(0, 1)
        ax.axis("off")
        ax.set_title(f"{name}: {len(filters)} filters shared by >= {min_classes} classes", fontsize=9)
    fig.suptitle(f"Filter-class associations (top-{top_k} of 1 - sigmoid(alpha) per class)")
    return save_figure(fig, path)
