"""``neggrad_plus``: NegGrad+ (card 11; SCRUB paper, Kurmanji et al. NeurIPS 2023).

``L = alpha * CE(D_r batch) - (1 - alpha) * CE(D_f batch)`` per step; an epoch is one pass over D_r with
D_f cycled (``drive="retain"``). Defaults from the SCRUB VGG notebook (card 11): alpha 0.9999, lr 1e-4,
5 epochs, both batches 128, SGD wd 5e-4, **no momentum**.

Left open by the card: the forget batch size when it differs from the retain one (``forget_batch_size``,
default = ``batch_size``); the retain batch is ``retain_batch_size`` (default ``batch_size``). The two
batches go through the model in separate forwards (our choice: BatchNorm statistics of D_r and D_f are
not mixed in one batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import PairedBatches, UnlearnContext, UnlearnHparams, UnlearningMethod

__all__ = ["NegGradPlus", "neggrad_plus_loss"]


def neggrad_plus_loss(retain_logits: Tensor, retain_y: Tensor, forget_logits: Tensor, forget_y: Tensor,
                      alpha: float) -> Tensor:
    """``alpha * CE(retain) - (1 - alpha) * CE(forget)``; logits ``[B, K]``, labels ``[B]``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"neggrad_plus: alpha must be in [0, 1], got {alpha}")
    return alpha * F.cross_entropy(retain_logits, retain_y) - (1.0 - alpha) * F.cross_entropy(forget_logits, forget_y)


@register_method("neggrad_plus")
class NegGradPlus(UnlearningMethod):
    """NegGrad+: descend on retain CE, ascend on forget CE, weighted by ``alpha``."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 5
        lr: float = 1e-4
        momentum: float = 0.0
        batch_size: int = 128                   # retain batch (the loop is driven by D_r)
        forget_batch_size: int | None = None    # None: = batch_size
        alpha: float = 0.9999

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"neggrad_plus: alpha must be in [0, 1], got {self.alpha}")

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"ec_table10": {}}   # EC Table 10 lists nothing for this method: its defaults

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        hp = self.hp
        model = u.copy_original()
        fb = hp.forget_batch_size or hp.batch_size
        rb = hp.retain_batch_size or hp.batch_size

        def loss(batch, _):
            xr, yr = batch["retain"]
            xf, yf = batch["forget"]
            # one forward over both halves would mix their BatchNorm statistics; keep them apart.
            return neggrad_plus_loss(model(xr), yr, model(xf), yf, hp.alpha)

        pb = PairedBatches(u.forget_set(), u.retain_set(), fb, rb, 1, "retain", u.run.seed)
        self.stage(u, "neggrad_plus", model, loss, batches=pb, n_batches=len(pb), batch_size=rb)
        return model
