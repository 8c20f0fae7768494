"""WF gate per layer (GPU): plain conv/linear vs the WF implementations, time and peak memory.

    pytest --benchmark-only bench/test_bench_wf_layers.py        # needs CUDA; skips otherwise

Variants (DESIGN §3, issue 4): ``plain_fwd``, ``plain_fwd_dgrad`` (frozen weights: data grad only),
``literal`` (WF Alg. 1, per-sample weights), ``loop`` (per-class loop over the classes present),
``eager_scale`` (conv + gather + multiply = the reference), ``compiled_scale`` (the same under
``torch.compile``), ``unlearn_fast`` (fused Triton kernels). WF variants run forward + backward to
x and alpha. Layers are taken from the real backbones (ResNet-18 at 32 / 224 px, ViT-S/16 qkv at
224 px), batch 256, 10 classes, mixed labels. This module also holds the helpers the whole-step
bench (``test_bench_wf_step.py``) imports.
"""
from __future__ import annotations

import contextlib
import json
import os
import types
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

BATCH, NUM_CLASSES = 256, 10
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="WF benchmarks need a CUDA GPU")
MODELS = {  # bench id -> (registry name, img_size)
    "resnet18_32": ("resnet18", 32),
    "resnet18_224": ("resnet18", 224),
    "vit_s16_224": ("vit_small", 224),
}
VARIANTS = ("plain_fwd", "plain_fwd_dgrad", "literal", "loop", "eager_scale", "compiled_scale", "unlearn_fast")


# ------------------------------------------------------------------------------ baselines
def wf_conv2d_loop(x, weight, bias, alpha_w, alpha_b, labels, stride=1, padding=0, dilation=1, groups=1):
    """Per-class loop: one conv per class present, with that class's gate baked into the weights."""
    out = None
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        g = torch.sigmoid(alpha_w[c])
        b = bias * torch.sigmoid(alpha_b[c]) if bias is not None and alpha_b is not None else bias
        yc = F.conv2d(x.index_select(0, idx), weight * g.view(-1, 1, 1, 1), b, stride, padding, dilation, groups)
        out = (yc.new_zeros((x.shape[0],) + yc.shape[1:]) if out is None else out).index_copy(0, idx, yc)
    return out


def wf_linear_loop(x, weight, bias, alpha_w, alpha_b, labels):
    """Per-class loop for a linear layer (``x [B, T, F]`` or ``[B, F]``)."""
    out = None
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        g = torch.sigmoid(alpha_w[c])
        b = bias * torch.sigmoid(alpha_b[c]) if bias is not None and alpha_b is not None else bias
        yc = F.linear(x.index_select(0, idx), weight * g[:, None], b)
        out = (yc.new_zeros((x.shape[0],) + yc.shape[1:]) if out is None else out).index_copy(0, idx, yc)
    return out


def _impls(variant: str):
    """``(wf_conv2d, wf_linear, backend)`` for a WF variant."""
    from unlearn_fast import ops
    from unlearn_fast.reference import wf_gate as ref

    if variant == "literal":
        return ref.wf_conv2d_literal, ref.wf_linear_literal, "torch"
    if variant == "loop":
        return wf_conv2d_loop, wf_linear_loop, "torch"
    if variant in ("eager_scale", "compiled_scale"):
        return ops.wf_conv2d, ops.wf_linear, "torch"
    if variant.startswith("unlearn_fast"):
        return ops.wf_conv2d, ops.wf_linear, "triton"
    raise ValueError(f"unknown WF variant {variant!r}")


@contextlib.contextmanager
def wf_impl(variant: str):
    """Route the WF layers of ``unlearn_fast.nn`` to one implementation while the block runs."""
    from unlearn_fast.nn import wf_layers
    from unlearn_fast.ops import use_backend

    conv, lin, backend = _impls(variant)
    old = wf_layers.ops
    wf_layers.ops = types.SimpleNamespace(wf_conv2d=conv, wf_linear=lin)
    try:
        with use_backend(backend):
            yield
    finally:
        wf_layers.ops = old


# ------------------------------------------------------------------------------ measuring
def device_name() -> str:
    if not CUDA:
        return "cpu"
    return torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")


