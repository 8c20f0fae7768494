"""Unlearning methods (a registry): original, retrain, wf, ec and the baselines - one file each.

Every module in this package and in ``baselines/`` is imported here so that its
``@register_method`` runs; adding a method is adding a file.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from unlearn_fast.methods.base import Method, MethodOutput, RunContext  # noqa: F401
from unlearn_fast.methods.registry import create_method, get_method_class, list_methods, register_method  # noqa: F401


def _import_all(pkg_name: str, path) -> None:
    for info in _pkgutil.iter_modules(path):
        mod = _importlib.import_module(f"{pkg_name}.{info.name}")
        if info.ispkg:
            _import_all(mod.__name__, mod.__path__)


_import_all(__name__, __path__)
