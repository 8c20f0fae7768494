"""Honest results and run-directory integrity (issue 12): verdicts for zero-step stages, NaN, weak
originals and unforgotten classes; stale artefacts recomputed with a true record; atomic files under
SIGKILL; schedules fitted to small data; typed hyper-parameters."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

import unlearn_fast
from unlearn_fast.cli import main
from unlearn_fast.data.checks import check_bundle
from unlearn_fast.methods import create_method
from unlearn_fast.methods.hparams import describe_hparams
from unlearn_fast.methods.schedule import fit_schedule
from unlearn_fast.models.io import read_metadata

TINY_ORIG = {"max_epochs": 4, "fit_to_data": False, "batch_size": 32}
TINY_WF = {"batch_size": 32, "grad_accum": 1, "max_epochs": 2, "patience": None, "evals_per_epoch": 1,
           "fit_to_data": False}


def _wf(run_dir, **kw):
    hp = {**TINY_WF, **kw}
    return unlearn_fast.train(method="wf", data="digits", run_dir=run_dir, device="cpu", progress=False,
                              max_per_class=40, original_hparams=TINY_ORIG, eval_splits=("test",),
                              **hp)


# -- schedules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,bs,ga,ep,min_steps,want", [
    # 280 face images, the App. A recipe: batch 256 -> 70 (4 steps per epoch), epochs raised to the floor
    (280, 256, 1, 100, 150, (70, 1, 100, 4)),
    (280, 256, 1, 10, 150, (70, 1, 38, 4)),
    # WF: 2 micro-batches of 128 with 16-step accumulation -> accumulation 1, then batch 70
    (280, 128, 16, 100, 50, (70, 1, 100, 4)),
    # a large split keeps the paper values
    (50000, 128, 16, 100, 50, (128, 16, 100, 24)),
    # 64 micro-batches, accumulation 16 -> 4 steps per epoch: kept
    (8192, 128, 16, 100, 0, (128, 16, 100, 4)),
    # 40 micro-batches, accumulation 16 gives 2 steps -> accumulation 10
    (5120, 128, 16, 100, 0, (128, 10, 100, 4)),
])
def test_fit_schedule_matches_hand_computed(n, bs, ga, ep, min_steps, want):
    s = fit_schedule("stage", n, batch_size=bs, grad_accum=ga, epochs=ep, min_steps=min_steps, min_batch=2)
    assert (s.batch_size, s.grad_accum, s.epochs, s.steps_per_epoch) == want
    assert s.steps_per_epoch * s.epochs >= min_steps
    assert bool(s.notes) == ((s.batch_size, s.grad_accum, s.epochs) != (bs, ga, ep))


def test_fit_schedule_literal_when_off():
    s = fit_schedule("stage", 280, batch_size=256, grad_accum=16, epochs=3, min_steps=150, adapt=False)
    assert (s.batch_size, s.grad_accum, s.epochs, s.min_steps, s.notes) == (256, 16, 3, 0, [])


# -- typed hyper-parameters ------------------------------------------------------------------------
def test_hparams_coerced_and_typed():
    wf = create_method("wf", lr="1e-3", batch_size=64.0, lambdas=["1", 3, 1.5], max_steps=None)
    assert wf.hp.lr == 0.001 and type(wf.hp.lr) is float
    assert wf.hp.batch_size == 64 and type(wf.hp.batch_size) is int
    assert wf.hp.lambdas == (1.0, 3.0, 1.5) and all(type(v) is float for v in wf.hp.lambdas)
    assert wf.hp.max_steps is None
    assert create_method("original", lr=None).hp.lr is None
    assert create_method("ga", epochs="7").hp.epochs == 7


def test_describe_hparams_reads_every_field_with_its_comment():
    rows = {r["name"]: r for r in describe_hparams(create_method("wf").Hparams)}
    assert rows["optimizer"]["default"] == "adam" and "adam" in rows["optimizer"]["meaning"]
    assert rows["fit_to_data"]["meaning"] and rows["min_steps"]["default"] == 50
    ga = {r["name"]: r for r in describe_hparams(create_method("ga").Hparams)}
    assert "epochs" in ga and "select_by" in ga and ga["select_by"]["meaning"]  # base-class fields too


def test_list_method_prints_every_hparam(capsys):
    assert main(["list", "wf"]) == 0
    out = capsys.readouterr().out
    for name in ("lr", "batch_size", "grad_accum", "lambdas", "fit_to_data", "min_steps", "presets: paper"):
        assert name in out


# -- data checks -----------------------------------------------------------------------------------
def _fake_bundle(train, val, test):
    counts = {"train": train, "val": val, "test": test}
    return SimpleNamespace(name="fake", num_classes=len(train), class_names=[str(i) for i in range(len(train))],
                           class_counts=lambda s: torch.tensor(counts[s]))


def test_check_bundle_errors_and_warnings():
    assert check_bundle(_fake_bundle([5, 5, 5], [1, 1, 1], [2, 2, 2])) == []
    w = check_bundle(_fake_bundle([5, 5, 1], [1, 0, 1], [2, 2, 0]))
    assert any("no val sample (1)" in x for x in w) and any("no test sample (2)" in x for x in w)
    assert any("single training sample (2)" in x for x in w)
    with pytest.raises(ValueError, match="at least 2 classes"):
        check_bundle(_fake_bundle([5, 0, 0], [1, 0, 0], [1, 0, 0]))
    with pytest.raises(ValueError, match=r"classes 2\.\.4 of 0\.\.5 have no training sample"):
        check_bundle(_fake_bundle([5, 5, 0, 0, 0, 1], [0] * 6, [0] * 6))


# -- verdicts --------------------------------------------------------------------------------------
def test_zero_step_stage_is_a_failure(tmp_path, capsys):
    """WF with the paper's accumulation on a split too small for one step: `fail`, exit code 1 - and the
    same settings fitted to the data take steps."""
    res = _wf(tmp_path / "a", batch_size=128, grad_accum=64, max_epochs=1)
    assert res.health["status"] == "fail"
    assert any("wf untrain: made no optimizer step" in r for r in res.health["reasons"])
    assert res.metrics["health"]["stages"]["wf untrain"]["steps"] == 0
    assert res.metrics["health"]["status"] == "fail"
    assert "made no optimizer step" in (tmp_path / "a" / "report.md").read_text()
    rc = main(["evaluate", "--run-dir", str(tmp_path / "a"), "--device", "cpu", "--quiet", "--eval-splits", "test"])
    assert rc == 1 and "verdict: FAIL" in capsys.readouterr().out
    fitted = _wf(tmp_path / "b", batch_size=128, grad_accum=64, max_epochs=1, fit_to_data=True)
    st = fitted.metrics["health"]["stages"]["wf untrain"]
    assert st["steps"] >= 50 and any("grad_accum 64 ->" in n for n in st["notes"])
    assert not any("no optimizer step" in r for r in fitted.health["reasons"])


def test_nan_stops_the_run_and_saves_nothing(tmp_path, capsys):
    d = tmp_path / "nan"
    rc = main(["train", "--method", "original", "--run-dir", str(d), "--device", "cpu", "--quiet",
               "--max-per-class", "30", "--set", "lr=1e30", "--set", "fit_to_data=false"])
    err = capsys.readouterr().err
    assert rc == 1 and "NaN/Inf" in err and "nothing was saved" in err
    assert not (d / "original.safetensors").exists()


def test_weak_original_is_flagged(tmp_path):
    res = unlearn_fast.train(method="original", data="digits", run_dir=tmp_path, device="cpu", progress=False,
                             max_per_class=30, max_epochs=1, batch_size=256, fit_to_data=False)
    assert res.info["test_acc"] < 60
    assert res.health["status"] in ("warn", "fail")
    assert any("original model: test accuracy" in r for r in res.health["reasons"])


def test_unforgotten_class_fails_its_verdict(tmp_path):
    """WF with the forget term switched off (lambda_1 = 0) forgets nothing: every class is flagged."""
    res = _wf(tmp_path, lambdas=[1, 0, 1], max_epochs=1)
    reasons = res.health["reasons"]
    assert res.health["status"] == "fail"
    assert sum("not forgotten" in r or "only partly forgotten" in r for r in reasons) >= 8, reasons
    assert sum("not forgotten" in r for r in reasons) >= 5, reasons


# -- stale artefacts -------------------------------------------------------------------------------
def test_changed_hparam_recomputes_with_a_true_record(tmp_path):
    d = tmp_path / "run"
    a = _wf(d, lambdas=[1, 3, 1])
    alpha_a = read_metadata(d / "wf.safetensors")["digest"]
    assert yaml.safe_load((d / "wf.hparams.yaml").read_text())["lambdas"] == [1.0, 3.0, 1.0]
    b = _wf(d, lambdas=[1, 10, 1])
    assert read_metadata(d / "wf.safetensors")["digest"] != alpha_a
    assert yaml.safe_load((d / "wf.hparams.yaml").read_text())["lambdas"] == [1.0, 10.0, 1.0]
    assert read_metadata(d / "wf.safetensors")["hparams"]["lambdas"] == [1.0, 10.0, 1.0]
    assert b.metrics["summary"] != a.metrics["summary"]
    # the same settings again: reused, nothing recomputed
    mtime = (d / "wf.safetensors").stat().st_mtime_ns
    c = _wf(d, lambdas=[1, 10, 1])
    assert (d / "wf.safetensors").stat().st_mtime_ns == mtime
    assert c.metrics["fingerprint"] == b.metrics["fingerprint"]


def test_changed_default_recomputes(tmp_path, monkeypatch):
    """The fingerprint holds the resolved lambdas: a new default is not served by a file made under the old
    one, and giving the default's value explicitly is the same run."""
    import unlearn_fast.methods.wf as wf_mod

    d = tmp_path / "run"
    _wf(d)
    first = read_metadata(d / "wf.safetensors")
    assert first["hparams"]["lambdas"] == list(wf_mod.DEFAULT_CNN_LAMBDAS)
    mtime = (d / "wf.safetensors").stat().st_mtime_ns
    _wf(d, lambdas=list(wf_mod.DEFAULT_CNN_LAMBDAS))
    assert (d / "wf.safetensors").stat().st_mtime_ns == mtime
    monkeypatch.setattr(wf_mod, "DEFAULT_CNN_LAMBDAS", (1.0, 7.0, 1.0))
    _wf(d)
    after = read_metadata(d / "wf.safetensors")
    assert after["hparams"]["lambdas"] == [1.0, 7.0, 1.0] and after["fingerprint"] != first["fingerprint"]
    assert yaml.safe_load((d / "wf.hparams.yaml").read_text())["lambdas"] == [1.0, 7.0, 1.0]


