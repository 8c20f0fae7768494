"""WF-Net files: the alphas (``wf.safetensors``) beside the original model they gate."""
from __future__ import annotations

import os

import torch

from unlearn_fast.models.io import load_model, load_tensors, save_tensors
from unlearn_fast.nn.wrap import WFModel, wrap

__all__ = ["save_wf", "load_wf"]


def save_wf(wf: WFModel, path: str | os.PathLike, **extra) -> None:
    from unlearn_fast.run_files import tensors_digest

    sd = wf.alpha_state_dict()
    save_tensors(sd, path, {"num_classes": wf.num_classes, "alpha_init": wf.alpha_init, "gate_scale": wf.gate_scale,
                            "gated_layers": list(getattr(wf, "gated_layers", [])), "digest": tensors_digest(sd),
                            **extra})


def load_wf(path: str | os.PathLike, original: str | os.PathLike | torch.nn.Module,
            map_location: str | torch.device = "cpu") -> WFModel:
    """Rebuild the WF-Net: the original model (file or module, copied) wrapped, alphas loaded from ``path``."""
    import copy

    tensors, meta = load_tensors(path)
    model = load_model(original, map_location) if not isinstance(original, torch.nn.Module) else copy.deepcopy(original)
    # files written before the option existed gated the patch embedding: tell by their tensor names
    gpe = meta.get("gate_patch_embed", any("patch_embed" in k for k in tensors))
    gpe = gpe if isinstance(gpe, bool) else str(gpe).lower() in ("1", "true")
    wf = wrap(model, int(meta["num_classes"]), float(meta.get("alpha_init", 3.0)), gate_patch_embed=gpe)
    expected = set(wf.alpha_state_dict())
    if set(tensors) != expected:
        raise ValueError(f"{path}: alphas do not fit this model (missing {sorted(expected - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:3]}); was it made for another original model?")
    wf.load_state_dict(tensors, strict=False)
    wf.gate_scale = float(meta.get("gate_scale", 1.0))
    return wf.to(map_location)
