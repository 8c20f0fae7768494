"""Unit gates (``WFModel.gate_scale``, WF option ``gate_norm``): the effective gate is ``s * sigmoid(alpha)``.

Checked against models built by hand (weights multiplied by ``s * sigmoid(alpha)[c]`` layer by layer),
not against the WF code paths themselves; odd shapes (7x13 images, batch 5, 37 channels)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from unlearn_fast.models import create
from unlearn_fast.nn import bake, compose, load_wf, save_wf, wrap
from unlearn_fast.nn.wf_layers import _WFLayer

S3 = 1.0 / (1.0 / (1.0 + math.exp(-3.0)))   # 1 / sigmoid(3), in float64


def _model(seed=0):
    torch.manual_seed(seed)
    m = create("small_cnn", num_classes=6, in_chans=1, img_size=13, width=37 // 4)
    m.eval()
    # non-trivial BN statistics, so a scaled conv is NOT undone by the following BN
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _by_hand(original: nn.Module, wf, rows: list[int], s: float) -> nn.Module:
    """The original model with every gated layer's weight and bias multiplied by prod_c s*sigmoid(alpha[c])."""
    ref = copy.deepcopy(original)
    layers = {n.removeprefix("model."): l for n, l in wf.named_modules() if isinstance(l, _WFLayer)}
    with torch.no_grad():
        for name, layer in layers.items():
            mod = ref.get_submodule(name)
            gw = torch.ones(layer.alpha_w.shape[1], dtype=torch.float64)
            gb = torch.ones_like(gw)
            for c in rows:
                gw = gw * s * torch.sigmoid(layer.alpha_w[c].double())
                if layer.alpha_b is not None:
                    gb = gb * s * torch.sigmoid(layer.alpha_b[c].double())
            mod.weight.mul_(gw.float().reshape(-1, *([1] * (mod.weight.dim() - 1))))
            if mod.bias is not None:
                mod.bias.mul_(gb.float())
    return ref


def _random_wf(seed: int, bound: float, s: float):
    """(original, its WF-Net with alphas uniform in [-bound, bound] and gate scale ``s``)."""
    original = _model(seed)
    wf = wrap(copy.deepcopy(original), 6, alpha_init=3.0)
    with torch.no_grad():
        for a in wf.alpha_parameters():
            a.uniform_(-bound, bound)
    wf.gate_scale = s
    return original, wf


def test_unit_gates_start_as_the_original_model():
    original = _model()
    x = torch.randn(5, 1, 7, 13)
    wf = wrap(copy.deepcopy(original), 6, alpha_init=3.0)
    labels = torch.tensor([0, 5, 2, 2, 1])
    with torch.no_grad():
        y0 = original(x)
        paper = wf(x, labels)
        wf.gate_scale = S3
        unit = wf(x, labels)
    assert not torch.allclose(paper, y0, rtol=1e-3, atol=1e-3)   # sigmoid(3) = 0.95 in every layer
    torch.testing.assert_close(unit, y0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", [1.0, S3, 1.7])
def test_scaled_gates_match_weights_multiplied_by_hand(s):
    original, wf = _random_wf(1, 3.0, s)
    x = torch.randn(5, 1, 7, 13)
    for c in (0, 4):
        ref = _by_hand(original, wf, [c], s)
        with torch.no_grad():
            want = ref(x)
            torch.testing.assert_close(wf(x, torch.full((5,), c)), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(bake(wf, c)(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compose(wf, [1, 3])(x), _by_hand(original, wf, [1, 3], s)(x), rtol=1e-5, atol=1e-5)


def test_scaled_gate_gradients_match_the_hand_built_model():
    """d loss / d alpha through the gated op equals autograd through weights multiplied by hand."""
    original, wf = _random_wf(2, 2.0, S3)
    x = torch.randn(5, 1, 7, 13)
    c = 3
    wf(x, torch.full((5,), c)).square().sum().backward()
    layers = [l for l in wf.modules() if isinstance(l, _WFLayer)]
    # hand-built: parameters are the alphas, weights rebuilt functionally
    ref = copy.deepcopy(original)
    names = [n.removeprefix("model.") for n, l in wf.named_modules() if isinstance(l, _WFLayer)]
    alphas = [l.alpha_w.detach()[c].clone().requires_grad_(True) for l in layers]
    params = {}
    for n, a, l in zip(names, alphas, layers):
        mod = ref.get_submodule(n)
        params[f"{n}.weight"] = mod.weight * (S3 * torch.sigmoid(a)).reshape(-1, *([1] * (mod.weight.dim() - 1)))
        if mod.bias is not None:
            params[f"{n}.bias"] = mod.bias * S3 * torch.sigmoid(l.alpha_b.detach()[c])
    torch.func.functional_call(ref, params, (x,)).square().sum().backward()
    for l, a in zip(layers, alphas):
        torch.testing.assert_close(l.alpha_w.grad[c], a.grad, rtol=1e-4, atol=1e-5)
        others = [r for r in range(6) if r != c]
        assert torch.count_nonzero(l.alpha_w.grad[others]) == 0


def test_gate_scale_survives_save_and_load(tmp_path):
    original = _model(3)
    wf = wrap(copy.deepcopy(original), 6)
    wf.gate_scale = S3
    save_wf(wf, tmp_path / "wf.safetensors")
    back = load_wf(tmp_path / "wf.safetensors", original)
    assert back.gate_scale == pytest.approx(S3, rel=0, abs=0)
    x = torch.randn(5, 1, 7, 13)
    with torch.no_grad():
        torch.testing.assert_close(back(x, torch.arange(5)), original(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gate_scale"):
        wf.gate_scale = 0.0


def test_scaled_frozen_weight_is_reused_until_it_changes():
    """The fused conv path packs a weight once per tensor version: the scaled weight must be the same
    tensor at every forward and a new one (with the new values) after an in-place update."""
    from unlearn_fast.nn.wf_layers import _scaled

    w = torch.randn(37, 5, 3, 3)
    a, b = _scaled(w, 1.25), _scaled(w, 1.25)
    assert a is b
    torch.testing.assert_close(a, w * 1.25, rtol=0, atol=0)
    with torch.no_grad():
        w.add_(1.0)
    c = _scaled(w, 1.25)
    assert c is not a
    torch.testing.assert_close(c, w * 1.25, rtol=0, atol=0)
    assert _scaled(w, 2.0) is not c                       # another scale, another product
    p = torch.randn(4, requires_grad=True)               # a trainable tensor is never cached
    assert _scaled(p, 2.0).requires_grad and _scaled(p, 2.0) is not _scaled(p, 2.0)
