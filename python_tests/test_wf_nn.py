"""WF layers: the gated forward and the alpha gradients equal the literal WF Alg. 1 (per-sample masked
weights), for conv and qkv, on mixed labels; forget_labels=None is the unwrapped model bit for bit;
bake/compose export plain models that match the gate."""
import copy
import os

import pytest
import torch
from torch import nn

from unlearn_fast.models import create
from unlearn_fast.nn import bake, compose, wrap
from unlearn_fast.nn.wf_layers import WFConv2d, WFLinear
from unlearn_fast.ops import use_backend
from unlearn_fast.reference import wf_conv2d, wf_conv2d_literal, wf_linear, wf_linear_literal

# The Triton backend runs on CUDA tensors, or on CPU tensors only under the interpreter (conftest sets
# TRITON_INTERPRET=1 when there is no GPU); never route CPU tensors to it otherwise.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton_here = pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _alphas(n, o, gen):
    return (torch.rand(n, o, generator=gen) * 6 - 3).requires_grad_(), (torch.rand(n, o, generator=gen) * 6 - 3).requires_grad_()


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (1, 2, 0, 1), (7, 2, 3, 1), (3, 1, 2, 2)])
def test_gated_conv_equals_literal_alg1(k, stride, padding, dilation):
    g = torch.Generator().manual_seed(k * 10 + stride)
    x = torch.randn(5, 6, 7, 13, generator=g, requires_grad=True)
    w = torch.randn(37, 6, k, k, generator=g)
    b = torch.randn(37, generator=g)
    aw, ab = _alphas(4, 37, g)
    labels = torch.tensor([0, 3, 3, 1, 0])  # mixed, class 2 absent
    args = (stride, padding, dilation, 1)
    y = wf_conv2d(x, w, b, aw, ab, labels, *args)
    y_lit = wf_conv2d_literal(x, w, b, aw, ab, labels, *args)
    assert _rel(y, y_lit) < 1e-5
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (x, aw, ab), dy)
    grads_lit = torch.autograd.grad(y_lit, (x, aw, ab), dy)
    for a, b_ in zip(grads, grads_lit):
        assert _rel(a, b_) < 1e-5
    assert torch.equal(grads[1][2], torch.zeros(37))  # absent class: exactly zero


@pytest.mark.parametrize("T", [1, 9])
def test_gated_qkv_equals_literal_alg1(T):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(5, T, 24, generator=g, requires_grad=True)
    w = torch.randn(72, 24, generator=g)
    b = torch.randn(72, generator=g)
    aw, ab = _alphas(6, 72, g)
    labels = torch.tensor([5, 0, 2, 2, 5])
    y = wf_linear(x, w, b, aw, ab, labels)
    y_lit = wf_linear_literal(x, w, b, aw, ab, labels)
    assert _rel(y, y_lit) < 1e-5
    dy = torch.randn(y.shape, generator=g)
    for a, b_ in zip(torch.autograd.grad(y, (x, aw, ab), dy), torch.autograd.grad(y_lit, (x, aw, ab), dy)):
        assert _rel(a, b_) < 1e-5


def test_reference_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(3, dtype=torch.float64, generator=g)
    aw = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    ab = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([1, 3, 1])
    assert torch.autograd.gradcheck(lambda x, aw, ab: wf_conv2d(x, w, b, aw, ab, labels, 2, 1, 1, 1), (x, aw, ab))
    xl = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    wl = torch.randn(3, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda x, aw, ab: wf_linear(x, wl, b, aw, ab, labels), (xl, aw, ab))


def _models():
    return [("small_cnn", dict(in_chans=1, img_size=8)), ("resnet18", dict(in_chans=3, img_size=32)),
            ("vit_tiny", dict(in_chans=3, img_size=32)), ("swin_tiny", dict(in_chans=1, img_size=32))]


@pytest.mark.parametrize("name,kw", _models())
def test_none_labels_is_original_bit_for_bit_and_model_gating_matches_literal(name, kw):
    torch.manual_seed(0)
    m = create(name, num_classes=5, **kw).eval()
    x = torch.randn(3, kw["in_chans"], kw["img_size"], kw["img_size"])
    with torch.no_grad():
        ref = m(x)
        wf = wrap(copy.deepcopy(m), 5)
        assert torch.equal(wf(x), ref)
        assert torch.equal(wf(x, None), ref)
        for a in wf.alpha_parameters():
            a.uniform_(-3, 3)
    n_conv = sum(isinstance(mm, nn.Conv2d) for mm in m.modules())
    n_qkv = sum(1 for n_, mm in m.named_modules() if isinstance(mm, nn.Linear) and n_.endswith("qkv"))
    layers = list(wf.wf_layers())
    # WF-Net Sec. 3.3: a CNN gates every conv; a ViT/Swin only its qkv projections (not patch_embed)
    assert len(layers) == (n_qkv if n_qkv else n_conv) > 0
    assert all(isinstance(mm, WFLinear) for _, mm in layers) == bool(n_qkv)
    assert all(not p.requires_grad for p in wf.model.parameters() if all(p is not a for a in wf.alpha_parameters()))
    labels = torch.tensor([4, 0, 4])
    y = wf(x, labels)
    # literal Alg. 1 on the whole model: every gated layer runs the per-sample masked weights
    with use_backend("torch"):
        lit = _literal_model_forward(wf, x, labels)
    assert _rel(y, lit) < 1e-5
    gy = torch.autograd.grad(y.square().sum(), wf.alpha_parameters(), allow_unused=True)
    gl = torch.autograd.grad(_literal_model_forward(wf, x, labels).square().sum(), wf.alpha_parameters(), allow_unused=True)
    for a, b_ in zip(gy, gl):
        assert _rel(a, b_) < 1e-4  # accumulated through a deep net in fp32


