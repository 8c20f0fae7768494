"""``ga``: Gradient Ascent on the forget set (card 11 "GA").

``L = -CE(f(x_f), y_f)`` on D_f only. Defaults from card 11 (Unlearn-Sparse README): SGD momentum 0.9,
wd 5e-4, lr 1e-4, 5 epochs, batch 256.

GA is unbounded: the card says to monitor forget accuracy and stop early. Here that is the shared
evaluation during unlearning (``evals_per_epoch`` validation points, the state with the best
validation H-Mean of 1-FA and RA kept, ``patience`` optional) - a choice, since the public code keeps
the last epoch. ``forget_weight`` scales the loss (0 = the ablation: the model stays the original).
``loss_clip`` (off by default, not in the card) stops the ascent on a batch once its
CE exceeds the value, for users who want a bounded variant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod

__all__ = ["GradientAscent", "ga_loss"]


def ga_loss(logits: Tensor, y: Tensor, loss_clip: float | None = None) -> Tensor:
    """``-CE(logits [B, K], y [B])`` (mean over the batch); with ``loss_clip``, 0 once CE > loss_clip."""
    ce = F.cross_entropy(logits, y)
    if loss_clip is not None and float(ce) > loss_clip:
        return ce * 0.0
    return -ce


@register_method("ga")
class GradientAscent(UnlearningMethod):
    """GA: minimise -CE on forget batches; the retain set is never seen."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 5
        lr: float = 1e-4
        batch_size: int = 256
        loss_clip: float | None = None
        forget_weight: float = 1.0       # weight of -CE(D_f); 0 switches the forgetting term off (ablation)

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"ec_table10": {}}   # EC Table 10 lists nothing for this method: its defaults

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        model = u.copy_original()

        def loss(batch, _):
            x, y = batch["forget"]
            return self.hp.forget_weight * ga_loss(model(x), y, self.hp.loss_clip)

        self.stage(u, "ga", model, loss, drive="forget", retain=None)
        return model
