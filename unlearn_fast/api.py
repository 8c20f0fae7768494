"""The Python faces of unlearn_fast: :func:`train` and :func:`evaluate` (DESIGN §2 data flow).

A run directory holds one model recipe on one dataset; each step writes its file there and the next
step reads it, so any step can be stopped and started again with the same call:

    runs/NAME/config.yaml  splits.json  original.safetensors  retrain/c<k>.safetensors  wf.safetensors
              metrics.json  report.md  figures/*.png  log.csv  timing.json  state/

Integrity (``unlearn_fast.run_files``): every input is validated before anything is written; each
artefact records the fingerprint of what produced it (data, model, seed, hyper-parameters, the
digests of its inputs) and is recomputed - with everything downstream - when a later call asks for
other settings; files are written atomically; a lock keeps a second process out of a busy run dir.
Every result carries a health verdict (``unlearn_fast.evaluation.health``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from unlearn_fast.run_files import RunLock, atomic_write_json, atomic_write_text, fingerprint
from unlearn_fast.runs import (check_device, default_device, ensure_original, model_options, open_run, original_health,
                               plan_run, read_config, record_time, stage_verdicts)

__all__ = ["train", "evaluate", "compare", "TrainResult", "default_device"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained / unlearned model, its metrics (if evaluated), the run dir,
    and the health verdict (``{"status": "ok" | "warn" | "fail", "reasons": [...], "notes": [...]}``)."""

    model: Any
    metrics: dict[str, Any] | None
    run_dir: Path
    info: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=lambda: {"status": "ok", "reasons": [], "notes": []})


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def train(method: str = "wf", model: str = "small_cnn", data: str = "digits", run_dir: str | Path | None = None, *,
          seed: int = 0, device: str | torch.device | None = None, img_size: int | None = None,
          in_chans: int | None = None, evaluate: bool | None = None, retrain: bool = False,
          forget: list[int] | str | None = None, max_per_class: int | None = None, data_fraction: float | None = None,
          eval_splits: Sequence[str] = ("test", "train"), eval_train_max: int | None = 2000,
          progress: bool = True, original_hparams: dict[str, Any] | None = None, workers: int | None = None,
          channels_last: bool = False, bf16: bool = False, weights: str | Path | None = None,
          feature_layers: str | Sequence[str] | None = None, model_kwargs: dict[str, Any] | None = None,
          **hparams: Any) -> TrainResult:
    """Train or unlearn with ``method`` (see ``unlearn_fast.methods.list_methods()``).

    ``wf`` trains the original model first when the run dir has none (``original_hparams`` override its
    recipe; given, they also replace an original trained with other settings), untrains all classes,
    and - unless ``evaluate=False`` - evaluates every class (``eval_splits``; the train split capped
    at ``eval_train_max`` images, stratified) and writes the report. ``forget`` with ``wf`` bakes
    (one class) or composes (several) those gate rows into a plain model, ``wf-f<classes>.safetensors``,
    and reports its accuracy. ``retrain=True`` also trains the per-class retrained models that
    Act-Dist / JS-Div need. Every keyword in ``hparams`` overrides the method's default (validated
    before any work). ``max_per_class`` / ``data_fraction`` cap the data per class. ``workers``,
    ``channels_last``, ``bf16``: run options (``unlearn_fast.methods.run_options``). ``model`` may be any
    ``timm:<name>`` / ``tv:<name>``; ``weights``: a local .pt/.pth/.safetensors file every model of the run
    starts from (classifier head resized to the data's classes); ``feature_layers``: the stage outputs for EC
    and the CKA / IDI layers (``"a,b,c"``); ``model_kwargs``: builder options (e.g. ``{"depth": 6}``). All are
    recorded in the run's config.yaml and checked (one model build) before any work.
    """
    from unlearn_fast.evaluation.health import merge
    from unlearn_fast.forget import precheck_forget_request, resolve_forget_request
    from unlearn_fast.methods import create_method
    from unlearn_fast.methods.run_options import RunOptions

    # -- validate everything before any work or write --------------------------------------
    meth = create_method(method, **hparams)
    if method == "original" and original_hparams:
        raise ValueError("train(method='original'): pass the recipe as hyper-parameters (or --set), not original_hparams")
    if original_hparams is not None:
        create_method("original", **original_hparams)
    if method == "original" and forget is not None:
        raise ValueError("forget= has no meaning for method='original'; use it with wf or an unlearning method")
    _check_eval_options(eval_splits, eval_train_max)
    opts = RunOptions.make(workers, channels_last, bf16)
    plan = plan_run(model, data, run_dir, seed=seed, device=device, img_size=img_size, in_chans=in_chans,
                    max_per_class=max_per_class, data_fraction=data_fraction, progress=progress,
                    workers=opts.workers, model_kwargs=model_options(weights, feature_layers, model_kwargs))
    ctx, run_dir = plan.ctx, plan.run_dir
    ctx.apply_run_options(opts)
    forget_classes = precheck_forget_request(forget, ctx) if forget is not None else None
    meth.check_inputs(ctx.data)

    with RunLock(run_dir):
        open_run(plan)
        stages: dict[str, dict] = {}
        if method == "original":
            out = meth.run(ctx)
            if "skipped" not in out.info:
                record_time(run_dir, "original_s", out.info["stages"]["original"]["seconds"])
            health, acc = original_health(ctx)
            _write_hparams_record(run_dir, "original")
            info = {**out.info, "test_acc": acc}
            return TrainResult(out.model, None, run_dir, info, merge(health, _data_verdict(plan)))
        ensure_original(ctx, original_hparams)
        if forget is not None:
            ctx.forget = forget_classes if forget_classes is not None else resolve_forget_request(forget, ctx)
        if retrain and method != "retrain":
            together = ctx.forget is not None and len(ctx.forget) > 1
            r = create_method("retrain", together=together, **(original_hparams or {})).run(ctx)
            trained = _retrain_stages(r.info)
            stages.update(trained)
            if trained:
                record_time(run_dir, "retrain_s", sum(s["seconds"] for s in trained.values()))
        out = meth.run(ctx)
        stages.update(out.info.get("stages") or _retrain_stages(out.info))
        if "skipped" not in out.info and out.info.get("stages"):
            record_time(run_dir, f"{method}_s", sum(s["seconds"] for s in out.info["stages"].values()))
        if method != "retrain":
            _write_hparams_record(run_dir, method)
        orig_health, _ = original_health(ctx)
        health = merge(_data_verdict(plan), orig_health, *stage_verdicts(stages).values())
        metrics = None
        if evaluate if evaluate is not None else method == "wf":
            metrics = _evaluate_locked(run_dir, ctx, plan.cfg, device=plan.device, progress=progress,
                                       splits=tuple(eval_splits), train_max=eval_train_max)
            health = merge(health, metrics["health"])
        info = dict(out.info)
        if ctx.forget and method != "retrain":
            info["forget_request"] = _forget_request_result(out.model, ctx, method)
            health = merge(health, info["forget_request"]["health"])
        return TrainResult(out.model, metrics, run_dir, info, health)


