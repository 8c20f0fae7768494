"""Opening a run directory: validate everything first, write nothing until then (DESIGN §2).

:func:`plan_run` checks the run directory, the device, the model name and the data (loading it and
checking its classes) and returns a :class:`RunPlan` without touching the disk; :func:`open_run`,
called under the run's lock, then creates the directory and writes ``config.yaml`` and
``splits.json``. A failed command therefore leaves the directory exactly as it was. Used by
:mod:`unlearn_fast.api` and :mod:`unlearn_fast.compare` (which do not import each other).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from unlearn_fast.run_files import atomic_write_json, atomic_write_text, check_writable_dir

__all__ = ["RunPlan", "plan_run", "open_run", "check_device", "default_device", "record_time", "read_config",
           "RUN_KEYS", "ensure_original", "stage_verdicts", "original_health"]

RUN_KEYS = ("model", "data", "seed", "img_size", "in_chans", "val_fraction", "test_fraction", "max_per_class",
            "data_fraction", "model_kwargs")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | torch.device | None) -> torch.device:
    """The device to run on, or one ValueError line saying why it cannot be used."""
    if device is None:
        device = default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is visible to torch (torch.cuda.is_available() is "
                             "False); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    elif d.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if d.type == "cuda" and d.index is None:
        from unlearn_fast.distributed import is_distributed, local_rank

        if is_distributed():  # torchrun: each rank on its own GPU
            d = torch.device("cuda", local_rank())
    return d


def _default_run_dir(model: str, data: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{data}").strip("_")
    return Path("runs") / slug


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """``run_dir/config.yaml`` (None when absent); a corrupt file is one clear error."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt ({type(exc).__name__}); delete it (the run's settings are recorded "
                         "again from the next command) or use another run_dir") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is corrupt (not a mapping); delete it or use another run_dir")
    return cfg


@dataclass
class RunPlan:
    """A validated run: where, on what device, with which settings and data. Nothing written yet."""

    run_dir: Path
    device: torch.device
    cfg: dict[str, Any]
    ctx: Any                               # methods.RunContext
    data_warnings: list[str] = field(default_factory=list)


