"""``rl``: Random Labelling (card 11 "RL"; the update of SalUn, card 6, without the mask).

Forget samples are trained towards uniformly random labels ``y ~ U{0..K-1}`` (they may equal the true
label), retain samples towards their true labels. Defaults from card 11 / SalUn's README
(CIFAR-10 recipe): SGD momentum 0.9, wd 5e-4, 10 epochs, lr 0.013, batch 256.

Choices the cards leave open (each a hyper-parameter):

- ``schedule``: ``"sequential"`` (default; SalUn CIFAR-10/SVHN code ``unlearn/RL.py``: every epoch is one
  pass over D_f with random labels, then one pass over D_r, as separate SGD steps, not a summed loss),
  ``"concat"`` (SalUn CIFAR-100/TinyImageNet: D_f with random labels drawn once per sample, concatenated
  with D_r into one shuffled set), ``"paired"`` (card 11 read literally: per step one forget batch and
  ``omega`` retain batches, ``L = CE(f, random) + retain_weight * CE(r, y)``).
- ``random_labels``: ``"all"`` (SalUn) or ``"retain"`` (the DUCK variant: forget classes excluded).
- ``forget_weight`` scales the random-label term (0 = the ablation: fine-tuning on D_r alone; the
  ``concat`` schedule has no separate term and refuses anything but 1).
- Random labels of the sequential/paired schedules are redrawn every step from a generator seeded by
  (run seed, epoch, micro-batch), so an interrupted run resumes to the same labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import PairedBatches, UnlearnContext, UnlearnHparams, UnlearningMethod

__all__ = ["RandomLabel", "SequentialBatches", "RelabelledDataset", "random_labels"]

_SCHEDULES = ("sequential", "concat", "paired")


def random_labels(n: int, num_classes: int, seed: int, epoch: int, micro: int,
                  exclude: list[int] | None = None) -> Tensor:
    """``[n]`` int64 labels uniform over ``{0..K-1}`` minus ``exclude``; a pure function of its arguments."""
    pool = torch.tensor([c for c in range(num_classes) if c not in set(exclude or [])], dtype=torch.long)
    if not len(pool):
        raise ValueError(f"random_labels: every one of the {num_classes} classes is excluded")
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 100_003 + micro) % (2**62))
    return pool[torch.randint(len(pool), (n,), generator=g)]


class RelabelledDataset(Dataset):
    """``dataset`` with its labels replaced by ``labels [n]`` (SalUn's concat schedule)."""

    def __init__(self, dataset: Dataset, labels: Tensor) -> None:
        if len(labels) != len(dataset):
            raise ValueError(f"RelabelledDataset: {len(labels)} labels for {len(dataset)} samples")
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i][0], int(self.labels[i])


class SequentialBatches:
    """Epoch = one pass over ``forget`` (batches ``{"forget": (x, y), "retain": None}``), then one pass
    over ``retain`` (``{"forget": None, "retain": (x, y)}``); orders are pure functions of (seed, epoch),
    so ``__call__(epoch, start)`` resumes mid-epoch exactly."""

    def __init__(self, forget: Dataset, retain: Dataset, forget_batch: int, retain_batch: int, seed: int) -> None:
        self.f = PairedBatches(forget, None, forget_batch, forget_batch, 1, "forget", seed)
        self.r = PairedBatches(None, retain, retain_batch, retain_batch, 1, "retain", seed)
        self.n_forget = len(self.f)

    def __len__(self) -> int:
        return len(self.f) + len(self.r)

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict]:
        if start < self.n_forget:
            yield from self.f(epoch, start)
            start = self.n_forget
        yield from self.r(epoch, start - self.n_forget)


@register_method("rl")
class RandomLabel(UnlearningMethod):
    """RL: CE towards random labels on D_f plus CE on D_r (see the module docstring for the schedules)."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 10
        lr: float = 0.013
        batch_size: int = 256              # forget batches (and retain batches unless retain_batch_size)
        schedule: str = "sequential"       # "sequential" | "concat" | "paired"
        random_labels: str = "all"         # "all" (SalUn) | "retain" (DUCK's CR variant)
        retain_weight: float = 1.0         # paired schedule only: weight of CE(D_r) (SalUn issue #21: 1)
        forget_weight: float = 1.0         # weight of CE(D_f, random labels); 0 = ablation (retain fine-tuning)

        def __post_init__(self) -> None:
            if self.schedule not in _SCHEDULES:
                raise ValueError(f"rl/salun: schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
            if self.random_labels not in ("all", "retain"):
                raise ValueError(f"rl/salun: random_labels must be 'all' or 'retain', got {self.random_labels!r}")

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"ec_table10": {}}   # EC Table 10 lists nothing for this method: its defaults

    def _excluded(self, u: UnlearnContext) -> list[int]:
        return list(u.forget_classes) if self.hp.random_labels == "retain" else []

    def rl_stage(self, u: UnlearnContext, name: str, model: nn.Module, **stage_kwargs):
        """Run the RL update on ``model`` (extra keywords go to :meth:`stage`, e.g. SalUn's optimizer/after_step)."""
        hp, seed, K, excl = self.hp, u.run.seed, u.num_classes, self._excluded(u)
        rb = hp.retain_batch_size or hp.batch_size

        if hp.schedule == "concat":
            if hp.forget_weight != 1.0:
                raise ValueError("rl/salun: schedule='concat' mixes D_f into D_r (one CE): forget_weight must be 1 there; "
                                 "use schedule='sequential' or 'paired' to weight the forgetting term")
            fset = u.forget_set()
            g = torch.Generator().manual_seed(seed * 7919 + 13)
            pool = torch.tensor([c for c in range(K) if c not in set(excl)], dtype=torch.long)
            labels = pool[torch.randint(len(pool), (len(fset),), generator=g)]
            union = ConcatDataset([RelabelledDataset(fset, labels), u.retain_set()])

            def loss_concat(batch, _):
                x, y = batch["retain"]
                return F.cross_entropy(model(x), y)

            return self.stage(u, name, model, loss_concat, drive="retain", forget=None, retain=union,
                              batch_size=hp.batch_size, **stage_kwargs)

        def loss(batch, info):
            total = None
            if batch["forget"] is not None:
                xf, _ = batch["forget"]
                yr = random_labels(len(xf), K, seed, info["epoch"], info["micro"], excl).to(xf.device)
                total = hp.forget_weight * F.cross_entropy(model(xf), yr)
            if batch["retain"] is not None:
                xr, yr_true = batch["retain"]
                lr_ = F.cross_entropy(model(xr), yr_true)
                w = hp.retain_weight if hp.schedule == "paired" else 1.0
                total = w * lr_ if total is None else total + w * lr_
            return total

        if hp.schedule == "sequential":
            sb = SequentialBatches(u.forget_set(), u.retain_set(), hp.batch_size, rb, seed)
            return self.stage(u, name, model, loss, batches=sb, n_batches=len(sb), **stage_kwargs)
        return self.stage(u, name, model, loss, drive="forget", **stage_kwargs)

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        model = u.copy_original()
        self.rl_stage(u, "rl", model)
        return model
