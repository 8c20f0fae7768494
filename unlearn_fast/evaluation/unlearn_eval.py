"""Evaluation of one unlearned model for one forget request, in the shape of EC Table 1.

Metrics (accuracies and CKA in %, JS in nats, ZRF in [0, 1]):

* ``FA`` / ``RA``: accuracy on the forget / retain classes of the **train** split;
  ``TFA`` / ``TRA``: the same on the **test** split.
* ``per_class[metric][str(c)]`` for every forget class c, metric ``FA``, ``TFA`` (its own train / test
  accuracy), ``JS`` and ``ActDist`` (WF paper Act-Dist: mean L2 distance between the softmax vectors) to
  the retrained model on its test samples, ``n_train`` / ``n_test`` - so that a class that was not
  forgotten does not hide in the mean. ``ActDist``: the same over all of D_f^te.
* ``CKA``: linear CKA (exact, fp64 streaming sufficient statistics) between the model's and the
  *original* model's features on the test forget set D_f^te, x100, at the penultimate layer - the
  input of the final classifier, i.e. the layer before it in ``models.feature_layers`` (EC Sec. 4.1:
  "penultimate-layer features"); ``cka_layers`` holds every named feature layer (EC Fig. 2), conv /
  token outputs global-average-pooled (EC App. B.6). ``cka_retrain_layers``: the same against the
  retrained model.
* ``JS``: mean JS divergence (natural log) between the softmax of the model and of the model
  retrained without the forget classes, on D_f^te (lower = closer to the gold standard).
* ``ZRF``: 1 - mean JS(model, randomly initialised copy of the architecture) on D_f^te
  (WF Eq. 4 / Chundawat et al.; the forward-KL JS of card 12, not the bad-teaching code's variant).
* Representation metrics, when asked (``representation=``, :mod:`.representation`): ``IDI`` (signed) /
  ``IDI_abs``, the linear-probe attack ``probe_TFA`` / ``probe_TRA``, k-NN retrieval
  ``knn_forget_retrieval`` / ``knn_overlap_original`` and downstream ``knn[name]`` / ``knn_gap[name]``
  (``knn_data=`` specs), SVC-MIA ``MIA`` (% of D_f predicted non-member).
* ``H-Mean`` (EC App. B.6, Eq. 4-5): the harmonic mean of the normalised scores in [0, 100], larger
  is better, over every EC score that was computed: s_FA = 100 - FA, s_RA = RA, s_TFA = 100 - TFA,
  s_TRA = TRA, s_kNN = 100 - |gap| per downstream set, s_CKA = 100 - CKA, s_IDI = 100 * clip(1 - |IDI|,
  0.1, 1). ``hmean_of`` lists them; with three downstream sets it is exactly EC's nine. JS, ZRF, the
  probe, retrieval and MIA are reported but are not part of EC's H-Mean. A score of 0 gives H-Mean 0.

Passes: the model runs once over the train split and once over the test split; the original,
retrained and random models run once over D_f^te only (their features are hooked in that pass); the
representation metrics add their own passes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unlearn_fast.data.pipeline import eval_loader
from unlearn_fast.evaluation.features import _classifier_module, penultimate_features  # noqa: F401  (re-exported)

__all__ = ["evaluate_unlearned", "hmean_scores", "h_mean", "random_model_like", "penultimate_layer",
           "forget_accuracies", "penultimate_features"]


def h_mean(scores: Sequence[float]) -> float:
    """EC Eq. 4: ``len(s) / sum(1 / s)`` over scores in [0, 100]; 0 if any score is 0; NaN if none."""
    vals = [float(s) for s in scores if s is not None and not math.isnan(float(s))]
    if not vals:
        return float("nan")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def hmean_scores(FA: float | None = None, RA: float | None = None, TFA: float | None = None,
                 TRA: float | None = None, CKA: float | None = None,
                 knn_gaps: Mapping[str, float] | Sequence[float] | None = (),
                 IDI: float | None = None) -> dict[str, float]:
    """EC Eq. 5 normalised scores (all in [0, 100], larger is better) of the metrics given (in %), in EC
    Table 1's column order. ``knn_gaps``: ``{downstream name: gap}`` (keys ``kNN:<name>``) or a list
    (keys ``kNN0``, ``kNN1``, ...). Missing (None) and NaN metrics are left out."""
    s: dict[str, float] = {}
    if FA is not None:
        s["FA"] = 100.0 - FA
    if RA is not None:
        s["RA"] = float(RA)
    if TFA is not None:
        s["TFA"] = 100.0 - TFA
    if TRA is not None:
        s["TRA"] = float(TRA)
    items = (knn_gaps.items() if isinstance(knn_gaps, Mapping)
             else ((None, g) for g in (knn_gaps or ())))
    for i, (name, g) in enumerate(items):
        if g is not None:
            s[f"kNN:{name}" if name is not None else f"kNN{i}"] = 100.0 - abs(float(g))
    if CKA is not None:
        s["CKA"] = 100.0 - CKA
    if IDI is not None:
        s["IDI"] = 100.0 * min(max(1.0 - abs(float(IDI)), 0.1), 1.0)
    return {k: min(max(v, 0.0), 100.0) for k, v in s.items() if not math.isnan(v)}


def random_model_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """A randomly initialised copy of ``model``'s architecture (ZRF's incompetent teacher), seeded."""
    from unlearn_fast.models import create

    cfg = dict(getattr(model, "unlearn_fast_config", None) or {})
    if "name" not in cfg:
        raise ValueError("random_model_like: the model was not made by unlearn_fast.models.create")
    name = cfg.pop("name")
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        m = create(name, **cfg)
    return m.eval()


def penultimate_layer(model: nn.Module) -> str:
    """The CKA layer: the input of the final classifier. CNNs: the feature layer right before it
    (``feature_layers(...)[-2]``, whose output is that input); ViT/Swin: ``"<head>:in"``, the head's
    input itself (after the final norm and token pooling; a block output would be token-averaged
    before that norm) - a LinearCKA layer name that hooks a module's input."""
    from unlearn_fast.models import feature_layers, model_family

    names = feature_layers(model, model.unlearn_fast_name)
    if model_family(model.unlearn_fast_name) == "vit":
        return f"{names[-1]}:in"
    return names[-2] if len(names) >= 2 else names[-1]


