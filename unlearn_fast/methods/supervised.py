"""Supervised training of a classifier with the WF-Net App. A recipe (shared by original / retrain)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_fast.evaluation.accuracy import accuracy
from unlearn_fast.methods.loop import LoopConfig, LoopResult, fit
from unlearn_fast.models import model_family

__all__ = ["ClassifierRecipe", "train_classifier", "hflip_batch"]


@dataclass
class ClassifierRecipe:
    """WF-Net App. A: Adam, lr 1e-3 (CNN) / 1e-4 (ViT), batch 256, early stop on validation accuracy
    with patience 5 epochs, random horizontal flip when the dataset calls for it (CIFAR)."""

    lr: float | None = None            # None: 1e-3 for CNNs, 1e-4 for ViTs
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 5
    weight_decay: float = 0.0
    hflip: bool | None = None          # None: the dataset's recipe (bundle.hflip)


def hflip_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image of ``x [B,C,H,W]`` horizontally with probability 1/2 (generator-driven: resumable)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    if flip.any():
        x = x.clone()
        idx = flip.nonzero().squeeze(1).to(x.device)
        x[idx] = x[idx].flip(-1)
    return x


def train_classifier(model: nn.Module, model_name: str, train_ds, val_ds, recipe: ClassifierRecipe, *,
                     hflip_default: bool, device: torch.device, seed: int, state_path: Path, desc: str,
                     progress: bool = True, log_path: Path | None = None) -> LoopResult:
    lr = recipe.lr if recipe.lr is not None else (1e-4 if model_family(model_name) == "vit" else 1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(seed + 17)
    do_flip = hflip_default if recipe.hflip is None else recipe.hflip

    def loss_fn(batch, _):
        x, y = batch
        model.train()
        if do_flip:
            x = hflip_batch(x, gen)
        return F.cross_entropy(model(x), y)

    def val_fn() -> float:
        return accuracy(model, val_ds, device)

    cfg = LoopConfig(batch_size=recipe.batch_size, max_epochs=recipe.max_epochs, patience=recipe.patience,
                     mode="max", seed=seed, progress=progress, desc=desc)
    res = fit(params_owner=model, trainable=params, optimizer=opt, dataset=train_ds, cfg=cfg, loss_fn=loss_fn,
              val_fn=val_fn, state_path=state_path, generators={"aug": gen}, device=device, log_path=log_path)
    model.eval()
    return res
