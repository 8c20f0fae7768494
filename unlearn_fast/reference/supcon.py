"""Plain-PyTorch float64 references of the contrastive losses of EC (the test oracle).

* :func:`supcon_loss_ref` - Supervised Contrastive loss (Khosla et al. 2020, L^sup_out; card 4), written
  anchor by anchor exactly as the formula reads::

      L = (1/|I|) sum_{i in I} -(tau/tau_base) (1/|P(i)|) sum_{p in P(i)} log[ exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau) ]

  with A(i) = every row but i, P(i) = rows of A(i) with label y_i, and I = the anchors with
  |P(i)| > 0 (an anchor without a positive would be 0/0 = NaN in the reference code; it is skipped).
  No anchor with a positive at all gives 0.
* :func:`ec_unlearning_loss_ref` - EC Eq. 1 on one batch: ``-(1/(|B_f||B_r|)) sum_{i,j} z_i.z_j / tau``
  (``log sim(u, v; tau) = u.v / tau``), forget rows i against retain rows j.

Both compute in float64 and return a float64 scalar; they do not normalise ``z`` (callers pass
L2-normalised rows, as the losses assume).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["supcon_loss_ref", "ec_unlearning_loss_ref"]


def _check_tau(tau: float, what: str) -> None:
    if not tau > 0:
        raise ValueError(f"{what} must be > 0, got {tau}")


def supcon_loss_ref(z: Tensor, labels: Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> Tensor:
    """SupCon of ``z [M, D]`` (rows = all views, e.g. two views of B images stacked: M = 2B) with
    ``labels [M]``; float64 scalar. See the module docstring."""
    if z.dim() != 2 or labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"supcon_loss_ref: expected z [M, D] and labels [M], got {tuple(z.shape)} and {tuple(labels.shape)}")
    _check_tau(temperature, "temperature")
    _check_tau(base_temperature, "base_temperature")
    z = z.double()
    m = z.shape[0]
    terms = []
    for i in range(m):
        others = [a for a in range(m) if a != i]
        pos = [p for p in others if int(labels[p]) == int(labels[i])]
        if not pos:
            continue
        denom = torch.stack([torch.exp(z[i] @ z[a] / temperature) for a in others]).sum()
        s = torch.stack([torch.log(torch.exp(z[i] @ z[p] / temperature) / denom) for p in pos]).sum()
        terms.append(-(temperature / base_temperature) * s / len(pos))
    if not terms:
        return z.sum() * 0.0
    return torch.stack(terms).mean()


def ec_unlearning_loss_ref(z_forget: Tensor, z_retain: Tensor, temperature: float = 0.07) -> Tensor:
    """EC Eq. 1 for one forget batch ``[Bf, D]`` and one retain batch ``[Br, D]``; float64 scalar."""
    if z_forget.dim() != 2 or z_retain.dim() != 2 or z_forget.shape[1] != z_retain.shape[1]:
        raise ValueError(f"ec_unlearning_loss_ref: expected [Bf, D] and [Br, D], got {tuple(z_forget.shape)} "
                         f"and {tuple(z_retain.shape)}")
    _check_tau(temperature, "temperature")
    zf, zr = z_forget.double(), z_retain.double()
    total = zf.new_zeros(())
    for i in range(zf.shape[0]):
        for j in range(zr.shape[0]):
            total = total + torch.log(torch.exp(zf[i] @ zr[j] / temperature))
    return -total / (zf.shape[0] * zr.shape[0])
