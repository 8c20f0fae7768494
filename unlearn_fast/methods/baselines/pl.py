"""``pl``: Pseudo-Labelling (card 9; the relabelling part of UNSC, Chen et al. IJCAI 2024, as in UUEF
``unlearn/PL.py``).

Each forget sample gets the frozen original model's most likely **remaining** class,
``y_hat = argmax_{k not in C_f} z_o(x)_k`` (forget-class logits set to -inf), and the model is trained
with ``CE(z_u(x), y_hat)`` on D_f only. Defaults: SGD (UUEF ``unlearn_lr`` 0.01, 10 epochs), momentum
0.9 and wd 5e-4 (card 11's common optimiser; UUEF does not state them for PL).

Choices the card leaves open:

- the batch size (128, as FT's paper value);
- pseudo-labels are computed per batch from the frozen original (eval mode), so they never drift;
- ``bn_train``: True (default) keeps BatchNorm in train mode on forget-only batches, as the reference
  code does (running statistics then drift towards D_f - the card's pitfall); False freezes BatchNorm
  (eval mode) during unlearning;
- UNSC's null-space projection is not part of PL (its thresholds were not recovered, card 9).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod

__all__ = ["PseudoLabel", "pseudo_labels"]


def pseudo_labels(teacher_logits: Tensor, forget_classes: list[int]) -> Tensor:
    """``[B]`` argmax of ``teacher_logits [B, K]`` over the classes not in ``forget_classes``."""
    K = teacher_logits.shape[1]
    bad = [c for c in forget_classes if not 0 <= c < K]
    if bad or len(set(forget_classes)) >= K:
        raise ValueError(f"pseudo_labels: forget classes {forget_classes} must be a proper subset of [0, {K})")
    z = teacher_logits.detach().float().clone()
    z[:, list(forget_classes)] = float("-inf")
    return z.argmax(1)


def _bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@register_method("pl")
class PseudoLabel(UnlearningMethod):
    """PL: CE towards the original model's best remaining class, on forget batches only."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 10
        lr: float = 0.01
        batch_size: int = 128
        bn_train: bool = True
        forget_weight: float = 1.0       # weight of CE(D_f, pseudo-labels); 0 = ablation (no forgetting term)

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"ec_table10": {}}   # EC Table 10 lists nothing for this method: its defaults

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        model = u.copy_original()
        teacher = u.original.eval()

        def loss(batch, _):
            x, _y = batch["forget"]
            if not self.hp.bn_train:
                _bn_eval(model)
            with torch.no_grad():
                y_hat = pseudo_labels(teacher(x), u.forget_classes)
            return self.hp.forget_weight * F.cross_entropy(model(x), y_hat)

        self.stage(u, "pl", model, loss, drive="forget", retain=None)
        return model
