"""Method registry (timm-style): ``@register_method``, :func:`list_methods`, :func:`create_method`."""
from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, type] = {}
_SUFFIXES: dict[str, Callable[[type], type]] = {}

__all__ = ["register_method", "register_suffix", "list_methods", "create_method", "get_method_class"]


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def register_suffix(suffix: str, factory: Callable[[type], type]) -> None:
    """``<method><suffix>`` names a method made on demand by ``factory(base_class)`` (e.g. ``+ec``: any
    unlearning method plus EC's multi-layer supervision, registered by ``methods/ec_plugin.py``)."""
    _SUFFIXES[suffix] = factory


def get_method_class(name: str) -> type:
    if not isinstance(name, str):
        raise ValueError(f"method name must be a string, got {name!r}")
    for suffix, factory in _SUFFIXES.items():
        if name not in _REGISTRY and name.endswith(suffix) and name[: -len(suffix)] in _REGISTRY:
            return factory(_REGISTRY[name[: -len(suffix)]])
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _REGISTRY[name]


def create_method(name: str, **hparams: Any):
    """An instance of method ``name`` with its defaults overridden by ``hparams`` (unknown keys raise)."""
    return get_method_class(name)(**hparams)
