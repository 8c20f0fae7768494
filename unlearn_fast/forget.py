"""Forget requests: which classes a run forgets (issue 6 item 1).

A request is one of

* an explicit class list: ``"3"`` or ``"1,4,7"`` (or a list of ints);
* ``"random:K"``: K distinct classes drawn with a generator seeded by the run's seed;
* ``"similar:K:<dataset spec>"``: the K classes of the run's dataset whose class-mean *penultimate*
  features (the input of the model's final classifier layer, hooked) under the run's original model,
  over the train split, have the highest cosine similarity to the mean feature of the downstream
  dataset (EC's Top-100 scenario, after Kim et al.: the forget classes are those most similar to a
  downstream task). The downstream set is loaded with the run's ``img_size`` / ``in_chans`` and
  normalised with the run's own mean/std (the statistics the model was trained with); its mean
  feature is taken over all of its splits. Needs ``run_dir/original.safetensors``.

A single class is the special case of a one-element list. Every form returns a sorted list of
distinct class ids, at least one and at most ``num_classes - 1`` (a retain set must remain).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from unlearn_fast.evaluation.unlearn_eval import penultimate_features

__all__ = ["resolve_forget_request", "precheck_forget_request", "random_classes", "similar_classes", "class_mean_features",
           "parse_class_list", "forget_tag"]

_FORMS = "'3', '1,4,7', 'random:K' or 'similar:K:<dataset spec>'"


def forget_tag(classes: Sequence[int]) -> str:
    """File-name tag of a forget request: ``[1, 4, 7] -> "1-4-7"``."""
    return "-".join(str(int(c)) for c in sorted(classes))


def _check(classes: Sequence[int], num_classes: int, spec: Any) -> list[int]:
    out = sorted({int(c) for c in classes})
    bad = [c for c in out if not 0 <= c < num_classes]
    if not out or bad:
        raise ValueError(f"forget request {spec!r}: classes must be a non-empty subset of 0..{num_classes - 1}"
                         + (f"; {bad} out of range" if bad else ""))
    if len(out) >= num_classes:
        raise ValueError(f"forget request {spec!r} names all {num_classes} classes: nothing would be retained; "
                         f"forget at most {num_classes - 1}")
    return out


def parse_class_list(spec: str, num_classes: int) -> list[int]:
    """``"1,4,7" -> [1, 4, 7]`` (checked against ``num_classes``)."""
    try:
        classes = [int(t) for t in spec.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"forget request {spec!r} is not understood; use {_FORMS}") from None
    return _check(classes, num_classes, spec)


def _parse_k(text: str, spec: str, num_classes: int) -> int:
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"forget request {spec!r}: K must be an integer, got {text!r} (e.g. 'random:3')") from None
    if not 1 <= k < num_classes:
        raise ValueError(f"forget request {spec!r}: K must be in 1..{num_classes - 1} for {num_classes} classes")
    return k


def random_classes(k: int, num_classes: int, seed: int) -> list[int]:
    """K distinct classes, a pure function of (k, num_classes, seed) (numpy PCG64)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6F7267]))
    return sorted(int(c) for c in rng.choice(num_classes, size=k, replace=False))


def class_mean_features(model: nn.Module, dataset: Dataset, num_classes: int, device: torch.device | str,
                        batch_size: int = 512) -> Tensor:
    """Class means of the penultimate features: ``[num_classes, d]`` float64 (NaN rows for absent classes)."""
    f, y = penultimate_features(model, dataset, device, batch_size)
    f = f.double()
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f)
    counts = torch.bincount(y, minlength=num_classes).double()
    return sums / counts[:, None]