def model_options(weights: str | Path | None = None, feature_layers: str | Any = None,
                  model_kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The model builder options of a run: ``weights`` (a local checkpoint), ``feature_layers`` (``"a,b,c"``
    or a list) and any other builder kwargs; None when there are none."""
    mk = dict(model_kwargs or {})
    if weights is not None:
        mk["weights"] = str(weights)
    if feature_layers is not None:
        from unlearn_fast.models.stages import parse_layer_names

        mk["feature_layers"] = parse_layer_names(feature_layers)
    return mk or None


def plan_run(model: str, data: str, run_dir: str | Path | None, *, seed: int = 0,
             device: str | torch.device | None = None, img_size: int | None = None, in_chans: int | None = None,
             max_per_class: int | None = None, data_fraction: float | None = None, progress: bool = True,
             workers: int | None = None, model_kwargs: dict[str, Any] | None = None) -> RunPlan:
    """Validate a run (see the module docstring); raises ValueError / FileNotFoundError with one line.
    ``workers``: the run option (processes decoding image files while the data loads)."""
    from unlearn_fast.data import load
    from unlearn_fast.data.checks import check_bundle
    from unlearn_fast.methods import RunContext
    from unlearn_fast.models import is_model_name, list_models, list_prefixes

    if not isinstance(model, str) or not is_model_name(model):
        raise ValueError(f"unknown model {model!r}; available: {', '.join(list_models())}"
                         + "".join(f"; {h}" for h in list_prefixes().values()))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, v, lo in (("img_size", img_size, 1), ("max_per_class", max_per_class, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if in_chans is not None and in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    if data_fraction is not None and (isinstance(data_fraction, bool) or not isinstance(data_fraction, (int, float))
                                      or not 0 < data_fraction <= 1):
        raise ValueError(f"data_fraction must be in (0, 1], got {data_fraction!r}")
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(model, data)
    check_writable_dir(run_dir)
    dev = check_device(device)
    if img_size is None and model != "small_cnn":
        img_size = 32  # the paper backbones at 32 px (WF-Net App. A); the small CNN keeps the data's size
    asked = {"model": model, "data": data, "seed": seed, "img_size": img_size, "in_chans": in_chans,
             "max_per_class": max_per_class, "data_fraction": data_fraction, "model_kwargs": model_kwargs or None}
    old = read_config(run_dir)
    if old:
        diff = {k: (old.get(k), v) for k, v in asked.items() if k in RUN_KEYS and v is not None
                and old.get(k) is not None and old.get(k) != v}
        if diff:
            raise ValueError(f"{run_dir} holds another run ({', '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in diff.items())}); "
                             "use another run_dir or the same settings")
        for k in ("max_per_class", "data_fraction"):
            if (old.get(k) is None) != (asked[k] is None) and asked[k] is not None:
                raise ValueError(f"{run_dir} holds a run without {k}; use another run_dir for a capped run")
        cfg = {**asked, **{k: v for k, v in old.items() if k in RUN_KEYS and v is not None}}
    else:
        cfg = dict(asked)
    kwargs = {k: cfg[k] for k in ("img_size", "in_chans", "val_fraction", "test_fraction", "max_per_class")
              if cfg.get(k) is not None}
    if cfg.get("data_fraction") is not None:
        kwargs["fraction"] = cfg["data_fraction"]
    from unlearn_fast.data.pipeline import load_workers

    bundle = load(cfg["data"], seed=cfg.get("seed", 0), workers=load_workers(workers, dev), **kwargs)
    warnings = check_bundle(bundle)
    splits = run_dir / "splits.json"
    if splits.exists():  # a resumed run must see the same samples in the same splits
        try:
            manifest = json.loads(splits.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{splits} is corrupt; delete it (and the run's models) or use another run_dir") from None
        bundle.check_manifest(manifest)
    mk = dict(cfg.get("model_kwargs") or {})
    if model_kwargs:  # weights= / feature_layers= / builder kwargs: build once so a bad one fails before any work
        from unlearn_fast.models import create

        create(cfg["model"], num_classes=bundle.num_classes, in_chans=bundle.in_chans, img_size=bundle.img_size, **mk)
    ctx = RunContext(data=bundle, model_name=cfg["model"], run_dir=run_dir, device=dev, seed=cfg.get("seed", 0),
                     progress=progress, model_kwargs=mk)
    return RunPlan(run_dir, dev, cfg, ctx, warnings)


def open_run(plan: RunPlan) -> None:
    """Create the run directory and record its settings and splits (call under the run's lock)."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    old = read_config(plan.run_dir) or {}
    merged = {**old, **{k: v for k, v in plan.cfg.items() if v is not None}}
    if merged != old:
        atomic_write_text(plan.run_dir / "config.yaml", yaml.safe_dump(merged, sort_keys=False))
    splits = plan.run_dir / "splits.json"
    if not splits.exists():
        atomic_write_json(splits, plan.ctx.data.manifest(), indent=None)
    for w in plan.data_warnings:
        plan.ctx.say(f"data: {w}")


def record_time(run_dir: Path, key: str, seconds: float) -> None:
    """``timing.json[key] = seconds`` (atomic)."""
    path = Path(run_dir) / "timing.json"
    try:
        t = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        t = {}
    t[key] = seconds
    atomic_write_json(path, t)


# -- steps shared by train() and compare() ------------------------------------------------
def ensure_original(ctx, original_hparams: dict[str, Any] | None):
    """Train the original model when missing, or when ``original_hparams`` (given) differ from its record.
    ``None`` keeps whatever original the run dir holds (its recipe is announced when not the default)."""
    from unlearn_fast.methods import create_method
    from unlearn_fast.methods.base import artefact_meta

    path = ctx.run_dir / "original.safetensors"
    if original_hparams is None and path.exists():
        meta = artefact_meta(path)
        if meta.get("digest") and meta.get("fingerprint"):
            return None
    out = create_method("original", **(original_hparams or {})).run(ctx)
    if "skipped" not in out.info:
        record_time(ctx.run_dir, "original_s", out.info["stages"]["original"]["seconds"])
    return out


def stage_verdicts(records: dict[str, dict]) -> dict[str, Any]:
    from unlearn_fast.evaluation.health import stage_verdict

    return {name: stage_verdict(name, r.get("steps", 0), r.get("min_steps", 0), r.get("notes", ()), r.get("max_steps"))
            for name, r in records.items()}


def original_health(ctx) -> tuple[dict[str, Any], float]:
    """Verdict of the run's original model (test accuracy, its stage) and that accuracy in %."""
    from unlearn_fast.evaluation.accuracy import accuracy
    from unlearn_fast.evaluation.health import merge, original_verdict
    from unlearn_fast.methods.base import artefact_meta
    from unlearn_fast.models.io import load_model

    path = ctx.run_dir / "original.safetensors"
    meta = artefact_meta(path)
    acc = 100.0 * accuracy(load_model(path, ctx.device), ctx.data.test, ctx.device)
    stages = stage_verdicts(meta.get("stages") or {})
    return merge(original_verdict(acc, ctx.data.num_classes), *stages.values()), acc
