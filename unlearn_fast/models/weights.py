"""Local state-dict files for backbones: ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) and
``.safetensors``. Nothing is downloaded.

``save_weights`` writes a state dict (safetensors also stores ``model.unlearn_fast_config`` as JSON
metadata so a mismatch error can say what the file was saved for); ``load_weights`` loads strictly and
turns every failure into a FileNotFoundError / ValueError that names the file and the expected config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn

SUFFIXES = (".pt", ".pth", ".safetensors")
_META_KEY = "unlearn_fast_config"
_SHOW = 5  # how many offending keys an error lists per kind


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"weights file {str(path)!r}: unsupported extension {suffix!r}; use one of {SUFFIXES}")
    return suffix


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``path`` (``.pt``/``.pth``/``.safetensors``, picked by suffix)."""
    path = Path(path)
    suffix = _suffix(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        config = getattr(model, "unlearn_fast_config", None)
        meta = {_META_KEY: json.dumps(config, default=str)} if config is not None else None
        # state_dict() tensors that share storage (tied weights) are cloned so safetensors accepts them.
        save_file({k: v.clone() for k, v in state.items()}, str(path), metadata=meta)
    else:
        torch.save(state, path)
    return path


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """Read a state dict (and the saved config, if the file carries one) from ``path`` on the CPU.

    Accepts a plain state dict or a checkpoint dict holding one under ``state_dict`` / ``model``;
    a ``module.`` prefix on every key (DDP) is stripped.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {str(path)!r}")
    saved_config = None
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            state = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                for key in f.keys():
                    state[key] = f.get_tensor(key)
            if _META_KEY in meta:
                try:
                    saved_config = json.loads(meta[_META_KEY])
                except json.JSONDecodeError:
                    saved_config = None
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated / not a tensor file
        raise ValueError(
            f"weights file {str(path)!r} could not be read as a {suffix} state dict "
            f"({type(exc).__name__}: {exc}); re-save it with unlearn_fast.models.save_weights"
        ) from exc
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"weights file {str(path)!r} does not hold a state dict (a mapping of names to tensors); "
            f"got {type(state).__name__}"
        )
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, saved_config


def load_weights(model: nn.Module, path: str | os.PathLike, config: Optional[dict] = None) -> nn.Module:
    """Strictly load the state dict in ``path`` into ``model`` (in place; returns it).

    Raises FileNotFoundError for a missing file and ValueError for an unreadable file or a state dict
    whose keys / shapes do not match, listing the first offending keys and the expected config.
    """
    config = config if config is not None else getattr(model, "unlearn_fast_config", None)
    state, saved_config = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                parts.append(f"{len(items)} {label}: {items[:_SHOW]}{more}")
        expected = f"model config {config}" if config is not None else f"a {type(model).__name__}"
        saved = f"; the file was saved for {saved_config}" if saved_config else ""
        raise ValueError(
            f"weights file {str(path)!r} does not match {expected}: " + "; ".join(parts) + saved
            + ". Create the model with the same name / num_classes / in_chans / img_size / kwargs as when it was saved."
        )
    model.load_state_dict(state, strict=True)
    return model
