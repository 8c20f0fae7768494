"""torchvision / timm backbones, randomly initialised and adapted to small (gray-scale) inputs.

Never downloads: torchvision builders get ``weights=None`` and timm ``pretrained=False``; trained
weights come from local files through ``create(..., weights=PATH)``.

Adaptations (WF-Net App. A: "we adjust the input layer of all backbones for gray-scale", 32x32 input):

* ResNet (``resnet18``, ``resnet50``): the stem conv takes ``in_chans``. At ``img_size <= 64`` it is the
  CIFAR ResNet stem: ``conv1 = Conv2d(in_chans, 64, 3, stride 1, pad 1, bias=False)`` and the initial
  max-pool is dropped (``maxpool = Identity``), so a 32 px input reaches ``layer4`` at 4x4.
  Above 64 px the ImageNet 7x7 / stride-2 stem and max-pool are kept.
* VGG (``vgg16``, ``vgg16_bn``): ``features[0]`` takes ``in_chans`` (needs ``img_size >= 32``: five
  max-pools). At ``img_size <= 64`` the feature map is 1x1x512 (2x2 at 64 px), so the 7x7 adaptive pool +
  4096-wide classifier (~120M parameters mostly fitting a replicated 1x1 map) is replaced by the usual
  CIFAR-VGG head: ``avgpool = AdaptiveAvgPool2d(1)`` and ``classifier = Linear(512, 512) -> ReLU ->
  Dropout(p) -> Linear(512, num_classes)`` (p = ``dropout`` kwarg, default 0.5); 14.9M parameters in all.
* ViT (``vit_tiny``, ``vit_small``: timm ``vit_{tiny,small}_patch16_224`` configs): the patch size is the
  largest ``p <= 16`` that divides ``img_size`` and leaves a token grid of at least 8x8 (224 px -> 16,
  32 px -> 4 (8x8 tokens), 28 px -> 2 (14x14)); pass ``patch_size=`` to override.
* Swin (``swin_tiny``: timm ``swin_tiny_patch4_window7_224``): the stage-1 grid must be >= 16 so the
  fourth stage still has 2x2 tokens, so the patch size is the largest ``p <= 4`` dividing ``img_size``
  with ``img_size / p >= 16`` (224 -> 4, 32 -> 2); the window is the largest ``w <= 7`` that divides the
  token grid of every stage whose grid exceeds ``w`` (stages whose grid is <= ``w`` use one full window,
  unshifted, as timm does). 224 px -> patch 4, window 7 (grids 56/28/14/7); 32 px -> patch 2, window 4
  (grids 16/8/4/2). Pass ``patch_size=`` / ``window_size=`` to override.

Module names stay the standard torchvision / timm ones: convs are ``nn.Conv2d``, transformer qkv
projections are ``...attn.qkv`` (``blocks.<i>.attn.qkv`` for ViT, ``layers.<s>.blocks.<b>.attn.qkv``
for Swin).
"""
from __future__ import annotations

import torch.nn as nn

from unlearn_fast.models.registry import register_model

SMALL_INPUT_MAX = 64  # img_size at or below which the CIFAR-style adaptations apply


def _no_pretrained(name: str, kwargs: dict) -> None:
    for key in ("pretrained", "weights"):
        if kwargs.pop(key, None):
            raise ValueError(
                f"{name}: {key}= would download weights; unlearn_fast never downloads. Pass a local "
                "state-dict file instead: unlearn_fast.models.create(..., weights='path.safetensors')"
            )


def _kaiming_conv(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


# ----------------------------------------------------------------------------------------- ResNet
def _resnet(arch: str, num_classes: int, in_chans: int, img_size: int, **kwargs) -> nn.Module:
    from torchvision import models as tvm

    _no_pretrained(arch, kwargs)
    model = getattr(tvm, arch)(weights=None, num_classes=num_classes, **kwargs)
    width = model.conv1.out_channels
    if img_size <= SMALL_INPUT_MAX:
        model.conv1 = _kaiming_conv(nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False))
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = _kaiming_conv(nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False))
    return model


def _resnet_layers(model: nn.Module) -> list[str]:
    names = ["conv1"]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        names += [f"{stage}.{i}" for i in range(len(getattr(model, stage)))]
    return names + ["avgpool", "fc"]


