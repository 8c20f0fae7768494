"""Tests for the backbone registry unlearn_fast.models (CPU, small shapes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unlearn_fast import models
from unlearn_fast.models import registry
from unlearn_fast.models.backbones import swin_window_size, vit_patch_size

BUILTIN = {
    "vgg16": "cnn",
    "vgg16_bn": "cnn",
    "resnet18": "cnn",
    "resnet50": "cnn",
    "small_cnn": "cnn",
    "vit_tiny": "vit",
    "vit_small": "vit",
    "swin_tiny": "vit",
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are small: one intra-op thread avoids OpenMP spin-wait stalls on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _forward_order(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """(names from ``names`` in the order their forward hooks first fire, model output)."""
    fired: list[str] = []
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: fired.append(n) if n not in fired else None)
        for n in names
    ]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    return fired, y


# ------------------------------------------------------------------------------------ registry
def test_list_models_has_builtins_sorted():
    names = models.list_models()
    assert names == sorted(names)
    assert set(BUILTIN) <= set(names)


@pytest.mark.parametrize("name,family", sorted(BUILTIN.items()))
def test_model_family(name, family):
    assert models.model_family(name) == family


def test_unknown_name_lists_models():
    with pytest.raises(ValueError) as exc:
        models.create("resnet19", num_classes=10)
    for name in models.list_models():
        assert name in str(exc.value)
    with pytest.raises(ValueError, match="available models"):
        models.model_family("nope")
    with pytest.raises(ValueError, match="available models"):
        models.feature_layers(nn.Linear(2, 2), "nope")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes="10"), "num_classes"),
        (dict(num_classes=10, in_chans=0), "in_chans"),
        (dict(num_classes=10, img_size=True), "img_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.create("small_cnn", **kwargs)


def test_never_downloads_and_vgg_min_size():
    with pytest.raises(ValueError, match="never downloads"):
        models.create("vit_tiny", num_classes=10, pretrained=True)
    with pytest.raises(ValueError, match="img_size >= 32"):
        models.create("vgg16", num_classes=10, img_size=16)


def test_register_model_custom_and_errors():
    name = "_test_tiny_mlp"
    try:

        @models.register_model(name, family="cnn")
        def _tiny(num_classes, in_chans=3, img_size=32, hidden=7):
            return nn.Sequential(
                nn.Flatten(), nn.Linear(in_chans * img_size * img_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )

        assert name in models.list_models()
        assert models.model_family(name) == "cnn"
        m = models.create(name, num_classes=4, in_chans=2, img_size=5, hidden=3)
        assert m.unlearn_fast_config == dict(name=name, num_classes=4, in_chans=2, img_size=5, hidden=3)
        assert m(torch.randn(3, 2, 5, 5)).shape == (3, 4)
        # generic layer rule: top-level children minus activations / flatten
        assert models.feature_layers(m, name) == ["1", "3"]

        with pytest.raises(ValueError, match="already registered"):

            @models.register_model(name, family="cnn")
            def _other(num_classes, in_chans=3, img_size=32):
                return nn.Linear(1, 1)

    finally:
        registry._REGISTRY.pop(name, None)
    with pytest.raises(ValueError, match="family"):
        models.register_model("_test_bad_family", family="mlp")
    assert "_test_bad_family" not in models.list_models()


# -------------------------------------------------------------------------- forward / layers
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_forward_shape_and_layers_32px(name, in_chans):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_chans=in_chans, img_size=32).eval()
    assert model.unlearn_fast_name == name
    resolved = {"width": 16} if name == "small_cnn" else {}  # small_cnn records the width it chose for 10 classes
    assert model.unlearn_fast_config == dict(name=name, num_classes=10, in_chans=in_chans, img_size=32, **resolved)
    x = torch.randn(2, in_chans, 32, 32)
    layers = models.feature_layers(model, name)
    modules = dict(model.named_modules())
    assert layers and all(n in modules for n in layers)
    # hooks fire exactly in the listed (forward) order, and every listed layer runs
    fired, y = _forward_order(model, layers, x)
    assert fired == layers
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    # the stem takes in_chans; convs are plain nn.Conv2d
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_chans
    if BUILTIN[name] == "vit":
        qkv = [n for n, m in model.named_modules() if n.endswith("attn.qkv")]
        assert qkv and all(isinstance(modules[n], nn.Linear) for n in qkv)


def test_resnet_stems():
    small = models.create("resnet18", num_classes=10, in_chans=1, img_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    assert models.feature_layers(small, "resnet18") == [
        "conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
        "layer3.0", "layer3.1", "layer4.0", "layer4.1", "avgpool", "fc",
    ]
    big = models.create("resnet18", num_classes=7, in_chans=1, img_size=224).eval()
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2) and big.conv1.in_channels == 1
    assert isinstance(big.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert big(torch.randn(1, 1, 224, 224)).shape == (1, 7)


def test_vgg_small_head():
    m = models.create("vgg16", num_classes=5, in_chans=1, img_size=32)
    linears = [l for l in m.classifier if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 512), (512, 5)]
    assert all(m.features[0].bias is not None for _ in [0])
    assert sum(p.numel() for p in m.parameters()) < 16_000_000


def test_patch_and_window_rules():
    assert vit_patch_size(224) == 16
    assert vit_patch_size(32) == 4
    assert vit_patch_size(28) == 2
    assert vit_patch_size(64) == 8
    assert vit_patch_size(32, default=4, min_grid=16) == 2
    assert swin_window_size(56) == 7  # 56/28/14/7: the ImageNet config
    assert swin_window_size(16) == 4  # 16/8/4/2
    for grid in range(1, 80):
        w = swin_window_size(grid)
        sizes = [grid]
        for _ in range(3):
            sizes.append((sizes[-1] + 1) // 2)
        assert 1 <= w <= 7 and all(s <= w or s % w == 0 for s in sizes)

    vit = models.create("vit_tiny", num_classes=10, in_chans=1, img_size=32, depth=1)
    assert vit.patch_embed.proj.kernel_size == (4, 4)
    assert vit.patch_embed.grid_size == (8, 8)
    swin = models.create("swin_tiny", num_classes=10, in_chans=1, img_size=32, depths=(1, 1, 1, 1))
    assert swin.patch_embed.proj.kernel_size == (2, 2)
    windows = [tuple(b.window_size) for stage in swin.layers for b in stage.blocks]
    assert windows[0] == (4, 4) and windows[-1] == (2, 2)
    swin224 = models.create("swin_tiny", num_classes=10, img_size=224, depths=(1, 1, 1, 1))
    assert swin224.patch_embed.proj.kernel_size == (4, 4)
    assert [tuple(stage.blocks[0].window_size) for stage in swin224.layers] == [(7, 7)] * 4
    # explicit override wins and is recorded
    vit8 = models.create("vit_tiny", num_classes=3, img_size=32, patch_size=8, depth=1)
    assert vit8.patch_embed.proj.kernel_size == (8, 8) and vit8.unlearn_fast_config["patch_size"] == 8


def test_vit_224_one_image():
    m = models.create("vit_tiny", num_classes=10, in_chans=3, img_size=224).eval()
    assert m.patch_embed.proj.kernel_size == (16, 16)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_config_rebuilds_same_architecture():
    m = models.create("vit_tiny", num_classes=6, in_chans=1, img_size=16, depth=2)
    again = models.create(**m.unlearn_fast_config)
    a, b = m.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert models.feature_layers(again, "vit_tiny") == ["blocks.0", "blocks.1", "head"]


# ---------------------------------------------------------------------------------- weights
def _trained_small_cnn(num_classes=10):
    torch.manual_seed(1)
    m = models.create("small_cnn", num_classes=num_classes, in_chans=1, img_size=8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, num_classes, (16,))
    F.cross_entropy(m(x), y).backward()
    opt.step()  # changes weights and BN running stats away from their init
    return m.eval()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_weights_round_trip(tmp_path, suffix):
    src = _trained_small_cnn()
    path = models.save_weights(src, tmp_path / f"w{suffix}")
    dst = models.create("small_cnn", num_classes=10, in_chans=1, img_size=8, weights=path).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # a fresh model differs, so the load did something
    fresh = models.create("small_cnn", num_classes=10, in_chans=1, img_size=8).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), dst(x))


def test_weights_round_trip_vit_and_plain_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    src = models.create("vit_tiny", num_classes=4, in_chans=1, img_size=16, depth=1).eval()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "plain.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    x = torch.randn(2, 1, 16, 16)
    for f in ("plain.safetensors", "ckpt.pt"):
        dst = models.create("vit_tiny", num_classes=4, in_chans=1, img_size=16, depth=1, weights=str(tmp_path / f))
        with torch.no_grad():
            assert torch.equal(src(x), dst.eval()(x))


def test_weights_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        models.create("small_cnn", num_classes=10, weights=path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\x00\x01 this is not a tensor file \xff" * 10)
    with pytest.raises(ValueError, match=f"bad{suffix}"):
        models.create("small_cnn", num_classes=10, weights=path)


def test_weights_not_a_state_dict_and_bad_suffix(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        models.create("small_cnn", num_classes=10, weights=path)
    other = tmp_path / "w.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported extension"):
        models.create("small_cnn", num_classes=10, weights=other)


def test_weights_shape_mismatch_names_keys_and_config(tmp_path):
    src = _trained_small_cnn(num_classes=10)
    path = models.save_weights(src, tmp_path / "w10.safetensors")
    with pytest.raises(ValueError) as exc:  # another width: body layers do not fit (the head alone would be resized)
        models.create("small_cnn", num_classes=5, in_chans=1, img_size=8, width=8, weights=path)
    msg = str(exc.value)
    assert "w10.safetensors" in msg and "shape mismatch" in msg and "block1" in msg
    assert "'num_classes': 5" in msg  # the expected config
    assert "'num_classes': 10" in msg  # what the file was saved for (safetensors metadata)
    # a classifier of another class count is dropped (fresh head), every other tensor loads
    dst = models.create("small_cnn", num_classes=5, in_chans=1, img_size=8, width=16, weights=path)
    own, ref = dst.state_dict(), src.state_dict()
    assert own["fc.weight"].shape[0] == 5
    assert all(torch.equal(own[k], v) for k, v in ref.items() if not k.startswith("fc."))


def test_weights_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(models.create("resnet18", num_classes=10, in_chans=1).state_dict(), path)
    with pytest.raises(ValueError) as exc:
        models.create("small_cnn", num_classes=10, in_chans=1, weights=path)
    msg = str(exc.value)
    assert "missing" in msg and "block1.conv.weight" in msg
    assert "unexpected" in msg and "bn1.running_mean" in msg
    assert "small_cnn" in msg


# -------------------------------------------------------------------------------- small_cnn
def test_small_cnn_structure():
    m = models.create("small_cnn", num_classes=10, in_chans=1, img_size=8)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) == 3 and all(c.bias is not None for c in convs)
    assert any(isinstance(b, nn.BatchNorm2d) for b in m.modules())
    assert 10_000 <= sum(p.numel() for p in m.parameters()) <= 100_000
    for size in (8, 13, 32):
        assert m.eval()(torch.randn(2, 1, size, size)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        m(torch.randn(2, 3, 8, 8))


def test_small_cnn_loss_decreases_on_digit_like_data():
    torch.manual_seed(0)
    # 10 random 8x8 prototypes; samples are noisy copies of their class prototype
    protos = torch.rand(10, 1, 8, 8)
    y = torch.arange(10).repeat(20)
    x = protos[y] + 0.3 * torch.randn(200, 1, 8, 8)
    m = models.create("small_cnn", num_classes=10, in_chans=1, img_size=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_small_cnn_learns_sklearn_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    m = models.create("small_cnn", num_classes=10, in_chans=1, img_size=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(4):
        m.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        acc = (m(x[te]).argmax(1) == y[te]).float().mean().item()
    assert acc > 0.95, acc  # ~0.98 in 4 epochs; a few seconds on one core


def test_small_cnn_width_follows_the_class_count_and_reloads(tmp_path):
    from unlearn_fast.models.io import load_model, save_model

    widths = {n: models.create("small_cnn", num_classes=n, in_chans=1, img_size=8).block1.conv.out_channels
              for n in (2, 10, 16, 17, 40, 48, 49, 200)}
    assert widths == {2: 16, 10: 16, 16: 16, 17: 32, 40: 48, 48: 48, 49: 64, 200: 64}
    assert models.create("small_cnn", num_classes=40, in_chans=1, img_size=8, width=8).block1.conv.out_channels == 8
    m = models.create("small_cnn", num_classes=40, in_chans=1, img_size=8)
    save_model(m, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    assert back.block1.conv.out_channels == 48 and back.unlearn_fast_config == m.unlearn_fast_config
