"""Typed, range-checked hyper-parameters: every method's ``Hparams`` dataclass is validated when the
method is created, before any work starts.

* Types come from the dataclass annotations: YAML strings like ``"1e-3"`` become floats, integral
  values stay ints (``2.5`` for an int is an error), tuples/lists are checked element by element,
  ``X | None`` admits ``None``. Non-finite floats are refused everywhere.
* Ranges come from the field name (the convention every method follows): ``lr`` / ``*_lr`` > 0,
  ``*batch_size`` >= 1, ``epochs`` / ``max_epochs`` / ``grad_accum`` / ``chi`` / ... >= 1, other
  ``*_epochs`` >= 0, ``*weight_decay`` >= 0, ``*momentum`` in [0, 1), temperatures > 0; plus a
  method's own ``CHOICES`` (``{"optimizer": ("sgd", "adam")}``).
* :func:`describe_hparams` reads each field's meaning from the comment after it in the source - the
  same text a reader of the code sees - for ``unlearn-fast list METHOD``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from typing import Any, Mapping

__all__ = ["coerce_hparams", "describe_hparams", "HparamError"]


class HparamError(ValueError):
    """A hyper-parameter of the wrong type or out of range (one line naming it and the fix)."""


_AT_LEAST_1 = {"epochs", "max_epochs", "grad_accum", "chi", "omega", "evals_per_epoch", "eval_every", "max_steps",
               "patience"}


def _range_error(name: str, v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if name == "lr" or name.endswith("_lr"):
        return None if v > 0 else "must be > 0"
    if name.endswith("batch_size") or name in _AT_LEAST_1 or name.endswith("max_steps"):
        return None if v >= 1 else "must be >= 1"
    if name.endswith("_epochs") or name.startswith("min_") or name.endswith("weight_decay"):
        return None if v >= 0 else "must be >= 0"
    if name.endswith("momentum"):
        return None if 0 <= v < 1 else "must be in [0, 1)"
    if name in ("temperature", "tau") or name.endswith("_temperature"):
        return None if v > 0 else "must be > 0"
    return None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` or HparamError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except HparamError as exc:
                errors.append(str(exc))
        raise HparamError(errors[0] if len(errors) == 1 else f"{where} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if value is None:
        raise HparamError(f"{where} must be {_type_name(tp)}, got None")
    if tp is typing.Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise HparamError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise HparamError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                raise HparamError(f"{where} must be an integer, got {value!r}") from None
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise HparamError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        if not isinstance(value, int):
            raise HparamError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise HparamError(f"{where} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise HparamError(f"{where} must be a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise HparamError(f"{where} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise HparamError(f"{where} must be a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise HparamError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise HparamError(f"{where} must be a list like [1, 2], got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise HparamError(f"{where} must have {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else typing.Any
        out = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise HparamError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _check_range(name: str, value: Any, where: str) -> None:
    vals = value if isinstance(value, (list, tuple)) else [value]
    for v in vals:
        err = _range_error(name, v)
        if err:
            raise HparamError(f"{where} {err}, got {value!r}")


def coerce_hparams(method: str, hp_cls: type, values: Mapping[str, Any], choices: Mapping[str, tuple] | None = None) -> dict[str, Any]:
    """Validate ``values`` (overrides, preset included) against the dataclass ``hp_cls``; returns the
    coerced overrides. Unknown names, wrong types and out-of-range values raise :class:`HparamError`."""
    hints = typing.get_type_hints(hp_cls)
    fields = {f.name for f in dataclasses.fields(hp_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise HparamError(f"{method}: unknown hyper-parameter(s) {unknown}; known: {sorted(fields)} "
                          f"(`unlearn-fast list {method}` explains each)")
    out = {}
    for k, v in values.items():
        where = f"{method}: hyper-parameter {k}"
        v = _coerce(v, hints.get(k, typing.Any), where)
        _check_range(k, v, where)
        allowed = (choices or {}).get(k)
        if allowed is not None and v not in allowed:
            raise HparamError(f"{where} must be one of {list(allowed)}, got {v!r}")
        out[k] = v
    return out


def check_defaults(method: str, hp: Any, choices: Mapping[str, tuple] | None = None) -> None:
    """Range/choice checks on a built Hparams instance (defaults included)."""
    for f in dataclasses.fields(hp):
        v = getattr(hp, f.name)
        _check_range(f.name, v, f"{method}: hyper-parameter {f.name}")
        allowed = (choices or {}).get(f.name)
        if allowed is not None and v not in allowed:
            raise HparamError(f"{method}: hyper-parameter {f.name} must be one of {list(allowed)}, got {v!r}")


_FIELD_RE = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=\s*(.*?))?\s*(?:#\s*(.*))?$")


def describe_hparams(hp_cls: type) -> list[dict[str, Any]]:
    """``[{"name", "type", "default", "meaning"}]`` for every field of ``hp_cls`` (base classes
    included); the meaning is the comment written after the field in its source."""
    comments: dict[str, str] = {}
    for klass in reversed(hp_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        last = None
        for line in src.splitlines()[1:]:
            m = _FIELD_RE.match(line)
            if m and not line.strip().startswith(("def ", "@", "#")):
                last = m.group(1)
                if m.group(3):
                    comments[last] = m.group(3).strip()
            elif last and line.strip().startswith("#") and last in comments:
                comments[last] += " " + line.strip().lstrip("#").strip()
            else:
                last = None
    hints = typing.get_type_hints(hp_cls)
    out = []
    for f in dataclasses.fields(hp_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append({"name": f.name, "type": _type_name(hints.get(f.name, "")), "default": default,
                    "meaning": comments.get(f.name, "")})
    return out