class _Acc:
    """Correct / total counts on the forget and the retain classes."""

    def __init__(self, forget: Tensor, num_classes: int | None = None) -> None:
        self.forget = forget
        self.c = torch.zeros(2, dtype=torch.float64)
        self.n = torch.zeros(2, dtype=torch.float64)
        self.k = num_classes
        if num_classes is not None:
            self.cc = torch.zeros(num_classes, dtype=torch.float64)
            self.nc = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, logits: Tensor, y: Tensor) -> None:
        f = torch.isin(y, self.forget.to(y.device))
        ok = (logits.argmax(1) == y).double()
        for i, m in enumerate((f, ~f)):
            self.c[i] += ok[m].sum().cpu()
            self.n[i] += m.sum().cpu()
        if self.k is not None:
            yc = y.long().cpu()
            self.cc += torch.bincount(yc, weights=ok.cpu(), minlength=self.k)
            self.nc += torch.bincount(yc, minlength=self.k).double()

    def result(self) -> tuple[float, float]:
        return tuple(float(100 * self.c[i] / self.n[i]) if self.n[i] > 0 else float("nan") for i in range(2))

    def per_class(self, classes: Sequence[int]) -> dict[int, float]:
        """Accuracy (%) of each class in ``classes`` (NaN for a class without samples)."""
        return {int(c): float(100 * self.cc[c] / self.nc[c]) if self.nc[c] > 0 else float("nan") for c in classes}


@torch.no_grad()
def forget_accuracies(model: nn.Module, dataset: Dataset, forget: Sequence[int], device, batch_size: int = 512) -> tuple[float, float]:
    """(forget accuracy, retain accuracy) in % of ``model`` on ``dataset``."""
    acc = _Acc(torch.tensor(sorted(forget)))
    model.eval()
    for x, y in eval_loader(dataset, batch_size):
        acc.update(model(x.to(device)).float(), torch.as_tensor(y).to(device))
    return acc.result()



