"""Whole-model WF benches (GPU): one WF untraining step and one all-class evaluation pass.

    pytest --benchmark-only bench/test_bench_wf_step.py           # needs CUDA; skips otherwise
    python bench/test_bench_wf_step.py bench/results/<device>.json  # Markdown tables from the JSON

Step = forward + backward to alpha (all original weights frozen; the WF wrapper ``unlearn_fast.nn.wrap``),
batch 256, 10 classes, mixed labels. Baselines: ``plain_fwd`` (no grad), ``plain_fwd_dgrad`` (plain
model, frozen weights, loss backward to the input) eager and compiled, and the WF variants of
``test_bench_wf_layers`` (``literal``, ``loop``, ``eager_scale``, ``compiled_scale``, ``unlearn_fast``,
``unlearn_fast_compiled``). Eval = ``wf(x, labels)`` under ``torch.inference_mode`` vs plain inference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

try:
    from test_bench_wf_layers import (BATCH, MODELS, NUM_CLASSES, mixed_labels, needs_cuda, run_bench,
                                      wf_impl)
except ImportError:  # imported as part of a package (bench/__init__.py present)
    from bench.test_bench_wf_layers import (BATCH, MODELS, NUM_CLASSES, mixed_labels, needs_cuda,
                                            run_bench, wf_impl)

STEP_VARIANTS = ("plain_fwd", "plain_fwd_dgrad", "plain_fwd_dgrad_compiled", "literal", "loop", "eager_scale",
                 "compiled_scale", "unlearn_fast", "unlearn_fast_compiled")
EVAL_VARIANTS = ("plain_fwd", "plain_fwd_compiled", "eager_scale", "compiled_scale", "unlearn_fast",
                 "unlearn_fast_compiled")


def _setup(model_id: str):
    from unlearn_fast.models import create
    from unlearn_fast.nn import wrap

    name, size = MODELS[model_id]
    torch.manual_seed(0)
    model = create(name, NUM_CLASSES, 3, size).cuda().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    wf = wrap(model, NUM_CLASSES)
    with torch.no_grad():  # mixed gates, inside WF's clip range
        for a in wf.alpha_parameters():
            a.uniform_(-3, 3)
    x = torch.randn(BATCH, 3, size, size, device="cuda")
    y = torch.randint(0, NUM_CLASSES, (BATCH,), device="cuda")
    return model, wf, x, y, mixed_labels()


def _step_fn(variant: str, model, wf, x, y, labels):
    compiled = variant.endswith("_compiled") or variant == "compiled_scale"
    if variant.startswith("plain"):
        net = torch.compile(model) if compiled else model
        xg = x.clone().requires_grad_()
        if variant == "plain_fwd":
            def fn():
                with torch.no_grad():
                    return net(x)
            return fn

        def fn():
            F.cross_entropy(net(xg), y).backward()
        return fn
    net = torch.compile(wf) if compiled else wf
    alphas = wf.alpha_parameters()
    impl = variant.replace("_compiled", "") if variant != "compiled_scale" else variant

    def fn():
        for a in alphas:
            a.grad = None
        with wf_impl(impl):
            F.cross_entropy(net(x, labels), y).backward()
    return fn


def _eval_fn(variant: str, model, wf, x, labels):
    compiled = variant.endswith("_compiled") or variant == "compiled_scale"
    if variant.startswith("plain"):
        net = torch.compile(model) if compiled else model

        def fn():
            with torch.inference_mode():
                return net(x)
        return fn
    net = torch.compile(wf) if compiled else wf
    impl = variant.replace("_compiled", "") if variant != "compiled_scale" else variant

    def fn():
        with torch.inference_mode(), wf_impl(impl):
            return net(x, labels)
    return fn


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("model_id", list(MODELS))
def test_wf_step(benchmark, model_id, variant):
    torch._dynamo.reset()
    model, wf, x, y, labels = _setup(model_id)
    benchmark.group = f"step {model_id}"
    rounds = 5 if variant in ("literal", "loop") else 20
    run_bench(benchmark, "step", f"{model_id}|{variant}", _step_fn(variant, model, wf, x, y, labels), rounds=rounds)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("variant", EVAL_VARIANTS)
@pytest.mark.parametrize("model_id", list(MODELS))
def test_wf_eval(benchmark, model_id, variant):
    torch._dynamo.reset()
    model, wf, x, _, labels = _setup(model_id)
    benchmark.group = f"eval {model_id}"
    run_bench(benchmark, "eval", f"{model_id}|{variant}", _eval_fn(variant, model, wf, x, labels))


# ------------------------------------------------------------------------------ report
def render(data: dict) -> str:
    """Markdown tables (median ms, peak MiB, and the issue-4 ratios) from a results JSON."""
    lines = [f"Device: {data.get('device', '?')}, torch {data.get('torch', '?')}; median ms (peak MiB).", ""]
    for section, variants in (("step", STEP_VARIANTS), ("eval", EVAL_VARIANTS)):
        res = data.get(section, {})
        if not res:
            continue
        lines += [f"### {section}", "", "| model | " + " | ".join(variants) + " |",
                  "|---" * (len(variants) + 1) + "|"]
        for m in MODELS:
            cells = []
            for v in variants:
                e = res.get(f"{m}|{v}")
                cells.append("—" if e is None else "OOM" if e.get("oom") else
                             f"{e['median_ms']:.1f} ({e['peak_mib']:.0f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    step, ev = data.get("step", {}), data.get("eval", {})
    lines += ["### issue-4 targets", "", "| model | step / compiled plain fwd+dgrad (≤1.05) | literal / step (≥10) "
              "| eager scale / step (≥1.6) | compiled scale / step (≥1) | eval throughput vs plain (≥0.95) "
              "| peak mem / plain fwd+dgrad (≤1.1) |", "|---|---|---|---|---|---|---|"]

    def t(d, k):
        e = d.get(k)
        return None if e is None or e.get("oom") else e

    for m in MODELS:
        uf = t(step, f"{m}|unlearn_fast_compiled") or t(step, f"{m}|unlearn_fast")
        pd = t(step, f"{m}|plain_fwd_dgrad_compiled") or t(step, f"{m}|plain_fwd_dgrad")
        lit, eag, com = (t(step, f"{m}|{v}") for v in ("literal", "eager_scale", "compiled_scale"))
        pe, ue = t(ev, f"{m}|plain_fwd"), t(ev, f"{m}|unlearn_fast_compiled") or t(ev, f"{m}|unlearn_fast")

        def r(a, b, key="median_ms"):
            return f"{a[key] / b[key]:.2f}" if a and b and b[key] else "—"
        lit_cell = r(lit, uf) if lit else ("OOM" if step.get(f"{m}|literal", {}).get("oom") else "—")
        lines.append(f"| {m} | {r(uf, pd)} | {lit_cell} | {r(eag, uf)} | {r(com, uf)} | {r(pe, ue)} "
                     f"| {r(uf, pd, 'peak_mib')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/test_bench_wf_step.py bench/results/<device>.json")
    print(render(json.loads(Path(sys.argv[1]).read_text())))
