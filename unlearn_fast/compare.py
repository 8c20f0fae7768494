"""``unlearn_fast.compare``: several unlearning methods x one forget request x one original model, in the
shape of EC Table 1 (issue 6 item 8).

    res = unlearn_fast.compare(methods=["ft", "ga", "ec"], model="small_cnn", data="digits",
                               forget="random:2", run_dir="runs/cmp", hparams={"ga": {"lr": 1e-3}})

In ``run_dir`` it trains (once) the original model and the model retrained without all forget classes
(``retrain/f<c1>-<c2>....safetensors``), runs every method on the same original model and forget
request, times each method's wall clock, evaluates each one with
:func:`unlearn_fast.evaluation.unlearn_eval.evaluate_unlearned`, and writes

    metrics.json   {"kind": "compare", "forget": [...], "order": [...], "rows": {name: {...}}, ...}
    report.md      the table (FA, RA, TFA, TRA, CKA, JS, ZRF, H-Mean, time) with Original and Retrained rows
    figures/compare_cka_layers.png   layer-wise CKA to the original model (EC Fig. 2)
    figures/compare_tsne.png         t-SNE of forget vs nearest retain classes (EC Fig. 3)

A method that raises is recorded as failed (with the error) and the others still run. metrics.json is
written after every method, so re-running the same call skips the methods already evaluated (a
method interrupted mid-way resumes from its own checkpoint in ``state/``). A run directory holds ONE
forget request for the unlearning methods (their files are ``<method>.safetensors``): asking for
another one there is an error.
"""
from __future__ import annotations

import json
import math
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from unlearn_fast.run_files import atomic_write_json

__all__ = ["compare", "CompareResult"]


@dataclass
class CompareResult:
    """What :func:`compare` returns: the metrics dict (as in metrics.json), and where the files are."""

    metrics: dict[str, Any]
    run_dir: Path
    report: Path
    figures: dict[str, str]
    health: dict[str, Any] | None = None


