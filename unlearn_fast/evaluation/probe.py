"""Linear-probe recovery attack (methods card 12; Jeon et al. 2026; EC Sec. 1 "superficial forgetting").

Freeze the backbone, train only a fresh linear head on the penultimate features (the input of the
model's final classifier) of a small stratified labelled subset of the train split - default 2 % of it,
every class (forget classes included), at least ``min_per_class`` samples per class - and report the
head's accuracy on the **test** samples of the forget classes (``probe_TFA``, %) and of the retain
classes (``probe_TRA``). A model that forgot only in its last layer gets its forget classes back
(Jeon et al., CIFAR-10: head distillation > 82 %, Retrain 41 %); always read it beside the same probe on
the retrained model.

The head is multinomial logistic regression on standardised features (mean / std of the probe's own
training subset), fitted to convergence by full-batch L-BFGS on mean cross-entropy + (l2 / 2) ||W||^2
(the bias is not penalised) - the optimum of sklearn's ``LogisticRegression(C = 1 / (n * l2))``, so the
result does not depend on a learning rate or a step budget.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["stratified_indices", "fit_linear_probe", "LinearProbe", "linear_probe"]


def stratified_indices(labels: Tensor, fraction: float = 0.02, min_per_class: int = 5, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded stratified subset: per class max(min_per_class, ceil(fraction * n_c)),
    capped at n_c."""
    if not 0 < fraction <= 1:
        raise ValueError(f"probe fraction must be in (0, 1], got {fraction}")
    if min_per_class < 1:
        raise ValueError(f"probe min_per_class must be >= 1, got {min_per_class}")
    labels = torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = min(len(idx), max(min_per_class, math.ceil(fraction * len(idx))))
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.sort(torch.cat(out)).values if out else torch.empty(0, dtype=torch.long)


class LinearProbe(nn.Module):
    """Standardise then linear: ``[n, d] -> [n, K]`` logits."""

    def __init__(self, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.linear.requires_grad_(False)

    def forward(self, f: Tensor) -> Tensor:
        return self.linear((f.to(self.mean.dtype) - self.mean) / self.std)


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: int, l2: float = 1e-3,
                     max_iter: int = 500) -> LinearProbe:
    """Multinomial logistic regression (float64, full-batch L-BFGS to convergence) on ``features [n, d]``."""
    if features.dim() != 2 or labels.shape != features.shape[:1] or len(labels) == 0:
        raise ValueError(f"fit_linear_probe: need features [n, d] and labels [n] with n > 0, got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    x = features.detach().double().cpu()
    y = torch.as_tensor(labels).long().cpu()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W.t() + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, W.detach(), b.detach())


def _acc(pred: Tensor, y: Tensor, mask: Tensor) -> float:
    return float(100.0 * (pred[mask] == y[mask]).double().mean()) if mask.any() else float("nan")


def linear_probe(model: nn.Module, data, forget: Sequence[int], *, fraction: float = 0.02, min_per_class: int = 5,
                 l2: float = 1e-3, device: torch.device | str | None = None, seed: int = 0,
                 batch_size: int = 512, features: dict[str, tuple[Tensor, Tensor]] | None = None) -> dict[str, Any]:
    """Card 12's probe on ``model``'s frozen penultimate features (``data``: the run's ``DataBundle``).

    ``features``: precomputed ``{"train": (f, y), "test": (f, y)}`` (the train entry may already be the
    probe subset). Returns ``{"probe_TFA", "probe_TRA", "probe_per_class": {class: acc %}, "n_probe",
    "fraction", "min_per_class"}``."""
    from torch.utils.data import Subset

    from unlearn_fast.evaluation.features import penultimate_features

    forget = sorted({int(c) for c in forget})
    if not forget:
        raise ValueError("linear_probe: forget must name at least one class")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    idx = stratified_indices(data.targets["train"], fraction, min_per_class, seed)
    if features is not None:
        ftr, ytr = features["train"]
        if len(ytr) == len(data.targets["train"]):
            ftr, ytr = ftr[idx], ytr[idx]
        fte, yte = features["test"]
    else:
        ftr, ytr = penultimate_features(model, Subset(data.train, idx.tolist()), device, batch_size)
        fte, yte = penultimate_features(model, data.test, device, batch_size)
    probe = fit_linear_probe(ftr, ytr, data.num_classes, l2=l2)
    with torch.no_grad():
        pred = probe(fte).argmax(1)
    f = torch.isin(yte, torch.tensor(forget))
    return {"probe_TFA": _acc(pred, yte, f), "probe_TRA": _acc(pred, yte, ~f),
            "probe_per_class": {c: _acc(pred, yte, yte == c) for c in forget},
            "n_probe": int(len(ytr)), "fraction": fraction, "min_per_class": min_per_class}