def _retrain_stages(info: dict[str, Any]) -> dict[str, dict]:
    out = {}
    for v in info.values():
        if isinstance(v, dict) and "stages" in v:
            out.update(v["stages"])
    return out


def _data_verdict(plan) -> dict[str, Any]:
    return {"status": "warn" if plan.data_warnings else "ok", "reasons": [f"data: {w}" for w in plan.data_warnings],
            "notes": []}


def _check_eval_options(splits: Sequence[str], train_max: int | None) -> None:
    bad = [s for s in splits if s not in ("test", "train", "val")]
    if bad or "test" not in splits:
        raise ValueError(f"eval_splits must include 'test' and may add 'train' / 'val', got {list(splits)}")
    if train_max is not None and (isinstance(train_max, bool) or not isinstance(train_max, int) or train_max < 0):
        raise ValueError(f"eval_train_max must be an integer >= 0 (0: all train images) or None, got {train_max!r}")


def _write_hparams_record(run_dir: Path, method: str) -> None:
    """``<method>.hparams.yaml``: the settings recorded IN the artefact, i.e. those actually used."""
    from unlearn_fast.methods.base import artefact_meta

    meta = artefact_meta(run_dir / f"{'original' if method == 'original' else method}.safetensors")
    if meta.get("hparams") is not None:
        atomic_write_text(run_dir / f"{method}.hparams.yaml", yaml.safe_dump(_plain(meta["hparams"]), sort_keys=False))