def _load_state(path: Path, forget: list[int]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it to start the comparison again") from exc
    if old.get("kind") != "compare":
        raise ValueError(f"{path} holds another kind of result (a WF evaluation?); run the comparison in its own "
                         "run_dir (it trains the original model there) or move that metrics.json away")
    if old.get("forget") != forget:
        raise ValueError(f"{path.parent} holds a comparison for forget classes {old.get('forget')}, asked {forget}: "
                         "one run directory holds one forget request; use another run_dir")
    return old


def _check_existing_model(path: Path, forget: list[int]) -> None:
    """A ``<method>.safetensors`` left by an earlier run must be for the same forget request."""
    if not path.exists():
        return
    from unlearn_fast.models.io import load_tensors

    _, meta = load_tensors(path)
    if "forget" in meta and sorted(int(c) for c in meta["forget"]) != forget:
        raise ValueError(f"{path} was unlearned for forget classes {meta['forget']}, this comparison forgets {forget}; "
                         "use another run_dir (one forget request per run directory) or delete that file")


def _near_retain_classes(original, data, forget: list[int], k: int, device) -> list[int]:
    """The ``k`` retain classes whose original class-mean penultimate features (train split) are closest
    (cosine) to the forget classes' mean feature (EC Fig. 3: the retain classes most similar to the forget class)."""
    from unlearn_fast.forget import class_mean_features, similar_classes

    means = class_mean_features(original, data.train, data.num_classes, device)
    target = means[forget].mean(0)
    means = means.clone()
    means[forget] = float("nan")
    return similar_classes(means, target, min(k, data.num_classes - len(forget)))


def _tsne_panels(models: dict[str, Any], data, classes: list[int], device, seed: int, max_per_class: int):
    from unlearn_fast.evaluation.compare_report import tsne_embed
    from unlearn_fast.evaluation.unlearn_eval import penultimate_features

    mask = data.class_mask("test", classes=classes)
    idx = torch.nonzero(mask).flatten()
    y_all = data.targets["test"][idx]
    keep = torch.cat([idx[y_all == c][:max_per_class] for c in classes])
    from torch.utils.data import Subset

    sub = Subset(data.test, keep.tolist())
    panels = {}
    for name, m in models.items():
        f, y = penultimate_features(m, sub, device)
        panels[name] = (tsne_embed(f, seed), y.numpy())
    return panels


def _ec_pretrain_seconds(files) -> float | None:
    """Pre-training seconds recorded in the EC module file(s) (None when unknown or ambiguous)."""
    from unlearn_fast.models.io import load_tensors

    secs = [load_tensors(f)[1].get("seconds") for f in sorted(files)]
    return float(secs[0]) if len(secs) == 1 and secs[0] is not None else None


def compare(methods: Sequence[str], model: str = "small_cnn", data: str = "digits",
            forget: list[int] | str | int | None = None, run_dir: str | Path | None = None, *,
            hparams: dict[str, dict[str, Any]] | None = None, device: str | torch.device | None = None,
            progress: bool = True, seed: int = 0, img_size: int | None = None, in_chans: int | None = None,
            original_hparams: dict[str, Any] | None = None, retrain_hparams: dict[str, Any] | None = None,
            tsne_method: str | None = None, tsne_neighbors: int = 9, tsne_max_per_class: int = 100,
            figures: bool = True, batch_size: int = 512, max_per_class: int | None = None,
            data_fraction: float | None = None, representation: Any = None,
            knn_data: str | Sequence[str] | None = None,
            representation_options: dict[str, Any] | None = None, workers: int | None = None,
            channels_last: bool = False, bf16: bool = False, weights: str | Path | None = None,
            feature_layers: str | Sequence[str] | None = None,
            model_kwargs: dict[str, Any] | None = None) -> CompareResult:
    """Run ``methods`` on one original model and one forget request; evaluate, tabulate and plot them.

    ``forget``: class list, ``"1,4"``, ``"random:K"`` or ``"similar:K:<dataset spec>"`` (resolved after the
    original model exists). ``hparams[method]`` overrides that method's defaults; ``original_hparams``
    the original model's recipe, ``retrain_hparams`` the retrained model's (default: ``original_hparams``).
    ``tsne_method``: the method shown beside Original and Retrained in the t-SNE figure (default: the
    best H-Mean). ``tsne_neighbors``: retain classes shown (EC Fig. 3: the 9 most similar).
    ``representation``: ``"all"`` or a list of ``idi``, ``probe``, ``knn``, ``mia`` computed for every row;
    ``knn_data``: downstream data spec(s) for EC's k-NN columns; ``representation_options``: fields of
    ``evaluation.representation.RepresentationOptions``. ``"wf"`` in ``methods`` untrains WF-Net once (or
    reuses the run's ``wf.safetensors``) and evaluates its gate rows of the forget request baked into a
    plain model (``nn.bake`` / ``nn.compose``). ``workers``, ``channels_last``, ``bf16``: run options
    (``unlearn_fast.methods.run_options``). ``weights`` / ``feature_layers`` / ``model_kwargs``: the model's
    local checkpoint, stage layers and builder options, as in :func:`unlearn_fast.train`.
    """
    from unlearn_fast.forget import precheck_forget_request
    from unlearn_fast.methods import create_method
    from unlearn_fast.methods.run_options import RunOptions
    from unlearn_fast.methods.unlearning import UnlearningMethod
    from unlearn_fast.run_files import RunLock
    from unlearn_fast.runs import model_options, open_run, plan_run

    # -- validate every input before any training or write -----------------------------------
    methods = list(dict.fromkeys(m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()))
    if forget is None:
        raise ValueError("compare: pass forget= (a class list, '1,4', 'random:K' or 'similar:K:<dataset spec>')")
    if not methods:
        raise ValueError("compare: give at least one method (unlearn_fast.methods.list_methods())")
    fixed = [m for m in methods if m in ("original", "retrain")]
    if fixed:
        raise ValueError(f"compare: {fixed} are always rows of the comparison (the reference models); remove them from "
                         "methods (their recipe: original_hparams / --original-set)")
    hparams = dict(hparams or {})
    extra = set(hparams) - set(methods)
    if extra:
        raise ValueError(f"compare: hparams given for {sorted(extra)}, which are not in methods={methods}")
    created = {}
    for name in methods:
        meth = create_method(name, **dict(hparams.get(name) or {}))
        if not isinstance(meth, UnlearningMethod) and name != "wf":
            raise ValueError(f"compare: {name!r} is not a class-unlearning method; compare runs those (unlearn-fast list) "
                             "- WF-Net over every class is `unlearn-fast train --method wf`")
        created[name] = meth
    if original_hparams is not None:
        create_method("original", **original_hparams)
    if retrain_hparams is not None:
        create_method("retrain", **retrain_hparams)
    run_opts = RunOptions.make(workers, channels_last, bf16)
    plan = plan_run(model, data, run_dir, seed=seed, device=device, img_size=img_size, in_chans=in_chans,
                    max_per_class=max_per_class, data_fraction=data_fraction, progress=progress,
                    workers=run_opts.workers, model_kwargs=model_options(weights, feature_layers, model_kwargs))
    run_dir, device, cfg, ctx = plan.run_dir, plan.device, plan.cfg, plan.ctx
    ctx.apply_run_options(run_opts)
    seed = cfg.get("seed", seed)
    pre = precheck_forget_request(forget, ctx)
    for meth in created.values():
        meth.check_inputs(ctx.data)
    from unlearn_fast.evaluation.representation import RepresentationOptions, prepare_cache

    rep_opts = RepresentationOptions.make(representation, knn_data, **(representation_options or {}))
    rep_cache = prepare_cache(rep_opts, ctx.data)  # loads the knn_data sets: a bad spec fails here
    with RunLock(run_dir):
        open_run(plan)
        return _compare_locked(**locals())


def _compare_locked(*, methods, created, forget, pre, plan, run_dir, device, cfg, ctx, seed, original_hparams,
                    retrain_hparams, batch_size, progress, figures, tsne_method, tsne_neighbors, tsne_max_per_class,
                    rep_opts, rep_cache,
                    **_: Any) -> CompareResult:
    from unlearn_fast.evaluation.compare_report import plot_cka_layers, plot_tsne, write_compare_report
    from unlearn_fast.evaluation.health import merge
    from unlearn_fast.evaluation.unlearn_eval import evaluate_unlearned
    from unlearn_fast.forget import resolve_forget_request
    from unlearn_fast.methods import create_method
    from unlearn_fast.methods.base import artefact_meta
    from unlearn_fast.methods.retrain import retrain_together_path
    from unlearn_fast.models.io import load_model
    from unlearn_fast.run_files import fingerprint
    from unlearn_fast.runs import ensure_original, original_health, record_time, stage_verdicts

    ensure_original(ctx, original_hparams)
    classes = pre if pre is not None else resolve_forget_request(forget, ctx)
    ctx.forget = classes
    tag = "-".join(map(str, classes))

    metrics_path = run_dir / "metrics.json"
    state = _load_state(metrics_path, classes) or {"kind": "compare", "rows": {}}
    state.update({"kind": "compare", "forget": classes, "forget_request": str(forget) if not isinstance(forget, list) else ",".join(map(str, forget)),
                  "class_names": list(ctx.data.class_names), "order": ["original", "retrain", *methods],
                  "run": {"name": run_dir.name, "model": cfg["model"], "data": cfg["data"], "seed": seed,
                          "device": str(device), "torch": torch.__version__}})
    rows: dict[str, Any] = state["rows"]

    rpath = retrain_together_path(run_dir, classes)
    rhp = retrain_hparams if retrain_hparams is not None else original_hparams
    rout = create_method("retrain", together=True, **(rhp or {})).run(ctx)
    if "skipped" not in rout.info:
        for v in rout.info.values():
            if isinstance(v, dict) and "seconds" in v:
                record_time(run_dir, f"retrain_f{tag}_s", v["seconds"])
    original = load_model(run_dir / "original.safetensors", device)
    retrained = load_model(rpath, device)
    orig_health, _ = original_health(ctx)
    timing_path = run_dir / "timing.json"
    eval_settings = {"batch_size": batch_size, "seed": seed, "forget": classes, "representation": repr(rep_opts),
                     "original": artefact_meta(run_dir / "original.safetensors").get("digest"),
                     "retrained": artefact_meta(rpath).get("digest")}

    def timing(key: str) -> float | None:
        t = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        return t.get(key)

    def evaluate(m):
        return evaluate_unlearned(_plain_model(m, classes), original, ctx.data, classes, retrained=retrained,
                                  device=device, batch_size=batch_size, seed=seed, progress=progress,
                                  representation=rep_opts, cache=rep_cache)

    changed = False
    ref_stages = {"original": artefact_meta(run_dir / "original.safetensors").get("stages") or {},
                  "retrain": artefact_meta(rpath).get("stages") or {}}
    for name, m, tkey, path in (("original", original, "original_s", run_dir / "original.safetensors"),
                                ("retrain", retrained, f"retrain_f{tag}_s", rpath)):
        fp = fingerprint({"model": artefact_meta(path).get("digest"), **eval_settings})
        if rows.get(name, {}).get("status") != "ok" or rows[name].get("fingerprint") != fp:
            changed = True
            rows[name] = {"status": "ok", **evaluate(m), "time_s": timing(tkey), "fingerprint": fp}
        v = merge(orig_health if name == "original" else None, *stage_verdicts(ref_stages[name]).values())
        rows[name]["health"] = v
        atomic_write_json(metrics_path, state)

    for name in methods:
        meth = created[name]
        prev = rows.get(name)
        try:
            hp_now = {"preset": meth.preset, **meth.hparams()}
            out_path = run_dir / f"{name}.safetensors"
            _check_existing_model(out_path, classes)
            resumed = any(ctx.state_dir.glob(f"{name}.*.pt"))
            shared_before = set(run_dir.glob("ec_modules*.safetensors"))
            out = meth.run(ctx)
            meta = artefact_meta(out_path)
            fp = fingerprint({"model": meta.get("digest"), "made_by": meta.get("fingerprint"), **eval_settings})
            if prev and prev.get("status") == "ok" and prev.get("fingerprint") == fp:
                continue  # finished and evaluated with these settings: resume skips it
            changed = True
            stages = meta.get("stages") or {}
            seconds = sum(float(s.get("seconds", 0.0)) for s in stages.values()) if stages else timing(f"{name}_s")
            if "skipped" not in out.info and seconds is not None:
                record_time(run_dir, f"{name}_s", seconds)
            row = evaluate(out.model)
            extra = {}
            if name == "ec" or name.endswith("+ec"):
                # EC's SupCon pre-training of the modules runs once per run dir and is reused by every EC
                # method: charge it to each of them, so the times compare like for like.
                now = set(run_dir.glob("ec_modules*.safetensors"))
                pre_s = _ec_pretrain_seconds(now - shared_before or shared_before)
                if pre_s is not None:
                    extra["ec_pretrain_s"] = pre_s
                    if not (now - shared_before) and seconds is not None:
                        seconds += pre_s  # reused: its pre-training is part of its cost too
            rows[name] = {"status": "ok", **row, "time_s": seconds, "resumed": bool(resumed), "hparams": hp_now,
                          "fingerprint": fp, "stages": stages, **extra}
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing method is reported; the others still run
            changed = True
            tb = traceback.format_exc().strip().splitlines()
            rows[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-12:],
                          "hparams": {"preset": meth.preset, **meth.hparams()}}
        atomic_write_json(metrics_path, state)
    for name in methods:
        rows[name]["health"] = _row_health(name, rows[name], rows["original"], ctx.data.num_classes, stage_verdicts)
    state["health"] = _overall_health([rows[n]["health"] for n in ("original", "retrain", *methods)], rows, methods)
    atomic_write_json(metrics_path, state)

    ok = [n for n in methods if rows.get(n, {}).get("status") == "ok"]
    old_figs = dict(state.get("figures") or {})
    if (figures and not changed and state.get("figure_methods") == ok and {"cka_layers", "tsne"} <= set(old_figs)
            and all((run_dir / f).exists() for f in old_figs.values()) and tsne_method in (None, state.get("tsne", {}).get("method"))):
        figures = False  # nothing new since the figures were drawn: keep them
        figs = old_figs
    else:
        figs = {}
    state["cka_layer"] = rows["original"]["cka_layer"]
    state["cka_layers_order"] = list(rows["original"]["cka_layers"])
    if figures:
        figs["cka_layers"] = str(plot_cka_layers(state, run_dir / "figures" / "compare_cka_layers.png").relative_to(run_dir))
        show = tsne_method if tsne_method is not None else (max(ok, key=lambda n: _score(rows[n])) if ok else None)
        note = ""
        if show is not None and rows.get(show, {}).get("status") != "ok":
            note = f" (tsne_method={show!r} did not finish in this comparison; showing the best H-Mean instead)"
            show = max(ok, key=lambda n: _score(rows[n])) if ok else None
        panel_models = {"original": original, "retrain": retrained}
        if show is not None:
            panel_models[show] = (_plain_model(created["wf"].run(ctx).model, classes) if show == "wf"
                                  else load_model(run_dir / f"{show}.safetensors", device))
        near = _near_retain_classes(original, ctx.data, classes, tsne_neighbors, device)
        panels = _tsne_panels(panel_models, ctx.data, classes + near, device, seed, tsne_max_per_class)
        figs["tsne"] = str(plot_tsne(panels, classes, ctx.data.class_names, run_dir / "figures" / "compare_tsne.png").relative_to(run_dir))
        from unlearn_fast.evaluation.compare_report import plot_compare_knn

        knn_fig = plot_compare_knn(state, ctx.data, run_dir / "figures" / "compare_knn.png")
        if knn_fig is not None:
            figs["knn"] = str(knn_fig.relative_to(run_dir))
        state["tsne_note"] = (f"t-SNE of the penultimate features on the test split: forget classes {classes} and the "
                              f"{len(near)} retain classes nearest to them under the original model {near}; "
                              f"method shown: {show}{note}.")
        state["tsne"] = {"method": show, "retain_classes": near}
        state["figure_methods"] = ok
    state["figures"] = figs
    atomic_write_json(metrics_path, state)
    report = write_compare_report(run_dir, state, figs)
    return CompareResult(json.loads(metrics_path.read_text()), run_dir, report, figs, state["health"])


