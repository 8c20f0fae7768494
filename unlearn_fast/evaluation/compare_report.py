"""The comparison report of ``unlearn_fast.compare``: a table shaped like EC Table 1, the layer-wise CKA
figure (EC Fig. 2) and the t-SNE figure of forget vs nearest retain classes (EC Fig. 3).

``metrics`` is the dict written to ``metrics.json`` by :func:`unlearn_fast.compare.compare`:
``{"kind": "compare", "forget": [...], "rows": {name: row}, "order": [...], ...}`` where a row is the
dict of :func:`unlearn_fast.evaluation.unlearn_eval.evaluate_unlearned` plus ``status``
("ok" | "failed"), ``time_s`` and, for failures, ``error``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from unlearn_fast.evaluation.plots import save_figure  # noqa: E402

__all__ = ["compare_table_markdown", "plot_cka_layers", "plot_tsne", "tsne_embed", "write_compare_report",
           "TABLE_COLUMNS"]

# (column title, row key, format); lower is better for FA, TFA, CKA, JS; higher for the rest.
TABLE_COLUMNS = (("FA↓", "FA", "{:.2f}"), ("RA↑", "RA", "{:.2f}"), ("TFA↓", "TFA", "{:.2f}"),
                 ("TRA↑", "TRA", "{:.2f}"), ("CKA↓", "CKA", "{:.2f}"), ("JS↓", "JS", "{:.4f}"),
                 ("ZRF", "ZRF", "{:.4f}"), ("H-Mean↑", "H-Mean", "{:.2f}"), ("Time (s)", "time_s", "{:.1f}"))

_LABELS = {"original": "Original", "retrain": "Retrained"}


def _fmt(v: Any, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f.format(v)


def compare_table_markdown(metrics: dict[str, Any]) -> str:
    """EC Table 1 layout: one row per model (original, retrained, then each method in order)."""
    head = "| Method | " + " | ".join(c for c, _, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for name in metrics["order"]:
        row = metrics["rows"].get(name)
        if row is None:
            continue
        label = _LABELS.get(name, name)
        if row.get("status") != "ok":
            err = str(row.get("error", "?")).replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| {label} | failed: {err} |" + " |" * (len(TABLE_COLUMNS) - 1))
            continue
        cells = [_fmt(row.get(k), f) for _, k, f in TABLE_COLUMNS]
        if row.get("resumed") and cells[-1] != "-":
            cells[-1] += " (resumed: this process only)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cka_layers(metrics: dict[str, Any], path: Path) -> Path:
    """EC Fig. 2: CKA (x100) to the original model on D_f^te, per feature layer, one bar per model."""
    names = [n for n in metrics["order"] if n != "original" and metrics["rows"].get(n, {}).get("status") == "ok"]
    layers = metrics.get("cka_layers_order") or (list(metrics["rows"][names[0]]["cka_layers"]) if names else [])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(layers) + 0.35 * len(names) * len(layers) / 2), 3.8))
    w = 0.8 / max(1, len(names))
    x = np.arange(len(layers))
    cmap = plt.get_cmap("tab20")  # distinct colours for up to 20 models
    for i, n in enumerate(names):
        vals = [metrics["rows"][n]["cka_layers"].get(lay, float("nan")) for lay in layers]
        ax.bar(x + (i - (len(names) - 1) / 2) * w, vals, w, label=_LABELS.get(n, n), color=cmap(i % cmap.N))
    ax.set_xticks(x, layers, rotation=30 if len(layers) > 6 else 0, fontsize=8)
    ax.set_ylabel("CKA to original (x100), forget test set")
    ax.set_ylim(0, 105)
    ax.set_title("Layer-wise CKA to the original model (lower = more forgotten)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=1 if len(names) <= 12 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def tsne_embed(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (sklearn, PCA init, perplexity min(30, (n - 1) / 3)) of ``features [n, d]``."""
    from sklearn.manifold import TSNE

    f = features.double().numpy()
    n = f.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 samples, got {n}")
    perp = float(min(30.0, max(2.0, (n - 1) / 3)))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, learning_rate="auto").fit_transform(f)


