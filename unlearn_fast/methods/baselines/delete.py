"""``delete``: DELETE, mask distillation on forget data only (card 10; Zhou et al. CVPR 2025,
shaaaaron/DELETE ``method/delete.py``).

The frozen original model's logits with the true-class logit set to -1e10 (not -inf: no NaN) give the
"dark knowledge" target ``t = softmax(mask_y(z_o(x)) / T)``; the loss is
``KL(t || softmax(z_u(x) / T))``, batch mean (``T = 1``, the code's ``soft_label="inf"``).
Defaults (card 10, CIFAR-10 ResNet-18): SGD momentum 0.9, **no** weight decay, lr 1e-4, batch 128,
20 epochs; BatchNorm in train mode (``bn_eval=True`` is the TinyImageNet single-class setting).

Choices the card leaves open:

- ``mask_all_forget``: False (default, the paper) masks only each sample's own label; True masks every
  forget class, so that with several forget classes no mass moves to another forget class;
- ``temperature`` other than 1 is an extension: logits divided by T, loss multiplied by T^2 (the usual
  distillation convention); the card's value is T = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod

__all__ = ["Delete", "delete_loss", "masked_teacher"]

_MASK = -1e10


def masked_teacher(teacher_logits: Tensor, y: Tensor, also: list[int] | None = None,
                   temperature: float = 1.0, alpha: float = 0.0) -> Tensor:
    """``[B, K]`` target probabilities: softmax of the teacher logits with ``z[i, y_i]`` (and the columns
    ``also``) set to -1e10. ``alpha > 0`` (EC Table 10's "scaling factor for the target probability of
    the forget class"; 0 in DELETE) instead scales the true class's unnormalised probability by alpha
    (``z[i, y_i] += log alpha``): alpha = 1 is the plain teacher - the ablation without forgetting."""
    if alpha < 0:
        raise ValueError(f"delete: alpha must be >= 0, got {alpha}")
    z = teacher_logits.detach().float().clone()
    if alpha == 0:
        z.scatter_(1, y.view(-1, 1).long(), _MASK)
    else:
        z.scatter_add_(1, y.view(-1, 1).long(), torch.full_like(z[:, :1], math.log(alpha)))
    if also:
        z[:, list(also)] = _MASK
    return F.softmax(z / temperature, dim=1)


def delete_loss(teacher_logits: Tensor, student_logits: Tensor, y: Tensor, also: list[int] | None = None,
                temperature: float = 1.0, alpha: float = 0.0) -> Tensor:
    """``KL(t || softmax(student / T)) * T^2``, batch mean; logits ``[B, K]``, labels ``[B]``."""
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2 or y.shape != teacher_logits.shape[:1]:
        raise ValueError(f"delete_loss: need teacher/student logits [B, K] and labels [B], got "
                         f"{tuple(teacher_logits.shape)}, {tuple(student_logits.shape)}, {tuple(y.shape)}")
    if temperature <= 0:
        raise ValueError(f"delete_loss: temperature must be > 0, got {temperature}")
    t = masked_teacher(teacher_logits, y, also, temperature, alpha)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_s, t, reduction="batchmean") * temperature**2


def _bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@register_method("delete")
class Delete(UnlearningMethod):
    """DELETE: distil the original's masked (true class removed) predictions on forget batches."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 20
        lr: float = 1e-4
        weight_decay: float = 0.0
        batch_size: int = 128
        temperature: float = 1.0
        mask_all_forget: bool = False
        bn_eval: bool = False
        alpha: float = 0.0                # target-probability scale of the true class (EC Table 10); 1 = ablation

        def __post_init__(self) -> None:
            if self.temperature <= 0:
                raise ValueError(f"delete: temperature must be > 0, got {self.temperature}")
            if self.alpha < 0:
                raise ValueError(f"delete: alpha must be >= 0 (0 = DELETE's mask, 1 = no masking), got {self.alpha}")

    @classmethod
    def presets(cls) -> dict[str, dict]:
        # EC Table 10: alpha 0 (no target mass on the forget class: the -1e10 mask), tau 1
        return {"ec_table10": {"temperature": 1.0, "alpha": 0.0}}

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        hp = self.hp
        model = u.copy_original()
        teacher = u.original.eval()
        also = list(u.forget_classes) if hp.mask_all_forget else None

        def loss(batch, _):
            x, y = batch["forget"]
            if hp.bn_eval:
                _bn_eval(model)
            with torch.no_grad():
                zt = teacher(x)
            return delete_loss(zt, model(x), y, also, hp.temperature, hp.alpha)

        self.stage(u, "delete", model, loss, drive="forget", retain=None)
        return model
