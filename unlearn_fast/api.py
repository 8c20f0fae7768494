"""The Python faces of unlearn_fast: :func:`train` and :func:`evaluate` (DESIGN §2 data flow).

A run directory holds one model recipe on one dataset; each step writes its file there and the next
step reads it, so any step can be stopped and started again with the same call:

    runs/NAME/config.yaml  splits.json  original.safetensors  retrain/c<k>.safetensors  wf.safetensors
              metrics.json  report.md  figures/*.png  log.csv  timing.json  state/
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = ["train", "evaluate", "compare", "TrainResult", "default_device"]

_RUN_KEYS = ("model", "data", "seed", "img_size", "in_chans", "val_fraction", "test_fraction", "max_per_class")


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained / unlearned model, its metrics (if evaluated) and the run dir."""

    model: Any
    metrics: dict[str, Any] | None
    run_dir: Path
    info: dict[str, Any] = field(default_factory=dict)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_run_dir(model: str, data: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{data}").strip("_")
    return Path("runs") / slug


def _default_img_size(model: str, data: str) -> int | None:
    # The small CNN runs digits at their native 8x8; the paper backbones at 32 px (WF-Net App. A).
    return None if model == "small_cnn" else 32


def _open_run(run_dir: Path, run_cfg: dict[str, Any]) -> dict[str, Any]:
    """Create the run dir or check that it holds the same run; returns the stored config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if path.exists():
        old = yaml.safe_load(path.read_text()) or {}
        diff = {k: (old.get(k), run_cfg[k]) for k in _RUN_KEYS if k in run_cfg and run_cfg[k] is not None
                and old.get(k) is not None and old.get(k) != run_cfg[k]}
        if diff:
            raise ValueError(f"{run_dir} holds another run ({', '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in diff.items())}); "
                             "use another run_dir or the same settings")
        merged = {**run_cfg, **{k: v for k, v in old.items() if k in _RUN_KEYS and v is not None}}
    else:
        merged = dict(run_cfg)
    path.write_text(yaml.safe_dump({**(yaml.safe_load(path.read_text()) if path.exists() else {}), **merged}, sort_keys=False))
    return merged


def _context(run_dir: Path, cfg: dict[str, Any], device: torch.device, progress: bool):
    from unlearn_fast.data import load
    from unlearn_fast.methods import RunContext

    data_kwargs = {k: cfg[k] for k in ("img_size", "in_chans", "val_fraction", "test_fraction", "max_per_class") if cfg.get(k) is not None}
    data = load(cfg["data"], seed=cfg.get("seed", 0), **data_kwargs)
    splits = run_dir / "splits.json"
    if splits.exists():  # a resumed run must see the same samples in the same splits
        data.check_manifest(json.loads(splits.read_text()))
    else:
        splits.write_text(json.dumps(data.manifest()))
    return RunContext(data=data, model_name=cfg["model"], run_dir=run_dir, device=device, seed=cfg.get("seed", 0),
                      progress=progress)


def prepare_run(model: str, data: str, run_dir: str | Path | None, *, seed: int = 0,
                device: str | torch.device | None = None, img_size: int | None = None, in_chans: int | None = None,
                progress: bool = True):
    """Open (or re-open and check) a run directory and load its data: ``(run_dir, device, cfg, ctx)``."""
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(model, data)
    device = torch.device(device) if device is not None else default_device()
    if img_size is None:
        img_size = _default_img_size(model, data)
    cfg = _open_run(run_dir, {"model": model, "data": data, "seed": seed, "img_size": img_size, "in_chans": in_chans})
    return run_dir, device, cfg, _context(run_dir, cfg, device, progress)


def _record_time(run_dir: Path, key: str, seconds: float) -> None:
    path = run_dir / "timing.json"
    t = json.loads(path.read_text()) if path.exists() else {}
    t[key] = seconds
    path.write_text(json.dumps(t, indent=1))


def train(method: str = "wf", model: str = "small_cnn", data: str = "digits", run_dir: str | Path | None = None, *,
          seed: int = 0, device: str | torch.device | None = None, img_size: int | None = None,
          in_chans: int | None = None, evaluate: bool | None = None, retrain: bool = False,
          forget: list[int] | str | None = None,
          progress: bool = True, original_hparams: dict[str, Any] | None = None, **hparams: Any) -> TrainResult:
    """Train or unlearn with ``method`` (see ``unlearn_fast.methods.list_methods()``).

    ``wf`` trains the original model first when the run dir has none (``original_hparams`` override its
    recipe), untrains all classes, and - unless ``evaluate=False`` - evaluates every class and writes
    the report. ``retrain=True`` also trains the per-class retrained models that Act-Dist / JS-Div need.
    Every keyword in ``hparams`` overrides the method's default (``preset="paper"`` for WF's paper values).
    """
    from unlearn_fast.methods import create_method

    run_dir, device, cfg, ctx = prepare_run(model, data, run_dir, seed=seed, device=device, img_size=img_size,
                                            in_chans=in_chans, progress=progress)
    meth = create_method(method, **hparams)
    if method not in ("original", "retrain") and not (run_dir / "original.safetensors").exists():
        t0 = time.perf_counter()
        create_method("original", **(original_hparams or {})).run(ctx)
        _record_time(run_dir, "original_s", time.perf_counter() - t0)
    if forget is not None:  # after the original exists: "similar:K:SPEC" needs its features
        ctx.forget = _forget_classes(forget, ctx)
    if retrain and method != "retrain":
        t0 = time.perf_counter()
        # WF needs one model per class; a forget request needs one model without all its classes
        together = ctx.forget is not None and len(ctx.forget) > 1
        create_method("retrain", together=together, **(original_hparams or {})).run(ctx)
        _record_time(run_dir, "retrain_s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = meth.run(ctx)
    if "skipped" not in out.info:
        _record_time(run_dir, f"{method}_s", time.perf_counter() - t0)
    (run_dir / f"{method}.hparams.yaml").write_text(yaml.safe_dump({"preset": meth.preset, **_plain(meth.hparams())}, sort_keys=False))
    metrics = None
    if evaluate if evaluate is not None else method == "wf":
        metrics = globals()["evaluate"](run_dir, device=device, progress=progress)
    return TrainResult(out.model, metrics, run_dir, out.info)


def _forget_classes(forget: list[int] | str, ctx) -> list[int]:
    """Explicit class list (ints or "1,4"). Other request forms are resolved by ``unlearn_fast.forget``."""
    if isinstance(forget, str):
        try:
            from unlearn_fast.forget import resolve_forget_request
        except ImportError:
            return [int(c) for c in forget.split(",")]
        return resolve_forget_request(forget, ctx)
    classes = sorted({int(c) for c in forget})
    bad = [c for c in classes if not 0 <= c < ctx.data.num_classes]
    if bad or not classes:
        raise ValueError(f"forget classes must be a non-empty subset of [0, {ctx.data.num_classes}), got {forget}")
    return classes


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def evaluate(run_dir: str | Path, *, device: str | torch.device | None = None, batch_size: int = 512,
             insertion_steps: int = 10, splits: tuple[str, ...] = ("test", "train"), progress: bool = True,
             report: bool = True) -> dict[str, Any]:
    """Evaluate the WF-Net of ``run_dir`` on every class; writes ``metrics.json`` and ``report.md``."""
    from unlearn_fast.evaluation.report import write_report
    from unlearn_fast.evaluation.wf_eval import evaluate_wf
    from unlearn_fast.models.io import load_model
    from unlearn_fast.nn import load_wf

    run_dir = Path(run_dir)
    cfgp = run_dir / "config.yaml"
    if not cfgp.exists():
        raise FileNotFoundError(f"{cfgp} is missing: {run_dir} is not an unlearn_fast run directory")
    for need in ("original.safetensors", "wf.safetensors"):
        if not (run_dir / need).exists():
            raise FileNotFoundError(f"{run_dir / need} is missing: run `unlearn-fast train --method wf --run-dir {run_dir}` first")
    cfg = yaml.safe_load(cfgp.read_text())
    device = torch.device(device) if device is not None else default_device()
    ctx = _context(run_dir, cfg, device, progress)
    original = load_model(run_dir / "original.safetensors", device)
    wf = load_wf(run_dir / "wf.safetensors", original, device)
    retrained = {}
    for p in sorted((run_dir / "retrain").glob("c*.safetensors")) if (run_dir / "retrain").exists() else []:
        retrained[int(p.stem[1:])] = load_model(p, device)
    t0 = time.perf_counter()
    metrics = evaluate_wf(wf, original, ctx.data, device, retrained=retrained, batch_size=batch_size,
                          splits=splits, insertion_steps=insertion_steps, seed=cfg.get("seed", 0), progress=progress)
    _record_time(run_dir, "evaluate_s", time.perf_counter() - t0)
    metrics["run"] = {"name": run_dir.name, "model": cfg["model"], "data": cfg["data"], "seed": cfg.get("seed", 0),
                      "device": str(device), "torch": torch.__version__}
    timing = run_dir / "timing.json"
    if timing.exists():
        metrics["timing"] = json.loads(timing.read_text())
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=True))
    if report:
        write_report(run_dir, metrics)
    return metrics


def compare(*args: Any, **kwargs: Any):
    """Several unlearning methods x one forget request x one original model -> metrics.json, report.md and
    figures (EC Table 1, Fig. 2, Fig. 3); see :func:`unlearn_fast.compare.compare` for the arguments."""
    from unlearn_fast.compare import compare as _compare

    return _compare(*args, **kwargs)
