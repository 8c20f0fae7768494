"""Any timm / torchvision model by name (``timm:<name>``, ``tv:<name>``): creation, the WF gate rule, open
gates == the plain model, baking, local weights with head resizing, stage feature points, EC modules, and a
very short WF and EC run per family. Tiny sizes (16-32 px, 5-10 classes), CPU, one thread."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from unlearn_fast import models
from unlearn_fast.models.ec_modules import build_ec_modules, ec_forward
from unlearn_fast.nn import bake, wrap

K = 5
TINY = {
    "timm:resnet10t": (dict(), 16),
    "timm:vit_tiny_patch16_224": (dict(patch_size=4, depth=4), 16),
    "timm:convnext_atto": (dict(), 32),
    "timm:swin_tiny_patch4_window7_224": (dict(patch_size=2, window_size=2, depths=(1, 1, 1, 1), embed_dim=16,
                                               num_heads=(1, 1, 2, 2)), 16),
    "timm:beit_base_patch16_224": (dict(patch_size=4, depth=2, embed_dim=32, num_heads=2), 16),
    "tv:resnet18": (dict(), 32),
    "tv:mobilenet_v3_small": (dict(), 32),
    "tv:VisionTransformer": (dict(patch_size=4, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64), 16),
    "tv:SwinTransformer": (dict(patch_size=[2, 2], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                window_size=[2, 2]), 16),
}
ATTENTION = {"timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224", "timm:beit_base_patch16_224",
             "tv:VisionTransformer", "tv:SwinTransformer"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make(name: str, in_chans: int = 1, seed: int = 0, **extra) -> nn.Module:
    kw, size = TINY[name]
    torch.manual_seed(seed)
    m = models.create(name, num_classes=K, in_chans=in_chans, img_size=size, **kw, **extra).eval()
    # torchvision ViT / BEiT start with a zero / tiny head: give every classifier real weights so that
    # output comparisons are not trivially equal
    head = dict(m.named_modules())[models.feature_layers(m, name)[-1]]
    with torch.no_grad():
        head.weight.normal_(0, head.weight.shape[1] ** -0.5)
    return m


def _x(name: str, b: int = 3, in_chans: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, in_chans, TINY[name][1], TINY[name][1], generator=torch.Generator().manual_seed(seed))


def _expected_gates(model: nn.Module) -> list[str]:
    """Independent of the rule in nn.wrap: by module class. Attention classes (timm ``Attention`` /
    ``WindowAttention``, torchvision ``ShiftedWindowAttention``) gate their ``qkv`` child, torchvision's
    ``nn.MultiheadAttention`` its in-projection; models without attention gate every exact ``nn.Conv2d``."""
    attn = [f"{n}.qkv" for n, m in model.named_modules() if type(m).__name__.endswith("Attention")
            and isinstance(getattr(m, "qkv", None), nn.Linear)]
    attn += [f"{n}.in_proj" for n, m in model.named_modules() if type(m) is nn.MultiheadAttention]
    if attn:
        return sorted(attn)
    return sorted(n for n, m in model.named_modules() if type(m) is nn.Conv2d)


# ------------------------------------------------------------------------------------ create
@pytest.mark.parametrize("name", sorted(TINY))
def test_create_forward_family_and_gates(name):
    m = _make(name)
    y = m(_x(name))
    assert y.shape == (3, K) and torch.isfinite(y).all()
    assert m.unlearn_fast_config["name"] == name and m.unlearn_fast_config["num_classes"] == K
    assert models.model_family(name) == ("vit" if name in ATTENTION else "cnn")
    expected = _expected_gates(m)
    wf = wrap(m, K)
    assert sorted(wf.gated_layers) == expected and expected
    assert wf.skipped_layers == {}


@pytest.mark.parametrize("name", sorted(TINY))
def test_open_gates_equal_plain_model_and_bake(name):
    m = _make(name)
    plain = copy.deepcopy(m)
    x = _x(name)
    labels = torch.tensor([0, 3, 4])
    wf = wrap(m, K)
    with torch.no_grad():
        for a in wf.alpha_parameters():
            a.fill_(30.0)  # sigmoid(30) == 1 in fp32: every gate fully open
        ref = plain(x)
        out = wf(x, labels)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert torch.equal(wf(x), ref)  # no labels: the original modules untouched
        # random gates: the gated path differs from the plain model, and baking a row reproduces it exactly
        g = torch.Generator().manual_seed(2)
        for a in wf.alpha_parameters():
            a.copy_(torch.randn(a.shape, generator=g) * 2)
        gated = wf(x, torch.full((3,), 2))
        assert (gated - ref).abs().max() > 1e-3 * ref.abs().max()
        baked = bake(wf, 2)(x)
        torch.testing.assert_close(baked, gated, rtol=1e-4, atol=1e-4 * gated.abs().max().item())
        # a mixed-label batch: each sample (all its tokens / windows) runs with its own gate row
        mixed = wf(x, labels)
        for i in range(3):
            one = wf(x[i:i + 1], labels[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], one, rtol=1e-4, atol=1e-4 * one.abs().max().item())


def test_in_chans_3_and_stem_replacement():
    m = models.create("tv:resnet18", num_classes=K, in_chans=2, img_size=16)
    assert m.conv1.in_channels == 2 and m.unlearn_fast_stem == "conv1"
    assert m(torch.randn(2, 2, 16, 16)).shape == (2, K)
    m3 = models.create("tv:mobilenet_v3_small", num_classes=K, in_chans=3, img_size=32)
    assert m3.features[0][0].in_channels == 3


def test_unknown_and_downloading_names_refused():
    with pytest.raises(ValueError, match="timm:"):
        models.create("timm:no_such_net", num_classes=K)
    with pytest.raises(ValueError, match="unknown model"):
        models.create("tv:fasterrcnn_resnet50_fpn", num_classes=K)  # a detector, not a classifier
    with pytest.raises(ValueError, match="never downloads"):
        models.create("timm:resnet10t", num_classes=K, pretrained=True)
    assert models.is_model_name("timm:resnet10t") and not models.is_model_name("timm:")
    assert set(models.list_prefixes()) >= {"timm", "tv"}


# ------------------------------------------------------------------------------------ weights
def test_weights_torchvision_pth_resizes_head(tmp_path, capsys):
    src = models.create("tv:resnet18", num_classes=7, in_chans=3, img_size=16)
    sd = src.state_dict()
    path = tmp_path / "tv_style.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)  # torchvision references' layout
    dst = models.create("tv:resnet18", num_classes=K, in_chans=3, img_size=16, weights=str(path))
    own = dst.state_dict()
    assert own["fc.weight"].shape == (K, 512)
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    assert "classifier fc" in capsys.readouterr().err
    # 1-channel model from RGB weights: the stem is adapted (summed over RGB), the rest loads
    gray = models.create("tv:resnet18", num_classes=K, in_chans=1, img_size=16, weights=str(path))
    torch.testing.assert_close(gray.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))


def test_weights_safetensors_with_prefix(tmp_path):
    from safetensors.torch import save_file

    src = _make("timm:vit_tiny_patch16_224")
    path = tmp_path / "w.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    kw, size = TINY["timm:vit_tiny_patch16_224"]
    dst = models.create("timm:vit_tiny_patch16_224", num_classes=K, in_chans=1, img_size=size, weights=path, **kw)
    x = _x("timm:vit_tiny_patch16_224")
    with torch.no_grad():
        assert torch.equal(src(x), dst.eval()(x))


def test_bad_weights_are_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError, match="weights file not found") as exc:
        models.create("tv:resnet18", num_classes=K, weights=tmp_path / "nope.pth")
    assert "\n" not in str(exc.value)
    other = tmp_path / "r10t.pth"
    torch.save(models.create("timm:resnet10t", num_classes=K, img_size=16).state_dict(), other)
    with pytest.raises(ValueError, match="missing") as exc:
        models.create("tv:resnet18", num_classes=K, img_size=16, weights=other)
    assert "unexpected" in str(exc.value) and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------ feature points
def _fired(model, names, x):
    order = []
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: order.append(n) if n not in order else None) for n in names]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return order


@pytest.mark.parametrize("name,expected", [
    ("tv:resnet18", ["layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]),
    ("timm:convnext_atto", ["stages.0", "stages.1", "stages.2", "stages.3", "head.drop", "head.fc"]),
    ("tv:mobilenet_v3_small", ["features.1", "features.3", "features.8", "features.12", "classifier.2", "classifier.3"]),
    ("tv:SwinTransformer", ["features.1", "features.3", "features.5", "features.7", "head"]),
    ("tv:VisionTransformer", [f"encoder.layers.encoder_layer_{i}" for i in range(4)] + ["heads.head"]),
    ("timm:vit_tiny_patch16_224", ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]),
])
def test_stage_feature_layers(name, expected):
    m = _make(name)
    names = models.feature_layers(m, name)
    assert names == expected
    assert _fired(m, names, _x(name)) == names
    # the layer before the classifier (CNN) outputs exactly the classifier's input
    if models.model_family(name) == "cnn":
        mods = dict(m.named_modules())
        got = {}
        h1 = mods[names[-2]].register_forward_hook(lambda mod, i, o: got.__setitem__("pre", o.clone()))
        h2 = mods[names[-1]].register_forward_pre_hook(lambda mod, i: got.__setitem__("in", i[0]))
        with torch.no_grad():
            m(_x(name))
        h1.remove(), h2.remove()
        assert torch.equal(got["pre"].flatten(1), got["in"].flatten(1))


def test_explicit_feature_layers_and_bad_names():
    kw, size = TINY["tv:resnet18"]
    m = models.create("tv:resnet18", num_classes=K, in_chans=1, img_size=size, feature_layers="layer2,layer3.1", **kw)
    assert models.feature_layers(m, "tv:resnet18") == ["layer2", "layer3.1", "avgpool", "fc"]
    assert [p.module for p in build_ec_modules(m).points] == ["layer2"]
    r = models.create("resnet18", num_classes=K, in_chans=1, img_size=16, feature_layers=["layer1", "layer3"])
    assert models.feature_layers(r, "resnet18") == ["layer1", "layer3", "avgpool", "fc"]
    with pytest.raises(ValueError, match="layer9"):
        models.create("tv:resnet18", num_classes=K, img_size=16, feature_layers="layer1,layer9")


@pytest.mark.parametrize("name", sorted(TINY))
def test_ec_modules_by_stage(name):
    m = _make(name)
    ec = build_ec_modules(m)
    stages = [n for n in models.feature_layers(m, name) if n in {p.module for p in ec.points}]
    assert len(ec.points) >= 1 and stages == [p.module for p in ec.points]
    out = ec_forward(m, ec, _x(name))
    assert len(out.embeddings) == len(ec.points) + 1
    for e, lg in zip(out.embeddings, out.layer_logits):
        assert torch.isfinite(e).all() and lg.shape == (3, K)
        torch.testing.assert_close(e.norm(dim=1), torch.ones(3))


# --------------------------------------------------------------------------- short WF / EC runs
@pytest.fixture(scope="module")
def digits16():
    from unlearn_fast.data import load

    return {s: load("digits", img_size=s, max_per_class=10, seed=0) for s in (16, 32)}


@pytest.mark.parametrize("name", ["timm:resnet10t", "timm:vit_tiny_patch16_224", "tv:mobilenet_v3_small",
                                  "tv:VisionTransformer"])
def test_short_wf_and_ec_runs(name, digits16, tmp_path):
    from unlearn_fast.methods import RunContext, create_method
    from unlearn_fast.models.io import load_model, save_model

    kw, size = TINY[name]
    data = digits16[size]
    ctx = RunContext(data=data, model_name=name, run_dir=tmp_path, device=torch.device("cpu"), progress=False,
                     model_kwargs=dict(kw))
    original = ctx.new_model()
    save_model(original, tmp_path / "original.safetensors")
    expected = _expected_gates(load_model(tmp_path / "original.safetensors"))
    res = create_method("wf", max_steps=2, min_steps=0, fit_to_data=False, batch_size=8, grad_accum=1,
                        evals_per_epoch=1, val_batch_size=64, select="loss").run(ctx)
    wf = res.model
    assert sorted(wf.gated_layers) == expected
    assert torch.isfinite(torch.cat([a.reshape(-1) for a in wf.alpha_parameters()])).all()
    assert res.info["steps"] == 2
    ctx.forget = [1]
    out = create_method("ec", pretrain_epochs=1, pretrain_max_steps=1, pretrain_batch_size=16, epochs=1,
                        max_steps=2, batch_size=4, min_steps=1, fit_to_data=False, evals_per_epoch=1).run(ctx)
    y = out.model(torch.randn(2, data.in_chans, size, size))
    assert torch.isfinite(y).all() and out.info["stages"]["ec"]["steps"] == 2


@pytest.mark.parametrize("name", ["timm:swin_tiny_patch4_window7_224", "tv:SwinTransformer", "tv:resnet18"])
def test_feature_hooks_pool_channels_last_stages_over_space(name):
    """Swin stages (timm and torchvision) return [B, H, W, C]: the CKA/IDI features must be the spatial
    mean per channel, computed here by hand from a hook on the same module."""
    from unlearn_fast.evaluation.metrics import FeatureHooks

    m = _make(name)
    layers = models.feature_layers(m, name)[:-1]
    raw = {}
    mods = dict(m.named_modules())
    hs = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: raw.__setitem__(n, o)) for n in layers]
    fh = FeatureHooks(m, layers)
    with torch.no_grad():
        m(_x(name))
    feats = fh.take()
    for h in hs:
        h.remove()
    for n, f in zip(layers, feats):
        t = raw[n]
        if t.dim() == 4:
            nhwc = name != "tv:resnet18"      # both Swin implementations keep channels last in every stage
            want = t.mean((1, 2)) if nhwc else t.mean((2, 3))
            torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-6)