def _check(model: nn.Module, what: str) -> None:
    if getattr(model, "unlearn_fast_name", None) is None:
        raise ValueError(f"evaluate_unlearned: the {what} model was not made by unlearn_fast.models.create "
                         "(load it with unlearn_fast.models.io.load_model)")


def _loader(ds: Dataset, batch_size: int) -> DataLoader:
    return eval_loader(ds, batch_size)  # workers for lazily decoded data (data.pipeline)


def _pct(v: Any) -> float:
    v = float(v)
    return 100.0 * v if not math.isnan(v) else float("nan")


@torch.no_grad()
def evaluate_unlearned(model: nn.Module, original: nn.Module, data, forget: Sequence[int], *,
                       retrained: nn.Module | None = None, layers: Sequence[str] | None = None,
                       device: torch.device | str | None = None, batch_size: int = 512, seed: int = 0,
                       random_model: nn.Module | None = None, progress: bool = False,
                       representation: Any = None, knn_data: str | Sequence[str] | None = None,
                       representation_options: dict[str, Any] | None = None,
                       cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """All metrics of the module docstring for ``model`` after forgetting ``forget`` (class ids).

    ``data``: the run's ``DataBundle``; ``retrained``: the model trained without all forget classes
    (``JS``, ``ActDist``, per-class JS / Act-Dist and ``cka_retrain_layers`` are ``None`` without it);
    ``layers``: CKA layers (default: every ``models.feature_layers`` name; the penultimate layer is always
    added); ``random_model``: ZRF's random copy (default: :func:`random_model_like` of ``original`` with
    ``seed``). ``representation``: ``"all"`` or a list of ``idi``, ``probe``, ``knn``, ``mia``;
    ``knn_data``: downstream data spec(s) for k-NN (turns ``knn`` on); ``representation_options``: fields
    of :class:`unlearn_fast.evaluation.representation.RepresentationOptions` (e.g. ``{"idi": "ec",
    "mia_attack": "rff"}``); ``cache``: a dict kept across the models of one comparison (the reference
    models' IDI, retrieval and downstream results are computed once).
    Returns a JSON-serialisable dict (floats; NaN where a set is empty).
    """
    from unlearn_fast.evaluation.representation import RepresentationOptions, representation_metrics
    from tqdm.auto import tqdm

    from unlearn_fast.evaluation.metrics import ZRF, ActivationDistance, FeatureHooks, JSDivergence, LinearCKA
    from unlearn_fast.models import feature_layers

    for m, what in ((model, "unlearned"), (original, "original")) + (((retrained, "retrained"),) if retrained is not None else ()):
        _check(m, what)
    forget = sorted({int(c) for c in forget})
    if not forget or any(not 0 <= c < data.num_classes for c in forget):
        raise ValueError(f"evaluate_unlearned: forget classes {forget} must be a non-empty subset of 0..{data.num_classes - 1}")
    rep_opts = RepresentationOptions.make(representation, knn_data, **(representation_options or {}))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pen = penultimate_layer(model)
    layers = list(layers) if layers is not None else feature_layers(model, model.unlearn_fast_name)
    if pen not in layers:
        layers.append(pen)
    rand = (random_model if random_model is not None else random_model_like(original, seed)).to(device).eval()
    for m in (model, original, retrained):
        if m is not None:
            m.eval()
    ft = torch.tensor(forget, device=device)

    acc_train = _Acc(ft, data.num_classes)
    for x, y in tqdm(_loader(data.train, batch_size), desc="eval train", disable=not progress, leave=False):
        acc_train.update(model(x.to(device)).float(), y.to(device))

    acc_test = _Acc(ft, data.num_classes)
    cka_o = LinearCKA(model, original, layers)
    cka_o.remove_hooks()
    cka_r = None
    if retrained is not None:
        cka_r = LinearCKA(model, retrained, layers)
        cka_r.remove_hooks()
    js, ad, zrf = JSDivergence(), ActivationDistance(), ZRF()
    js_c, ad_c = JSDivergence(num_groups=len(forget)), ActivationDistance(num_groups=len(forget))
    group_of = torch.full((data.num_classes,), -1, dtype=torch.long, device=device)
    group_of[ft] = torch.arange(len(forget), device=device)
    grabs = {"u": FeatureHooks(model, layers), "o": FeatureHooks(original, layers)}
    if retrained is not None:
        grabs["r"] = FeatureHooks(retrained, layers)
    n_forget_test = 0
    try:
        for x, y in tqdm(_loader(data.test, batch_size), desc="eval test", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            out = model(x).float()
            fu = grabs["u"].take()
            acc_test.update(out, y)
            f = torch.isin(y, ft)
            if not f.any():
                continue
            n_forget_test += int(f.sum())
            xf, uf, fu = x[f], out[f], [t[f] for t in fu]
            original(xf)
            cka_o.update_features(fu, grabs["o"].take())
            if retrained is not None:
                r = retrained(xf).float()
                cka_r.update_features(fu, grabs["r"].take())
                js.update(uf, r)
                ad.update(uf, r)
                g = group_of[y[f]]
                js_c.update(uf, r, g)
                ad_c.update(uf, r, g)
            zrf.update(uf, rand(xf).float())
    finally:
        for g in grabs.values():
            g.remove()

    FA, RA = acc_train.result()
    TFA, TRA = acc_test.result()
    nan = float("nan")
    cka_layers = dict(zip(layers, (_pct(v) for v in cka_o.compute()["cka"]))) if n_forget_test else {k: nan for k in layers}
    cka_ret = None
    if cka_r is not None:
        cka_ret = dict(zip(layers, (_pct(v) for v in cka_r.compute()["cka"]))) if n_forget_test else {k: nan for k in layers}
    CKA = cka_layers[pen]
    have_r = retrained is not None and n_forget_test > 0
    js_per = js_c.compute().tolist() if have_r else [None] * len(forget)
    ad_per = ad_c.compute().tolist() if have_r else [None] * len(forget)
    fa_c, tfa_c = acc_train.per_class(forget), acc_test.per_class(forget)
    per_class = {"FA": {str(c): fa_c[c] for c in forget}, "TFA": {str(c): tfa_c[c] for c in forget},
                 "JS": {str(c): js_per[i] for i, c in enumerate(forget)},
                 "ActDist": {str(c): ad_per[i] for i, c in enumerate(forget)},
                 "n_train": {str(c): int(acc_train.nc[c]) for c in forget},
                 "n_test": {str(c): int(acc_test.nc[c]) for c in forget}}
    rep: dict[str, Any] = {}
    if rep_opts.metrics:
        rep = representation_metrics(model, original, retrained, data, forget, rep_opts, device=device, seed=seed,
                                     batch_size=batch_size, cache=cache)
    scores = hmean_scores(FA=FA, RA=RA, TFA=TFA, TRA=TRA, CKA=CKA, knn_gaps=rep.get("knn_gap"), IDI=rep.get("IDI"))
    return {
        "FA": FA, "RA": RA, "TFA": TFA, "TRA": TRA, "CKA": CKA,
        "JS": float(js.compute()) if have_r else None,
        "ActDist": float(ad.compute()) if have_r else None,
        "ZRF": float(zrf.compute()) if n_forget_test else nan,
        "H-Mean": h_mean(list(scores.values())),
        "hmean_scores": scores, "hmean_of": list(scores),
        "per_class": per_class,
        **rep,
        "cka_layer": pen, "cka_layers": cka_layers, "cka_retrain_layers": cka_ret,
        "CKA_retrain": cka_ret[pen] if cka_ret is not None else None,
        "cka_estimator": "exact", "forget": forget,
        "n": {"train_forget": int(acc_train.n[0]), "train_retain": int(acc_train.n[1]),
              "test_forget": int(acc_test.n[0]), "test_retain": int(acc_test.n[1])},
    }
