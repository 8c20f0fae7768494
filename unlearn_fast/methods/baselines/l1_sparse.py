"""``l1_sparse``: l1-sparse unlearning (card 11; Jia et al. NeurIPS 2023 "Model Sparsity Can Simplify
Machine Unlearning", Unlearn-Sparse ``FT_prune``).

``L = CE(D_r batch) + gamma_e * ||theta||_1`` over **all** parameters (weights, biases, BatchNorm), with
the linear per-epoch decay of the public code::

    gamma_e = gamma * (1 - e / (E - E_no_l1))   for e < E - E_no_l1
    gamma_e = gamma                             if E == E_no_l1 (the code's edge case)
    gamma_e = 0                                 otherwise

Defaults (card 11): SGD momentum 0.9, wd 5e-4, lr 0.01, 10 epochs, batch 128 (the paper's; the
arg_parser says 256), ``no_l1_epochs`` 0. ``gamma`` (``--alpha`` in the code) is not published per
setting (card "Open questions" 8): 5e-4 is our choice, inside the paper's search range; every
coordinate then feels an l1 pull of ``lr * gamma_e`` per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod

__all__ = ["L1Sparse", "l1_gamma", "l1_norm"]


def l1_gamma(gamma: float, epoch: int, epochs: int, no_l1_epochs: int = 0) -> float:
    """The l1 weight of (0-based) ``epoch`` out of ``epochs`` (Unlearn-Sparse ``FT_prune`` schedule)."""
    if not 0 <= no_l1_epochs <= epochs:
        raise ValueError(f"l1_sparse: no_l1_epochs must be in [0, epochs={epochs}], got {no_l1_epochs}")
    span = epochs - no_l1_epochs
    if epoch < span:
        return gamma * (1.0 - epoch / span)
    if span == 0:
        return gamma
    return 0.0


def l1_norm(params) -> Tensor:
    """``sum |theta|`` over the given parameters (a 0-d tensor)."""
    return torch.stack([p.abs().sum() for p in params]).sum()


@register_method("l1_sparse")
class L1Sparse(UnlearningMethod):
    """Fine-tune on D_r with a linearly decaying l1 penalty on every parameter."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 10
        lr: float = 0.01
        batch_size: int = 128
        gamma: float = 5e-4
        no_l1_epochs: int = 0

        def __post_init__(self) -> None:
            l1_gamma(self.gamma, 0, self.epochs, self.no_l1_epochs)  # raises on a bad no_l1_epochs

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"ec_table10": {}}   # EC Table 10 lists nothing for this method: its defaults

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        hp = self.hp
        model = u.copy_original()
        params = [p for p in model.parameters() if p.requires_grad]

        def loss(batch, info):
            x, y = batch["retain"]
            g = l1_gamma(hp.gamma, info["epoch"], hp.epochs, hp.no_l1_epochs)
            ce = F.cross_entropy(model(x), y)
            return ce + g * l1_norm(params) if g else ce

        self.stage(u, "l1_sparse", model, loss, drive="retain", forget=None)
        return model
