"""WF gate per layer (GPU): the plain frozen layer vs the WF implementations, time and peak memory.

    pytest bench/test_bench_wf_layers.py -s        # needs CUDA; skips otherwise

Variants: ``plain_fwd``; ``plain_fwd_dgrad`` (frozen weights: data gradient only, no weight gradient -
what a WF layer computes besides dalpha); ``loop`` (per-class loop); ``eager_scale`` (conv + gather +
multiply = the reference); ``compiled_scale`` (the same under ``torch.compile``); ``unlearn_fast`` (fused
Triton kernels). WF variants run forward + backward to x and alpha. Representative layers of ResNet-18
(32 / 224 px) and the ViT-S/16 qkv (224 px), batch 256, 10 classes, mixed labels, TF32 on; each WF
variant's dx and dalpha are checked against the eager reference before timing. Results:
``bench/results/<device>.json``, section ``wf_layers``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import wf_bench as wb
from conftest import requires_cuda

VARIANTS = ("plain_fwd", "plain_fwd_dgrad", "loop", "eager_scale", "compiled_scale", "unlearn_fast_fusedconv",
            "unlearn_fast_epilogue")
LAYERS = {  # bench id -> module names of representative gated layers
    "resnet18_32": ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"],
    "resnet18_224": ["conv1", "layer1.0.conv1", "layer3.0.conv1", "layer4.1.conv2"],
    "vit_s16_224": ["blocks.0.attn.qkv"],
}
_cache: dict = {}


def layer_specs(model_id: str):
    """``[(name, module, input shape)]`` of the representative layers of ``model_id`` (batch 256)."""
    if model_id not in _cache:
        from unlearn_fast.models import create

        name, size, kw = wb.MODELS[model_id]
        model = create(name, wb.NUM_CLASSES, 3, size, **kw).cuda().eval()
        shapes = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, tuple(i[0].shape))) for n in LAYERS[model_id]]
        with torch.no_grad():
            model(torch.randn(2, 3, size, size, device="cuda"))
        for h in hooks:
            h.remove()
        _cache[model_id] = [(n, model.get_submodule(n), (wb.BATCH,) + shapes[n][1:]) for n in LAYERS[model_id]]
    return _cache[model_id]


def layer_fn(variant: str, module: torch.nn.Module, shape: tuple[int, ...]):
    """``(fn, probe)``: one call, and one call returning (out, dx, dalpha...) flattened for the check."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=gen)
    w, b = module.weight.detach(), (module.bias.detach() if module.bias is not None else None)
    alpha_w = torch.empty((wb.NUM_CLASSES, w.shape[0]), device="cuda").uniform_(-3, 3, generator=gen).requires_grad_()
    alpha_b = torch.empty_like(alpha_w).uniform_(-3, 3, generator=gen).requires_grad_() if b is not None else None
    labels = torch.randint(0, wb.NUM_CLASSES, (shape[0],), device="cuda", generator=gen)
    is_conv = isinstance(module, torch.nn.Conv2d)
    geo = (module.stride, module.padding, module.dilation, module.groups) if is_conv else ()
    plain = (lambda t: F.conv2d(t, w, b, *geo)) if is_conv else (lambda t: F.linear(t, w, b))
    xg = x.clone().requires_grad_()
    alphas = [a for a in (alpha_w, alpha_b) if a is not None]
    if variant == "plain_fwd":
        def fn():
            with torch.no_grad():
                return plain(x)
        return fn, lambda: fn().flatten()
    if variant == "plain_fwd_dgrad":
        def fn():
            xg.grad = None
            y = plain(xg)
            y.backward(torch.ones_like(y))
            return y
        return fn, lambda: torch.cat([fn().flatten(), xg.grad.flatten()])
    conv, lin, backend = wb.impls(variant.replace("_epilogue", ""))
    op = conv if is_conv else lin
    path = "fused" if variant.endswith("_fusedconv") else "epilogue" if variant.endswith("_epilogue") else None
    if variant == "compiled_scale":
        op = torch.compile(op)

    def fn():
        from unlearn_fast.ops import use_backend

        xg.grad = None
        for a in alphas:
            a.grad = None
        with use_backend(backend), wb.conv_path_env(path):
            y = op(xg, w, b, alpha_w, alpha_b, labels, *geo)
        y.backward(torch.ones_like(y))
        return y
    return fn, lambda: torch.cat([fn().detach().flatten(), xg.grad.flatten()] + [a.grad.flatten() for a in alphas])


_PARAMS = [(m, i) for m in LAYERS for i in range(len(LAYERS[m]))]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_id,layer_idx", _PARAMS, ids=[f"{m}-{LAYERS[m][i]}" for m, i in _PARAMS])
def test_wf_layer(record, model_id, layer_idx, variant):
    name, module, shape = layer_specs(model_id)[layer_idx]
    torch._dynamo.reset()
    fn, probe = layer_fn(variant, module, shape)
    entry: dict = {}
    if variant not in ("plain_fwd", "plain_fwd_dgrad"):
        err = wb.rel_err(probe(), layer_fn("eager_scale", module, shape)[1]())
        entry["check_rel_err"] = err
        assert err <= 2e-2, f"{variant} disagrees with the eager reference: rel err {err:.3g}"
    try:
        entry.update(wb.time_ms(fn, reps=20))
    except torch.cuda.OutOfMemoryError:
        entry = {"oom": True}
    record("wf_layers", {f"{model_id}|{name}|{variant}": entry})
