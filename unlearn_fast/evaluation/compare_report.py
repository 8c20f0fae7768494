"""The comparison report of ``unlearn_fast.compare``: a table shaped like EC Table 1, the layer-wise CKA
figure (EC Fig. 2) and the t-SNE figure of forget vs nearest retain classes (EC Fig. 3).

``metrics`` is the dict written to ``metrics.json`` by :func:`unlearn_fast.compare.compare`:
``{"kind": "compare", "forget": [...], "rows": {name: row}, "order": [...], ...}`` where a row is the
dict of :func:`unlearn_fast.evaluation.unlearn_eval.evaluate_unlearned` plus ``status``
("ok" | "failed"), ``time_s`` and, for failures, ``error``.

Beside the main table (its last column lists the scores each row's H-Mean is over), the report has a
table of the representation-level metrics that were computed (|IDI|, linear probe, k-NN retrieval and
downstream accuracy with the gap to Retrained, MIA), a per-class table of the forget classes (FA, TFA,
JS, Act-Dist; a class whose TFA stays at or above half of the original's is flagged "not forgotten"),
and the k-NN retrieval figure of EC Fig. 4 (:func:`plot_compare_knn`).
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

from unlearn_fast.evaluation.health import FORGET_TOL, NOT_MOVED  # noqa: E402
from unlearn_fast.evaluation.plots import save_figure  # noqa: E402

__all__ = ["compare_table_markdown", "representation_table_markdown", "per_class_table_markdown",
           "not_forgotten", "plot_cka_layers", "plot_compare_knn", "plot_tsne", "tsne_embed", "write_compare_report",
           "TABLE_COLUMNS", "REPRESENTATION_COLUMNS"]

# (column title, row key, format); lower is better for FA, TFA, CKA, JS; higher for the rest.
TABLE_COLUMNS = (("FA↓", "FA", "{:.2f}"), ("RA↑", "RA", "{:.2f}"), ("TFA↓", "TFA", "{:.2f}"),
                 ("TRA↑", "TRA", "{:.2f}"), ("CKA↓", "CKA", "{:.2f}"), ("JS↓", "JS", "{:.4f}"),
                 ("ZRF", "ZRF", "{:.4f}"), ("H-Mean↑", "H-Mean", "{:.2f}"), ("Time (s)", "time_s", "{:.1f}"))

# Representation-level columns (shown when some row has them): lower is better for |IDI|, the probe's
# forget accuracy and retrieval of forget-class neighbours; MIA is the % of D_f predicted non-member.
REPRESENTATION_COLUMNS = (("|IDI|↓", "IDI_abs", "{:.3f}"), ("Probe TFA↓", "probe_TFA", "{:.2f}"),
                          ("Probe TRA↑", "probe_TRA", "{:.2f}"), ("kNN forget-ret.↓", "knn_forget_retrieval", "{:.2f}"),
                          ("kNN overlap w/ Original↓", "knn_overlap_original", "{:.1f}"), ("MIA", "MIA", "{:.2f}"),
                          ("Act-Dist", "ActDist", "{:.4f}"))

_LABELS = {"original": "Original", "retrain": "Retrained"}


def _fmt(v: Any, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f.format(v)


def _hmean_of(row: dict[str, Any]) -> str:
    names = row.get("hmean_of") or list(row.get("hmean_scores") or {})
    return f"{len(names)}: " + ", ".join(names) if names else "-"


def compare_table_markdown(metrics: dict[str, Any]) -> str:
    """EC Table 1 layout: one row per model (original, retrained, then each method in order); the last
    column lists the scores that row's H-Mean is over (EC's nine when all were computed)."""
    head = "| Method | " + " | ".join(c for c, _, _ in TABLE_COLUMNS) + " | H-Mean over |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for name in metrics["order"]:
        row = metrics["rows"].get(name)
        if row is None:
            continue
        label = _LABELS.get(name, name)
        if row.get("status") != "ok":
            err = str(row.get("error", "?")).replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| {label} | failed: {err} |" + " |" * len(TABLE_COLUMNS))
            continue
        cells = [_fmt(row.get(k), f) for _, k, f in TABLE_COLUMNS]
        if row.get("resumed") and cells[-1] != "-":
            cells[-1] += " (resumed: this process only)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_hmean_of(row)} |")
    return "\n".join(lines)


def _ok_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, metrics["rows"][n]) for n in metrics["order"] if metrics["rows"].get(n, {}).get("status") == "ok"]


def representation_table_markdown(metrics: dict[str, Any]) -> str:
    """The representation-level metrics that some row has; k-NN downstream cells read "acc (gap)" (EC
    Table 1: the gap to Retrained). Empty string when no row has any."""
    rows = _ok_rows(metrics)
    cols = [c for c in REPRESENTATION_COLUMNS if any(r.get(c[1]) is not None for _, r in rows)]
    knn = list(dict.fromkeys(k for _, r in rows for k in (r.get("knn") or {})))
    if not any(k != "ActDist" for _, k, _ in cols) and not knn:
        return ""
    head = "| Method | " + " | ".join([c for c, _, _ in cols] + [f"kNN {k}↑ (gap↓)" for k in knn]) + " |"
    lines = [head, "|" + "---|" * (len(cols) + len(knn) + 1)]
    for name, r in rows:
        cells = [_fmt(r.get(k), f) for _, k, f in cols]
        for k in knn:
            a, g = (r.get("knn") or {}).get(k), (r.get("knn_gap") or {}).get(k)
            cells.append(_fmt(a, "{:.2f}") + (f" ({abs(g):.2f})" if g is not None else ""))
        lines.append(f"| {_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def not_forgotten(metrics: dict[str, Any]) -> list[tuple[str, int, float, float, str]]:
    """``(method, class, its TFA, the original's TFA, kind)`` for every forget class a method left above
    health's ``FORGET_TOL`` %: kind "not forgotten" at or above ``NOT_MOVED`` x the original's TFA (a failed
    verdict), else "partly forgotten" (a warning) - the report marks exactly what the verdict says."""
    orig = (metrics["rows"].get("original") or {}).get("per_class") or {}
    out = []
    for name, r in _ok_rows(metrics):
        if name in ("original", "retrain"):
            continue
        for c, t in ((r.get("per_class") or {}).get("TFA") or {}).items():
            o = (orig.get("TFA") or {}).get(str(c))
            if o is None or t is None or math.isnan(o) or math.isnan(t) or t <= FORGET_TOL:
                continue
            kind = "not forgotten" if t >= NOT_MOVED * o else "partly forgotten"
            out.append((name, int(c), float(t), float(o), kind))
    return out


def per_class_table_markdown(metrics: dict[str, Any], class_names: Sequence[str] = ()) -> str:
    """One row per model, per forget class ``FA / TFA`` (%) and ``JS / Act-Dist`` to Retrained; a class
    that was not forgotten (:func:`not_forgotten`) is marked with "⚠"."""
    rows = _ok_rows(metrics)
    classes = [int(c) for c in metrics.get("forget", [])]
    if not rows or not classes or not any(r.get("per_class") for _, r in rows):
        return ""
    flags = {(n, c): kind for n, c, _, _, kind in not_forgotten(metrics)}
    nm = lambda c: f"{c} ({class_names[c]})" if c < len(class_names) and str(class_names[c]) != str(c) else str(c)  # noqa: E731
    head = "| Method | " + " | ".join(f"class {nm(c)}: FA / TFA | JS / Act-Dist" for c in classes) + " |"
    lines = [head, "|" + "---|" * (2 * len(classes) + 1)]
    for name, r in rows:
        pc = r.get("per_class") or {}
        cells = []
        for c in classes:
            v = {k: (pc.get(k) or {}).get(str(c)) for k in ("FA", "TFA", "JS", "ActDist")}
            mark = {"not forgotten": " ⚠", "partly forgotten": " ◐"}.get(flags.get((name, c)), "")
            cells.append(f"{_fmt(v['FA'], '{:.2f}')} / {_fmt(v['TFA'], '{:.2f}')}{mark}")
            cells.append(f"{_fmt(v['JS'], '{:.4f}')} / {_fmt(v['ActDist'], '{:.4f}')}")
        lines.append(f"| {_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_compare_knn(metrics: dict[str, Any], data, path: Path, max_models: int = 6, query: int = 0) -> Path | None:
    """EC Fig. 4 from the rows' ``knn_examples``: the ``query``-th forget test image and each model's top-k
    train neighbours (Original, Retrained, then the methods in order; at most ``max_models`` rows).
    ``data``: the run's ``DataBundle``. None when no row has retrieval examples."""
    from unlearn_fast.evaluation.knn import plot_knn_retrieval

    rows = [(n, r) for n, r in _ok_rows(metrics) if (r.get("knn_examples") or {}).get("queries")]
    if not rows:
        return None
    q = rows[0][1]["knn_examples"]["queries"]
    query = min(query, len(q) - 1)
    qi = int(q[query])
    nb = {}
    for name, r in rows[:max_models]:
        ex = r["knn_examples"]
        if int(ex["queries"][min(query, len(ex["queries"]) - 1)]) != qi:
            continue
        nb[_LABELS.get(name, name)] = [data.train[int(j)] for j in ex["neighbors"][query]]
    return plot_knn_retrieval(data.test[qi], nb, metrics.get("forget", []), data.class_names, path,
                              tuple(data.mean), tuple(data.std))


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


def _representation_note(metrics: dict[str, Any]) -> str:
    rows = [r for _, r in _ok_rows(metrics)]
    parts = []
    idi = next((r["idi"] for r in rows if r.get("idi")), None)
    if idi:
        c = idi.get("config", {})
        parts.append(f"|IDI|: signed IDI = sum_l [I_u - I_r] / sum_l [I_o - I_r] (card 1), InfoNCE critics on layers "
                     f"{', '.join(idi.get('layers', []))}; forget-membership label, H(Y) = {idi.get('H_Y', float('nan')):.3f} "
                     f"nats; critic settings batch {c.get('batch_size')}, {c.get('epochs')} epochs x <= {c.get('max_steps')} "
                     f"steps, d = {c.get('dim')}, lr {c.get('lr_suffix')} / {c.get('lr_head')}, {c.get('seeds')} seed(s), "
                     f"read out on the {c.get('eval_split')} split" + (" (EC App. B.6 setting)." if c.get("batch_size") == 512
                                                                       and c.get("epochs") == 5 else " (the cheap CPU setting, not EC App. B.6's)."))
    pr = next((r for r in rows if r.get("probe_TFA") is not None), None)
    if pr:
        parts.append(f"Probe: a fresh linear head on the frozen penultimate features, {pr.get('n_probe')} train samples "
                     f"({pr.get('fraction', 0) * 100:g}% per class, >= {pr.get('min_per_class')}), accuracy on the forget / "
                     "retain test classes (card 12).")
    if any(r.get("knn_forget_retrieval") is not None for r in rows):
        parts.append("kNN forget-ret.: % of the 5 cosine nearest train neighbours of forget test queries that are forget-"
                     "class samples; overlap: % of those neighbours shared with the original model's (EC Fig. 4).")
    if any(r.get("knn") for r in rows):
        parts.append("kNN downstream: k = 5 cosine on penultimate features, 80/20 split seed 2, accuracy (|gap| to Retrained).")
    mi = next((r for r in rows if r.get("MIA") is not None), None)
    if mi:
        parts.append(f"MIA: SVC-MIA efficacy, % of D_f predicted non-member (higher = more forgotten; Retrained ~100), "
                     f"feature `{mi.get('mia_feature')}`, attack `{mi.get('mia_attack')}`, {mi.get('n_shadow')} shadow "
                     "members + non-members (retain train vs retain test).")
    notes = list(dict.fromkeys(n for r in rows for n in (r.get("notes") or [])))
    if notes:
        parts.append("Notes: " + "; ".join(notes) + ".")
    return " ".join(parts)


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
             "ZRF: 1 - mean JS to a randomly initialised model. H-Mean (EC App. B.6 Eq. 4-5): harmonic mean of "
             "the normalised scores that were computed - 100-FA, RA, 100-TFA, TRA, 100-|gap| per k-NN downstream "
             "set, 100-CKA, 100*clip(1-|IDI|, 0.1, 1) - listed in the last column (EC's nine when IDI and three "
             "downstream sets are present). Time: wall clock of the method.", "",
             compare_table_markdown(metrics), ""]
    rep = representation_table_markdown(metrics)
    if rep:
        lines += ["## Inside the network", "", _representation_note(metrics), "", rep, ""]
    pc = per_class_table_markdown(metrics, names)
    if pc:
        lines += ["## Per forget class", "",
                  f"FA / TFA (%) of each forget class; JS / Act-Dist to the retrained model on its test samples. "
                  f"⚠: TFA at or above {NOT_MOVED:.0%} of the original's - the class was not forgotten; ◐: TFA above "
                  f"{FORGET_TOL:.0f}% - only partly forgotten (the health verdict's thresholds).",
                  "", pc, ""]
        nf = not_forgotten(metrics)
        if nf:
            lines += ["Not fully forgotten: " + "; ".join(f"`{n}` class {c}: {kind} (TFA {t:.2f}, original {o:.2f})"
                                                          for n, c, t, o, kind in nf), ""]
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
                       ("tsne", "t-SNE of forget vs nearest retain classes (EC Fig. 3)"),
                       ("knn", "k-NN retrieval of a forget-class query (EC Fig. 4)")):
        if figures and figures.get(key):
            lines += [f"## {title}", "", f"![{key}]({figures[key]})", ""]
    if metrics.get("tsne_note"):
        lines += [metrics["tsne_note"], ""]
    path = run_dir / "report.md"
    from unlearn_fast.run_files import atomic_write_text

    atomic_write_text(path, "\n".join(lines))  # atomic; rank 0 alone in a process group
    return path