def _literal_model_forward(wf, x, labels):
    import unlearn_fast.nn.wf_layers as L

    saved = (L.WFConv2d.forward, L.WFLinear.forward)

    def conv_fwd(self, inp):
        c = self.inner
        return wf_conv2d_literal(inp, c.weight, c.bias, self.alpha_w, self.alpha_b, self._ctx.labels,
                                 c.stride, c.padding, c.dilation, c.groups)

    def lin_fwd(self, inp):
        lab = self._ctx.labels
        if inp.shape[0] != lab.shape[0]:
            lab = lab.repeat_interleave(inp.shape[0] // lab.shape[0])
        shp = inp.shape
        y = wf_linear_literal(inp.reshape(shp[0], -1, shp[-1]), self.inner.weight, self.inner.bias,
                              self.alpha_w, self.alpha_b, lab)
        return y.reshape(*shp[:-1], y.shape[-1])

    L.WFConv2d.forward, L.WFLinear.forward = conv_fwd, lin_fwd
    try:
        return wf(x, labels)
    finally:
        L.WFConv2d.forward, L.WFLinear.forward = saved


def test_bake_and_compose():
    torch.manual_seed(1)
    m = create("small_cnn", num_classes=4, in_chans=1, img_size=8).eval()
    wf = wrap(m, 4)
    with torch.no_grad():
        for a in wf.alpha_parameters():
            a.uniform_(-3, 3)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        for c in range(4):
            baked = bake(wf, c)
            assert type(baked) is type(m) and not any(isinstance(mm, (WFConv2d, WFLinear)) for mm in baked.modules())
            assert _rel(baked(x), wf(x, torch.full((6,), c))) < 1e-5
        # compose of one class is bake; of two it closes what either closes (gates multiply)
        assert _rel(compose(wf, [2])(x), bake(wf, 2)(x)) < 1e-6
        both = compose(wf, [0, 3])
        conv = both.block1.conv
        orig = wf.model.block1.conv
        gw = torch.sigmoid(orig.alpha_w[0]) * torch.sigmoid(orig.alpha_w[3])
        assert torch.allclose(conv.weight, orig.inner.weight * gw[:, None, None, None])
    with pytest.raises(IndexError):
        bake(wf, 4)
    with pytest.raises(ValueError):
        compose(wf, [])
    # the WF model itself is untouched by baking
    assert any(isinstance(mm, WFConv2d) for mm in wf.modules())


def test_bad_labels_raise_clear_errors():
    m = create("small_cnn", num_classes=3, in_chans=1, img_size=8).eval()
    wf = wrap(m, 3)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        wf(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="gate rows"):
        wf(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="already"):
        wrap(wf, 3)


def test_regularizer_and_clip():
    m = create("small_cnn", num_classes=3, in_chans=1, img_size=8)
    wf = wrap(m, 3, alpha_init=3.0)
    assert abs(wf.regularizer().item() - (1 - torch.sigmoid(torch.tensor(3.0))).item()) < 1e-6
    with torch.no_grad():
        for a in wf.alpha_parameters():
            a.fill_(10.0)
    wf.clip_alphas(-3, 3)
    assert all(a.max().item() == 3.0 for a in wf.alpha_parameters())
    wf.train()
    assert not wf.model.training  # BN stays frozen while alphas train


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_transformers_gate_qkv_only_unless_patch_embed_asked(name, tmp_path):
    from unlearn_fast.nn import load_wf, save_wf

    torch.manual_seed(0)
    m = create(name, num_classes=4, in_chans=1, img_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    wf = wrap(copy.deepcopy(m), 4)
    names = [n for n, _ in wf.wf_layers()]
    assert names and all(n.endswith("qkv") for n in names) and not wf.gate_patch_embed
    wf_pe = wrap(copy.deepcopy(m), 4, gate_patch_embed=True)
    names_pe = [n for n, _ in wf_pe.wf_layers()]
    assert set(names_pe) - set(names) == {"patch_embed.proj"}
    with torch.no_grad():
        for a in wf_pe.alpha_parameters():
            a.uniform_(-3, 3)
    # the option survives save / load (the alphas would not fit otherwise)
    save_wf(wf_pe, tmp_path / "wf.safetensors")
    back = load_wf(tmp_path / "wf.safetensors", m)
    assert back.gate_patch_embed and [n for n, _ in back.wf_layers()] == names_pe
    labels = torch.tensor([3, 1])
    with torch.no_grad():
        assert torch.equal(back(x, labels), wf_pe(x, labels))


@needs_triton_here
def test_wrap_turns_off_inplace_ops_so_the_fused_backward_works():
    # the Triton op saves its output for the alpha gradient; VGG's ReLU(inplace=True) would overwrite it
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(100, 3))
    wf = wrap(net, 3).to(DEV)
    assert not net[1].inplace
    x = torch.randn(2, 3, 5, 5, device=DEV)
    labels = torch.tensor([0, 2], device=DEV)
    from unlearn_fast.kernels._tf32 import tf32_policy

    with tf32_policy(False), use_backend("triton"):  # IEEE fp32 on both paths (explicit, GPU too)
        wf(x, labels).square().sum().backward()
    g_triton = [a.grad.clone() for a in wf.alpha_parameters()]
    for a in wf.alpha_parameters():
        a.grad = None
    with tf32_policy(False), use_backend("torch"):
        wf(x, labels).square().sum().backward()
    for a, b_ in zip(g_triton, [a.grad for a in wf.alpha_parameters()]):
        assert _rel(a, b_) < (1e-5 if DEV == "cpu" else 1e-4)
