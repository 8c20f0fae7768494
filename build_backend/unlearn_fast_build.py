"""PEP 517 backend: setuptools, but built against the torch already installed.

pip builds in an isolated environment by default. Listing ``torch`` as a build requirement would
make pip download a second (multi-GB) torch into it, possibly a different version than the one the
extension will run with. Instead this backend makes the *invoking* environment's site-packages
visible (appended, so the isolated setuptools still wins) before setuptools imports ``setup.py``.
``pip install --no-build-isolation -e .`` skips all of this and works the same.
"""
from __future__ import annotations

import os
import site
import sys
import sysconfig


def _expose_outer_site_packages() -> None:
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    candidates = []
    for key in ("purelib", "platlib"):
        for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_prefix}):
            try:
                candidates.append(sysconfig.get_paths(vars=scheme_vars or None)[key])
            except KeyError:
                pass
    try:
        candidates += site.getsitepackages()
    except AttributeError:
        pass
    candidates += [p for p in os.environ.get("UNLEARN_FAST_TORCH_SITE", "").split(os.pathsep) if p]
    for path in candidates:
        if path and os.path.isdir(os.path.join(path, "torch")) and path not in sys.path:
            sys.path.append(path)
    try:
        import torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - message for humans
        raise RuntimeError(
            "unlearn_fast builds against an installed torch, and none was found. Install it first, "
            "e.g. `pip install torch==2.14.1 torchvision==0.29.1`, then `pip install -e .`."
        ) from exc


_expose_outer_site_packages()

from setuptools import build_meta as _orig  # noqa: E402
from setuptools.build_meta import *  # noqa: E402,F401,F403


def get_requires_for_build_wheel(config_settings=None):
    return [r for r in _orig.get_requires_for_build_wheel(config_settings) if not r.startswith("torch")]


def get_requires_for_build_editable(config_settings=None):
    return [r for r in _orig.get_requires_for_build_editable(config_settings) if not r.startswith("torch")]
