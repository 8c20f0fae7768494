"""WF-Net fidelity guard (issue 13): with the WF defaults, every class is forgotten and the retained
accuracy stays close to the original's, on a small generated many-class set (glyphs, 16 classes,
12 px), seeded, CPU. A default change that lets mean Acc_r fall more than ``MARGIN`` points below the
original, or leaves a class above ``ACC_F_MAX`` percent, fails here. Measured in this budget (8 epochs,
original 93.7): defaults (unit gates, lambda_1 2) -4.1 points, max Acc_f 8.3; lambda_1 10 (the previous
default) -8.6; the paper levers with Adam 0.1 -47.1. The margin is a regression guard in a CPU budget,
not the issue's 2-point goal; docs/wf_fidelity.md has the study behind the defaults."""
from __future__ import annotations

import shutil

import pytest
import torch

from unlearn_fast.data import load
from unlearn_fast.evaluation.wf_eval import gate_accuracy_table
from unlearn_fast.methods import RunContext, create_method

SPEC, IMG, N = "glyphs:16:60", 12, 16
MARGIN = 6.5        # points of mean Acc_r the defaults may lose (measured: defaults -4.1, lambda_1 10 -8.6)
ACC_F_MAX = 10.0    # per-class Acc_f bound in % (a row has 12 test images: at most one still recognised)
# Time caps only (not levers): the defaults of every fidelity lever apply.
CAPS = {"batch_size": 64, "grad_accum": 1, "max_epochs": 8, "evals_per_epoch": 2, "min_steps": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    data = load(SPEC, img_size=IMG, seed=0)
    base = tmp_path_factory.mktemp("fid")
    ctx = RunContext(data=data, model_name="small_cnn", run_dir=base, device=torch.device("cpu"), seed=0,
                     progress=False)
    orig = create_method("original", max_epochs=12, patience=4, min_steps=150).run(ctx).model.eval()
    cor = torch.zeros(N, dtype=torch.float64)
    tot = torch.zeros(N, dtype=torch.float64)
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(data.test, batch_size=256):
            cor += torch.bincount(y, weights=(orig(x).argmax(1) == y).double(), minlength=N)
            tot += torch.bincount(y, minlength=N).double()
    orig_r = [float(100 * (cor.sum() - cor[c]) / (tot.sum() - tot[c])) for c in range(N)]
    return data, base, orig_r


def _untrain(setup, name: str, **hp):
    data, base, _ = setup
    rd = base / name
    rd.mkdir()
    shutil.copy(base / "original.safetensors", rd / "original.safetensors")
    ctx = RunContext(data=data, model_name="small_cnn", run_dir=rd, device=torch.device("cpu"), seed=0, progress=False)
    wf = create_method("wf", **{**CAPS, **hp}).run(ctx).model
    return gate_accuracy_table(wf, data.test, torch.device("cpu"), progress=False)


def _check(setup, acc_f, acc_r) -> list[str]:
    orig_r = setup[2]
    fails = []
    mean_o, mean_r = sum(orig_r) / N, sum(acc_r) / N
    if mean_r < mean_o - MARGIN:
        fails.append(f"mean Acc_r {mean_r:.1f} is more than {MARGIN} points below the original's {mean_o:.1f}")
    bad = [(c, round(f, 1)) for c, f in enumerate(acc_f) if f > ACC_F_MAX]
    if bad:
        fails.append(f"classes not forgotten (Acc_f > {ACC_F_MAX}%): {bad}")
    return fails


def test_defaults_forget_every_class_and_keep_retain_accuracy(setup):
    acc_f, acc_r = _untrain(setup, "defaults")
    assert setup[2] and sum(setup[2]) / N > 85, "the original glyph model should be accurate"
    print(f"defaults: mean Acc_r {sum(acc_r) / N:.1f} vs original {sum(setup[2]) / N:.1f}, max Acc_f {max(acc_f):.1f}")
    fails = _check(setup, acc_f, acc_r)
    assert not fails, "; ".join(fails)


PAPER_LAMBDAS = {"lambdas": [1, 10, 1]}


@pytest.mark.parametrize("name,hp", [
    ("lambda1_10", PAPER_LAMBDAS),                                                      # the previous default
    ("paper_levers", {**PAPER_LAMBDAS, "select": "loss", "forget_stop": None, "gate_norm": False}),
])
def test_earlier_defaults_fail_the_same_check(setup, name, hp):
    """The guard can fail: the earlier defaults lose more retain accuracy than MARGIN allows."""
    acc_f, acc_r = _untrain(setup, name, **hp)
    print(f"{name}: mean Acc_r {sum(acc_r) / N:.1f}, max Acc_f {max(acc_f):.1f}")
    fails = _check(setup, acc_f, acc_r)
    assert any("mean Acc_r" in f for f in fails), f"{name} passed: Acc_r {sum(acc_r) / N:.1f}"
