"""Model files: ``.safetensors`` with the model's creation config in the metadata."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["save_model", "load_model", "save_tensors", "load_tensors", "read_metadata"]


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a ``.safetensors`` file (temporary name, then rename); rank 0 alone in a process group."""
    from safetensors.torch import save_file

    from unlearn_fast.distributed import main_rank_only

    main_rank_only(_save_file)(save_file, tensors, path, metadata)


def _save_file(save_file, tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"unlearn_fast": json.dumps(metadata or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The unlearn_fast metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("unlearn_fast", "{}"))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); delete it to compute it again") from exc


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("unlearn_fast", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); re-create it") from exc
    return tensors, meta


def save_model(model: nn.Module, path: str | os.PathLike, **extra) -> None:
    """Save weights plus ``model.unlearn_fast_config`` so :func:`load_model` can rebuild it."""
    config = getattr(model, "unlearn_fast_config", None)
    if config is None:
        raise ValueError("save_model(): the model was not made by unlearn_fast.models.create (no unlearn_fast_config)")
    from unlearn_fast.run_files import tensors_digest

    sd = model.state_dict()
    save_tensors(sd, path, {"config": config, "digest": tensors_digest(sd), **extra})


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    from unlearn_fast.models import create

    tensors, meta = load_tensors(path)
    config = dict(meta.get("config") or {})
    if "name" not in config:
        raise ValueError(f"{path} has no unlearn_fast model config in its metadata; load it with models.create(..., weights=)")
    name = config.pop("name")
    model = create(name, **config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match {name} {config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(map_location).eval()
