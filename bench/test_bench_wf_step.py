"""Whole-model WF benches (GPU): one WF untraining step and one all-class evaluation pass.

    pytest bench/test_bench_wf_step.py -s        # needs CUDA; skips otherwise
    bash bench/gpu_check.sh                      # the same measurements in one time-boxed run, plus a ratio table

Step = forward + backward to the alphas (all original weights frozen; ``unlearn_fast.nn.wrap``), batch 256,
10 classes, mixed labels, TF32 on (explicit). Fair baselines (``wf_bench``): ``plain_fwd`` (no grad) and
``plain_fwd_dgrad`` - frozen weights, no weight gradient, no gradient into the image (the backward starts
at the stem output) - eager, compiled and channels-last; the WF variants ``eager_scale``,
``compiled_scale``, ``loop``, ``unlearn_fast`` (``_compiled``, ``_cl``). Every variant is checked against
the eager reference before it is timed. Results: ``bench/results/<device>.json``, section ``wf_step``.
"""
from __future__ import annotations

import pytest

import wf_bench as wb
from conftest import requires_cuda

gpu = pytest.mark.gpu


@requires_cuda
@gpu
@pytest.mark.parametrize("variant", wb.STEP_VARIANTS + wb.CL_VARIANTS)
@pytest.mark.parametrize("model_id", list(wb.MODELS))
def test_wf_step(record, model_id, variant):
    if variant.endswith("_cl") and "resnet" not in model_id:
        pytest.skip("channels-last variants are for the CNNs")
    state = wb.setup(model_id, channels_last=variant.endswith("_cl"))
    entry = wb.measure("step", variant, model_id, state, reps=20 if variant != "loop" else 5, tol=2e-2)
    record("wf_step", {f"step|{model_id}|{variant}": entry})
    assert "error" not in entry, entry["error"]


@requires_cuda
@gpu
@pytest.mark.parametrize("variant", wb.EVAL_VARIANTS)
@pytest.mark.parametrize("model_id", list(wb.MODELS))
def test_wf_eval(record, model_id, variant):
    state = wb.setup(model_id)
    entry = wb.measure("eval", variant, model_id, state, reps=20, tol=2e-2)
    record("wf_step", {f"eval|{model_id}|{variant}": entry})
    assert "error" not in entry, entry["error"]


def test_render_ratio_table():
    # the ratio table from made-up entries: a fixed input, so this runs (and can fail) without a GPU
    res = {"step|m|unlearn_fast": {"median_ms": 10.0}, "step|m|unlearn_fast_compiled": {"median_ms": 8.0},
           "step|m|plain_fwd_dgrad": {"median_ms": 9.0}, "step|m|plain_fwd_dgrad_compiled": {"median_ms": 7.6},
           "step|m|eager_scale": {"median_ms": 16.0}, "step|m|loop": {"error": "x"},
           "eval|m|plain_fwd": {"median_ms": 3.0}, "eval|m|unlearn_fast": {"median_ms": 3.3}}
    rows = {c.split(" [")[0]: v for _, c, v in wb.ratio_rows(res, ["m"])}
    assert rows["WF step (unlearn_fast_compiled) / plain fwd+dgrad compiled (plain_fwd_dgrad_compiled)"] == "1.05"
    assert rows["WF step (unlearn_fast_compiled) / plain fwd+dgrad eager (plain_fwd_dgrad)"] == "0.89"
    assert rows["eager gate / WF step"] == "2.00" and rows["per-class loop / WF step"] == "—"
    assert rows["all-class eval throughput / plain inference"] == "0.91"
    assert "| m | step loop | x" in wb.render(res, ["m"])
