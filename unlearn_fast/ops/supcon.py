"""Vectorised contrastive losses of EC (card 4 SupCon, EC Eq. 1); plain PyTorch on every device.

The oracle is :mod:`unlearn_fast.reference.supcon` (float64, anchor by anchor). Both losses are
computed in float32 at least (under bf16 autocast the similarity matrix would lose the precision a
temperature of 0.07 amplifies), and return a float32 scalar (float64 for float64 input).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["supcon_loss", "ec_unlearning_loss"]


def _up(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out) of L2-normalised rows ``z [M, D]``
    with ``labels [M]`` (stack the views: two views of B images give M = 2B rows, labels repeated).

    Anchors without a positive (a class seen once in the batch) are left out of the mean instead of
    giving 0/0 = NaN; a batch without any positive pair returns 0 (still attached to the graph).
    The loss is multiplied by ``temperature / base_temperature`` as in the reference code.
    """
    if z.dim() != 2 or labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"supcon_loss: expected z [M, D] and labels [M], got {tuple(z.shape)} and {tuple(labels.shape)}")
    if not (temperature > 0 and base_temperature > 0):
        raise ValueError(f"supcon_loss: temperatures must be > 0, got {temperature}, {base_temperature}")
    z = _up(z)
    m = z.shape[0]
    labels = labels.to(z.device)
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye                       # [M, M]
    n_pos = pos.sum(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return z.sum() * 0.0
    sim = (z @ z.t() / temperature).masked_fill(eye, float("-inf"))       # A(i) = all but i
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    mean_pos = log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp_min(1)
    return -(temperature / base_temperature) * mean_pos[valid].mean()


def ec_unlearning_loss(z_forget: Tensor, z_retain: Tensor, temperature: float = 0.07) -> Tensor:
    """EC Eq. 1 on one batch: ``-(1/(|B_f||B_r|)) sum_{i,j} log exp(z_i.z_j / tau)`` for L2-normalised
    forget rows ``[Bf, D]`` and retain rows ``[Br, D]``.

    The double sum of dot products equals the dot product of the two row means, so this is
    ``-(mean_i z_i) . (mean_j z_j) / tau`` - O((Bf + Br) D) instead of a [Bf, Br] similarity matrix.
    Minimising it pulls every forget embedding toward every retain embedding (and vice versa: the
    gradient reaches both sides, as in EC Alg. 1, which updates with the full gradient of L_total).
    """
    if z_forget.dim() != 2 or z_retain.dim() != 2 or z_forget.shape[1] != z_retain.shape[1]:
        raise ValueError(f"ec_unlearning_loss: expected [Bf, D] and [Br, D], got {tuple(z_forget.shape)} and "
                         f"{tuple(z_retain.shape)}")
    if z_forget.shape[0] == 0 or z_retain.shape[0] == 0:
        raise ValueError("ec_unlearning_loss: the forget and the retain batch must both be non-empty")
    if not temperature > 0:
        raise ValueError(f"ec_unlearning_loss: temperature must be > 0, got {temperature}")
    return -(_up(z_forget).mean(0) @ _up(z_retain).mean(0)) / temperature
