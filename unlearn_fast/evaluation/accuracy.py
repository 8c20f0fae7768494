"""Plain accuracy / loss over a dataset, batched, no grad."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["predict_logits", "accuracy"]


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, device: torch.device | str, batch_size: int = 512,
                   forget_label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, K]`` and labels ``[n]`` of ``model`` on ``dataset`` (WF models get gate row ``forget_label``)."""
    model.eval()
    outs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = x.to(device)
        if forget_label is None:
            out = model(x)
        else:
            out = model(x, torch.full((x.shape[0],), forget_label, dtype=torch.long, device=device))
        outs.append(out.float().cpu())
        ys.append(torch.as_tensor(y))
    if not outs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


def accuracy(model: nn.Module, dataset: Dataset, device: torch.device | str, batch_size: int = 512) -> float:
    logits, y = predict_logits(model, dataset, device, batch_size)
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")
