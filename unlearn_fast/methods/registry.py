"""Method registry (timm-style): ``@register_method``, :func:`list_methods`, :func:`create_method`."""
from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, type] = {}

__all__ = ["register_method", "list_methods", "create_method", "get_method_class"]


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


def get_method_class(name: str) -> type:
    if name not in _REGISTRY and name.endswith("+ec") and name[:-3] in _REGISTRY:
        # any unlearning method gains EC's multi-layer supervision on demand (EC Sec. 4.2)
        from unlearn_fast.methods.ec_plugin import ec_plugin

        return ec_plugin(_REGISTRY[name[:-3]])
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _REGISTRY[name]


def create_method(name: str, **hparams: Any):
    """An instance of method ``name`` with its defaults overridden by ``hparams`` (unknown keys raise)."""
    return get_method_class(name)(**hparams)
