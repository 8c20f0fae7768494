"""Local state-dict files for backbones: ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) and
``.safetensors``. Nothing is downloaded.

``save_weights`` writes a state dict (safetensors also stores ``model.unlearn_fast_config`` as JSON
metadata so a mismatch error can say what the file was saved for); ``load_weights`` loads strictly and
turns every failure into a FileNotFoundError / ValueError that names the file and the expected config.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn

SUFFIXES = (".pt", ".pth", ".safetensors")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net")  # checkpoint dicts holding a state dict
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "net.")


class WeightsFileNotFoundError(FileNotFoundError, ValueError):
    """A ``weights=`` file that does not exist (both a FileNotFoundError and a ValueError)."""
_META_KEY = "unlearn_fast_config"
_SHOW = 5  # how many offending keys an error lists per kind
_SAID: set = set()  # head / stem notes already printed


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
        raise WeightsFileNotFoundError(f"weights file not found: {str(path)!r}; give a local .pt/.pth/.safetensors file")
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
        for wrapper in _WRAPPERS:
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


def normalize_keys(state: dict[str, torch.Tensor], own_keys) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.`` DDP, ``_orig_mod.`` torch.compile, ``model.`` / ``backbone.`` /
    ``net.`` training wrappers) while every key carries one and the model's own keys do not."""
    own_keys = list(own_keys)
    changed = True
    while changed and state:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in state) and not all(k.startswith(p) for k in own_keys):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    return state


def classifier_name(model: nn.Module) -> Optional[str]:
    """Dotted name of timm's ``get_classifier()`` module, or None (``create`` passes the head itself: the last
    name of ``models.feature_layers``)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        return next((n for n, m in model.named_modules() if m is head and n), None)
    return None


def _adapt_stem(file_w: torch.Tensor, own_shape: tuple) -> Optional[torch.Tensor]:
    """RGB stem conv weights -> ``in_chans`` input channels (timm's rule: sum for 1 channel, else repeat the
    RGB filters and rescale by 3 / in_chans), or None when the shapes differ otherwise."""
    if file_w.dim() != 4 or len(own_shape) != 4 or file_w.shape[1] != 3 or \
            (file_w.shape[0], *file_w.shape[2:]) != (own_shape[0], *own_shape[2:]):
        return None
    c = own_shape[1]
    if c == 1:
        return file_w.sum(dim=1, keepdim=True)
    reps = -(-c // 3)
    return file_w.repeat(1, reps, 1, 1)[:, :c] * (3 / float(c))


def load_weights(model: nn.Module, path: str | os.PathLike, config: Optional[dict] = None,
                 resize_head: bool = False, head: Optional[str] = None) -> nn.Module:
    """Strictly load the state dict in ``path`` into ``model`` (in place; returns it).

    Key prefixes of wrappers (``module.``, ``_orig_mod.``, ``model.``, ...) and checkpoint nesting
    (``{"state_dict": ...}``, ``{"model": ...}``) are removed first. ``resize_head=True``: the classifier's
    tensors (``head``, default :func:`classifier_name`) are dropped when their shape differs (the model keeps its fresh head,
    e.g. ImageNet weights for 10 classes), a 3-channel stem conv is adapted to the model's input channels,
    and one line on stderr says so. Raises FileNotFoundError (also a ValueError) for a missing file and
    ValueError for an unreadable file or a state dict whose other keys / shapes do not match, listing the
    first offending keys and the expected config.
    """
    config = config if config is not None else getattr(model, "unlearn_fast_config", None)
    state, saved_config = read_state_dict(path)
    own = model.state_dict()
    state = normalize_keys(state, own)
    notes: list[str] = []
    drop: list[str] = []
    if resize_head:
        head = head or classifier_name(model)
        drop = [k for k in (f"{head}.weight", f"{head}.bias") if head and k in state and k in own
                and tuple(state[k].shape) != tuple(own[k].shape)]
        if drop:
            notes.append(f"classifier {head} {tuple(state[drop[0]].shape)} -> {tuple(own[drop[0]].shape)} "
                         "not loaded (fresh head: train it)")
            state = {k: v for k, v in state.items() if k not in drop}
        for k, v in list(state.items()):
            if k in own and tuple(v.shape) != tuple(own[k].shape):
                adapted = _adapt_stem(v, tuple(own[k].shape))
                if adapted is not None:
                    state[k] = adapted.to(v.dtype)
                    notes.append(f"stem {k} adapted from 3 to {own[k].shape[1]} input channels")
    missing = [k for k in own if k not in state and k not in drop]
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
    model.load_state_dict({**{k: own[k] for k in drop}, **state}, strict=True)
    line = f"weights {os.fspath(path)}: " + "; ".join(notes)
    if notes and line not in _SAID:  # once per process: every model of a run loads the same file
        _SAID.add(line)
        print(line, file=sys.stderr)
    model.unlearn_fast_weights_notes = notes
    return model