def test_paper_preset_resolves_the_papers_lambdas():
    from unlearn_fast.methods.wf import default_lambdas

    assert default_lambdas("small_cnn", "paper") == (1.0, 10.0, 1.0)
    assert default_lambdas("small_cnn", None) == (1.0, 2.0, 1.0)
    assert default_lambdas("vit_tiny", None) == default_lambdas("vit_tiny", "paper") == (1.0, 100.0, 1.0)


def test_new_original_recipe_invalidates_everything_downstream(tmp_path):
    d = tmp_path / "run"
    _wf(d)
    wf_before = read_metadata(d / "wf.safetensors")
    unlearn_fast.train(method="wf", data="digits", run_dir=d, device="cpu", progress=False, max_per_class=40,
                       original_hparams={**TINY_ORIG, "lr": 3e-3}, eval_splits=("test",), **TINY_WF)
    wf_after = read_metadata(d / "wf.safetensors")
    orig = read_metadata(d / "original.safetensors")
    assert orig["hparams"]["lr"] == 3e-3
    assert wf_after["inputs"]["original"] == orig["digest"] != wf_before["inputs"]["original"]


def test_stale_checkpoint_is_not_resumed(tmp_path):
    """A checkpoint left by an interrupted stage under other settings is ignored, not resumed."""
    from unlearn_fast.checkpoint import load_state

    d = tmp_path / "run"
    _wf(d, max_epochs=1)
    ck = load_state(d / "state" / "wf.pt")
    (d / "wf.safetensors").unlink()
    ck["loop"]["done"] = False
    ck["loop"]["steps"] = 12345
    torch.save(ck, d / "state" / "wf.pt")  # looks interrupted, made with the default lambdas (1,2,1)
    _wf(d, max_epochs=1, lambdas=[1, 3, 1])
    assert load_state(d / "state" / "wf.pt")["fingerprint"] == read_metadata(d / "wf.safetensors")["fingerprint"]
    assert 0 < read_metadata(d / "wf.safetensors")["stages"]["wf untrain"]["steps"] < 12345


