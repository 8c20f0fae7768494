"""All-class evaluation of a WF-Net (WF-Net Sec. 4.2, Table 1).

For every class c, with gate row c: Acc_f (accuracy on class c) and Acc_r (on every other class), on
the test and the train split (also named TFA/TRA and FA/RA); Act-Dist and JS-Div against the model
retrained without c, on the test samples of c; ZRF (WF Eq. 4) against a randomly initialised copy of
the architecture, on the test samples of c; insertion and deletion curves over alpha.

All classes run as ONE mixed-label stream: each loaded batch of images is paired with every gate
row (chunked to ``batch_size`` pairs) and the correct/total counts are accumulated per (gate row,
true class) in an ``[N, N]`` table, so memory does not grow with the split size. The original and
retrained rows of the table are computed in the same pass over the test split.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from unlearn_fast.data.pipeline import eval_loader
from unlearn_fast.evaluation.metrics import ZRF, ActivationDistance, JSDivergence
from unlearn_fast.evaluation.unlearn_eval import random_model_like
from unlearn_fast.nn import WFModel

__all__ = ["evaluate_wf", "gate_accuracy_table", "insertion_deletion"]


def _loader(ds: Dataset, batch_size: int) -> DataLoader:
    return eval_loader(ds, batch_size)  # workers for lazily decoded data (data.pipeline)


class _Counts:
    """correct / total per (row, true class): ``[R, N]``; ``row`` = gate row (or a fixed model id)."""

    def __init__(self, rows: int, n: int) -> None:
        self.correct = torch.zeros(rows * n, dtype=torch.float64)
        self.total = torch.zeros(rows * n, dtype=torch.float64)
        self.n = n
        self.rows = rows

    def update(self, rows: Tensor, y: Tensor, pred: Tensor) -> None:
        key = (rows.long() * self.n + y.long()).cpu()
        self.total += torch.bincount(key, minlength=self.rows * self.n).double()
        self.correct += torch.bincount(key, weights=(pred == y).double().cpu(), minlength=self.rows * self.n)

    def acc_f_r(self) -> tuple[list[float], list[float]]:
        """Per row c: accuracy on class c (Acc_f) and on the other classes (Acc_r), in %."""
        cor = self.correct.view(self.rows, self.n)
        tot = self.total.view(self.rows, self.n)
        acc_f, acc_r = [], []
        for c in range(self.rows):
            f_t, f_c = tot[c, c], cor[c, c]
            r_t, r_c = tot[c].sum() - f_t, cor[c].sum() - f_c
            acc_f.append(float(100 * f_c / f_t) if f_t > 0 else math.nan)
            acc_r.append(float(100 * r_c / r_t) if r_t > 0 else math.nan)
        return acc_f, acc_r


@torch.no_grad()
def gate_accuracy_table(wf: WFModel, dataset: Dataset, device: torch.device, batch_size: int = 512,
                        progress: bool = True, desc: str = "eval") -> tuple[list[float], list[float]]:
    """Acc_f / Acc_r (%) for every gate row, one mixed-label stream over ``dataset``."""
    n = wf.num_classes
    counts = _Counts(n, n)
    img_bs = max(1, batch_size // n)
    for x, y in tqdm(_loader(dataset, img_bs), desc=desc, disable=not progress, leave=False):
        _stream_gates(wf, x.to(device), y.to(device), n, batch_size, lambda rows, yy, logits: counts.update(rows, yy, logits.argmax(1)))
    return counts.acc_f_r()


def _stream_gates(wf: WFModel, x: Tensor, y: Tensor, n: int, batch_size: int, sink) -> None:
    b = x.shape[0]
    per = max(1, batch_size // b)
    for c0 in range(0, n, per):
        cls = torch.arange(c0, min(n, c0 + per), device=x.device)
        rows = cls.repeat_interleave(b)
        xs = x.repeat(len(cls), *([1] * (x.dim() - 1)))
        ys = y.repeat(len(cls))
        sink(rows, ys, wf(xs, rows))


@torch.no_grad()
def _test_pass(wf: WFModel, original: nn.Module, retrained: dict[int, nn.Module], random_model: nn.Module,
               dataset: Dataset, device: torch.device, batch_size: int, progress: bool) -> dict[str, Any]:
    n = wf.num_classes
    wf_counts, orig_counts = _Counts(n, n), _Counts(1, n)
    ret_classes = sorted(retrained)
    ret_counts = _Counts(n, n)
    js_wf, ad_wf = JSDivergence(num_groups=n), ActivationDistance(num_groups=n)
    zrf_wf, zrf_orig, zrf_ret = ZRF(num_groups=n), ZRF(num_groups=n), ZRF(num_groups=n)
    img_bs = max(1, batch_size // n)
    for x, y in tqdm(_loader(dataset, img_bs), desc="eval test", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        rand = random_model(x).float()
        orig = original(x).float()
        orig_counts.update(torch.zeros_like(y), y, orig.argmax(1))
        zrf_orig.update(orig, rand, y)
        # the WF stream: every gate row; keep the forget pairs (row == true class) for the divergences
        forget_logits = torch.empty_like(orig)

        def sink(rows, ys, logits):
            wf_counts.update(rows, ys, logits.argmax(1))
            hit = rows == ys
            if hit.any():
                idx = hit.nonzero().squeeze(1) % x.shape[0]
                forget_logits[idx] = logits[hit].float()

        _stream_gates(wf, x, y, n, batch_size, sink)
        zrf_wf.update(forget_logits, rand, y)
        for c in ret_classes:
            r = retrained[c](x).float()
            ret_counts.update(torch.full_like(y, c), y, r.argmax(1))
            m = y == c
            if m.any():
                js_wf.update(forget_logits[m], r[m], y[m])
                ad_wf.update(forget_logits[m], r[m], y[m])
                zrf_ret.update(r[m], rand[m], y[m])
    acc_f, acc_r = wf_counts.acc_f_r()
    cor, tot = orig_counts.correct, orig_counts.total
    per_class = (100 * cor / tot.clamp_min(1)).tolist()
    o_f = per_class
    o_r = [float(100 * (cor.sum() - cor[c]) / (tot.sum() - tot[c]).clamp_min(1)) for c in range(n)]
    out = {"wf": {"acc_f": acc_f, "acc_r": acc_r, "zrf": _list(zrf_wf.compute())},
           "original": {"acc_f": o_f, "acc_r": o_r, "zrf": _list(zrf_orig.compute()),
                        "acc": float(100 * cor.sum() / tot.sum())}}
    if ret_classes:
        rf, rr = ret_counts.acc_f_r()
        keep = lambda v: [v[c] if c in retrained else math.nan for c in range(n)]  # noqa: E731
        out["retrained"] = {"acc_f": keep(rf), "acc_r": keep(rr), "zrf": keep(_list(zrf_ret.compute()))}
        out["wf"]["js_div"] = keep(_list(js_wf.compute()))
        out["wf"]["act_dist"] = keep(_list(ad_wf.compute()))
    return out


def _list(t: Tensor) -> list[float]:
    return [float(v) for v in torch.as_tensor(t).reshape(-1)]


@torch.no_grad()
def insertion_deletion(wf: WFModel, original: nn.Module, dataset: Dataset, device: torch.device,
                       steps: int = 10, batch_size: int = 512, progress: bool = True) -> dict[str, Any]:
    """Insertion / deletion curves over alpha (WF-Net Sec. 4.2, App. B), for every class at once.

    Relevance of a gate element for class c = how closed untraining left it: elements of each layer's
    row c sorted by trained alpha, smallest first. At fraction f of ``steps``:
    * insertion starts from the untrained rows and re-opens (alpha = alpha_init) the most relevant f;
    * deletion starts from fully open rows (alpha = alpha_init everywhere) and closes (gate 0) the
      most relevant f.
    Each test image of class c runs with gate row c; the curve is the mean softmax probability of c
    divided by the original model's mean probability of c on the same images (the "baseline model");
    the "other classes" curve is the mean of the largest other-class probability, divided by the same
    baseline. Scores are the trapezoid AUC over f in [0, 1], averaged over classes.
    """
    n = wf.num_classes
    fracs = np.linspace(0.0, 1.0, steps + 1)
    layers = [layer for _, layer in wf.wf_layers()]
    saved = [[a.detach().clone() for a in layer.alphas()] for layer in layers]
    orders = [[a.argsort(dim=1) for a in alphas] for alphas in saved]  # per row, ascending alpha
    base_sum = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    loader = _loader(dataset, batch_size)
    for x, y in loader:
        p = torch.softmax(original(x.to(device)).float(), 1)
        yy = y.to(device)
        base_sum += torch.bincount(y, weights=p.gather(1, yy[:, None]).squeeze(1).double().cpu(), minlength=n)
        count += torch.bincount(y, minlength=n).double()
    base = base_sum / count.clamp_min(1)
    curves = {k: np.zeros((n, len(fracs))) for k in ("insertion", "deletion", "insertion_other", "deletion_other")}
    closed = -30.0  # sigmoid(-30) ~ 1e-13: a closed gate
    try:
        for kind in ("insertion", "deletion"):
            for j, f in enumerate(tqdm(fracs, desc=kind, disable=not progress, leave=False)):
                for layer, alphas, ords in zip(layers, saved, orders):
                    for param, a0, order in zip(layer.alphas(), alphas, ords):
                        k = int(round(f * a0.shape[1]))
                        new = a0.clone() if kind == "insertion" else torch.full_like(a0, wf.alpha_init)
                        if k:
                            sel = order[:, :k]
                            new.scatter_(1, sel, wf.alpha_init if kind == "insertion" else closed)
                        param.data.copy_(new)
                tgt = torch.zeros(n, dtype=torch.float64)
                oth = torch.zeros(n, dtype=torch.float64)
                for x, y in loader:
                    x, yy = x.to(device), y.to(device)
                    p = torch.softmax(wf(x, yy).float(), 1)
                    pt = p.gather(1, yy[:, None]).squeeze(1)
                    po = p.scatter(1, yy[:, None], -1.0).max(1).values
                    tgt += torch.bincount(y, weights=pt.double().cpu(), minlength=n)
                    oth += torch.bincount(y, weights=po.double().cpu(), minlength=n)
                denom = (base * count).clamp_min(1e-12)
                curves[kind][:, j] = (tgt / denom).numpy()
                curves[kind + "_other"][:, j] = (oth / denom).numpy()
    finally:
        for layer, alphas in zip(layers, saved):
            for param, a0 in zip(layer.alphas(), alphas):
                param.data.copy_(a0)
    auc = {k: np.trapezoid(v, fracs, axis=1) for k, v in curves.items()}
    return {"fractions": fracs.tolist(),
            "curves": {k: v.tolist() for k, v in curves.items()},
            "insertion": auc["insertion"].tolist(), "deletion": auc["deletion"].tolist(),
            "insertion_mean": float(np.nanmean(auc["insertion"])), "deletion_mean": float(np.nanmean(auc["deletion"]))}


def _mean(v: Sequence[float]) -> float:
    a = np.asarray(v, dtype=float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


@torch.no_grad()
def evaluate_wf(wf: WFModel, original: nn.Module, data, device: torch.device | str,
                retrained: dict[int, nn.Module] | None = None, batch_size: int = 512,
                splits: Sequence[str] = ("test", "train"), insertion_steps: int = 10, seed: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """Every WF-Net metric for every class; see the module docstring. Accuracies in %, ZRF in [0, 1]."""
    device = torch.device(device)
    wf.eval()
    original = original.to(device).eval()
    retrained = {c: m.to(device).eval() for c, m in (retrained or {}).items()}
    random_model = random_model_like(original, seed + 12345).to(device)
    res: dict[str, Any] = {"num_classes": wf.num_classes, "class_names": list(data.class_names), "splits": {}}
    test = _test_pass(wf, original, retrained, random_model, data.test, device, batch_size, progress)
    res["splits"]["test"] = test
    for split in splits:
        if split == "test":
            continue
        acc_f, acc_r = gate_accuracy_table(wf, getattr(data, split), device, batch_size, progress, f"eval {split}")
        res["splits"][split] = {"wf": {"acc_f": acc_f, "acc_r": acc_r}}
    if insertion_steps:
        res["insertion_deletion"] = insertion_deletion(wf, original, data.test, device, insertion_steps, batch_size, progress)
    res["summary"] = summarize(res)
    return res


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Means over classes (the WF Table 1 rows) plus the classes that were not forgotten."""
    t = res["splits"]["test"]
    rows = {}
    for name in ("original", "retrained", "wf"):
        if name not in t:
            continue
        r = t[name]
        rows[name] = {"acc_r": _mean(r["acc_r"]), "acc_f": _mean(r["acc_f"]), "zrf": _mean(r["zrf"]),
                      "act_dist": _mean(r["act_dist"]) if "act_dist" in r else None,
                      "js_div": _mean(r["js_div"]) if "js_div" in r else None}
    for split, v in res["splits"].items():
        if split != "test":
            rows["wf"][f"acc_r_{split}"] = _mean(v["wf"]["acc_r"])
            rows["wf"][f"acc_f_{split}"] = _mean(v["wf"]["acc_f"])
    out: dict[str, Any] = {"rows": rows}
    wf_f = t["wf"]["acc_f"]
    out["max_acc_f"] = float(np.nanmax(wf_f))
    if "insertion_deletion" in res:
        out["insertion"] = res["insertion_deletion"]["insertion_mean"]
        out["deletion"] = res["insertion_deletion"]["deletion_mean"]
    return out