def _forget_request_result(model, ctx, method: str) -> dict[str, Any]:
    """The unlearned model of a forget request measured on the test split: accuracy per forget class and on
    the retained classes, against the original model's. WF bakes (one class) or composes (several) the
    request's gate rows into a plain model first and saves it as ``wf-f<classes>.safetensors``."""
    from unlearn_fast.evaluation.accuracy import predict_logits
    from unlearn_fast.evaluation.health import forget_verdict, merge, retain_verdict
    from unlearn_fast.models.io import load_model, save_model
    from unlearn_fast.nn import bake, compose

    classes = list(ctx.forget)
    file = f"{method}.safetensors"
    if method == "wf":
        model = bake(model, classes[0]) if len(classes) == 1 else compose(model, classes)
        file = f"wf-f{'-'.join(map(str, classes))}.safetensors"
        save_model(model, ctx.run_dir / file, method="wf", forget=classes, baked=len(classes) == 1)
    original = load_model(ctx.run_dir / "original.safetensors", ctx.device)

    def per_class(m) -> tuple[list[float], float]:
        logits, y = predict_logits(m, ctx.data.test, ctx.device)
        ok = (logits.argmax(1) == y).double()
        acc_c = [float(100 * ok[y == c].mean()) if (y == c).any() else float("nan") for c in classes]
        keep = ~torch.isin(y, torch.tensor(classes))
        return acc_c, float(100 * ok[keep].mean()) if keep.any() else float("nan")

    acc_f, acc_r = per_class(model)
    o_f, o_r = per_class(original)
    names = ctx.data.class_names
    what = f"{method} forget request"
    health = merge(forget_verdict(acc_f, o_f, classes, names, what), retain_verdict(acc_r, o_r, ctx.data.num_classes, what))
    mode = ("bake" if len(classes) == 1 else "compose (experimental)") if method == "wf" else "unlearned"
    return {"classes": classes, "file": file, "mode": mode,
            "acc_f": dict(zip(map(str, classes), acc_f)), "acc_r": acc_r, "original_acc_f": dict(zip(map(str, classes), o_f)),
            "original_acc_r": o_r, "health": health}


