"""Recipes (issue 11 item 4): every shipped recipe validates; the range checker against hand-made
metrics.json files (in range, out of range either side, bounds inclusive, missing, NaN, reducers,
health); the CLI (unknown recipe, --list, data root errors, a paper-only recipe without its data);
and a tiny recipe file run end to end on ``digits`` with --check (pass, then OUT on a range that
excludes the measured value, without retraining)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from unlearn_fast import recipes
from unlearn_fast.cli import main

REQUIRED = {"demo", "mnist-wf", "mnist-compare", "cifar10-resnet18-wf", "cifar100-resnet50-compare"}


def _cli_known_keys(command: str, tmp_path: Path, capsys) -> set[str]:
    """The config keys the CLI itself accepts for ``command``: from its own 'unknown key' message."""
    cfg = tmp_path / f"probe-{command}.yaml"
    cfg.write_text("__probe__: 1\n")
    rc = main([command, "--config", str(cfg), "--run-dir", str(tmp_path / "never"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "__probe__" in err, err
    known = re.search(r"known: \[(.*)\]", err).group(1)
    assert not (tmp_path / "never").exists()
    return {k.strip().strip("'") for k in known.split(",")}


def _base(**over) -> dict:
    raw = {"description": "test", "command": "train", "runs_on": "cpu",
           "options": {"model": "small_cnn", "data": "digits", "method": "wf", "hparams": {"max_epochs": 2}},
           "expect": {"summary.rows.wf.acc_r": [50, 100], "summary.max_acc_f": [0, 10]},
           "health": ["ok", "warn"], "source": "test"}
    raw.update(over)
    return raw


# -- shipped recipes ---------------------------------------------------------------------------

def test_every_shipped_recipe_validates_and_uses_only_cli_keys(tmp_path, capsys):
    names = recipes.list_recipes()
    assert REQUIRED <= set(names), names
    cli_keys = {c: _cli_known_keys(c, tmp_path, capsys) for c in recipes.COMMANDS}
    for c in recipes.COMMANDS:  # the recipe key table is exactly what the CLI itself accepts (its error lists them)
        assert set(recipes.CONFIG_KEYS[c]) | {"hparams", "original_hparams"} == cli_keys[c], (c, cli_keys[c])
    for n in names:
        r = recipes.load(n)
        assert set(r.options) <= cli_keys[r.command], (n, set(r.options) - cli_keys[r.command])
        assert r.expect and all(lo <= hi for lo, hi in r.expect.values())
        if r.runs_on == "cpu":  # CI runs these: numbers measured here, on stated hardware
            assert r.measured and r.measured["hardware"] and r.measured["wall_s"] > 0, n
        else:
            assert r.source and "paper" in r.source, n
    assert recipes.load(str(recipes.recipe_dir() / "demo.yaml")).name == "demo"  # by path too


@pytest.mark.parametrize("over, words", [
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"command": "dance"}, "command must be one of"),
    ({"runs_on": "tpu"}, "runs_on must be cpu or gpu"),
    ({"options": {"model": "small_cnn", "modle": "x"}}, "unknown key(s) ['modle']"),
    ({"options": {"run_dir": "runs/x"}}, "run_dir is chosen at run time"),
    ({"options": {"model": "no_such_net"}}, "is not a known model"),
    ({"options": {"method": "no_such_method"}}, "unknown method"),
    ({"options": {"method": "wf", "hparams": {"no_such_hp": 1}}}, "no_such_hp"),
    ({"options": {"data": "idx:${HOME}/x"}}, "unknown variable ${HOME}"),
    ({"options": {"data": "nosuchkind:/x"}}, "unknown dataset spec"),
    ({"command": "compare", "options": {"methods": ["ft"]}}, "needs options.methods (a list) and options.forget"),
    ({"command": "compare", "options": {"methods": ["ft"], "forget": 3, "hparams": {"ga": {}}}}, "not in methods"),
    ({"expect": {"a.b": [2, 1]}}, "lo <= hi"),
    ({"expect": {"a.b": [0, 1, 2]}}, "must be [lo, hi]"),
    ({"expect": {"a.b": [0, float("nan")]}}, "finite"),
    ({"expect": {"a.b": ["0", 1]}}, "must be [lo, hi]"),
    ({"expect": {"a.b:median": [0, 1]}}, "unknown reducer"),
    ({"expect": {}}, "at least one metric"),
    ({"health": ["fine"]}, "health must be one or more of"),
    ({"measured": {"hardware": "x", "date": "d", "command": "c", "wall_s": 1, "values": {}}}, "exactly one of"),
])
def test_validate_refuses_bad_recipes(over, words):
    with pytest.raises(ValueError) as ei:
        recipes.validate(_base(**over), name="bad")
    msg = str(ei.value)
    assert words in msg and msg.startswith("recipe bad:") and "\n" not in msg


def test_measured_values_must_lie_in_their_own_ranges():
    meas = {"hardware": "cpu", "date": "2026-11-30", "command": "x", "wall_s": 10.0,
            "values": {"summary.rows.wf.acc_r": 90.0, "summary.max_acc_f": 11.0}}
    raw = _base(measured=meas, margin="m")
    del raw["source"]
    with pytest.raises(ValueError, match=r"summary.max_acc_f = 11.0 lies outside its own range \[0, 10\]"):
        recipes.validate(raw, name="bad")
    meas["values"]["summary.max_acc_f"] = 10.0  # the bound itself is in
    assert recipes.validate(raw, name="ok").measured["wall_s"] == 10.0
    del raw["margin"]
    with pytest.raises(ValueError, match="needs margin"):
        recipes.validate(raw, name="bad")


# -- the checker ---------------------------------------------------------------------------------

def _recipe(expect: dict, health=("ok", "warn")) -> recipes.Recipe:
    return recipes.validate(_base(expect=expect, health=list(health)), name="t")


def test_checker_in_range_out_of_range_and_bounds():
    rng = np.random.default_rng(7)
    for _ in range(25):
        lo, hi = sorted(rng.uniform(-50, 150, 2).tolist())
        inside = lo + rng.uniform() * (hi - lo)
        eps = 1e-6 * max(1.0, abs(hi))
        values = {"in": inside, "lo": lo, "hi": hi, "above": hi + eps, "below": lo - eps,
                  "far": hi + rng.uniform(1, 100)}
        metrics = {"g": values, "health": {"status": "ok"}}
        rec = _recipe({f"g.{k}": [lo, hi] for k in values})
        res = recipes.check(rec, metrics)
        got = {m.path.split(".")[1]: m.status for m in res.metrics}
        assert got == {"in": "in", "lo": "in", "hi": "in", "above": "out", "below": "out", "far": "out"}, (lo, hi, got)
        assert not res.ok
        only_in = recipes.check(_recipe({"g.in": [lo, hi], "g.lo": [lo, hi], "g.hi": [lo, hi]}), metrics)
        assert only_in.ok and [m.value for m in only_in.metrics] == [inside, lo, hi]


def test_checker_nan_none_and_strings_are_out_and_missing_is_an_error():
    metrics = {"r": {"nan": float("nan"), "none": None, "s": "12", "b": True, "ok": 5.0, "lst": [1.0, float("nan")]},
               "health": {"status": "ok"}}
    rec = _recipe({"r.nan": [-1e9, 1e9], "r.none": [0, 1], "r.s": [0, 100], "r.b": [0, 1], "r.ok": [0, 10],
                   "r.gone": [0, 1], "r.lst:max": [0, 10], "r.ok.deeper": [0, 1]})
    res = recipes.check(rec, metrics)
    st = {m.path: m.status for m in res.metrics}
    assert st == {"r.nan": "out", "r.none": "out", "r.s": "out", "r.b": "out", "r.ok": "in", "r.gone": "missing",
                  "r.lst:max": "out", "r.ok.deeper": "missing"}
    assert not res.ok
    only_missing = recipes.check(_recipe({"r.ok": [0, 10], "r.gone": [0, 1]}), metrics)
    assert [m.status for m in only_missing.metrics] == ["in", "missing"] and not only_missing.ok  # missing is no pass
    why = {m.path: m.why for m in res.metrics}
    assert "has no 'gone'" in why["r.gone"] and "'nan'" in why["r.gone"]  # says what IS there
    text = recipes.format_check(rec, res)
    assert "MISSING" in text and "OUT (not a number)" in text and text.endswith("FAIL")


def test_reducers_and_list_indices_match_numpy():
    rng = np.random.default_rng(3)
    vals = rng.uniform(0, 100, 13).tolist()
    m = {"s": {"acc": vals}}
    assert recipes.metric_value(m, "s.acc:max") == pytest.approx(np.max(vals), rel=1e-12)
    assert recipes.metric_value(m, "s.acc:min") == pytest.approx(np.min(vals), rel=1e-12)
    assert recipes.metric_value(m, "s.acc:mean") == pytest.approx(np.mean(vals), rel=1e-12)
    assert recipes.metric_value(m, "s.acc.4") == vals[4] and recipes.metric_value(m, "s.acc.-1") == vals[-1]
    with pytest.raises(KeyError):
        recipes.metric_value(m, "s.acc.13")
    with pytest.raises(KeyError):
        recipes.metric_value({"s": {"acc": 3.0}}, "s.acc:max")


def test_health_verdict_must_be_accepted_and_a_failed_command_counts_as_fail():
    rec = _recipe({"x": [0, 1]}, health=("ok", "warn"))
    assert recipes.check(rec, {"x": 0.5, "health": {"status": "warn"}}).ok
    assert not recipes.check(rec, {"x": 0.5, "health": {"status": "fail"}}).ok
    assert not recipes.check(rec, {"x": 0.5}).ok  # no verdict at all is not a pass
    assert not recipes.check(rec, {"x": 0.5, "health": {"status": "ok"}}, command_rc=1).ok
    assert not recipes.check(_recipe({"x": [0, 1]}, health=("ok",)), {"x": 0.5, "health": {"status": "warn"}}).ok


# -- the CLI -------------------------------------------------------------------------------------

def test_unknown_recipe_exits_2_with_the_list(capsys):
    assert main(["recipe", "no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown recipe 'no-such-recipe'" in err
    for n in REQUIRED:
        assert n in err


@pytest.mark.parametrize("argv", [["recipe", "--list"], ["list", "recipes"]])
def test_list_shows_every_recipe_with_its_source(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for n in recipes.list_recipes():
        r = recipes.load(n)
        assert re.search(rf"^{re.escape(n)}\s+{r.command}\s+{r.runs_on}\s+", out, re.M), (n, out)
    assert "measured:" in out and "source: paper" in out


def test_data_root_errors_name_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(recipes.DATA_ENV, str(tmp_path / "nowhere"))
    run_dir = tmp_path / "run"
    assert main(["recipe", "mnist-wf", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "UNLEARN_FAST_DATA" in err and "nowhere" in err and "\n" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(recipes.DATA_ENV, str(empty))
    for name, sub in (("mnist-wf", "mnist5k"), ("cifar10-resnet18-wf", "cifar"), ("cifar100-resnet50-compare", "cifar")):
        assert main(["recipe", name, "--check", "--run-dir", str(run_dir)]) == 2  # no data: no run, no fake pass
        err = capsys.readouterr().err.strip()
        assert "does not exist" in err and "UNLEARN_FAST_DATA" in err and "--data-root" in err and sub in err, err
    assert not run_dir.exists()
    assert main(["recipe", "mnist-wf", "--data-root", str(tmp_path / "nope"), "--run-dir", str(run_dir)]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert not run_dir.exists()


# -- end to end --------------------------------------------------------------------------------

TINY = {
    "description": "tiny: digits, small CNN, WF over 10 classes, a few steps",
    "command": "train", "runs_on": "cpu",
    "options": {"model": "small_cnn", "data": "digits", "method": "wf", "seed": 0, "threads": 1, "max_per_class": 40,
                "eval_splits": "test", "device": "cpu",
                "original_hparams": {"max_epochs": 6, "fit_to_data": False, "min_steps": 0},
                "hparams": {"max_epochs": 2, "batch_size": 64, "grad_accum": 1, "evals_per_epoch": 1,
                            "fit_to_data": False, "min_steps": 0}},
    "expect": {"splits.test.original.acc": [0, 100], "summary.rows.wf.acc_r": [0, 100],
               "splits.test.wf.acc_f:max": [0, 100]},
    "health": ["ok", "warn", "fail"], "source": "test",
}


def test_tiny_recipe_end_to_end_with_check(tmp_path, capsys):
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / "run"
    rc = main(["recipe", str(f), "--check", "--run-dir", str(run_dir), "--quiet"])
    out = capsys.readouterr().out
    m = json.loads((run_dir / "metrics.json").read_text())
    assert rc == 0, out
    acc = m["splits"]["test"]["original"]["acc"]
    worst_f = max(m["splits"]["test"]["wf"]["acc_f"])
    assert 0 <= acc <= 100 and math.isfinite(worst_f)
    assert re.search(rf"splits.test.original.acc\s+{acc:.4g}\s+\[0, 100\]\s+in range", out), out
    assert "PASS" in out
    # a range around the measured value passes; one that excludes it is OUT (exit 1); resume, no retraining
    before = (run_dir / "wf.safetensors").stat().st_mtime_ns
    tight = dict(TINY, expect={"splits.test.original.acc": [acc - 0.01, acc + 0.01],
                               "splits.test.wf.acc_f:max": [worst_f, worst_f]})
    f.write_text(yaml.safe_dump(tight))
    assert main(["recipe", str(f), "--check", "--run-dir", str(run_dir), "--quiet"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    excl = dict(TINY, expect={"splits.test.original.acc": [acc + 0.5, 100.5]})
    f.write_text(yaml.safe_dump(excl))
    assert main(["recipe", str(f), "--check", "--run-dir", str(run_dir), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "OUT (below)" in out and "FAIL" in out
    assert (run_dir / "wf.safetensors").stat().st_mtime_ns == before
