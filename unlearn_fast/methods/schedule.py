"""Schedules that fit the data: paper-scale batch sizes, accumulation and epoch counts adapted to the
size of the split a stage actually trains on, so every stage does real work at any dataset size.

What adapts (``fit_to_data=True``, the default of every method; ``False`` / ``preset="paper"`` keeps
the literal values):

* gradient accumulation is reduced, then the batch size, until an epoch holds at least
  ``min_steps_per_epoch`` optimizer steps (measured: the original recipe's batch 256 made two steps per
  epoch on a 280-image face set and early-stopped at step 20 near chance; WF's 16-step accumulation on
  two micro-batches per epoch stopped before its first step);
* the epoch budget is raised until it holds at least ``min_steps`` optimizer steps (measured: GA and
  NegGrad+ card defaults, defined in epochs over a ~250-image forget set, made 5 steps and left 83.8%
  forget accuracy);
* early stopping cannot fire before ``min_steps`` optimizer steps (the loop's ``min_steps``).

Every change is returned as a sentence for the stage's record and the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Schedule", "fit_schedule"]


@dataclass
class Schedule:
    batch_size: int
    grad_accum: int
    epochs: int
    min_steps: int
    steps_per_epoch: int
    notes: list[str] = field(default_factory=list)


def fit_schedule(stage: str, n: int, *, batch_size: int, grad_accum: int = 1, epochs: int, min_steps: int = 0,
                 min_steps_per_epoch: int = 4, min_batch: int = 2, drop_last: bool = False,
                 adapt: bool = True) -> Schedule:
    """The schedule for a stage of ``n`` samples per epoch (see the module docstring).

    ``min_batch``: smallest batch the stage can use (WF splits each micro-batch in two halves).
    ``drop_last``: the loop drops the last incomplete micro-batch (then ``batch_size <= n`` is kept).
    """
    if n < 1:
        raise ValueError(f"{stage}: no samples to train on")
    notes: list[str] = []
    bs, ga, ep = int(batch_size), int(grad_accum), int(epochs)

    def micro(b: int) -> int:
        return n // b if drop_last and n >= b else math.ceil(n / b)

    if adapt:
        if bs > n:
            new = max(min_batch, n)
            notes.append(f"batch_size {bs} -> {new}: the split has only {n} samples")
            bs = new
        if micro(bs) // ga < min_steps_per_epoch and ga > 1:
            new = max(1, micro(bs) // min_steps_per_epoch)
            if new != ga:
                notes.append(f"grad_accum {ga} -> {new}: {micro(bs)} micro-batches per epoch would give "
                             f"{micro(bs) // ga} optimizer step(s) per epoch (at least {min_steps_per_epoch} wanted)")
                ga = new
        if micro(bs) // ga < min_steps_per_epoch:
            new = max(min_batch, n // min_steps_per_epoch)
            if new < bs:
                notes.append(f"batch_size {bs} -> {new}: {n} samples per epoch would give {micro(bs) // ga} optimizer "
                             f"step(s) per epoch (at least {min_steps_per_epoch} wanted)")
                bs = new
    steps_per_epoch = max(1, micro(bs) // ga) if micro(bs) >= ga else (1 if adapt else 0)
    if adapt and min_steps and ep * steps_per_epoch < min_steps:
        new = math.ceil(min_steps / steps_per_epoch)
        notes.append(f"epochs {ep} -> {new}: {ep} epoch(s) of {steps_per_epoch} step(s) is fewer than the floor of "
                     f"{min_steps} optimizer steps")
        ep = new
    return Schedule(bs, ga, ep, min_steps if adapt else 0, steps_per_epoch, notes)