def evaluate(run_dir: str | Path, *, device: str | torch.device | None = None, batch_size: int = 512,
             insertion_steps: int = 10, splits: tuple[str, ...] = ("test", "train"), train_max: int | None = 2000,
             representation: Any = None, knn_data: str | Sequence[str] | None = None,
             progress: bool = True, report: bool = True, workers: int | None = None, channels_last: bool = False,
             bf16: bool = False) -> dict[str, Any]:
    """Evaluate the WF-Net of ``run_dir`` on every class; writes ``metrics.json`` and ``report.md``.

    ``splits``: the test split always, plus ``train`` / ``val``; the train split is capped at
    ``train_max`` images (stratified, seeded; 0 = all) since every image runs under every gate row.
    ``representation`` (``"all"`` or some of ``idi, probe, knn, mia``) and ``knn_data`` add the
    representation metrics per class, each gate row baked into a plain model
    (``metrics["representation_per_class"]``). ``workers``: DataLoader workers of the evaluation passes
    over lazily decoded data; ``channels_last`` / ``bf16`` are training options (accepted with a note:
    evaluation stays fp32 so its metrics compare across runs)."""
    from unlearn_fast.evaluation.representation import RepresentationOptions
    from unlearn_fast.methods import RunContext
    from unlearn_fast.methods.run_options import RunOptions

    _check_eval_options(splits, train_max)
    opts = RunOptions.make(workers, channels_last, bf16)
    rep = RepresentationOptions.make(representation, knn_data) if representation or knn_data else None
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if cfg is None:
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} is missing: {run_dir} is not an unlearn_fast run directory")
    for need in ("original.safetensors", "wf.safetensors"):
        if not (run_dir / need).exists():
            raise FileNotFoundError(f"{run_dir / need} is missing: run `unlearn-fast train --method wf --run-dir {run_dir}` first")
    dev = check_device(device)
    plan = plan_run(cfg["model"], cfg["data"], run_dir, seed=cfg.get("seed", 0), device=dev,
                    img_size=cfg.get("img_size"), in_chans=cfg.get("in_chans"), max_per_class=cfg.get("max_per_class"),
                    data_fraction=cfg.get("data_fraction"), progress=progress, workers=opts.workers)
    ctx: RunContext = plan.ctx
    ctx.apply_run_options(opts)
    if ctx.channels_last or ctx.bf16:
        ctx.say("--channels-last / --bf16 apply to training stages; evaluation runs in fp32 so its metrics "
                "compare across runs")
    with RunLock(run_dir):
        return _evaluate_locked(run_dir, ctx, plan.cfg, device=dev, batch_size=batch_size,
                                insertion_steps=insertion_steps, splits=splits, train_max=train_max,
                                progress=progress, report=report, reuse=False, representation=rep)


