"""``duck``: DUCK - forget embeddings pulled to the centroid of their nearest wrong class (card 7).

Cotogni, Bonato, Sabetta, Pelosin, Nicolosi, "DUCK: Distance-based Unlearning via Centroid Kinematics"
[repo OcraM17+DUCK: src/Unlearning_methods.py DUCK.run, src/opts.py]. Per step, on one forget batch
``x_f`` and one retain batch ``(x_r, y_r)``::

    L = lambda_fgt * mean_i [1 - cos(phi(x_f,i), c_{k*_i})] + lambda_ret * CE(fc(phi(x_r)) / T, y_r)

``phi`` is the pooled penultimate feature (the classifier head's input, ``[B, d]``); ``c_k`` the mean
``phi`` of retain class ``k`` under the original model (eval mode) over the first ``centroid_batches``
retain batches of a seeded permutation; forget classes have no centroid.

Choices the card leaves open or where the public code is wrong (all parameters):

* ``k*_i`` (nearest centroid other than ``y_i``, forget classes excluded, indices over all classes -
  the code's reduced-list indexing bug is avoided) is **cached per sample** (keyed by the sample's
  index in the forget set), not per batch index as in the code, whose shuffled forget loader
  misaligns the cache after epoch 1. The cache is filled once before the first step from the
  original model in eval mode (the student at step 0), so it is deterministic and resume-safe; the
  code fills it during epoch 1 from the partly-updated student in train mode.
* Schedule as in the code: each forget batch is used for ``ratio + 1`` consecutive Adam steps, each
  with a new retain batch (a fresh retain permutation per forget batch), see :class:`RepeatedPairs`.
* The forget and retain batches go through the network in two forward passes (BatchNorm statistics
  as in the code); lr steps x``lr_gamma`` at the epoch ``milestones`` (MultiStepLR).
* The code's stop rule (forget accuracy < 1%) is replaced by the trainer's model selection
  (validation H-Mean; ``select_best``/``patience``).
* "Low-regime" polish (code only, when both lambdas > 0): per epoch, one forget batch of
  ``polish_forget_batch`` samples against ``len(D_r) // polish_batch_size`` retain batches, Adam
  ``polish_lr`` with a cosine schedule to 0 over the whole polish (the code's T_max is a guess tied to
  its loader sizes), loss ``CE(z_r / T) + lambda_fgt * polish_fgt_scale * cos-dist`` on one
  concatenated forward; no augmentation (the code applies RandomCrop + flip there).
  ``polish_epochs=0`` turns it off.

This module also holds small helpers the other feature-level baselines share
(:func:`features_and_logits`, :class:`RepeatedPairs`, :func:`cosine_distance`, :func:`class_feature_means`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod, make_optimizer

__all__ = ["Duck", "fp32", "features_and_logits", "head_module", "RepeatedPairs", "fetch", "cosine_distance",
           "class_feature_means", "dataset_features", "nearest_other_class", "set_lr"]


# --------------------------------------------------------------------------------------- helpers
def head_module(model: nn.Module) -> nn.Module:
    """The classifier head of a model built by ``unlearn_fast.models.create`` (last of its feature layers)."""
    name = getattr(model, "unlearn_fast_name", None)
    if name is None:
        raise ValueError("features_and_logits: the model was not built by unlearn_fast.models.create "
                         "(no unlearn_fast_name); cannot find its classifier head")
    from unlearn_fast.models import feature_layers

    head = dict(model.named_modules())[feature_layers(model, name)[-1]]
    if not isinstance(head, nn.Linear):
        raise ValueError(f"features_and_logits: the last feature layer of {name} is {type(head).__name__}, not Linear")
    return head


def features_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """One forward: ``(phi [B, d], logits [B, K])``, phi = the input of the classifier head (pooled feature)."""
    head = head_module(model)
    store: dict[str, Tensor] = {}
    h = head.register_forward_pre_hook(lambda _m, inp: store.__setitem__("phi", inp[0]))
    try:
        logits = model(x)
    finally:
        h.remove()
    return store["phi"].flatten(1), logits


def fp32(x: Tensor):
    """Context that turns autocast off on ``x``'s device (losses whose similarities bf16 would blur)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise ``1 - cos``: ``a [n, d]``, ``b [k, d]`` -> ``[n, k]`` float32 (eps-safe for zero vectors)."""
    with fp32(a):
        return 1.0 - F.normalize(a.float(), dim=1, eps=1e-12) @ F.normalize(b.float(), dim=1, eps=1e-12).T


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def fetch(ds: Dataset, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Samples ``idx`` of ``ds`` stacked: ``(x [B, ...], y [B] int64)``."""
    items = ds.__getitems__(idx.tolist()) if hasattr(ds, "__getitems__") else [ds[i] for i in idx.tolist()]
    xs, ys = zip(*items)
    return torch.stack(list(xs)), torch.as_tensor([int(v) for v in ys], dtype=torch.long)


class RepeatedPairs:
    """The DUCK / SCAR / CU step order: each forget batch is used for ``repeat`` consecutive steps, each
    step with the next retain batch of a fresh permutation of the retain set (the code re-creates its
    retain iterator for every forget batch). Forget batches come from a seeded permutation per epoch;
    ``forget_batches`` keeps only the first few; ``match_forget`` truncates each retain batch to the
    forget batch's size (CU). Deterministic in ``(seed, epoch)``, so ``__call__(epoch, start)`` resumes.

    Yields ``{"forget": (x, y), "retain": (x, y), "forget_idx": int64 [B]}``; ``forget_idx`` are the
    samples' indices in the forget dataset (the key of per-sample caches).
    """

    def __init__(self, forget: Dataset, retain: Dataset, batch_size: int, retain_batch_size: int, repeat: int,
                 seed: int = 0, forget_batches: int | None = None, match_forget: bool = False) -> None:
        if not len(forget) or not len(retain):
            raise ValueError(f"RepeatedPairs: empty {'forget' if not len(forget) else 'retain'} set")
        if repeat < 1 or batch_size < 1 or retain_batch_size < 1:
            raise ValueError(f"RepeatedPairs: repeat and batch sizes must be >= 1, got {repeat}, {batch_size}, "
                             f"{retain_batch_size}")
        self.forget, self.retain, self.repeat, self.seed = forget, retain, repeat, seed
        self.bf, self.br = batch_size, retain_batch_size
        nb = math.ceil(len(forget) / batch_size)
        self.n_forget_batches = nb if forget_batches is None else max(1, min(nb, forget_batches))
        self.match_forget = match_forget

    def __len__(self) -> int:
        return self.n_forget_batches * self.repeat

    def _perm(self, n: int, key: int) -> Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + key))

    def __call__(self, epoch: int, start: int = 0):
        pf = self._perm(len(self.forget), 2 * epoch)
        for i in range(start, len(self)):
            b, r = divmod(i, self.repeat)
            fidx = pf[b * self.bf:(b + 1) * self.bf]
            pr = self._perm(len(self.retain), 2 * (epoch * 65_537 + b) + 1)
            br = len(fidx) if self.match_forget else self.br
            ridx = pr[torch.arange(r * br, (r + 1) * br) % len(pr)]
            yield {"forget": fetch(self.forget, fidx), "retain": fetch(self.retain, ridx), "forget_idx": fidx.clone()}


@torch.no_grad()
def class_feature_means(model: nn.Module, ds: Dataset, num_classes: int, device, batch_size: int,
                        max_batches: int | None = None, seed: int = 0, transform=None) -> tuple[Tensor, Tensor]:
    """Per-class mean of ``transform(phi)`` over (the first ``max_batches`` batches of a seeded
    permutation of) ``ds`` with ``model`` in eval mode: ``(means [K, d], counts [K])``; absent classes are NaN."""
    was = model.training
    model.eval()
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if max_batches is not None:
        perm = perm[: max_batches * batch_size]
    sums, counts = None, torch.zeros(num_classes, dtype=torch.long)
    for s in range(0, len(perm), batch_size):
        idx = perm[s:s + batch_size].tolist()
        items = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items]).to(device)
        y = torch.as_tensor([int(it[1]) for it in items])
        f = features_and_logits(model, x)[0].float().cpu()
        f = transform(f) if transform is not None else f
        if sums is None:
            sums = torch.zeros(num_classes, f.shape[1])
        sums.index_add_(0, y, f)
        counts += torch.bincount(y, minlength=num_classes)
    model.train(was)
    means = sums / counts.clamp(min=1).unsqueeze(1).float()
    means[counts == 0] = float("nan")
    return means, counts


@torch.no_grad()
def dataset_features(model: nn.Module, ds: Dataset, device, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """``phi`` of every sample of ``ds`` in order (eval mode): ``(phi [n, d] float32 CPU, y [n])``."""
    was = model.training
    model.eval()
    fs, ys = [], []
    for s in range(0, len(ds), batch_size):
        idx = list(range(s, min(len(ds), s + batch_size)))
        items = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items]).to(device)
        fs.append(features_and_logits(model, x)[0].float().cpu())
        ys.append(torch.as_tensor([int(it[1]) for it in items]))
    model.train(was)
    return torch.cat(fs), torch.cat(ys)


def nearest_other_class(dist: Tensor, y: Tensor, excluded: Sequence[int]) -> Tensor:
    """``argmin_k dist[i, k]`` over ``k != y_i``, ``k`` not excluded and with a finite distance: ``[n]``."""
    d = dist.clone()
    d[~torch.isfinite(d)] = math.inf
    if len(excluded):
        d[:, list(excluded)] = math.inf
    d[torch.arange(len(y)), y] = math.inf
    if torch.isinf(d).all(1).any():
        raise ValueError("no class left to move forget samples to (every other class is forgotten or absent)")
    return d.argmin(1)


# --------------------------------------------------------------------------------------- method
@register_method("duck")
class Duck(UnlearningMethod):
    """DUCK (card 7); see the module docstring for the loss and every choice."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 10                  # README CIFAR-10: 10 (opts: <= 30 with the 1% stop)
        lr: float = 4e-4                  # opts (README CIFAR-10 HR: 1e-3)
        optimizer: str = "adam"
        weight_decay: float = 0.0
        batch_size: int = 1024            # forget batch (code: one bsize for both loaders)
        retain_batch_size: int | None = None
        ratio: int = 40                   # batch_fgt_ret_ratio: ratio + 1 steps per forget batch (CIFAR-10)
        lambda_fgt: float = 1.0           # lambda_1
        lambda_ret: float = 1.4           # lambda_2
        temperature: float = 2.0
        label_smoothing: float = 0.0      # 0.2 on TinyImageNet only
        centroid_batches: int = 50
        milestones: tuple[int, ...] = (25, 40)
        lr_gamma: float = 0.5
        polish_epochs: int = 2
        polish_lr: float = 1e-4
        polish_batch_size: int = 512
        polish_forget_batch: int = 128
        polish_fgt_scale: float = 0.1

    @classmethod
    def presets(cls) -> dict[str, dict]:
        # EC Table 10: lambda_fgt = lambda_ret = 1.5, T 2 (the UUEF port's values)
        return {"ec_table10": {"lambda_fgt": 1.5, "lambda_ret": 1.5, "temperature": 2.0}}

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        hp = self.hp
        model = u.copy_original()
        rset, fset = u.retain_set(), u.forget_set()
        centroids, counts = class_feature_means(u.original, rset, u.num_classes, u.device, hp.retain_batch_size or hp.batch_size,
                                                hp.centroid_batches, seed=u.run.seed)
        phi_f, y_f = dataset_features(u.original, fset, u.device)
        targets = nearest_other_class(cosine_distance(phi_f, torch.nan_to_num(centroids)).masked_fill(counts == 0, math.inf),
                                      y_f, u.forget_classes)          # [|D_f|], keyed by forget-set index
        centroids = torch.nan_to_num(centroids).to(u.device)
        self.centroids, self.forget_targets = centroids, targets      # inspectable

        def forget_term(phi: Tensor, idx: Tensor) -> Tensor:
            k = targets.to(phi.device)[idx]
            return cosine_distance(phi.float(), centroids).gather(1, k[:, None]).mean()

        # main stage: ratio + 1 steps per forget batch ---------------------------------------------
        br = hp.retain_batch_size or hp.batch_size
        pairs = RepeatedPairs(fset, rset, hp.batch_size, br, hp.ratio + 1, seed=u.run.seed)
        opt = make_optimizer(model.parameters(), hp)

        def loss(batch, info):
            set_lr(opt, hp.lr * hp.lr_gamma ** sum(int(m) <= info["epoch"] for m in hp.milestones))
            (xf, _), (xr, yr) = batch["forget"], batch["retain"]
            phi_f, _ = features_and_logits(model, xf)
            _, zr = features_and_logits(model, xr)
            ce = F.cross_entropy(zr.float() / hp.temperature, yr, label_smoothing=hp.label_smoothing)
            return hp.lambda_fgt * forget_term(phi_f, batch["forget_idx"]) + hp.lambda_ret * ce

        self.stage(u, "main", model, loss, optimizer=opt, batches=pairs, n_batches=len(pairs))

        # low-regime polish: one forget batch against every retain batch, per epoch ------------------
        if hp.polish_epochs > 0 and hp.lambda_fgt > 0 and hp.lambda_ret > 0:
            nf = min(hp.polish_forget_batch, len(fset))
            per_epoch = max(1, len(rset) // hp.polish_batch_size)
            ppairs = RepeatedPairs(fset, rset, nf, hp.polish_batch_size, per_epoch, seed=u.run.seed + 1, forget_batches=1)
            popt = make_optimizer(model.parameters(), hp, lr=hp.polish_lr)
            n_steps = hp.polish_epochs * len(ppairs)

            def polish(batch, info):
                set_lr(popt, 0.5 * hp.polish_lr * (1 + math.cos(math.pi * min(info["step"], n_steps) / n_steps)))
                (xf, _), (xr, yr) = batch["forget"], batch["retain"]
                phi, z = features_and_logits(model, torch.cat([xf, xr]))
                n = xf.shape[0]
                ce = F.cross_entropy(z[n:].float() / hp.temperature, yr, label_smoothing=hp.label_smoothing)
                return ce + hp.lambda_fgt * hp.polish_fgt_scale * forget_term(phi[:n], batch["forget_idx"])

            self.stage(u, "polish", model, polish, optimizer=popt, epochs=hp.polish_epochs, batches=ppairs,
                       n_batches=len(ppairs))
        return model