def _row_health(name: str, row: dict[str, Any], original: dict[str, Any], num_classes: int, stage_verdicts) -> dict:
    """A method's verdict: it ran; its stages took steps; each forget class (per class when the row has
    ``per_class`` test accuracies) left the original's accuracy; retained accuracy held; numbers finite."""
    from unlearn_fast.evaluation.health import finite_verdict, forget_verdict, merge, retain_verdict

    if row.get("status") != "ok":
        return {"status": "fail", "reasons": [f"{name}: failed - {row.get('error')}"], "notes": []}
    per = row.get("per_class") or {}
    o_per = original.get("per_class") or {}
    if per.get("TFA") and o_per.get("TFA"):
        cls = sorted(int(c) for c in per["TFA"])
        fv = forget_verdict([per["TFA"][str(c)] for c in cls], [o_per["TFA"].get(str(c)) for c in cls], cls,
                            [str(c) for c in range(num_classes)], name)
    else:
        fv = forget_verdict([row["TFA"]], [original["TFA"]], [0], ["(forget classes together)"], name)
    return merge(*stage_verdicts(row.get("stages") or {}).values(), fv,
                 retain_verdict(row["TRA"], original["TRA"], num_classes, name),
                 finite_verdict({k: row.get(k) for k in ("FA", "RA", "TFA", "TRA")}, name))


def _overall_health(verdicts: list[dict], rows: dict[str, Any], methods: list[str]) -> dict:
    from unlearn_fast.evaluation.health import merge

    out = merge(*verdicts)
    out["methods"] = {n: rows[n]["health"]["status"] for n in methods}
    return out


def _plain_model(m, classes: list[int]):
    """A WF-Net (``nn.WFModel``) becomes the plain model with the forget request's gate row(s) baked in
    (``nn.bake`` for one class, ``nn.compose`` for several); any other model is returned as is."""
    from unlearn_fast.nn import WFModel, bake, compose

    if isinstance(m, WFModel):
        return bake(m, classes[0]) if len(classes) == 1 else compose(m, classes)
    return m


def _score(row: dict[str, Any]) -> float:
    v = row.get("H-Mean")
    return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


class _CallableModule(types.ModuleType):
    """``unlearn_fast.compare`` is this module once imported; calling it calls :func:`compare`, so that
    ``unlearn_fast.compare(methods=[...], ...)`` works whatever was imported first."""

    def __call__(self, *args: Any, **kwargs: Any) -> CompareResult:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
