"""A WF untraining run killed mid-way (SIGKILL) and started again with the same command ends with
the same alphas and the same metrics as an uninterrupted run with the same seed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import unlearn_fast
from unlearn_fast.models.io import load_tensors

WF_ARGS = ["--set", "batch_size=32", "--set", "grad_accum=2", "--set", "max_epochs=4", "--set", "patience=null",
           "--set", "evals_per_epoch=3", "--set", "fit_to_data=false", "--no-eval", "--quiet"]


def _cli(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "unlearn_fast.cli", "train", "--method", "wf", "--model", "small_cnn",
            "--data", "digits", "--run-dir", str(run_dir), "--device", "cpu", *WF_ARGS]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(scope="module")
def original_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("orig")
    unlearn_fast.train(method="original", model="small_cnn", data="digits", run_dir=d, device="cpu",
                       progress=False, max_epochs=3, fit_to_data=False)
    return d


def _evaluate(run_dir: Path) -> dict:
    m = unlearn_fast.evaluate(run_dir, device="cpu", insertion_steps=2, splits=("test",), progress=False, report=False)
    out = {k: v for k, v in m.items() if k not in ("timing", "run")}
    for st in out["health"]["stages"].values():  # wall times differ between two runs; step counts must not
        st.pop("seconds")
    return out


def test_killed_wf_run_resumes_to_identical_result(original_run, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    for d in (full, killed):
        shutil.copytree(original_run, d)
        shutil.rmtree(d / "state", ignore_errors=True)
    subprocess.run(_cli(full), check=True, env=_env(), timeout=600)

    proc = subprocess.Popen(_cli(killed), env=_env())
    state = killed / "state" / "wf.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=False)["loop"]["steps"] >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "wf.safetensors").exists()
    ck = torch.load(state, weights_only=False)
    assert 0 < ck["loop"]["steps"] and not ck["loop"]["done"]

    subprocess.run(_cli(killed), check=True, env=_env(), timeout=600)
    a_full, meta_full = load_tensors(full / "wf.safetensors")
    a_kill, meta_kill = load_tensors(killed / "wf.safetensors")
    assert a_full.keys() == a_kill.keys()
    for k in a_full:
        assert torch.equal(a_full[k], a_kill[k]), k
    assert meta_full["steps"] == meta_kill["steps"]
    assert json.dumps(_evaluate(full), sort_keys=True) == json.dumps(_evaluate(killed), sort_keys=True)
