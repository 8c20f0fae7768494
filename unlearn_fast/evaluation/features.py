"""Penultimate features of a model made by ``unlearn_fast.models.create``: the input of its final
classifier layer (the last name of ``models.feature_layers``), hooked during a plain forward pass. Shared
by CKA / t-SNE (``unlearn_eval``), the linear probe, k-NN and the representation metrics."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unlearn_fast.data.pipeline import eval_loader

__all__ = ["penultimate_features"]


def _classifier_module(model: nn.Module) -> nn.Module:
    from unlearn_fast.models import feature_layers

    name = getattr(model, "unlearn_fast_name", None)
    if name is None:
        raise ValueError("the model was not made by unlearn_fast.models.create: cannot find its final classifier layer")
    return dict(model.named_modules())[feature_layers(model, name)[-1]]


@torch.no_grad()
def penultimate_features(model: nn.Module, dataset: Dataset, device: torch.device | str,
                         batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Input of the final classifier layer (hooked), flattened: ``([n, d] float32 on CPU, labels [n])``."""
    grab: list[Tensor] = []
    handle = _classifier_module(model).register_forward_hook(
        lambda m, inp, out: grab.append(inp[0].flatten(1).float().cpu()))
    model.eval()
    ys = []
    try:
        for x, y in eval_loader(dataset, batch_size):  # workers for lazily decoded data (data.pipeline)
            model(x.to(device))
            ys.append(torch.as_tensor(y))
    finally:
        handle.remove()
    if not grab:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(grab), torch.cat(ys)
