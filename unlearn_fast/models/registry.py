"""Backbone registry: ``register_model`` (timm-style decorator), ``create``, ``list_models``,
``model_family`` and ``feature_layers``.

A builder registered under ``name`` is called as ``fn(num_classes=, in_chans=, img_size=, **kwargs)``
and returns a randomly initialised ``nn.Module`` (nothing is ever downloaded). ``create`` validates
the arguments, tags the model with ``unlearn_fast_name`` / ``unlearn_fast_config`` and, when asked,
loads a local state-dict file (see :mod:`unlearn_fast.models.weights`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch.nn as nn

FAMILIES = ("cnn", "vit")

Builder = Callable[..., nn.Module]
LayerFn = Callable[[nn.Module], list]


@dataclass(frozen=True)
class _Entry:
    name: str
    family: Union[str, Callable[[], str]]   # a callable: decided lazily by rule (prefix models)
    builder: Builder
    layers: Optional[LayerFn]


_REGISTRY: dict[str, _Entry] = {}
# "timm" -> (resolver(arch) -> _Entry raising ValueError for an unknown arch, one-line help)
_PREFIXES: dict[str, tuple[Callable[[str], _Entry], str]] = {}


def register_prefix(prefix: str, resolver: Callable[[str], "_Entry"], help: str) -> None:
    """Names ``"<prefix>:<arch>"`` resolve through ``resolver(arch)`` (e.g. ``timm:``, ``tv:``)."""
    if not prefix.isidentifier():
        raise ValueError(f"register_prefix: prefix must be an identifier, got {prefix!r}")
    _PREFIXES[prefix] = (resolver, help)


def list_prefixes() -> dict[str, str]:
    """``{"timm": "any timm model: timm:<name> ...", "tv": ...}``: the name prefixes ``create`` resolves."""
    return {p: h for p, (_, h) in sorted(_PREFIXES.items())}


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


@functools.lru_cache(maxsize=256)
def _resolve_prefixed(name: str) -> _Entry:
    prefix, _, arch = name.partition(":")
    return _PREFIXES[prefix][0](arch)


def _entry(name: str) -> _Entry:
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and name.partition(":")[0] in _PREFIXES and name.partition(":")[2]:
        return _resolve_prefixed(name)
    prefixes = "".join(f"; {h}" for h in list_prefixes().values())
    raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}{prefixes}") from None


def is_model_name(name: object) -> bool:
    """True for a registered name or a resolvable ``prefix:arch`` name (no model is built)."""
    try:
        _entry(name)  # type: ignore[arg-type]
        return True
    except ValueError:
        return False


def model_family(name: str) -> str:
    """``"cnn"`` or ``"vit"`` for a model name (``timm:`` / ``tv:`` names: decided by rule, see models.named)."""
    fam = _entry(name).family
    return fam if isinstance(fam, str) else fam()


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
    feature_layers: str | Sequence[str] | None = None,
    **kwargs,
) -> nn.Module:
    """Build backbone ``name`` (random init) for ``[B, in_chans, img_size, img_size]`` inputs -> ``[B, num_classes]``.

    name: a registered name (``list_models()``) or ``timm:<name>`` / ``tv:<name>`` (any timm model / torchvision
    classifier, see :mod:`unlearn_fast.models.named`).
    weights: optional local file (``.pt``/``.pth``/``.safetensors``; timm / torchvision / unlearn_fast state dicts)
    loaded strictly except for the classifier head, which is dropped (and stays freshly initialised) when its
    shape differs, e.g. ImageNet weights for 10 classes (:func:`unlearn_fast.models.weights.load_weights`).
    feature_layers: ``"a,b,c"`` or a list of module names: the stage outputs used for the EC modules and the
    CKA / IDI layers instead of the rule (recorded in the config; unknown names raise a ValueError).
    kwargs go to the builder (e.g. torchvision / timm constructor options) and are recorded in
    ``model.unlearn_fast_config`` so that ``create(**model.unlearn_fast_config)`` rebuilds the same
    architecture.
    """
    entry = _entry(name)
    _check_int("num_classes", num_classes, 1)
    _check_int("in_chans", in_chans, 1)
    _check_int("img_size", img_size, 1)
    from unlearn_fast.models.stages import check_layer_names, parse_layer_names

    layers = parse_layer_names(feature_layers)
    if weights is not None and not os.path.isfile(weights):
        from unlearn_fast.models.weights import WeightsFileNotFoundError

        raise WeightsFileNotFoundError(f"weights file not found: {str(weights)!r}; give a local .pt/.pth/.safetensors file")
    model = entry.builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    # a builder may report the values it chose for options left to it (e.g. small_cnn's width)
    config = {**dict(name=name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs),
              **getattr(model, "resolved_kwargs", {})}
    if layers is not None:
        check_layer_names(model, layers)
        config["feature_layers"] = layers
    model.unlearn_fast_name = name
    model.unlearn_fast_config = config
    if weights is not None:
        from unlearn_fast.models.weights import load_weights

        try:
            head = _layer_names(model, name)[-1]
        except ValueError:
            head = None
        load_weights(model, weights, config=config, resize_head=True, head=head)
    return model


_SKIP_GENERIC = (nn.ReLU, nn.GELU, nn.Dropout, nn.Identity, nn.Flatten)


def feature_layers(model: nn.Module, name: str) -> list[str]:
    """Dotted names of ``model``'s natural block outputs, in forward order (hook targets for CKA etc.).

    ResNet: ``conv1, layer1.0 ... layer4.<last>, avgpool, fc``; ViT: ``blocks.0 ... blocks.<depth-1>, head``;
    Swin: ``layers.<s>.blocks.<b> ..., head.fc``; VGG: the five max-pool outputs ``features.<i>`` then the
    classifier's linear layers; small CNN: ``block1, block2, block3, pool, fc``. ``timm:`` / ``tv:`` models: about
    four stage outputs, the layer feeding the classifier (CNN) and the classifier, by rule
    (:mod:`unlearn_fast.models.stages`). A model created with ``feature_layers=`` gets those names, then the
    classifier (and for a CNN the layer before it). A model registered without a layer rule gets its
    top-level children minus activations / dropout / identities. Every returned name exists in
    ``dict(model.named_modules())``.
    """
    entry = _entry(name)
    if entry.layers is not None:
        names = list(entry.layers(model))
    else:
        names = [n for n, m in model.named_children() if not isinstance(m, _SKIP_GENERIC)]
    explicit = (getattr(model, "unlearn_fast_config", None) or {}).get("feature_layers")
    if explicit and names[: len(explicit)] != list(explicit):
        # create(..., feature_layers=) replaces the stages; the classifier (and, CNN, the layer feeding it) stay
        tail = names[-1:] if model_family(name) == "vit" or len(names) < 2 else names[-2:]
        names = [n for n in explicit if n not in tail] + tail
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"feature_layers({name!r}): model has no modules {missing[:5]}; was it built by "
            f"unlearn_fast.models.create({name!r}, ...)?"
        )
    return names


_layer_names = feature_layers  # for create(), whose ``feature_layers`` parameter shadows the function
