"""Membership inference on the forget set: SVC-MIA (methods card 12; OPTML Unlearn-Sparse
``evaluation/SVC_MIA.py``, SalUn) and a version that scales.

Convention (card 12, Unlearn-Sparse / SalUn): an attack is trained to tell *members* - retain samples of
the train split (label 1) - from *non-members* - retain-class samples of the test split (label 0), the
same number of each (``n_shadow`` = the smaller of the two; a seeded subset of the larger). It is then
applied to the forget samples of the train split, and

    MIA = 100 * fraction of D_f predicted NON-member       ("MIA-efficacy"; higher = more forgotten)

The model retrained without the forget classes scores near 100, the original near 100 - (its train
accuracy on D_f). ``MIA_member`` = 100 - MIA is the other convention (fraction predicted member, e.g.
Jeon et al.'s "Retrain MIA 10.64"); both are in the result.

Per-sample features of the softmax p of the logits (augmentation off), :data:`MIA_FEATURES`:
``confidence`` p_y (the default, the one the papers report), ``entropy`` -sum p log p, ``m_entropy``
(Song & Mittal 2021: -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i); the reference code's version
indexes the wrong columns and uses log p: card 12 pitfall), ``loss`` -log p_y, ``prob`` the whole vector.

Attacks, :data:`MIA_ATTACKS`:

* ``svc`` - sklearn ``SVC(C=3, gamma="auto", kernel="rbf")`` exactly as the reference (fit cost O(n^2) to
  O(n^3)); refused above ``svc_max`` shadow samples.
* ``rff`` - the same RBF kernel (gamma = 1 / n_features, "auto") approximated by ``rff_dim`` random
  Fourier features (Rahimi & Recht 2007, seeded), then an L2-regularised logistic regression fitted to
  convergence (full-batch L-BFGS): O(n * rff_dim) time and memory, for any n.
* ``threshold`` - the accuracy-maximising threshold on a scalar feature (O(n log n); the attack of Yeom
  et al. 2018 / Song & Mittal 2021 for confidence or loss).
* ``auto`` (default) - ``svc`` up to ``svc_max`` (default 20,000) shadow samples, ``rff`` above.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIA_FEATURES", "MIA_ATTACKS", "mia_features", "fit_attack", "membership_attack_accuracy",
           "mia_efficacy", "svc_mia", "rff_map"]


def _conf(p: Tensor, y: Tensor) -> Tensor:
    return p.gather(1, y[:, None])


def _entropy(p: Tensor, y: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(1, keepdim=True)


def _m_entropy(p: Tensor, y: Tensor) -> Tensor:
    py = _conf(p, y).squeeze(1)
    log_p = torch.log(p.clamp_min(1e-30))
    log_1mp = torch.log((1 - p).clamp_min(1e-30))
    other = -(p * log_1mp)
    other = other.sum(1) - other.gather(1, y[:, None]).squeeze(1)
    return (-(1 - py) * log_p.gather(1, y[:, None]).squeeze(1) + other)[:, None]


def _loss(p: Tensor, y: Tensor) -> Tensor:
    return -torch.log(_conf(p, y).clamp_min(1e-30))


def _prob(p: Tensor, y: Tensor) -> Tensor:
    return p


MIA_FEATURES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "confidence": _conf, "entropy": _entropy, "m_entropy": _m_entropy, "loss": _loss, "prob": _prob}


def mia_features(logits: Tensor, y: Tensor, feature: str = "confidence") -> Tensor:
    """Float64 ``[n, f]`` attack features of ``logits [n, K]`` and labels ``y [n]`` (see the module docstring)."""
    if feature not in MIA_FEATURES:
        raise ValueError(f"MIA feature {feature!r} is unknown; use one of {sorted(MIA_FEATURES)}")
    if logits.dim() != 2 or torch.as_tensor(y).shape != logits.shape[:1]:
        raise ValueError(f"mia_features: need logits [n, K] and labels [n], got {tuple(logits.shape)} and "
                         f"{tuple(torch.as_tensor(y).shape)}")
    p = torch.softmax(logits.detach().double().cpu(), dim=1)
    return MIA_FEATURES[feature](p, torch.as_tensor(y).long().cpu())


class _Attack:
    """A fitted binary attack: ``predict(x [n, f]) -> {0, 1} [n]`` (1 = member)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str) -> None:
        self.fn, self.name = fn, name

    def predict(self, x: Tensor) -> Tensor:
        return self.fn(x.double()).long()


