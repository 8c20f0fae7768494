"""Supervised training of a classifier with the WF-Net App. A recipe (shared by original / retrain),
fitted to the size of the data (:mod:`unlearn_fast.methods.schedule`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_fast.data.augment import random_view
from unlearn_fast.evaluation.accuracy import accuracy
from unlearn_fast.methods.loop import LoopConfig, LoopResult, fit
from unlearn_fast.methods.schedule import Schedule, fit_schedule
from unlearn_fast.models import model_family

__all__ = ["ClassifierRecipe", "train_classifier", "hflip_batch", "PAPER_RECIPE", "SMALL_SET_PER_CLASS"]

# Train splits with fewer images per class than this get translation augmentation by default: on a
# 40-class face set of 7 training images per person the unaugmented recipe over-fits in a few epochs.
SMALL_SET_PER_CLASS = 50


@dataclass
class ClassifierRecipe:
    """WF-Net App. A: Adam, lr 1e-3 (CNN) / 1e-4 (ViT), batch 256, early stop on validation accuracy
    with patience 5 epochs, random horizontal flip when the dataset calls for it (CIFAR).

    Fitted to the data (``fit_to_data``, ``preset="paper"`` turns it off): the batch shrinks until an
    epoch holds at least 4 optimizer steps, the epoch budget and the early-stopping floor hold at least
    ``min_steps`` steps, and small train splits (< 50 images per class) get random translations of up
    to ``shift`` of the image side and a floor of 1000 steps (cheap there: the batch is small) - so a
    10-images-per-class set still trains a model worth unlearning (real MNIST, 10 per class: 21.8% test
    accuracy at a 150-step floor, 58.2% at 600, 66.4% at 1200).
    """

    lr: float | None = None            # None: 1e-3 for CNNs, 1e-4 for ViTs
    batch_size: int = 256              # upper bound; fitted to the split size (fit_to_data)
    max_epochs: int = 100              # raised when it holds fewer than min_steps optimizer steps (fit_to_data)
    patience: int = 5                  # early stopping, in epochs without a better validation accuracy
    weight_decay: float = 0.0          # Adam weight decay
    hflip: bool | None = None          # random horizontal flip; None: the dataset's recipe (CIFAR yes, digits no)
    fit_to_data: bool = True           # adapt batch / epochs / augmentation to the data size (False: literal values)
    min_steps: int | None = None       # floor of optimizer steps before early stopping; None: 150, 1000 on small sets
    shift: float | None = None         # random translation, fraction of the side; None: 1/8 on small sets, else 0


PAPER_RECIPE = {"fit_to_data": False, "min_steps": 0, "shift": 0.0}


def hflip_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image of ``x [B,C,H,W]`` horizontally with probability 1/2 (generator-driven: resumable)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    if flip.any():
        x = x.clone()
        idx = flip.nonzero().squeeze(1).to(x.device)
        x[idx] = x[idx].flip(-1)
    return x


def _small_set(train_ds) -> bool:
    """Fewer than SMALL_SET_PER_CLASS training images per class (median over the classes present)."""
    y = getattr(train_ds, "targets", None)
    if y is None or not len(y):
        return False
    counts = torch.bincount(torch.as_tensor(y))
    return float(counts[counts > 0].float().median()) < SMALL_SET_PER_CLASS


def _shift_for(recipe: ClassifierRecipe, small: bool) -> float:
    if recipe.shift is not None:
        return float(recipe.shift)
    return 0.125 if recipe.fit_to_data and small else 0.0


def train_classifier(model: nn.Module, model_name: str, train_ds, val_ds, recipe: ClassifierRecipe, *,
                     hflip_default: bool, device: torch.device, seed: int, state_path: Path, desc: str,
                     progress: bool = True, log_path: Path | None = None,
                     fingerprint: str | None = None,
                     loop_options: dict[str, Any] | None = None) -> tuple[LoopResult, Schedule]:
    """Train ``model`` on ``train_ds``, early-stopped on ``val_ds`` accuracy; returns the loop result and
    the fitted schedule (its ``notes`` say what was adapted). ``loop_options``: extra ``LoopConfig``
    fields, the run options (``RunContext.loop_options()``)."""
    lr = recipe.lr if recipe.lr is not None else (1e-4 if model_family(model_name) == "vit" else 1e-3)
    small = _small_set(train_ds)
    min_steps = recipe.min_steps if recipe.min_steps is not None else (1000 if small else 150)
    sched = fit_schedule(desc, len(train_ds), batch_size=recipe.batch_size, epochs=recipe.max_epochs,
                         min_steps=min_steps, min_batch=1, adapt=recipe.fit_to_data)
    shift = _shift_for(recipe, small)
    if shift and recipe.shift is None:
        sched.notes.append(f"random translation up to {shift:.3g} of the image side (fewer than "
                           f"{SMALL_SET_PER_CLASS} training images per class)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(seed + 17)
    do_flip = hflip_default if recipe.hflip is None else recipe.hflip

    def loss_fn(batch, _):
        x, y = batch
        model.train()
        if shift:
            x = random_view(x, gen, shift, do_flip)
        elif do_flip:
            x = hflip_batch(x, gen)
        return F.cross_entropy(model(x), y)

    def val_fn() -> float:
        return accuracy(model, val_ds, device)

    cfg = LoopConfig(batch_size=sched.batch_size, max_epochs=sched.epochs, patience=recipe.patience,
                     min_steps=sched.min_steps, mode="max", seed=seed, progress=progress, desc=desc,
                     **(loop_options or {}))
    res = fit(params_owner=model, trainable=params, optimizer=opt, dataset=train_ds, cfg=cfg, loss_fn=loss_fn,
              val_fn=val_fn if len(val_ds) else None, state_path=state_path, generators={"aug": gen}, device=device,
              log_path=log_path, fingerprint=fingerprint)
    model.eval()
    return res, sched
