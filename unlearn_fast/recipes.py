"""Recipes: one command with fixed settings plus the numbers it must give (issue 11 item 4).

A recipe is a YAML file (shipped ones live in the repository's ``recipes/`` folder, installed as the
package data ``unlearn_fast.recipe_files``)::

    description: real MNIST digits, small CNN, WF-Net over all 10 classes
    command: train                  # demo | train | compare
    runs_on: cpu                    # cpu: fits a few CPU minutes (CI runs it) | gpu: needs a GPU-size budget
    options:                        # exactly the keys `unlearn-fast <command> --config FILE` accepts
      model: small_cnn
      data: idx:${DATA}/mnist5k     # ${DATA}: --data-root DIR, else $UNLEARN_FAST_DATA, else ../shared/data
      method: wf
      hparams: {max_epochs: 6}
    expect:                         # metric path into metrics.json -> [lo, hi] (inclusive)
      summary.rows.wf.acc_r: [88, 97]
      splits.test.wf.acc_f:max: [0, 5]   # ':min' / ':max' / ':mean' reduce a per-class list
    health: [ok, warn]              # accepted verdicts (metrics.json "health.status")
    measured: {hardware: ..., date: ..., command: ..., wall_s: ..., values: {path: value}}
    margin: how the ranges were chosen around the measured values
    # or, for numbers taken from a paper (no run here): source: paper (WF-Net Table 1)

:func:`load` parses and validates (keys, command options, methods, models, hyper-parameters, data
specs, ranges, measured values inside their ranges) before anything runs; :func:`resolve` fills in
``${DATA}``; :func:`run` runs the command through the CLI entry point it is given (so a recipe does
exactly what the same ``--config`` file does, resume included); :func:`check` compares a
metrics.json with the ranges.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from unlearn_fast.config_keys import COMMAND_KEYS

__all__ = ["Recipe", "MetricCheck", "CheckResult", "COMMANDS", "CONFIG_KEYS", "DATA_ENV", "recipe_dir",
           "list_recipes", "load", "load_file", "validate", "resolve_data_root", "resolve", "run", "check",
           "metric_value", "format_check", "format_list"]

COMMANDS = ("demo", "train", "compare")
# The keys each command's --config file accepts (besides hparams / original_hparams): the CLI's own table.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {c: COMMAND_KEYS[c] for c in COMMANDS}
TOP_KEYS = ("description", "command", "runs_on", "options", "expect", "health", "measured", "source", "margin", "notes")
MEASURED_KEYS = ("hardware", "date", "command", "wall_s", "values")
MEASURED_OPTIONAL = ("cpu_s", "load")  # CPU seconds (user + sys) and the machine's load while measuring
VERDICTS = ("ok", "warn", "fail")
REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "min": min, "max": max, "mean": lambda v: sum(v) / len(v)}
DATA_ENV = "UNLEARN_FAST_DATA"
_VAR = re.compile(r"\$\{([^}]*)\}")


@dataclass
class Recipe:
    """A parsed, validated recipe. ``options`` still hold ``${DATA}`` (see :func:`resolve`)."""

    name: str
    path: Path
    description: str
    command: str
    runs_on: str
    options: dict[str, Any]
    expect: dict[str, tuple[float, float]]
    health: tuple[str, ...]
    measured: dict[str, Any] | None = None
    source: str | None = None
    margin: str | None = None
    notes: str | None = None

    @property
    def uses_data_root(self) -> bool:
        return any("${DATA}" in s for s in _strings(self.options))

    @property
    def origin(self) -> str:
        """Where the ranges come from, in one line (for listings and check headers)."""
        if self.measured:
            m = self.measured
            cpu = f", {float(m['cpu_s']):.0f} s CPU" if _is_num(m.get("cpu_s")) else ""
            return f"measured: {m['hardware']}, {m['date']}, {float(m['wall_s']):.0f} s wall{cpu}"
        return f"source: {self.source}"


@dataclass
class MetricCheck:
    """One expectation against one metrics.json: ``status`` is ``in`` | ``out`` | ``missing``."""

    path: str
    lo: float
    hi: float
    value: Any
    status: str
    why: str = ""


@dataclass
class CheckResult:
    metrics: list[MetricCheck]
    health: str | None
    health_ok: bool
    accepted: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.health_ok and all(m.status == "in" for m in self.metrics)


# -- finding and loading ---------------------------------------------------------------------------

def recipe_dir() -> Path:
    """The folder of the shipped recipes: the installed package data, else the source checkout's ``recipes/``."""
    try:
        from importlib.resources import files

        p = Path(str(files("unlearn_fast.recipe_files")))
        if p.is_dir() and any(p.glob("*.yaml")):
            return p
    except Exception:  # noqa: BLE001 - not installed as package data (a source checkout): look beside the package
        pass
    here = Path(__file__).resolve().parent
    for p in (here / "recipe_files", here.parent / "recipes"):
        if p.is_dir():
            return p
    raise FileNotFoundError(f"no recipes folder found (looked for the package data unlearn_fast.recipe_files and "
                            f"{here.parent / 'recipes'}); reinstall unlearn_fast")


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file stems), sorted."""
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def load(name_or_path: str | os.PathLike) -> Recipe:
    """A shipped recipe by name, or any recipe file by path (``.yaml`` / ``.yml``); validated."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if s.endswith((".yaml", ".yml")) or os.sep in s:
        if not p.is_file():
            raise ValueError(f"recipe file {p} does not exist")
        return load_file(p)
    names = list_recipes()
    if s not in names:
        raise ValueError(f"unknown recipe {s!r}; available: {', '.join(names)} (or a path to a recipe .yaml)")
    return load_file(recipe_dir() / f"{s}.yaml")