# -- files -----------------------------------------------------------------------------------------
def test_log_csv_has_a_header_and_stage_names(tmp_path):
    _wf(tmp_path)
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == "stage,epoch,micro,step,val,loss,time_s,img_s"
    assert {ln.split(",")[0] for ln in lines[1:]} == {"original", "wf untrain"}
    assert all(float(ln.split(",")[7]) > 0 for ln in lines[1:])  # throughput, images/s
    assert sum(ln == lines[0] for ln in lines) == 1


_WRITER = """
import sys
from unlearn_fast.run_files import atomic_write_json
i = 0
print("ready", flush=True)
while True:
    atomic_write_json(sys.argv[1], {"i": i, "rows": [[float(i)] * 64 for _ in range(4000)]})
    i += 1
"""


def test_metrics_json_is_never_torn_by_sigkill(tmp_path):
    """SIGKILL a process that keeps rewriting a ~3 MB metrics.json: the file always parses whole."""
    path = tmp_path / "metrics.json"
    for delay in (0.15, 0.3, 0.45, 0.6, 0.8):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        if path.exists():
            obj = json.loads(path.read_text())
            assert len(obj["rows"]) == 4000


# -- small data ------------------------------------------------------------------------------------
def test_small_data_recipe_trains_an_original_and_wf_takes_steps(tmp_path):
    """At most 10 training images per class: the default (fitted) recipe gives an original well above
    chance, and WF with its paper-scale defaults (batch 128 x 16 accumulation) takes optimizer steps."""
    res = unlearn_fast.train(method="wf", data="digits", run_dir=tmp_path, device="cpu", progress=False,
                             max_per_class=14, eval_splits=("test",))
    n_train = int(json.loads((tmp_path / "splits.json").read_text())["sizes"]["train"])
    assert n_train <= 100
    st = res.metrics["health"]["stages"]
    orig_acc = res.metrics["splits"]["test"]["original"]["acc"]
    assert orig_acc > 50, orig_acc          # chance is 10%
    assert st["original"]["steps"] >= 1000 and st["wf untrain"]["steps"] >= 50  # the small-set floors
    assert any("random translation" in n for n in st["original"]["notes"])
    assert not any("no optimizer step" in r for r in res.health["reasons"])
    assert math.isfinite(res.metrics["summary"]["rows"]["wf"]["acc_r"])


