"""Backbone registry: ``register_model`` (timm-style decorator), ``create``, ``list_models``,
``model_family`` and ``feature_layers``.

A builder registered under ``name`` is called as ``fn(num_classes=, in_chans=, img_size=, **kwargs)``
and returns a randomly initialised ``nn.Module`` (nothing is ever downloaded). ``create`` validates
the arguments, tags the model with ``unlearn_fast_name`` / ``unlearn_fast_config`` and, when asked,
loads a local state-dict file (see :mod:`unlearn_fast.models.weights`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

FAMILIES = ("cnn", "vit")

Builder = Callable[..., nn.Module]
LayerFn = Callable[[nn.Module], list]


@dataclass(frozen=True)
class _Entry:
    name: str
    family: str
    builder: Builder
    layers: Optional[LayerFn]


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, *, family: str, feature_layers: Optional[LayerFn] = None):
    """Decorator registering ``fn(num_classes, in_chans, img_size, **kwargs) -> nn.Module`` as ``name``.

    family: ``"cnn"`` or ``"vit"`` (picks the WF recipe's lr and lambdas).
    feature_layers: optional ``fn(model) -> list[str]`` of dotted module names (forward order) used by
    :func:`feature_layers`; without it a generic rule is used (see there).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_model: name must be a non-empty string, got {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"register_model({name!r}): family must be one of {FAMILIES}, got {family!r}")

    def deco(fn: Builder) -> Builder:
        old = _REGISTRY.get(name)
        if old is not None and (old.builder.__module__, old.builder.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ValueError(
                f"model {name!r} is already registered by {old.builder.__module__}.{old.builder.__qualname__}; "
                "pick another name"
            )
        _REGISTRY[name] = _Entry(name=name, family=family, builder=fn, layers=feature_layers)
        return fn

    return deco


def list_models() -> list[str]:
    """Sorted names of all registered backbones."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}") from None


def model_family(name: str) -> str:
    """``"cnn"`` or ``"vit"`` for a registered model name."""
    return _entry(name).family


def _check_int(what: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def create(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    weights: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build backbone ``name`` (random init) for ``[B, in_chans, img_size, img_size]`` inputs -> ``[B, num_classes]``.

    weights: optional local state-dict file (``.pt``/``.pth``/``.safetensors``) loaded strictly.
    kwargs go to the builder (e.g. torchvision / timm constructor options) and are recorded in
    ``model.unlearn_fast_config`` so that ``create(**model.unlearn_fast_config)`` rebuilds the same
    architecture.
    """
    entry = _entry(name)
    _check_int("num_classes", num_classes, 1)
    _check_int("in_chans", in_chans, 1)
    _check_int("img_size", img_size, 1)
    model = entry.builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    # a builder may report the values it chose for options left to it (e.g. small_cnn's width)
    config = {**dict(name=name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs),
              **getattr(model, "resolved_kwargs", {})}
    model.unlearn_fast_name = name
    model.unlearn_fast_config = config
    if weights is not None:
        from unlearn_fast.models.weights import load_weights

        load_weights(model, weights, config=config)
    return model


_SKIP_GENERIC = (nn.ReLU, nn.GELU, nn.Dropout, nn.Identity, nn.Flatten)


def feature_layers(model: nn.Module, name: str) -> list[str]:
    """Dotted names of ``model``'s natural block outputs, in forward order (hook targets for CKA etc.).

    ResNet: ``conv1, layer1.0 ... layer4.<last>, avgpool, fc``; ViT: ``blocks.0 ... blocks.<depth-1>, head``;
    Swin: ``layers.<s>.blocks.<b> ..., head.fc``; VGG: the five max-pool outputs ``features.<i>`` then the
    classifier's linear layers; small CNN: ``block1, block2, block3, pool, fc``. A model registered without
    a layer rule gets its top-level children minus activations / dropout / identities. Every returned name
    exists in ``dict(model.named_modules())``.
    """
    entry = _entry(name)
    if entry.layers is not None:
        names = list(entry.layers(model))
    else:
        names = [n for n, m in model.named_children() if not isinstance(m, _SKIP_GENERIC)]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"feature_layers({name!r}): model has no modules {missing[:5]}; was it built by "
            f"unlearn_fast.models.create({name!r}, ...)?"
        )
    return names