def mixed_labels(n: int = BATCH, classes: int = NUM_CLASSES, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=gen).cuda()


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory above what was allocated before one call of ``fn``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_bench(benchmark, section: str, key: str, fn: Callable[[], object], rounds: int = 20, warmup: int = 3):
    """Time ``fn`` (CUDA-synchronised) with pytest-benchmark, record median ms + peak memory."""
    def call():
        fn()
        torch.cuda.synchronize()

    try:
        for _ in range(warmup):
            call()
        mem = peak_bytes(fn)
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        record(section, key, {"oom": True})
        pytest.skip(f"{key}: out of GPU memory")
    st = benchmark.stats.stats
    entry = {"median_ms": st.median * 1e3, "min_ms": st.min * 1e3, "peak_mib": mem / 2 ** 20, "rounds": rounds}
    benchmark.extra_info.update(entry)
    record(section, key, entry)
    return entry


def record(section: str, key: str, entry: dict) -> None:
    """Merge one result into ``bench/results/<device>.json`` under ``section`` (read-modify-write)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{device_name()}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("device", torch.cuda.get_device_name() if CUDA else "cpu")
    data.setdefault("torch", torch.__version__)
    data.setdefault(section, {})[key] = entry
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------ layer specs
_LAYERS = {  # bench id -> module names of representative gated layers
    "resnet18_32": ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"],
    "resnet18_224": ["conv1", "layer1.0.conv1", "layer3.0.conv1", "layer4.1.conv2"],
    "vit_s16_224": ["blocks.0.attn.qkv"],
}
_cache: dict[str, list] = {}


def layer_specs(model_id: str):
    """``[(name, module, input shape)]`` for the representative layers of ``model_id`` (batch 256)."""
    if model_id not in _cache:
        from unlearn_fast.models import create

        name, size = MODELS[model_id]
        model = create(name, NUM_CLASSES, 3, size).cuda().eval()
        shapes = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, tuple(i[0].shape))) for n in _LAYERS[model_id]]
        with torch.no_grad():
            model(torch.randn(2, 3, size, size, device="cuda"))
        for h in hooks:
            h.remove()
        _cache[model_id] = [(n, model.get_submodule(n), (BATCH,) + shapes[n][1:]) for n in _LAYERS[model_id]]
    return _cache[model_id]


def _layer_fn(variant: str, module: torch.nn.Module, shape: tuple[int, ...]):
    x = torch.randn(shape, device="cuda")
    w, b = module.weight.detach(), (module.bias.detach() if module.bias is not None else None)
    out_ch = w.shape[0]
    alpha_w = torch.full((NUM_CLASSES, out_ch), 3.0, device="cuda").uniform_(-3, 3).requires_grad_()
    alpha_b = torch.zeros_like(alpha_w).uniform_(-3, 3).requires_grad_() if b is not None else None
    labels = mixed_labels()
    is_conv = isinstance(module, torch.nn.Conv2d)
    geo = (module.stride, module.padding, module.dilation, module.groups) if is_conv else ()
    if variant == "plain_fwd":
        def fn():
            with torch.no_grad():
                return module(x)
        return fn
    xg = x.clone().requires_grad_()
    if variant == "plain_fwd_dgrad":
        def fn():
            y = module(xg)
            y.backward(torch.ones_like(y))
        return fn
    conv, lin, backend = _impls(variant)
    op = conv if is_conv else lin
    if variant == "compiled_scale":
        from unlearn_fast.reference import wf_gate as ref

        op = torch.compile(ref.wf_conv2d if is_conv else ref.wf_linear)

    def fn():
        from unlearn_fast.ops import use_backend

        with use_backend(backend):
            y = op(xg, w, b, alpha_w, alpha_b, labels, *geo)
        y.backward(torch.ones_like(y))
    return fn


_PARAMS = [(m, i) for m in MODELS for i in range(len(_LAYERS[m]))]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_id,layer_idx", _PARAMS, ids=[f"{m}-{_LAYERS[m][i]}" for m, i in _PARAMS])
def test_wf_layer(benchmark, model_id, layer_idx, variant):
    name, module, shape = layer_specs(model_id)[layer_idx]
    benchmark.group = f"layer {model_id} {name} {shape}"
    torch._dynamo.reset()
    run_bench(benchmark, "layers", f"{model_id}|{name}|{variant}", _layer_fn(variant, module, shape))