# -- compare ---------------------------------------------------------------------------------------
def test_compare_marks_a_failing_method_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """A method that raises during unlearning is a `fail` row, the others still run, and the CLI exits 1."""
    from dataclasses import dataclass

    from unlearn_fast.methods import registry
    from unlearn_fast.methods.unlearning import UnlearnHparams, UnlearningMethod

    class Boom(UnlearningMethod):
        name = "boom"

        @dataclass
        class Hparams(UnlearnHparams):
            pass

        def unlearn(self, u):
            raise RuntimeError("planted failure")

    monkeypatch.setitem(registry._REGISTRY, "boom", Boom)
    rc = main(["compare", "--methods", "boom,ga", "--forget", "2", "--run-dir", str(tmp_path), "--device", "cpu",
               "--quiet", "--max-per-class", "40", "--original-set", "fit_to_data=false", "--original-set", "max_epochs=4",
               "--set", "ga.epochs=1", "--set", "ga.fit_to_data=false"])
    out = capsys.readouterr().out
    assert rc == 1
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["rows"]["boom"]["status"] == "failed" and m["rows"]["boom"]["health"]["status"] == "fail"
    assert m["rows"]["ga"]["status"] == "ok" and m["health"]["methods"] == {"boom": "fail", "ga": m["rows"]["ga"]["health"]["status"]}
    assert "verdict: FAIL" in out and "planted failure" in out


# -- the verdict rules themselves --------------------------------------------------------------------
def test_health_rules_at_their_thresholds():
    from unlearn_fast.evaluation import health as H

    assert H.stage_verdict("s", 0)["status"] == "fail"
    assert H.stage_verdict("s", 10, min_steps=50)["status"] == "warn"
    assert H.stage_verdict("s", 10, min_steps=50, max_steps=10)["status"] == "ok"   # the user capped it
    assert H.stage_verdict("s", 60, min_steps=50, notes=["x"])["notes"] == ["s: x"]
    assert H.original_verdict(19.9, 10)["status"] == "fail"        # <= 2 x chance (10%)
    assert H.original_verdict(59.9, 10)["status"] == "warn"
    assert H.original_verdict(60.0, 10)["status"] == "ok"
    assert H.original_verdict(float("nan"), 10)["status"] == "fail"
    v = H.forget_verdict([0.0, 5.0, 5.1, 89.9, 90.0, float("nan")], [100.0] * 6, list(range(6)), list("abcdef"))
    assert v["status"] == "fail"
    assert [r.split(":")[0] for r in v["reasons"]] == ["class e not forgotten", "class c only partly forgotten",
                                                        "class d only partly forgotten", "class f has no test sample"]
    assert H.retain_verdict(70.0, 90.1, 10)["status"] == "warn" and H.retain_verdict(70.1, 90.0, 10)["status"] == "ok"
    assert H.retain_verdict(20.0, 90.0, 10)["status"] == "fail"
    assert H.finite_verdict({"a": [1.0, float("inf")], "b": 2.0})["reasons"] == ["non-finite values in a"]
    m = H.merge({"status": "warn", "reasons": ["x"], "notes": []}, {"status": "ok", "reasons": ["x"], "notes": ["n"]})
    assert m == {"status": "warn", "reasons": ["x"], "notes": ["n"]}
