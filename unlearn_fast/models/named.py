"""Any timm / torchvision classifier by name: ``timm:<name>`` and ``tv:<name>`` (random init, never downloads).

    create("timm:convnext_atto", num_classes=10, in_chans=1, img_size=32)
    create("tv:mobilenet_v3_small", num_classes=10, in_chans=1, img_size=32, weights="mine.pth")

* ``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=, in_chans=, img_size=, **kwargs)``;
  ``img_size`` is passed only to models whose constructor takes it (ViT, DeiT, BEiT, Swin, ...).
* ``tv:<name>``: ``torchvision.models.get_model(name, weights=None, num_classes=, **kwargs)`` for the names of
  ``torchvision.models.list_models(module=torchvision.models)`` (the classifiers), or a model class of
  ``torchvision.models`` called with ``num_classes=`` and kwargs (``tv:VisionTransformer`` with ``patch_size=4,
  num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64``: any size); ``image_size=img_size`` is passed to those
  that take it (ViT). ``in_chans != 3``: the stem conv (the first ``nn.Conv2d`` that runs,
  which must read 3 channels) is replaced by one of the same shape reading ``in_chans`` channels (Kaiming
  init); a model whose first layer is not such a conv raises a ValueError.

Family (:func:`family_of`, picks the WF recipe): ``"vit"`` when the model has attention input projections
that WF gates (an ``nn.MultiheadAttention`` or an ``nn.Linear`` named ``qkv``; :func:`unlearn_fast.nn.wrap.
attention_targets`), else ``"cnn"``. Recorded whenever such a model is built; asked before any build, it is
decided on a default-config build (meta device when the builder allows it). Feature points (:mod:`unlearn_fast.models.stages`) are chosen by stage.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn

from unlearn_fast.models.registry import _Entry, register_prefix


def _no_pretrained(name: str, kwargs: dict) -> None:
    for key in ("pretrained", "weights", "pretrained_cfg_overlay", "checkpoint_path"):
        if kwargs.get(key):
            raise ValueError(
                f"{name}: {key}= would load or download weights inside the builder; unlearn_fast never downloads. "
                "Pass a local file instead: unlearn_fast.models.create(..., weights='path.pth') (CLI --weights FILE)"
            )
        kwargs.pop(key, None)


def _call_optional(fn: Callable[..., nn.Module], optional: dict, **kwargs) -> nn.Module:
    """``fn(**kwargs, **optional)``; drop an optional keyword the constructor rejects and retry."""
    opt = dict(optional)
    while True:
        try:
            return fn(**kwargs, **opt)
        except TypeError as exc:
            bad = [k for k in opt if f"'{k}'" in str(exc)]
            if not bad:
                raise
            for k in bad:
                opt.pop(k)


# ------------------------------------------------------------------------------------------ timm
@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset:
    import timm

    return frozenset(timm.list_models())


def _build_timm(arch: str, num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    import timm

    name = f"timm:{arch}"
    _no_pretrained(name, kwargs)
    try:
        model = _call_optional(
            timm.create_model, {"img_size": img_size} if "img_size" not in kwargs else {},
            model_name=arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs,
        )
    except Exception as exc:  # a timm assertion / TypeError on a bad kwarg or size
        raise ValueError(f"{name} could not be built with num_classes={num_classes}, in_chans={in_chans}, "
                         f"img_size={img_size}, {kwargs}: {type(exc).__name__}: {exc}") from None
    return _record("timm", arch, model)


# ----------------------------------------------------------------------------------- torchvision
@functools.lru_cache(maxsize=1)
def _tv_names() -> tuple:
    """torchvision classifier builders plus the model classes of ``torchvision.models`` (``tv:VisionTransformer``
    with its constructor's kwargs builds any size, e.g. a 2-layer ViT for tests)."""
    import torchvision.models as tvm

    classes = [n for n, v in vars(tvm).items() if isinstance(v, type) and issubclass(v, nn.Module)]
    return tuple(tvm.list_models(module=tvm)) + tuple(sorted(classes))


def _first_conv(model: nn.Module, img_size: int) -> str | None:
    """Name of the first ``nn.Conv2d`` that runs on a ``[1, 3, img_size, img_size]`` input."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    except Exception:
        pass  # e.g. too small for this model: fall back to registration order
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    if order:
        return order[0]
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def replace_stem(model: nn.Module, in_chans: int, name: str, img_size: int = 32) -> str:
    """Swap the stem conv (first conv that runs, reading 3 channels) for one reading ``in_chans``; its name."""
    stem = _first_conv(model, img_size)
    conv = model.get_submodule(stem) if stem else None
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise ValueError(f"{name}: cannot adapt to in_chans={in_chans} (no 3-channel stem conv found); "
                         "use 3-channel input (--in-chans 3)")
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    1, conv.bias is not None, conv.padding_mode)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent, _, child = stem.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return stem


def _build_tv(arch: str, num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    import torchvision.models as tvm

    name = f"tv:{arch}"
    _no_pretrained(name, kwargs)
    opt = {"image_size": img_size} if "image_size" not in kwargs else {}
    cls = getattr(tvm, arch, None)
    try:
        if isinstance(cls, type):  # a model class: its constructor's kwargs set the architecture
            model = _call_optional(cls, opt, num_classes=num_classes, **kwargs)
        else:
            model = _call_optional(tvm.get_model, opt, name=arch, weights=None, num_classes=num_classes, **kwargs)
    except Exception as exc:
        raise ValueError(f"{name} could not be built with num_classes={num_classes}, img_size={img_size}, "
                         f"{kwargs}: {type(exc).__name__}: {exc}") from None
    if in_chans != 3:
        model.unlearn_fast_stem = replace_stem(model, in_chans, name, img_size)
    return _record("tv", arch, model)


# ---------------------------------------------------------------------------------------- family
def has_attention(model: nn.Module) -> bool:
    """True when WF would gate attention input projections (the ``"vit"`` family)."""
    from unlearn_fast.nn.wrap import attention_targets

    return bool(attention_targets(model))


_SEEN: dict[str, str] = {}  # family of every prefix model built in this process, by name


def _family(prefix: str, arch: str) -> str:
    name = f"{prefix}:{arch}"
    if name not in _SEEN:
        build = _BUILDERS[prefix]
        try:
            with torch.device("meta"):
                build(arch, num_classes=10, in_chans=3, img_size=224)
        except Exception:  # builders that compute on tensors at init (e.g. RegNet widths) run on the CPU
            try:
                build(arch, num_classes=10, in_chans=3, img_size=224)
            except ValueError as exc:
                raise ValueError(f"{name}: the family (cnn / vit) is decided on a built model and the default "
                                 f"config does not build ({exc}); create the model first") from None
    return _SEEN[name]


def _record(prefix: str, arch: str, model: nn.Module) -> nn.Module:
    _SEEN[f"{prefix}:{arch}"] = "vit" if has_attention(model) else "cnn"
    return model


def family_of(name: str) -> str:
    """``"vit"`` / ``"cnn"`` for a ``timm:`` / ``tv:`` name (see module doc)."""
    prefix, _, arch = name.partition(":")
    return _family(prefix, arch)


_BUILDERS = {"timm": _build_timm, "tv": _build_tv}


def _resolver(prefix: str, names: Callable[[], object], help_cmd: str):
    def resolve(arch: str) -> _Entry:
        if arch not in names():
            close = sorted(n for n in names() if arch and (arch in n or n in arch))[:8]
            raise ValueError(f"unknown model {prefix}:{arch!r}; {help_cmd}"
                             + (f" (close: {', '.join(close)})" if close else ""))
        from unlearn_fast.models.stages import stage_feature_layers

        builder = functools.partial(_BUILDERS[prefix], arch)
        family = functools.partial(_family, prefix, arch)
        return _Entry(name=f"{prefix}:{arch}", family=family, builder=builder,
                      layers=lambda model: stage_feature_layers(model, family()))

    return resolve


register_prefix("timm", _resolver("timm", _timm_names, "names: python -c \"import timm; print(timm.list_models('*pattern*'))\""),
                "any timm model: timm:<name> (timm.list_models())")
register_prefix("tv", _resolver("tv", _tv_names, "names: python -c \"import torchvision.models as m; print(m.list_models(module=m))\""),
                "any torchvision classifier: tv:<name> (torchvision.models.list_models(module=torchvision.models))")

__all__ = ["family_of", "has_attention", "replace_stem"]