def _capped_train(data, train_max: int | None, seed: int):
    """A view of ``data`` whose train split keeps at most ``train_max`` images (stratified, seeded)."""
    import copy

    import numpy as np

    from unlearn_fast.data.datasets import ClassSubset
    from unlearn_fast.data.splits import cap_per_class

    n = len(data.train)
    if not train_max or n <= train_max:
        return data, n
    y = data.targets["train"].numpy()
    per_class = max(1, train_max // data.num_classes)
    keep = cap_per_class(y, per_class, seed)
    view = copy.copy(data)
    view.train = ClassSubset(data.train, np.asarray(keep))
    return view, len(keep)


def _evaluate_locked(run_dir: Path, ctx, cfg: dict[str, Any], *, device, batch_size: int = 512,
                     insertion_steps: int = 10, splits: tuple[str, ...] = ("test", "train"),
                     train_max: int | None = 2000, progress: bool = True, report: bool = True,
                     reuse: bool = True, representation=None) -> dict[str, Any]:
    import time

    from unlearn_fast.evaluation.health import finite_verdict, forget_verdict, merge, original_verdict, retain_verdict
    from unlearn_fast.evaluation.report import write_report
    from unlearn_fast.evaluation.wf_eval import evaluate_wf
    from unlearn_fast.methods.base import artefact_meta
    from unlearn_fast.models.io import load_model
    from unlearn_fast.nn import load_wf

    dev = torch.device(device) if device is not None else default_device()
    orig_meta = artefact_meta(run_dir / "original.safetensors")
    wf_meta = artefact_meta(run_dir / "wf.safetensors")
    if wf_meta.get("inputs", {}).get("original") not in (None, orig_meta.get("digest")):
        raise ValueError(f"{run_dir / 'wf.safetensors'} was untrained from another original model than the one in "
                         f"{run_dir}; run `unlearn-fast train --method wf --run-dir {run_dir}` again")
    rdir = run_dir / "retrain"
    rpaths = sorted(p for p in rdir.glob("c*.safetensors")) if rdir.exists() else []
    settings = {"splits": list(splits), "train_max": train_max, "insertion_steps": insertion_steps,
                "batch_size": batch_size, "seed": cfg.get("seed", 0), "representation": repr(representation)}
    fp = fingerprint({"original": orig_meta.get("digest"), "wf": wf_meta.get("digest") or wf_meta.get("fingerprint"),
                      "retrained": {p.stem: artefact_meta(p).get("digest") for p in rpaths}, "settings": settings})
    mpath = run_dir / "metrics.json"
    if reuse and mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        if old.get("fingerprint") == fp and "health" in old:
            return old
    original = load_model(run_dir / "original.safetensors", dev)
    wf = load_wf(run_dir / "wf.safetensors", original, dev)
    retrained = {int(p.stem[1:]): load_model(p, dev) for p in rpaths}
    data, n_train = _capped_train(ctx.data, train_max if "train" in splits else None, cfg.get("seed", 0))
    t0 = time.perf_counter()
    metrics = evaluate_wf(wf, original, data, dev, retrained=retrained, batch_size=batch_size, splits=splits,
                          insertion_steps=insertion_steps, seed=cfg.get("seed", 0), progress=progress)
    if representation is not None:
        from unlearn_fast.evaluation.representation import wf_representation_per_class

        per = wf_representation_per_class(wf, original, retrained, ctx.data, range(ctx.data.num_classes),
                                          representation, device=dev, seed=cfg.get("seed", 0), batch_size=batch_size)
        metrics["representation_per_class"] = {str(c): v for c, v in per.items()}
    record_time(run_dir, "evaluate_s", time.perf_counter() - t0)
    metrics["fingerprint"] = fp
    metrics["evaluation"] = {**settings, "train_images": n_train if "train" in splits else 0}
    metrics["run"] = {"name": run_dir.name, "model": cfg["model"], "data": cfg["data"], "seed": cfg.get("seed", 0),
                      "device": str(dev), "torch": torch.__version__}
    timing = run_dir / "timing.json"
    if timing.exists():
        metrics["timing"] = json.loads(timing.read_text())
    # -- health ------------------------------------------------------------------------------
    t = metrics["splits"]["test"]
    names = list(ctx.data.class_names)
    k = ctx.data.num_classes
    stage_records = {**(orig_meta.get("stages") or {}), **(wf_meta.get("stages") or {})}
    stages = stage_verdicts(stage_records)
    orig_acc = t["original"].get("acc")
    per_class_r = [retain_verdict(r, o, k, f"gate row {names[c]}")
                   for c, (r, o) in enumerate(zip(t["wf"]["acc_r"], t["original"]["acc_r"]))]
    health = merge(original_verdict(orig_acc, k),
                   *stages.values(),
                   forget_verdict(t["wf"]["acc_f"], t["original"]["acc_f"], list(range(k)), names, "wf"),
                   retain_verdict(metrics["summary"]["rows"]["wf"]["acc_r"], orig_acc, k, "wf mean"),
                   *per_class_r,
                   finite_verdict(metrics["summary"]["rows"]["wf"], "wf summary"))
    if not wf_meta.get("stages"):
        health = merge(health, {"status": "warn", "reasons": ["wf.safetensors has no training record (made by an older "
                                                              "version?): its step count is unknown"], "notes": []})
    health["stages"] = {name: stage_records[name] | {"verdict": v} for name, v in stages.items()}
    metrics["health"] = health
    atomic_write_json(mpath, metrics)
    if report:
        write_report(run_dir, metrics)
    return metrics


def compare(*args: Any, **kwargs: Any):
    """Several unlearning methods x one forget request x one original model -> metrics.json, report.md and
    figures (EC Table 1, Fig. 2, Fig. 3); see :func:`unlearn_fast.compare.compare` for the arguments."""
    from unlearn_fast.compare import compare as _compare

    return _compare(*args, **kwargs)