@register_model("resnet18", family="cnn", feature_layers=_resnet_layers)
def resnet18(num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    """torchvision ResNet-18; CIFAR 3x3 stem without max-pool at ``img_size <= 64``."""
    return _resnet("resnet18", num_classes, in_chans, img_size, **kwargs)


@register_model("resnet50", family="cnn", feature_layers=_resnet_layers)
def resnet50(num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    """torchvision ResNet-50; CIFAR 3x3 stem without max-pool at ``img_size <= 64``."""
    return _resnet("resnet50", num_classes, in_chans, img_size, **kwargs)


# -------------------------------------------------------------------------------------------- VGG
def _vgg(arch: str, num_classes: int, in_chans: int, img_size: int, **kwargs) -> nn.Module:
    import torch
    from torchvision import models as tvm

    _no_pretrained(arch, kwargs)
    if img_size < 32:
        raise ValueError(f"{arch} needs img_size >= 32 (five 2x2 max-pools), got {img_size}; upsample the input")
    small = img_size <= SMALL_INPUT_MAX
    if not small:
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes, **kwargs)
        if in_chans != 3:
            first = model.features[0]
            model.features[0] = _kaiming_conv(
                nn.Conv2d(in_chans, first.out_channels, first.kernel_size, padding=first.padding, bias=True)
            )
        return model
    # Small input: build on the meta device (skips allocating + initialising the 120M-parameter
    # 4096-wide head that is replaced anyway), swap stem / pool / head, then materialise and
    # initialise every layer exactly as torchvision's VGG does.
    dropout = kwargs.get("dropout", 0.5)
    init_weights = kwargs.pop("init_weights", True)
    with torch.device("meta"):
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes, init_weights=False, **kwargs)
        first = model.features[0]
        model.features[0] = nn.Conv2d(in_chans, first.out_channels, first.kernel_size, padding=first.padding)
        width = max(m.out_channels for m in model.features if isinstance(m, nn.Conv2d))
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(width, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(512, num_classes),
        )
    model = model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _kaiming_conv(m) if init_weights else m.reset_parameters()
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()  # weight 1, bias 0, running stats reset
        elif isinstance(m, nn.Linear):
            if init_weights:
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
            else:
                m.reset_parameters()
    return model


def _vgg_layers(model: nn.Module) -> list[str]:
    names = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    return names + [f"classifier.{i}" for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]


@register_model("vgg16", family="cnn", feature_layers=_vgg_layers)
def vgg16(num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    """torchvision VGG-16 (no BatchNorm); CIFAR 512-512-N head at ``img_size <= 64``."""
    return _vgg("vgg16", num_classes, in_chans, img_size, **kwargs)


@register_model("vgg16_bn", family="cnn", feature_layers=_vgg_layers)
def vgg16_bn(num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    """torchvision VGG-16 with BatchNorm; CIFAR 512-512-N head at ``img_size <= 64``."""
    return _vgg("vgg16_bn", num_classes, in_chans, img_size, **kwargs)


# -------------------------------------------------------------------------------------- ViT / Swin
def vit_patch_size(img_size: int, default: int = 16, min_grid: int = 8) -> int:
    """Largest patch ``p <= default`` dividing ``img_size`` with ``img_size // p >= min_grid`` (else 1)."""
    for p in range(min(default, img_size), 0, -1):
        if img_size % p == 0 and img_size // p >= min_grid:
            return p
    return 1


def swin_window_size(grid: int, num_stages: int = 4, default: int = 7) -> int:
    """Largest window ``w <= default`` dividing every stage's token grid that exceeds ``w``.

    Stage ``k`` has a ``ceil(grid / 2**k)`` grid (timm pads odd sizes before patch merging); a stage
    whose grid is <= ``w`` is one full window (timm clamps the window and drops the shift there).
    """
    sizes = []
    g = grid
    for _ in range(num_stages):
        sizes.append(g)
        g = (g + 1) // 2
    for w in range(default, 0, -1):
        if all(s <= w or s % w == 0 for s in sizes):
            return w
    return 1  # unreachable: w = 1 divides everything


def _timm(arch: str, name: str, num_classes: int, in_chans: int, img_size: int, **kwargs) -> nn.Module:
    import timm

    _no_pretrained(name, kwargs)
    return timm.create_model(
        arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs
    )


def _vit(arch: str, name: str, num_classes: int, in_chans: int, img_size: int, **kwargs) -> nn.Module:
    kwargs.setdefault("patch_size", vit_patch_size(img_size))
    if img_size % kwargs["patch_size"] != 0:
        raise ValueError(f"{name}: img_size {img_size} is not a multiple of patch_size {kwargs['patch_size']}")
    return _timm(arch, name, num_classes, in_chans, img_size, **kwargs)


def _vit_layers(model: nn.Module) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))] + ["head"]


@register_model("vit_tiny", family="vit", feature_layers=_vit_layers)
def vit_tiny(num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    """timm ViT-Tiny (``vit_tiny_patch16_224``: dim 192, depth 12, 3 heads); patch from ``vit_patch_size``."""
    return _vit("vit_tiny_patch16_224", "vit_tiny", num_classes, in_chans, img_size, **kwargs)


@register_model("vit_small", family="vit", feature_layers=_vit_layers)
def vit_small(num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    """timm ViT-Small (``vit_small_patch16_224``: dim 384, depth 12, 6 heads); patch from ``vit_patch_size``."""
    return _vit("vit_small_patch16_224", "vit_small", num_classes, in_chans, img_size, **kwargs)


def _swin_layers(model: nn.Module) -> list[str]:
    names = []
    for s, stage in enumerate(model.layers):
        names += [f"layers.{s}.blocks.{b}" for b in range(len(stage.blocks))]
    return names + ["head.fc"]


@register_model("swin_tiny", family="vit", feature_layers=_swin_layers)
def swin_tiny(num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    """timm Swin-T (``swin_tiny_patch4_window7_224``); patch / window chosen as in the module docstring."""
    patch = kwargs.setdefault("patch_size", vit_patch_size(img_size, default=4, min_grid=16))
    if img_size % patch != 0:
        raise ValueError(f"swin_tiny: img_size {img_size} is not a multiple of patch_size {patch}")
    kwargs.setdefault("window_size", swin_window_size(img_size // patch))
    return _timm("swin_tiny_patch4_window7_224", "swin_tiny", num_classes, in_chans, img_size, **kwargs)
