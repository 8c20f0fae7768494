"""End to end on the embedded digits set with the small CNN: original -> retrained -> WF -> evaluation
-> report, through the API and the CLI (short schedules: this checks the plumbing, the demo checks
the numbers)."""
import json
import math

import pytest
import yaml

import unlearn_fast
from unlearn_fast.cli import build_parser, main

FAST_ORIG = {"max_epochs": 3, "batch_size": 32, "fit_to_data": False}
FAST_WF = {"batch_size": 64, "grad_accum": 1, "max_epochs": 3, "patience": None, "fit_to_data": False}


@pytest.fixture(scope="module")
def wf_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    res = unlearn_fast.train(method="wf", model="small_cnn", data="digits", run_dir=d, device="cpu", retrain=True,
                             progress=False, original_hparams=FAST_ORIG, **FAST_WF)
    return res


def test_train_returns_model_metrics_and_run_dir(wf_run):
    d = wf_run.run_dir
    for f in ("config.yaml", "splits.json", "original.safetensors", "wf.safetensors", "metrics.json", "report.md",
              "log.csv", "timing.json", "wf.hparams.yaml"):
        assert (d / f).exists(), f
    assert sorted(p.name for p in (d / "retrain").iterdir()) == sorted(f"c{c}.safetensors" for c in range(10))
    for fig in ("accuracy_per_class.png", "alpha_heatmap.png", "filter_class.png", "insertion_deletion.png"):
        assert (d / "figures" / fig).stat().st_size > 1000
    m = wf_run.metrics
    t = m["splits"]["test"]
    for key in ("acc_f", "acc_r", "zrf", "js_div", "act_dist"):
        assert len(t["wf"][key]) == 10 and all(math.isfinite(v) for v in t["wf"][key]), key
    assert len(m["splits"]["train"]["wf"]["acc_f"]) == 10
    assert all(0 <= v <= math.log(2) for v in t["wf"]["js_div"])
    assert all(0 <= v <= 1 for v in t["wf"]["zrf"])
    # retrained models never saw their class: they (almost) never predict it
    assert max(t["retrained"]["acc_f"]) < 5.0
    ins = m["insertion_deletion"]
    assert len(ins["curves"]["insertion"]) == 10 and len(ins["fractions"]) == 11
    # both curves meet at the all-alpha=init state: insertion's end is deletion's start
    for ci, cd in zip(ins["curves"]["insertion"], ins["curves"]["deletion"]):
        assert abs(ci[-1] - cd[0]) < 1e-9 and cd[-1] < cd[0]
    report = (d / "report.md").read_text()
    assert "| WF-Net |" in report and "| Original model |" in report and "| Retrained model |" in report
    assert json.loads((d / "metrics.json").read_text())["summary"] == json.loads(json.dumps(m["summary"]))


def test_wf_actually_forgets_with_gate_and_keeps_original_without(wf_run):
    t = wf_run.metrics["splits"]["test"]
    assert t["original"]["acc"] > 80
    assert sum(t["wf"]["acc_f"]) / 10 < sum(t["original"]["acc_f"]) / 10 - 30


def test_rerun_resumes_instead_of_retraining(wf_run):
    res = unlearn_fast.train(method="wf", model="small_cnn", data="digits", run_dir=wf_run.run_dir, device="cpu",
                             progress=False, evaluate=False, **FAST_WF)
    assert res.info.get("skipped") == "exists"


def test_run_dir_guards_against_other_settings(wf_run):
    with pytest.raises(ValueError, match="holds another run"):
        unlearn_fast.train(method="wf", model="resnet18", data="digits", run_dir=wf_run.run_dir, device="cpu")


def test_cli_help_for_every_command(capsys):
    for cmd in ("demo", "train", "evaluate", "report", "list"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: unlearn-fast " + cmd in capsys.readouterr().out


def test_cli_list_and_report_with_yaml_config(wf_run, tmp_path, capsys):
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"original", "retrain", "wf"} <= set(listing["methods"]) and "small_cnn" in listing["models"]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(wf_run.run_dir)}))
    assert main(["report", "--config", str(cfg)]) == 0
    assert (wf_run.run_dir / "report.md").exists()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["evaluate", "--run-dir", str(tmp_path / "nope")]) == 2
    assert "not an unlearn_fast run directory" in capsys.readouterr().err
    assert main(["train", "--method", "wf", "--data", "idx:" + str(tmp_path / "missing"), "--run-dir",
                 str(tmp_path / "r"), "--quiet"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed")
    assert main(["report", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_unknown_hparam_and_preset():
    from unlearn_fast.methods import create_method

    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        create_method("wf", learning_rate=1)
    paper = create_method("wf", preset="paper")
    assert paper.hp.optimizer == "sgd" and paper.hp.lr == 100.0 and paper.hp.grad_accum == 16
    assert create_method("wf", preset="paper", lr=5.0).hp.lr == 5.0
    with pytest.raises(ValueError, match="unknown preset"):
        create_method("wf", preset="nope")