def plot_tsne(panels: dict[str, tuple[np.ndarray, np.ndarray]], forget: Sequence[int], class_names: Sequence[str],
              path: Path) -> Path:
    """EC Fig. 3: one panel per model; forget classes as stars, nearest retain classes as circles.

    ``panels[name] = (emb [n, 2], labels [n])``."""
    forget = set(int(c) for c in forget)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    classes = sorted({int(c) for _, y in panels.values() for c in np.asarray(y).tolist()})
    retain = [c for c in classes if c not in forget]
    cmap_r = plt.get_cmap("tab10" if len(retain) <= 10 else "tab20")
    reds = plt.get_cmap("autumn")
    for ax, (name, (emb, y)) in zip(axes[0], panels.items()):
        y = np.asarray(y)
        for i, c in enumerate(retain):
            m = y == c
            ax.scatter(emb[m, 0], emb[m, 1], s=10, marker="o", color=cmap_r(i % cmap_r.N), alpha=0.6,
                       label=str(class_names[c]) if c < len(class_names) else str(c))
        for i, c in enumerate(sorted(forget)):
            m = y == c
            ax.scatter(emb[m, 0], emb[m, 1], s=40, marker="*", color=reds(i / max(1, len(forget))),
                       edgecolors="k", linewidths=0.3, label=f"forget {class_names[c] if c < len(class_names) else c}")
        ax.set_title(_LABELS.get(name, name), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, path)


def write_compare_report(run_dir: str | Path, metrics: dict[str, Any], figures: dict[str, str] | None = None) -> Path:
    """Write ``report.md``: the command/settings, the table, failures and the figures."""
    run_dir = Path(run_dir)
    run = metrics.get("run", {})
    fr = metrics.get("forget", [])
    names = metrics.get("class_names") or []
    lines = [f"# Unlearning comparison: {run.get('model', '?')} on {run.get('data', '?')}", "",
             f"Forget request `{metrics.get('forget_request')}` = classes {fr}"
             + (f" ({', '.join(str(names[c]) for c in fr if c < len(names))})" if names else "")
             + f"; device {run.get('device', '?')}, seed {run.get('seed', 0)}.", "",
             "FA/RA: forget/retain accuracy on the train split, TFA/TRA on the test split (%). CKA: linear CKA x100 "
             f"to the original model on the test forget set at `{metrics.get('cka_layer', '?')}` (the layer before "
             "the classifier). JS: mean JS divergence to the retrained model on the test forget set (nats). "
             "ZRF: 1 - mean JS to a randomly initialised model. H-Mean: harmonic mean of 100-FA, 100-TFA, "
             "100-CKA, RA, TRA (EC App. B.6 without its k-NN and IDI terms). Time: wall clock of the method.", "",
             compare_table_markdown(metrics), ""]
    pre = [r["ec_pretrain_s"] for r in metrics["rows"].values() if r.get("ec_pretrain_s") is not None]
    if pre:
        lines += [f"EC-family times (`ec`, `*+ec`) include the SupCon pre-training of the EC modules ({pre[0]:.1f} s): "
                  "it runs once per run directory and is charged to every method that uses the modules.", ""]
    failed = [n for n in metrics["order"] if metrics["rows"].get(n, {}).get("status") == "failed"]
    if failed:
        lines += ["## Failed methods", ""]
        lines += [f"- `{n}`: {metrics['rows'][n].get('error')}" for n in failed]
        lines.append("")
    for key, title in (("cka_layers", "Layer-wise CKA to the original model (EC Fig. 2)"),
                       ("tsne", "t-SNE of forget vs nearest retain classes (EC Fig. 3)")):
        if figures and figures.get(key):
            lines += [f"## {title}", "", f"![{key}]({figures[key]})", ""]
    if metrics.get("tsne_note"):
        lines += [metrics["tsne_note"], ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