def _svc(x: Tensor, y: Tensor, seed: int, **kw: Any) -> _Attack:
    from sklearn.svm import SVC

    svc_max = kw.get("svc_max", 20000)
    if len(y) > svc_max:
        raise ValueError(f"MIA attack 'svc' on {len(y)} shadow samples exceeds svc_max={svc_max} (sklearn's SVC is "
                         "O(n^2) memory); use attack='rff' (same RBF kernel, linear cost) or attack='auto'")
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x.numpy(), y.numpy())
    return _Attack(lambda t: torch.as_tensor(clf.predict(t.numpy())), "svc")


def rff_map(n_features: int, dim: int, gamma: float, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """Random Fourier features (Rahimi & Recht 2007): ``phi(x) . phi(x') ~ exp(-gamma ||x - x'||^2)``;
    ``phi: [n, n_features] -> [n, dim]`` float64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_features, dim, generator=g, dtype=torch.float64) * math.sqrt(2 * gamma)
    b = torch.rand(dim, generator=g, dtype=torch.float64) * 2 * math.pi
    return lambda t: math.sqrt(2.0 / dim) * torch.cos(t.double() @ W + b)


def _rff(x: Tensor, y: Tensor, seed: int, **kw: Any) -> _Attack:
    from unlearn_fast.evaluation.probe import fit_linear_probe

    phi = rff_map(x.shape[1], int(kw.get("rff_dim", 512)), 1.0 / x.shape[1], seed)  # sklearn gamma="auto"
    head = fit_linear_probe(phi(x), y, 2, l2=float(kw.get("rff_l2", 1e-4)))
    return _Attack(lambda t: head(phi(t)).argmax(1), "rff")


def _threshold(x: Tensor, y: Tensor, seed: int, **kw: Any) -> _Attack:
    if x.shape[1] != 1:
        raise ValueError(f"MIA attack 'threshold' needs a scalar feature, got {x.shape[1]} columns; use 'rff' or 'svc'")
    v = x[:, 0]
    order = torch.argsort(v)
    vs, ys = v[order], y[order].double()
    n1, n0 = float(ys.sum()), float(len(ys) - ys.sum())
    # cut after position i: members are predicted for values > cut (sign s = +1) or < cut (s = -1)
    below1 = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ys, 0)])
    below0 = torch.arange(len(ys) + 1, dtype=torch.float64) - below1
    acc_up = below0 + (n1 - below1)       # non-members below the cut, members above
    acc_down = below1 + (n0 - below0)
    # only cut between distinct values
    valid = torch.ones(len(ys) + 1, dtype=torch.bool)
    valid[1:-1] = vs[1:] != vs[:-1]
    acc_up[~valid] = -1
    acc_down[~valid] = -1
    up = bool(acc_up.max() >= acc_down.max())
    i = int((acc_up if up else acc_down).argmax())
    cut = (float(vs[i - 1]) + float(vs[i])) / 2 if 0 < i < len(vs) else (float(vs[0]) - 1 if i == 0 else float(vs[-1]) + 1)
    return _Attack((lambda t: t[:, 0] > cut) if up else (lambda t: t[:, 0] < cut), "threshold")


MIA_ATTACKS: dict[str, Callable[..., _Attack]] = {"svc": _svc, "rff": _rff, "threshold": _threshold}


def fit_attack(members: Tensor, nonmembers: Tensor, attack: str = "auto", seed: int = 0, **kw: Any) -> _Attack:
    """Fit an attack on feature rows ``members [n1, f]`` (label 1) and ``nonmembers [n0, f]`` (label 0)."""
    if attack == "auto":
        attack = "svc" if len(members) + len(nonmembers) <= kw.get("svc_max", 20000) else "rff"
    if attack not in MIA_ATTACKS:
        raise ValueError(f"MIA attack {attack!r} is unknown; use one of {sorted(MIA_ATTACKS)} or 'auto'")
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError(f"MIA: need members and non-members to fit the attack, got {len(members)} and {len(nonmembers)}")
    x = torch.cat([members, nonmembers]).double().cpu()
    y = torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))]).long()
    return MIA_ATTACKS[attack](x, y, seed, **kw)


def membership_attack_accuracy(members: Tensor, nonmembers: Tensor, attack: str = "auto", seed: int = 0,
                               **kw: Any) -> float:
    """Balanced held-out accuracy of the attack (0.5 = chance): fit on one half of each set, score on the
    other half (equal numbers of members and non-members in each half)."""
    n = min(len(members), len(nonmembers))
    if n < 4:
        raise ValueError(f"membership_attack_accuracy: need at least 4 members and 4 non-members, got {len(members)}, {len(nonmembers)}")
    g = torch.Generator().manual_seed(seed)
    m = members[torch.randperm(len(members), generator=g)[:n]]
    o = nonmembers[torch.randperm(len(nonmembers), generator=g)[:n]]
    h = n // 2
    att = fit_attack(m[:h], o[:h], attack, seed, **kw)
    return 0.5 * float(att.predict(m[h:].double()).double().mean()) + 0.5 * float(1 - att.predict(o[h:].double()).double().mean())


def mia_efficacy(shadow_members: Tensor, shadow_nonmembers: Tensor, target: Tensor, attack: str = "auto",
                 seed: int = 0, **kw: Any) -> float:
    """Card 12's MIA-efficacy: % of ``target`` rows the attack predicts as non-member."""
    att = fit_attack(shadow_members, shadow_nonmembers, attack, seed, **kw)
    return float(100.0 * (1 - att.predict(target.double()).double()).mean()) if len(target) else float("nan")


def svc_mia(model: nn.Module, data, forget: Sequence[int], *, feature: str = "confidence", attack: str = "auto",
            device: torch.device | str | None = None, seed: int = 0, batch_size: int = 512, **kw: Any) -> dict[str, Any]:
    """SVC-MIA of ``model`` on the forget classes (``data``: the run's ``DataBundle``; module docstring).

    Returns ``{"MIA", "MIA_member", "mia_feature", "mia_attack", "n_shadow"}``."""
    from unlearn_fast.evaluation.accuracy import predict_logits

    if feature not in MIA_FEATURES:
        raise ValueError(f"MIA feature {feature!r} is unknown; use one of {sorted(MIA_FEATURES)}")
    if attack != "auto" and attack not in MIA_ATTACKS:
        raise ValueError(f"MIA attack {attack!r} is unknown; use one of {sorted(MIA_ATTACKS)} or 'auto'")
    forget = sorted({int(c) for c in forget})
    device = torch.device(device) if device is not None else next(model.parameters()).device
    lt, yt = predict_logits(model, data.train, device, batch_size)
    le, ye = predict_logits(model, data.test, device, batch_size)
    ft = torch.tensor(forget)
    f_tr, f_te = torch.isin(yt, ft), torch.isin(ye, ft)
    feats_tr = mia_features(lt, yt, feature)
    feats_te = mia_features(le, ye, feature)
    mem, non = feats_tr[~f_tr], feats_te[~f_te]
    n = min(len(mem), len(non))
    g = torch.Generator().manual_seed(seed)
    mem = mem[torch.sort(torch.randperm(len(mem), generator=g)[:n]).values]
    non = non[torch.sort(torch.randperm(len(non), generator=g)[:n]).values]
    used = attack if attack != "auto" else ("svc" if 2 * n <= kw.get("svc_max", 20000) else "rff")
    eff = mia_efficacy(mem, non, feats_tr[f_tr], used, seed, **kw)
    return {"MIA": eff, "MIA_member": 100.0 - eff if not math.isnan(eff) else float("nan"),
            "mia_feature": feature, "mia_attack": used, "n_shadow": int(n)}
