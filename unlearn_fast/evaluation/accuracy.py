"""Plain accuracy / loss over a dataset, batched, no grad."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from unlearn_fast.data.pipeline import eval_loader

__all__ = ["predict_logits", "accuracy"]


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, device: torch.device | str, batch_size: int = 512,
                   forget_label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, K]`` and labels ``[n]`` of ``model`` on ``dataset`` (WF models get gate row ``forget_label``)."""
    model.eval()
    outs, ys = [], []
    for x, y in eval_loader(dataset, batch_size):  # workers for lazily decoded data (data.pipeline)
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
    """Top-1 accuracy in [0, 1] (NaN on an empty set). In a process group (torchrun) each rank scores its
    contiguous shard and the sufficient statistics (correct, seen) are summed across ranks: the same
    number as one process, for 1/N of the work (unlearn_fast.distributed)."""
    from unlearn_fast import distributed as ddp

    if ddp.is_distributed():
        from torch.utils.data import Subset

        lo, hi = ddp.shard_range(len(dataset))
        logits, y = predict_logits(model, Subset(dataset, range(lo, hi)), device, batch_size)
        correct, seen = ddp.sum_across_ranks([int((logits.argmax(1) == y).sum()) if len(y) else 0, len(y)])
        return float(torch.tensor(correct, dtype=torch.float32) / seen) if seen else float("nan")  # = float32 mean
    logits, y = predict_logits(model, dataset, device, batch_size)
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")
