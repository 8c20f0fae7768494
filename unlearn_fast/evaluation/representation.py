"""The representation-level metrics of one unlearned model, in one call (issue 9; EC Table 1, card 12):
``idi`` (|IDI|, :mod:`.idi`), ``probe`` (linear-probe recovery attack, :mod:`.probe`), ``knn`` (forget-class
retrieval and k-NN on downstream data specs, :mod:`.knn`) and ``mia`` (SVC-MIA, :mod:`.mia`).

:func:`representation_metrics` is called by :func:`unlearn_fast.evaluation.unlearn_eval.evaluate_unlearned`
once per model; ``cache`` (a dict the caller keeps across the models of one comparison) holds what does
not depend on the evaluated model: the original's and the retrained model's IDI estimates, the
original's retrieval neighbours, the loaded downstream sets and the retrained model's downstream
accuracies (for EC's |gap|).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Subset

__all__ = ["REPRESENTATION_METRICS", "RepresentationOptions", "parse_representation", "representation_metrics",
           "knn_data_names", "prepare_cache", "wf_representation_per_class"]

REPRESENTATION_METRICS = ("idi", "probe", "knn", "mia")


def parse_representation(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``None`` / ``""`` -> none; ``"all"`` -> all four; ``"idi,probe"`` or a list -> those (validated)."""
    if spec is None or spec is False:
        return ()
    if spec is True:
        return REPRESENTATION_METRICS
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if "all" in items:
        return REPRESENTATION_METRICS
    bad = [s for s in items if s not in REPRESENTATION_METRICS]
    if bad:
        raise ValueError(f"representation metrics {bad} are unknown; use a comma list of {', '.join(REPRESENTATION_METRICS)} "
                         "or 'all'")
    return tuple(dict.fromkeys(items))


def knn_data_names(specs: Sequence[str]) -> dict[str, str]:
    """Short unique display names of downstream data specs (the folder's last part, else the spec)."""
    short = {}
    for s in specs:
        kind, _, path = s.partition(":")
        name = PurePath(path.rstrip("/")).name if path else kind
        short[s] = re.sub(r"\s+", "_", name) or s
    if len(set(short.values())) < len(short):
        return {s: s for s in specs}
    return short


@dataclass
class RepresentationOptions:
    """What :func:`representation_metrics` computes and how (defaults: card 12 / EC App. B.6)."""

    metrics: tuple[str, ...] = ()
    knn_data: tuple[str, ...] = ()        # downstream data specs for k-NN (EC: Office-Home, CUB, DomainNet)
    knn_k: int = 5
    knn_gallery_max: int | None = 100_000  # retrieval gallery (train split) cap, a seeded subset
    knn_show: int = 4                      # forget queries kept for the retrieval figure
    idi: Any = None                        # preset / IDIConfig / dict; None: "ec" on CUDA, "cpu" otherwise
    idi_layers: tuple[str, ...] | None = None
    probe_fraction: float = 0.02
    probe_min_per_class: int = 5
    mia_feature: str = "confidence"
    mia_attack: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, representation: Any = None, knn_data: str | Sequence[str] | None = None, **kw: Any) -> "RepresentationOptions":
        """Validated options; ``knn_data`` alone turns on ``knn``; a ready :class:`RepresentationOptions` is
        returned as is (with nothing else given)."""
        from unlearn_fast.evaluation.mia import MIA_ATTACKS, MIA_FEATURES

        if isinstance(representation, RepresentationOptions):
            if knn_data or kw:
                raise ValueError("pass either a RepresentationOptions or knn_data / options, not both")
            return representation

        metrics = parse_representation(representation)
        specs = tuple(s.strip() for s in ([knn_data] if isinstance(knn_data, str) else (knn_data or ())) if s and s.strip())
        if specs and "knn" not in metrics:
            metrics = (*metrics, "knn")
        bad = set(kw) - set(cls.__dataclass_fields__)
        if bad:
            raise ValueError(f"representation options {sorted(bad)} are unknown; options are "
                             f"{sorted(set(cls.__dataclass_fields__) - {'metrics', 'knn_data', 'extra'})}")
        opts = cls(metrics=metrics, knn_data=specs, **kw)
        if opts.mia_feature not in MIA_FEATURES:
            raise ValueError(f"mia_feature {opts.mia_feature!r} is unknown; use one of {sorted(MIA_FEATURES)}")
        if opts.mia_attack != "auto" and opts.mia_attack not in MIA_ATTACKS:
            raise ValueError(f"mia_attack {opts.mia_attack!r} is unknown; use one of {sorted(MIA_ATTACKS)} or 'auto'")
        if opts.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {opts.knn_k}")
        if "idi" in metrics:
            from unlearn_fast.evaluation.idi import idi_config

            if opts.idi is not None:
                idi_config(opts.idi)  # validates
        return opts


