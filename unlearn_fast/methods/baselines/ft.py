"""``ft``: fine-tune on the retain set only (card 11; Unlearn-Sparse: lr 0.01, 10 epochs, SGD m 0.9, wd 5e-4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod


@register_method("ft")
class FineTune(UnlearningMethod):
    """L = CE on D_r batches; the forget set is never seen (catastrophic forgetting does the work)."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 10
        lr: float = 0.01
        batch_size: int = 128

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"ec_table10": {}}   # EC Table 10 lists nothing for this method: its defaults

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        model = u.copy_original()

        def loss(batch, _):
            x, y = batch["retain"]
            return F.cross_entropy(model(x), y)

        self.stage(u, "ft", model, loss, drive="retain", forget=None)
        return model