def load_file(path: str | os.PathLike) -> Recipe:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        raise ValueError(f"recipe {p} is not valid YAML" + (f" (line {where.line + 1})" if where else "")) from None
    return validate(raw, name=p.stem, path=p)


# -- validation ----------------------------------------------------------------------------------------

def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"recipe {name}: {msg}")


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range(name: str, path: str, r: Any) -> tuple[float, float]:
    if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_num(x) for x in r)):
        raise _err(name, f"expect.{path} must be [lo, hi] (two numbers), got {r!r}")
    lo, hi = float(r[0]), float(r[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise _err(name, f"expect.{path} must be finite with lo <= hi, got [{r[0]}, {r[1]}]")
    return lo, hi


def _check_metric_path(name: str, path: str) -> None:
    if not isinstance(path, str) or not path.strip():
        raise _err(name, f"expect keys must be metric paths like summary.rows.wf.acc_r, got {path!r}")
    base, colon, red = path.partition(":")
    if colon and red not in REDUCERS:
        raise _err(name, f"expect.{path}: unknown reducer ':{red}'; use one of {', '.join(':' + r for r in REDUCERS)}")
    if any(not part for part in base.split(".")):
        raise _err(name, f"expect.{path}: empty path segment")


def _check_options(name: str, command: str, opts: dict[str, Any]) -> None:
    from unlearn_fast.data.registry import parse_spec
    from unlearn_fast.methods import create_method
    from unlearn_fast.models import list_models

    known = (*CONFIG_KEYS[command], "hparams", "original_hparams")
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise _err(name, f"options: unknown key(s) {unknown} for `{command}`; known: {sorted(known)}")
    if "run_dir" in opts:
        raise _err(name, "options: run_dir is chosen at run time (`unlearn-fast recipe NAME --run-dir DIR`); remove it")
    for s in _strings(opts):
        for var in _VAR.findall(s):
            if var != "DATA":
                raise _err(name, f"options: unknown variable ${{{var}}} in {s!r}; only ${{DATA}} (the data root) exists")
    model = opts.get("model", "small_cnn")
    if not isinstance(model, str) or (model not in list_models() and model.partition(":")[0] not in ("timm", "tv")):
        raise _err(name, f"options.model {model!r} is not a known model; known: {list_models()} (or timm:NAME / tv:NAME)")
    if "data" in opts:
        try:
            parse_spec(str(opts["data"]).replace("${DATA}", "/data-root"))  # a clear ValueError on a bad kind
        except ValueError as exc:
            raise _err(name, f"options.data: {exc}") from None
    for k in ("hparams", "original_hparams"):
        if opts.get(k) is not None and not isinstance(opts[k], dict):
            raise _err(name, f"options.{k} must be a mapping, got {type(opts[k]).__name__}")
    try:
        if command == "compare":
            methods = opts.get("methods")
            if isinstance(methods, str):
                methods = [m.strip() for m in methods.split(",") if m.strip()]
            if not methods or not isinstance(methods, list) or opts.get("forget") is None:
                raise _err(name, "compare needs options.methods (a list) and options.forget")
            hp = opts.get("hparams") or {}
            extra = sorted(set(hp) - set(methods))
            if extra:
                raise _err(name, f"options.hparams names {extra}, which are not in methods {methods}")
            for m in methods:
                create_method(m, **dict(hp.get(m) or {}))
        else:
            create_method(opts.get("method", "wf") if command == "train" else "wf", **dict(opts.get("hparams") or {}))
        if opts.get("original_hparams") is not None:
            create_method("original", **opts["original_hparams"])
    except ValueError as exc:
        if str(exc).startswith(f"recipe {name}:"):
            raise
        raise _err(name, f"options: {exc}") from None


def validate(raw: Any, name: str = "<recipe>", path: str | os.PathLike = "<memory>") -> Recipe:
    """Check a parsed recipe mapping; raise ValueError (one line, naming the recipe and the fix) if it is wrong."""
    if not isinstance(raw, dict):
        raise _err(name, f"must be a mapping of {', '.join(TOP_KEYS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise _err(name, f"unknown key(s) {unknown}; known: {list(TOP_KEYS)}")
    for k in ("description", "command", "runs_on", "options", "expect", "health"):
        if k not in raw:
            raise _err(name, f"missing key {k!r}")
    command = raw["command"]
    if command not in COMMANDS:
        raise _err(name, f"command must be one of {list(COMMANDS)}, got {command!r}")
    if raw["runs_on"] not in ("cpu", "gpu"):
        raise _err(name, f"runs_on must be cpu or gpu, got {raw['runs_on']!r}")
    opts = raw["options"] or {}
    if not isinstance(opts, dict):
        raise _err(name, f"options must be a mapping, got {type(opts).__name__}")
    _check_options(name, command, opts)
    exp = raw["expect"]
    if not isinstance(exp, dict) or not exp:
        raise _err(name, "expect must map at least one metric path to [lo, hi]")
    expect = {}
    for p, r in exp.items():
        _check_metric_path(name, p)
        expect[p] = _range(name, p, r)
    health = raw["health"]
    health = (health,) if isinstance(health, str) else tuple(health or ())
    if not health or any(h not in VERDICTS for h in health):
        raise _err(name, f"health must be one or more of {list(VERDICTS)}, got {raw['health']!r}")
    measured, source = raw.get("measured"), raw.get("source")
    if (measured is None) == (source is None):
        raise _err(name, "give exactly one of measured: {...} (numbers measured here) or source: (e.g. 'paper (WF-Net Table 1)')")
    if measured is not None:
        if (not isinstance(measured, dict) or not set(MEASURED_KEYS) <= set(measured)
                or not set(measured) <= {*MEASURED_KEYS, *MEASURED_OPTIONAL}):
            raise _err(name, f"measured must have the keys {list(MEASURED_KEYS)} (optional: {list(MEASURED_OPTIONAL)})")
        if not _is_num(measured["wall_s"]) or measured["wall_s"] <= 0:
            raise _err(name, f"measured.wall_s must be a positive number, got {measured['wall_s']!r}")
        vals = measured["values"]
        if not isinstance(vals, dict) or set(vals) != set(expect):
            raise _err(name, "measured.values must give the measured value of every expect path, and only those")
        for p, v in vals.items():
            lo, hi = expect[p]
            if not _is_num(v) or not lo <= v <= hi:
                raise _err(name, f"measured value {p} = {v!r} lies outside its own range [{lo:g}, {hi:g}]")
        if not raw.get("margin"):
            raise _err(name, "a measured recipe needs margin: (how the ranges were chosen around the measured values)")
    elif not isinstance(source, str) or not source.strip():
        raise _err(name, f"source must be a non-empty string, got {source!r}")
    return Recipe(name=name, path=Path(path), description=str(raw["description"]), command=command,
                  runs_on=raw["runs_on"], options=opts, expect=expect, health=health, measured=measured,
                  source=source, margin=raw.get("margin"), notes=raw.get("notes"))


# -- data root and running -------------------------------------------------------------------------

def resolve_data_root(cli_value: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """``(root, how)``: ``--data-root`` wins, then ``$UNLEARN_FAST_DATA``, then ``../shared/data`` beside a
    source checkout (None when absent). A given root that is not a directory is an error."""
    if cli_value:
        p = Path(cli_value).expanduser().resolve()
        if not p.is_dir():
            raise ValueError(f"--data-root {cli_value} is not a directory; pass the folder that holds the recipe's data")
        return p, "--data-root"
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser().resolve()
        if not p.is_dir():
            raise ValueError(f"{DATA_ENV}={env} is not a directory; set {DATA_ENV} to the folder that holds the recipe's data")
        return p, DATA_ENV
    p = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return (p, "default ../shared/data") if p.is_dir() else (None, "unset")


def resolve(recipe: Recipe, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The recipe's options with ``${DATA}`` filled in; every data directory it names must exist
    (one error line naming ``UNLEARN_FAST_DATA`` / ``--data-root`` otherwise)."""
    root, how = resolve_data_root(data_root) if recipe.uses_data_root else (None, "")
    if recipe.uses_data_root and root is None:
        raise ValueError(f"recipe {recipe.name} reads ${{DATA}} ({recipe.options.get('data')}) and no data root is set: "
                         f"set {DATA_ENV}=DIR or pass --data-root DIR")

    def sub(obj: Any) -> Any:
        if isinstance(obj, str):
            return obj.replace("${DATA}", str(root)) if root is not None else obj
        if isinstance(obj, dict):
            return {k: sub(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [sub(v) for v in obj]
        return obj

    opts = sub(recipe.options)
    from unlearn_fast.data.registry import parse_spec

    for key in ("data", "knn_data"):
        raw = recipe.options.get(key)
        for raw_spec in [raw] if isinstance(raw, str) else list(raw or []):
            if "${DATA}" not in str(raw_spec):
                continue
            _, d = parse_spec(sub(str(raw_spec)))
            if d is not None and not Path(d).exists():
                raise ValueError(f"recipe {recipe.name} needs the data directory {d}, which does not exist (data root "
                                 f"from {how}): set {DATA_ENV}=DIR or pass --data-root DIR, DIR holding {Path(d).name}/")
    return opts


def run(recipe: Recipe, run_dir: str | os.PathLike, main: Callable[[Sequence[str]], int], *,
        data_root: str | os.PathLike | None = None, quiet: bool = False) -> int:
    """Run the recipe's command through ``main`` (the CLI entry point) with its options as a ``--config``
    file; returns the command's exit code. Re-running with the same ``run_dir`` resumes."""
    opts = resolve(recipe, data_root)
    with tempfile.TemporaryDirectory(prefix="unlearn_fast_recipe_") as tmp:
        cfg = Path(tmp) / f"{recipe.name}.yaml"
        cfg.write_text(yaml.safe_dump(opts, sort_keys=False))
        argv = [recipe.command, "--config", str(cfg), "--run-dir", str(run_dir)] + (["--quiet"] if quiet else [])
        return main(argv)


# -- checking --------------------------------------------------------------------------------------

def metric_value(metrics: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of metrics.json (list items by index), reduced by ``:min|:max|:mean``
    if given. Raises KeyError naming the first segment that is not there."""
    base, _, red = path.partition(":")
    cur: Any = metrics
    walked = []
    for part in base.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and re.fullmatch(r"-?\d+", part) and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            have = sorted(map(str, cur)) if isinstance(cur, dict) else f"a list of {len(cur)}" if isinstance(cur, list) else type(cur).__name__
            raise KeyError(f"{'.'.join(walked) or '(top)'} has no {part!r} (it holds {have})")
        walked.append(part)
    if red:
        if not isinstance(cur, list) or not cur:
            raise KeyError(f"{base} is not a non-empty list, cannot take :{red}")
        vals = [float("nan") if not _is_num(v) else float(v) for v in cur]
        cur = float("nan") if any(math.isnan(v) for v in vals) else REDUCERS[red](vals)
    return cur


def check(recipe: Recipe, metrics: dict[str, Any], command_rc: int | None = None) -> CheckResult:
    """Every ``expect`` path of ``recipe`` against ``metrics``: in range (inclusive), OUT (outside, NaN,
    not a number) or missing; the health verdict against the accepted ones (a command exit code of 1
    counts as ``fail``)."""
    out = []
    for path, (lo, hi) in recipe.expect.items():
        try:
            v = metric_value(metrics, path)
        except KeyError as exc:
            out.append(MetricCheck(path, lo, hi, None, "missing", str(exc.args[0])))
            continue
        if not _is_num(v) or math.isnan(float(v)):
            out.append(MetricCheck(path, lo, hi, v, "out", "not a number"))
        elif lo <= float(v) <= hi:
            out.append(MetricCheck(path, lo, hi, float(v), "in"))
        else:
            out.append(MetricCheck(path, lo, hi, float(v), "out", "below" if float(v) < lo else "above"))
    status = (metrics.get("health") or {}).get("status")
    if command_rc == 1:
        status = "fail"
    return CheckResult(out, status, status in recipe.health, recipe.health)


def _fmt(v: Any) -> str:
    if _is_num(v):
        return f"{float(v):.4g}"
    return "-" if v is None else str(v)


def format_check(recipe: Recipe, res: CheckResult) -> str:
    """The per-metric table ``--check`` prints."""
    w = max([len(m.path) for m in res.metrics] + [6])
    lines = [f"recipe {recipe.name} ({recipe.origin})"]
    for m in res.metrics:
        verdict = {"in": "in range", "out": f"OUT ({m.why})", "missing": f"MISSING: {m.why}"}[m.status]
        lines.append(f"  {m.path:<{w}}  {_fmt(m.value):>9}  [{m.lo:g}, {m.hi:g}]  {verdict}")
    lines.append(f"  {'health':<{w}}  {str(res.health):>9}  {'|'.join(res.accepted)}  "
                 + ("in range" if res.health_ok else "OUT"))
    n_in = sum(m.status == "in" for m in res.metrics) + res.health_ok
    lines.append(f"check: {n_in}/{len(res.metrics) + 1} in range - {'PASS' if res.ok else 'FAIL'}")
    return "\n".join(lines)


def format_list() -> str:
    """One line per shipped recipe: name, command, where it runs, where its ranges come from."""
    rows = []
    for n in list_recipes():
        r = load(n)
        rows.append((n, r.command, r.runs_on, r.origin, r.description))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{n:<{w}}  {c:<7}  {on:<3}  {o}\n{'':<{w}}  {d}" for n, c, on, o, d in rows)