def _gallery(data, opts: RepresentationOptions, seed: int) -> list[int] | None:
    n = len(data.targets["train"])
    if opts.knn_gallery_max is None or n <= opts.knn_gallery_max:
        return None
    g = torch.Generator().manual_seed(seed + 7)
    return sorted(torch.randperm(n, generator=g)[: opts.knn_gallery_max].tolist())


def _retrieval(model: nn.Module, original: nn.Module, data, forget: list[int], opts: RepresentationOptions,
               device, seed: int, batch_size: int, cache: dict[str, Any]) -> dict[str, Any]:
    from unlearn_fast.evaluation.knn import knn_retrieval
    from unlearn_fast.evaluation.features import penultimate_features

    gal = _gallery(data, opts, seed)
    gal_ds = data.train if gal is None else Subset(data.train, gal)
    q_idx = torch.nonzero(data.class_mask("test", classes=forget)).flatten().tolist()
    q_ds = Subset(data.test, q_idx)

    def feats(m):
        gf, gy = penultimate_features(m, gal_ds, device, batch_size)
        qf, qy = penultimate_features(m, q_ds, device, batch_size)
        return gf, gy, qf, qy

    key = repr(("knn_ref", forget, opts.knn_k, gal is None, len(gal or ())))
    if cache.get("knn_ref_key") != key:
        cache["knn_ref_neighbors"] = knn_retrieval(*feats(original), forget, opts.knn_k)["neighbors"]
        cache["knn_ref_key"] = key
    ref = cache["knn_ref_neighbors"]
    r = knn_retrieval(*feats(model), forget, opts.knn_k, reference_idx=ref)
    nb = r.pop("neighbors")
    to_train = (lambda j: int(j)) if gal is None else (lambda j: gal[int(j)])  # noqa: E731
    show = min(opts.knn_show, len(q_idx))
    r["knn_examples"] = {"queries": q_idx[:show], "neighbors": [[to_train(j) for j in nb[i]] for i in range(show)]}
    return r


def _downstream(model: nn.Module, retrained: nn.Module | None, data, opts: RepresentationOptions, device,
                batch_size: int, cache: dict[str, Any]) -> dict[str, Any]:
    from unlearn_fast.evaluation.knn import knn_downstream, load_knn_data

    names = knn_data_names(opts.knn_data)
    acc, gap = {}, {}
    for spec in opts.knn_data:
        dkey = f"knn_data::{spec}"
        if dkey not in cache:
            cache[dkey] = load_knn_data(spec, data)
        ds = cache[dkey]
        a = knn_downstream(model, ds, k=opts.knn_k, device=device, batch_size=batch_size)
        acc[names[spec]] = a
        if retrained is not None:
            rkey = f"knn_retrained::{spec}::{opts.knn_k}"
            if rkey not in cache:
                cache[rkey] = a if model is retrained else knn_downstream(retrained, ds, k=opts.knn_k, device=device,
                                                                          batch_size=batch_size)
            gap[names[spec]] = a - cache[rkey]
    return {"knn": acc, "knn_gap": gap if retrained is not None else None, "knn_specs": dict(zip(names.values(), names))}


