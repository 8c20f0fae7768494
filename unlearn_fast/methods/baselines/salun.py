"""``salun``: Saliency Unlearning (card 6; Fan et al. ICLR 2024, OPTML-Group/Unlearn-Saliency).

**Mask** (``generate_mask.py``): ``g = |sum_batches grad_theta(-CE(theta_o; D_f batch))|`` - the GA-loss
gradient of the original model (eval mode, as the code does), summed over forget batches (batch mean
per batch), absolute value; all parameter tensors (weights, biases, BatchNorm affine) are ranked
together and the top ``round(q * #params)`` entries get ``m = 1`` (ties broken by ``torch.topk``).

**Update**: Random Labelling (:mod:`.rl`, same schedules and defaults) with the mask applied to the
*update*, not only the gradient: gradients are multiplied by ``m`` and, after every optimizer step,
masked-out coordinates are put back to ``theta_o`` and their optimizer state (SGD momentum, Adam
moments) is zeroed - so weight decay and momentum cannot move them (the fix of the reference code's
2026-02-28 commit a6e89fd). BatchNorm running statistics are buffers, not parameters: they still
adapt, as in the reference code.

Defaults (card 6, README CIFAR-10 recipe): mask fraction q = 0.5, lr 0.013, 10 epochs, batch 256, SGD
momentum 0.9, wd 5e-4. The card leaves open the q and lr for class-wise forgetting (Open questions 10):
we keep the documented recipe. The mask is saved to ``state/salun.mask.pt`` (with the fraction, forget
classes and batch size it was made with) so a resumed run uses the same mask; with q = 1 SalUn is
exactly ``rl``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from unlearn_fast.checkpoint import atomic_save
from unlearn_fast.data.pipeline import eval_loader
from unlearn_fast.methods.baselines.rl import RandomLabel
from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, make_optimizer

__all__ = ["SalUn", "saliency_mask", "forget_gradient"]


def saliency_mask(scores: dict[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """Bool masks (shapes of ``scores``) marking the global top ``round(fraction * n)`` scores, n = all entries."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"salun: mask fraction must be in [0, 1], got {fraction}")
    names = list(scores)
    flat = torch.cat([scores[k].detach().flatten().float() for k in names])
    k = int(round(fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    out, i = {}, 0
    for n in names:
        c = scores[n].numel()
        out[n] = keep[i:i + c].view_as(scores[n])
        i += c
    return out


def forget_gradient(model: nn.Module, forget_set, batch_size: int, device: torch.device) -> dict[str, Tensor]:
    """``|sum_b grad(-CE(model(x_b), y_b))|`` per parameter over forget batches (model in eval mode)."""
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters()}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    req = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for x, y in eval_loader(forget_set, batch_size):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            grads = torch.autograd.grad(-F.cross_entropy(model(x), y), list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    acc[n] += g
    finally:
        for n, p in params.items():
            p.requires_grad_(req[n])
        model.train(was_training)
    return {n: a.abs() for n, a in acc.items()}


@register_method("salun")
class SalUn(RandomLabel):
    """SalUn = RL restricted to the salient weights (see the module docstring)."""

    @dataclass
    class Hparams(RandomLabel.Hparams):
        mask_fraction: float = 0.5
        mask_batch_size: int | None = None   # batch of the mask's gradient pass; None: = batch_size

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0.0 <= self.mask_fraction <= 1.0:
                raise ValueError(f"salun: mask_fraction must be in [0, 1], got {self.mask_fraction}")

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"ec_table10": {"mask_fraction": 0.5}}   # EC Table 10: pt 0.5

    def compute_mask(self, u: UnlearnContext) -> dict[str, Tensor]:
        path = u.state_path("mask")
        bs = self.hp.mask_batch_size or self.hp.batch_size
        key = {"fraction": self.hp.mask_fraction, "forget": list(u.forget_classes), "batch_size": bs}
        if path.exists():
            try:
                saved = torch.load(path, map_location=u.device, weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"{path} is corrupt ({e}); delete it to recompute the SalUn mask") from e
            if saved.get("key") == key:
                return saved["mask"]
        scores = forget_gradient(u.original, u.forget_set(), bs, u.device)
        mask = saliency_mask(scores, self.hp.mask_fraction)
        atomic_save({"key": key, "mask": {k: v.cpu() for k, v in mask.items()}}, path)
        return mask

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        model = u.copy_original()
        mask = {k: v.to(u.device) for k, v in self.compute_mask(u).items()}
        named = dict(model.named_parameters())
        if set(named) != set(mask):
            raise RuntimeError(f"salun: the mask names {sorted(set(mask) ^ set(named))[:5]} do not match the model; "
                               f"delete {u.state_path('mask')}")
        theta0 = {n: p.detach().clone() for n, p in u.original.named_parameters()}
        pairs = [(p, mask[n], theta0[n]) for n, p in named.items() if p.requires_grad]
        opt = make_optimizer([p for p, _, _ in pairs], self.hp)
        hooks = [p.register_hook(lambda g, m=m: g * m) for p, m, _ in pairs]

        @torch.no_grad()
        def restore_unmasked() -> None:
            for p, m, p0 in pairs:
                p.copy_(torch.where(m, p, p0))
                for v in opt.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.mul_(m)

        try:
            self.rl_stage(u, "salun", model, optimizer=opt, after_step=restore_unmasked)
        finally:
            for h in hooks:
                h.remove()
        return model
