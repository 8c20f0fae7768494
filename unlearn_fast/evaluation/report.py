"""metrics.json -> report.md (a table shaped like WF-Net Table 1) + figures/*.png."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from unlearn_fast.evaluation.health import FORGET_TOL
from unlearn_fast.run_files import atomic_write_text

__all__ = ["write_report", "wf_table_markdown", "health_markdown"]


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def wf_table_markdown(metrics: dict[str, Any]) -> str:
    rows = metrics["summary"]["rows"]
    label = {"original": "Original model", "retrained": "Retrained model", "wf": "WF-Net"}
    lines = ["| model | Acc_r [%] ↑ | Acc_f [%] ↓ | Act-Dist ↓ | JS-Div ↓ | ZRF ↑ |", "|---|---|---|---|---|---|"]
    for k in ("original", "retrained", "wf"):
        if k in rows:
            r = rows[k]
            lines.append(f"| {label[k]} | {_fmt(r['acc_r'])} | {_fmt(r['acc_f'])} | {_fmt(r.get('act_dist'), 3)} | "
                         f"{_fmt(r.get('js_div'), 3)} | {_fmt(r['zrf'], 3)} |")
    return "\n".join(lines)


def health_markdown(health: dict[str, Any] | None) -> list[str]:
    """The verdict section of a report: status, reasons, notes and the stages' step counts."""
    if not health:
        return ["## Health: UNKNOWN", "", "This metrics.json has no verdict (made by an older version): evaluate again.", ""]
    mark = {"ok": "OK", "warn": "WARN ⚠", "fail": "FAIL ✗"}[health["status"]]
    lines = [f"## Health: {mark}", ""]
    lines += [f"- {r}" for r in health.get("reasons", [])] or ["- no problem found"]
    if health.get("notes"):
        lines += ["", "Adapted to the data:"] + [f"- {n}" for n in health["notes"]]
    stages = health.get("stages") or {}
    if stages:
        lines += ["", "| stage | optimizer steps | floor | epochs | early-stopped | time (s) | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for name, st in stages.items():
            lines.append(f"| {name} | {st.get('steps')} | {st.get('min_steps', 0)} | {_fmt(st.get('epochs'))} | "
                         f"{'yes' if st.get('stopped_early') else 'no'} | {_fmt(st.get('seconds'))} | "
                         f"{st.get('verdict', {}).get('status', '-')} |")
    return lines + [""]


def _per_class_table(metrics: dict[str, Any]) -> str:
    t = metrics["splits"]["test"]
    tr = metrics["splits"].get("train", {}).get("wf")
    names = metrics["class_names"]
    head = "| class | TFA (Acc_f test) | TRA (Acc_r test) |" + (" FA (Acc_f train) | RA (Acc_r train) |" if tr else "")
    head += " JS-Div | Act-Dist | ZRF | insertion | deletion | original Acc_f | retrained Acc_r |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    w = t["wf"]
    ins = metrics.get("insertion_deletion", {})
    for c, name in enumerate(names):
        cells = [name, _fmt(w["acc_f"][c]), _fmt(w["acc_r"][c])]
        if tr:
            cells += [_fmt(tr["acc_f"][c]), _fmt(tr["acc_r"][c])]
        cells += [_fmt(w.get("js_div", [None] * len(names))[c], 3), _fmt(w.get("act_dist", [None] * len(names))[c], 3),
                  _fmt(w["zrf"][c], 3), _fmt(ins.get("insertion", [None] * len(names))[c], 3),
                  _fmt(ins.get("deletion", [None] * len(names))[c], 3), _fmt(t["original"]["acc_f"][c]),
                  _fmt(t.get("retrained", {}).get("acc_r", [None] * len(names))[c])]
        flag = " ⚠ not forgotten" if w["acc_f"][c] > FORGET_TOL else ""
        lines.append("| " + " | ".join(cells) + " |" + flag)
    return "\n".join(lines)


def _representation_table(rep: dict[str, Any], names: list[str]) -> str:
    settings = {"fraction", "min_per_class"}  # probe settings and sample counts are not results
    keys = sorted({k for r in rep.values() for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in settings and not k.startswith("n_")})
    lines = ["| class | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for c, r in sorted(rep.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {names[int(c)]} | " + " | ".join(_fmt(r.get(k), 2) for k in keys) + " |")
    notes = sorted({n for r in rep.values() for n in r.get("notes", [])})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def write_report(run_dir: str | Path, metrics: dict[str, Any] | None = None, figures: bool = True) -> Path:
    """Write ``report.md`` (and the figures) of ``run_dir`` from its ``metrics.json``."""
    from unlearn_fast.evaluation import plots
    from unlearn_fast.models.io import load_tensors

    run_dir = Path(run_dir)
    if metrics is None:
        mpath = run_dir / "metrics.json"
        if not mpath.exists():
            raise FileNotFoundError(f"{mpath} is missing: run `unlearn-fast evaluate --run-dir {run_dir}` first")
        metrics = json.loads(mpath.read_text())
    figs: dict[str, Path] = {}
    if figures:
        fd = run_dir / "figures"
        names = metrics["class_names"]
        figs["accuracy"] = plots.plot_accuracy_bars(metrics, fd / "accuracy_per_class.png")
        if (run_dir / "wf.safetensors").exists():
            alphas, _ = load_tensors(run_dir / "wf.safetensors")
            figs["alpha"] = plots.plot_alpha_heatmap(alphas, names, fd / "alpha_heatmap.png")
            figs["filters"] = plots.plot_filter_class(alphas, names, fd / "filter_class.png")
        if "insertion_deletion" in metrics:
            figs["insdel"] = plots.plot_insertion_deletion(metrics["insertion_deletion"], names, fd / "insertion_deletion.png")
    s = metrics["summary"]
    info = metrics.get("run", {})
    lines = [f"# unlearn_fast report: {info.get('name', run_dir.name)}", ""]
    if info:
        lines += [f"- model `{info.get('model')}`, data `{info.get('data')}`, device `{info.get('device')}`, "
                  f"seed {info.get('seed')}", ""]
    lines += health_markdown(metrics.get("health"))
    ev = metrics.get("evaluation")
    if ev:
        lines += [f"Evaluated on: {', '.join(ev['splits'])}"
                  + (f" (train split: {ev['train_images']} images, stratified)" if "train" in ev["splits"] else ""), ""]
    lines += ["## WF-Net, all classes in one untraining round (test split, mean over classes)", "",
              "Shaped like WF-Net Table 1. Acc_r / Acc_f of the original model are its accuracy on the other "
              "classes / on class c; retrained = one model per class trained without it. Act-Dist and JS-Div "
              "are against the retrained model on the forget-class test images; ZRF against a randomly "
              "initialised copy (WF Eq. 4).", "", wf_table_markdown(metrics), ""]
    wf_row = s["rows"]["wf"]
    not_forgotten = [metrics["class_names"][c] for c, v in enumerate(metrics["splits"]["test"]["wf"]["acc_f"]) if v > FORGET_TOL]
    lines += [f"- worst-forgotten class: Acc_f = {_fmt(s['max_acc_f'])}%"
              + (f" — **not forgotten (Acc_f > {FORGET_TOL:.0f}%)**: {', '.join(not_forgotten)}" if not_forgotten
                 else f" (every class ≤ {FORGET_TOL:.0f}%)")]
    if "acc_r_train" in wf_row:
        lines.append(f"- train split: Acc_r {_fmt(wf_row.get('acc_r_train'))}%, Acc_f {_fmt(wf_row.get('acc_f_train'))}%")
    if "insertion" in s:
        lines.append(f"- insertion {s['insertion']:.3f} (↑), deletion {s['deletion']:.3f} (↓)")
    if "timing" in metrics:
        lines.append("- wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in metrics["timing"].items()))
    lines += ["", "## Per class", "", _per_class_table(metrics), ""]
    rep = metrics.get("representation_per_class")
    if rep:
        lines += ["## Inside the network, per gate row (baked)", "",
                  "Each gate row baked into a plain model (the deployable artefact) and measured like a compare row: "
                  "linear-probe recovery, membership inference, IDI against the model retrained without the class, "
                  "k-NN retrieval on the forget class.", "", _representation_table(rep, metrics["class_names"]), ""]
    if figs:
        lines += ["## Figures", ""] + [f"![{k}](figures/{p.name})" for k, p in figs.items()] + [""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