def representation_metrics(model: nn.Module, original: nn.Module, retrained: nn.Module | None, data,
                           forget: Sequence[int], opts: RepresentationOptions, *, device, seed: int = 0,
                           batch_size: int = 512, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics named in ``opts.metrics`` for ``model`` (keys: ``probe_*``, ``MIA*``, ``IDI``, ``IDI_abs``,
    ``idi``, ``knn_*``, ``knn`` / ``knn_gap`` per downstream set). IDI and the k-NN gaps need ``retrained``
    (``None`` with a note otherwise)."""
    cache = cache if cache is not None else {}
    forget = sorted({int(c) for c in forget})
    out: dict[str, Any] = {"representation": list(opts.metrics), "notes": []}
    if "probe" in opts.metrics:
        from unlearn_fast.evaluation.probe import linear_probe

        out.update(linear_probe(model, data, forget, fraction=opts.probe_fraction, min_per_class=opts.probe_min_per_class,
                                device=device, seed=seed, batch_size=batch_size))
    if "mia" in opts.metrics:
        from unlearn_fast.evaluation.mia import svc_mia

        out.update(svc_mia(model, data, forget, feature=opts.mia_feature, attack=opts.mia_attack, device=device,
                           seed=seed, batch_size=batch_size))
    if "idi" in opts.metrics:
        if retrained is None:
            out.update({"IDI": None, "IDI_abs": None})
            out["notes"].append("IDI needs the retrained model")
        else:
            from unlearn_fast.evaluation.idi import compute_idi

            cfg = opts.idi if opts.idi is not None else ("ec" if torch.device(device).type == "cuda" else "cpu")
            r = compute_idi(model, original, retrained, data, forget, layers=opts.idi_layers, config=cfg,
                            device=device, seed=seed, cache=cache)
            out.update({"IDI": r["IDI"], "IDI_abs": r["IDI_abs"], "idi": r})
            if r["note"]:
                out["notes"].append(r["note"])
    if "knn" in opts.metrics:
        out.update(_retrieval(model, original, data, forget, opts, device, seed, batch_size, cache))
        if opts.knn_data:
            out.update(_downstream(model, retrained, data, opts, device, batch_size, cache))
            if retrained is None:
                out["notes"].append("k-NN gaps need the retrained model")
    return out


def prepare_cache(opts: RepresentationOptions, data) -> dict[str, Any]:
    """A fresh comparison cache with the downstream ``knn_data`` sets loaded - so that a bad spec fails
    (ValueError naming it) before any training starts."""
    from unlearn_fast.evaluation.knn import load_knn_data

    return {f"knn_data::{spec}": load_knn_data(spec, data) for spec in opts.knn_data}


def wf_representation_per_class(wf, original: nn.Module, retrained: dict[int, nn.Module], data,
                                classes: Sequence[int], opts: RepresentationOptions, *, device, seed: int = 0,
                                batch_size: int = 512) -> dict[int, dict[str, Any]]:
    """Representation metrics of a WF-Net per class (WF-Net + EC protocol): for each class c, gate row c is
    baked into a plain model (``unlearn_fast.nn.bake``: the deployable artefact, DESIGN §3) and measured
    against the original and ``retrained[c]`` (the model trained without c; IDI and k-NN gaps are None
    for a class without one). Returns ``{c: representation_metrics(...)}``."""
    from unlearn_fast.nn import bake

    out = {}
    for c in classes:
        c = int(c)
        plain = bake(wf, c).to(device)
        out[c] = representation_metrics(plain, original, retrained.get(c), data, [c], opts, device=device, seed=seed,
                                        batch_size=batch_size, cache={})
    return out