def similar_classes(class_means: Tensor, target_mean: Tensor, k: int) -> list[int]:
    """The K classes whose mean feature ``class_means [N, d]`` has the highest cosine similarity to
    ``target_mean [d]`` (ties broken by the lower class id; classes with NaN means are never picked)."""
    if class_means.dim() != 2 or target_mean.shape != class_means.shape[1:]:
        raise ValueError(f"similar_classes: need class_means [N, d] and target_mean [d], got "
                         f"{tuple(class_means.shape)} and {tuple(target_mean.shape)}")
    sim = torch.nn.functional.cosine_similarity(class_means.double(), target_mean.double()[None], dim=1)
    sim = torch.where(torch.isnan(sim), torch.full_like(sim, -torch.inf), sim)
    order = sorted(range(len(sim)), key=lambda c: (-float(sim[c]), c))
    return sorted(order[:k])


def _similar(k: int, data_spec: str, ctx, spec: str) -> list[int]:
    from unlearn_fast.data import load
    from unlearn_fast.models.io import load_model

    orig = ctx.run_dir / "original.safetensors"
    if not orig.exists():
        raise FileNotFoundError(f"forget request {spec!r} ranks classes with the original model, but {orig} is missing: "
                                "train it first (unlearn_fast.train(method='original', ...) or `unlearn-fast train "
                                "--method original`), then resolve the request")
    data = ctx.data
    try:
        down = load(data_spec, img_size=data.img_size, in_chans=data.in_chans, seed=ctx.seed,
                    mean=tuple(data.mean) or None, std=tuple(data.std) or None)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"forget request {spec!r}: cannot load the downstream dataset {data_spec!r}: {exc}") from exc
    model = load_model(orig, ctx.device)
    means = class_mean_features(model, data.train, data.num_classes, ctx.device)
    f, _ = penultimate_features(model, ConcatDataset([down.train, down.val, down.test]), ctx.device)
    if not len(f):
        raise ValueError(f"forget request {spec!r}: the downstream dataset {data_spec!r} is empty")
    return similar_classes(means, f.double().mean(0), k)


def resolve_forget_request(spec: str | Sequence[int] | int, ctx) -> list[int]:
    """Classes named by a forget request (see the module docstring); ``ctx`` is a ``RunContext``
    (``data``, ``seed``, ``run_dir``, ``device``). Returns sorted distinct class ids."""
    n = ctx.data.num_classes
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return _check([int(spec)], n, spec)
    if not isinstance(spec, str):
        return _check(list(spec), n, spec)
    s = spec.strip()
    kind, _, rest = s.partition(":")
    if kind == "random":
        return random_classes(_parse_k(rest, s, n), n, ctx.seed)
    if kind == "similar":
        k_text, sep, data_spec = rest.partition(":")
        if not sep or not data_spec:
            raise ValueError(f"forget request {spec!r}: use 'similar:K:<dataset spec>', e.g. 'similar:3:folder:/data/birds'")
        return _check(_similar(_parse_k(k_text, s, n), data_spec, ctx, s), n, spec)
    if ":" in s:
        raise ValueError(f"forget request {spec!r} is not understood; use {_FORMS}")
    return parse_class_list(s, n)


def precheck_forget_request(spec: str | Sequence[int] | int, ctx) -> list[int] | None:
    """Validate a request before any work: the classes for a list or ``random:K``; ``None`` for
    ``similar:K:SPEC`` (it needs the original model) after checking K and that SPEC can be read."""
    if isinstance(spec, str) and spec.strip().startswith("similar"):
        from unlearn_fast.data.registry import parse_spec

        s = spec.strip()
        k_text, sep, data_spec = s.partition(":")[2].partition(":")
        if not sep or not data_spec:
            raise ValueError(f"forget request {spec!r}: use 'similar:K:<dataset spec>', e.g. 'similar:3:folder:/data/birds'")
        _parse_k(k_text, s, ctx.data.num_classes)
        kind, path = parse_spec(data_spec)
        if path is not None and not os.path.exists(path):
            raise ValueError(f"forget request {spec!r}: the downstream dataset directory {path} does not exist")
        return None
    return resolve_forget_request(spec, ctx)
