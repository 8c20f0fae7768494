"""``scrub``: SCRUB - a student that moves away from its teacher on D_f and stays close on D_r (card 5).

Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine Unlearning", NeurIPS 2023
[repo meghdadk+SCRUB: thirdparty/repdistiller/helper/loops.py train_distill; distiller_zoo/KD.py].
The student starts from the original model, the teacher is the frozen original::

    d(z_s, z_t) = T^2 * sum_k KL(softmax(z_t / T) || softmax(z_s / T)) / B          (DistillKL)
    max-step (forget batch):  L = -d(z_s, z_t)
    min-step (retain batch):  L = gamma * CE(z_s, y) + alpha * d(z_s, z_t)

Epoch ``e = 1..epochs``: lr = ``lr * lr_decay_rate ** #{m in lr_decay_epochs : e > m}``; if
``e <= msteps`` one full max pass over D_f (batches of ``batch_size``), then one full min pass over D_r
(batches of ``retain_batch_size``); one SGD optimizer (momentum state shared by both kinds of pass).

Defaults: the card's large-scale (CIFAR-10 ResNet) setting; ``preset="small"`` is its small-scale
setting (Adam, wd 0.1, T 2, gamma 1, alpha 0.5, msteps 3, 10 epochs, decay at 5/8/9);
``preset="ec_table10"`` is EC's (alpha = gamma = 1, 200 max steps: ``forget_steps`` caps each max pass
at that many optimizer steps, cycling D_f - the UUEF port's 200 max steps per epoch). ``msteps=0``
switches the forgetting (max) term off: SCRUB's ablation. The
``beta`` term of the code is the weight of other distillers and is 0 in every SCRUB setting: omitted.

Each pass is its own resumable stage (``max<e>`` / ``min<e>``) so that a ``<method>+ec`` plug-in
wrapping ``self.stage``'s loss sees every step. Model selection (``select_best``) is done across
epochs: the validation H-Mean is read after each epoch's min pass and the best epoch's state is kept
(selecting inside a max pass would keep its least-forgotten state); ``patience`` counts epochs.
``evals_per_epoch`` is not used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod, make_optimizer

__all__ = ["Scrub", "distill_kl"]


def distill_kl(z_s: Tensor, z_t: Tensor, T: float) -> Tensor:
    """SCRUB's DistillKL: ``T^2 * sum KL(softmax(z_t/T) || softmax(z_s/T)) / B``; ``z_* [B, K]`` -> scalar."""
    if z_s.shape != z_t.shape or z_s.dim() != 2:
        raise ValueError(f"distill_kl: student and teacher logits must both be [B, K], got {tuple(z_s.shape)} "
                         f"and {tuple(z_t.shape)}")
    log_p_s = F.log_softmax(z_s.float() / T, dim=1)
    p_t = F.softmax(z_t.float() / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * (T * T) / z_s.shape[0]


class CycledForget:
    """Exactly ``steps`` forget batches of ``batch_size`` (``{"forget": (x, y), "retain": None}``): the forget
    set in seeded permutations, one after another (EC Table 10's fixed number of max steps). Deterministic
    in (seed, epoch, start), so a resumed stage continues where it stopped."""

    def __init__(self, forget, batch_size: int, steps: int, seed: int) -> None:
        if steps < 1 or batch_size < 1 or not len(forget):
            raise ValueError(f"scrub: forget_steps and batch_size must be >= 1 and the forget set non-empty, got "
                             f"{steps}, {batch_size}, {len(forget)} samples")
        self.forget, self.bs, self.steps, self.seed = forget, batch_size, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __call__(self, epoch: int, start: int = 0):
        from unlearn_fast.methods.baselines.duck import fetch

        n = len(self.forget)
        per = max(1, n // self.bs)  # whole batches per permutation (one short batch when n < batch_size)
        for i in range(start, self.steps):
            rnd, j = divmod(i, per)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + rnd))
            yield {"forget": fetch(self.forget, perm[j * self.bs:(j + 1) * self.bs]), "retain": None}


@register_method("scrub")
class Scrub(UnlearningMethod):
    """SCRUB (card 5); see the module docstring."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 3                       # sgda_epochs
        lr: float = 5e-4
        optimizer: str = "sgd"
        momentum: float = 0.9
        weight_decay: float = 5e-4
        batch_size: int = 32                  # forget batch (max passes)
        retain_batch_size: int | None = 128   # min passes
        kd_T: float = 4.0
        gamma: float = 0.99                   # CE weight of the min step
        alpha: float = 0.001                  # KL weight of the min step
        msteps: int = 2                       # epochs with a max pass
        lr_decay_epochs: tuple[int, ...] = (3, 5, 9)
        lr_decay_rate: float = 0.1
        forget_steps: int | None = None       # max-step optimizer steps per max pass (D_f cycled); None: one pass

        def __post_init__(self) -> None:
            if self.forget_steps is not None and self.forget_steps < 1:
                raise ValueError(f"scrub: forget_steps must be >= 1 or None (one pass over D_f), got {self.forget_steps}")
            if self.msteps < 0:
                raise ValueError(f"scrub: msteps must be >= 0 (0 = no max passes: the ablation), got {self.msteps}")

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"small": dict(optimizer="adam", lr=5e-4, weight_decay=0.1, kd_T=2.0, gamma=1.0, alpha=0.5, msteps=3,
                              epochs=10, lr_decay_epochs=(5, 8, 9)),
                # EC Table 10: alpha = gamma = 1, m_steps = 200 max-phase steps (UUEF port: 200 per epoch)
                "ec_table10": dict(alpha=1.0, gamma=1.0, forget_steps=200)}

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        hp = self.hp
        model, teacher = u.copy_original(), u.original
        opt = make_optimizer(model.parameters(), hp)

        def teacher_logits(x: Tensor) -> Tensor:
            with torch.no_grad():
                return teacher(x)

        def max_loss(batch, _info):
            x, _ = batch["forget"]
            return -distill_kl(model(x), teacher_logits(x), hp.kd_T)

        def min_loss(batch, _info):
            x, y = batch["retain"]
            z = model(x)
            return hp.gamma * F.cross_entropy(z.float(), y) + hp.alpha * distill_kl(z, teacher_logits(x), hp.kd_T)

        best, best_state, bad = -math.inf, None, 0
        for e in range(1, hp.epochs + 1):
            lr = hp.lr * hp.lr_decay_rate ** sum(e > int(m) for m in hp.lr_decay_epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            if e <= hp.msteps:
                if hp.forget_steps is None:
                    self.stage(u, f"max{e}", model, max_loss, optimizer=opt, epochs=1, drive="forget", retain=None,
                               select_best=False, min_steps=0)
                else:
                    cyc = CycledForget(u.forget_set(), hp.batch_size, hp.forget_steps, u.run.seed + e)
                    self.stage(u, f"max{e}", model, max_loss, optimizer=opt, epochs=1, batches=cyc,
                               n_batches=len(cyc), select_best=False, min_steps=0)
            self.stage(u, f"min{e}", model, min_loss, optimizer=opt, epochs=1, drive="retain", forget=None,
                       select_best=False, min_steps=0)
            if hp.select_best:
                score = self.validation_score(u, model)
                if score > best:
                    best, bad = score, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                    if hp.patience is not None and bad >= hp.patience:
                        break
        if hp.select_best and best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        return model
