"""Float64 references for the IDI metric (methods card 1; Jeon et al. 2026, EC App. B.6).

* :func:`infonce_mi_reference`: the card's InfoNCE estimate written literally with the N x N score
  matrix ``S[i, j] = s(z_i, y_j)``:  I = (1/N) sum_i [ S[i, i] - log((1/N) sum_j exp S[i, j]) ].
* :func:`idi_reference`: ID(theta) = sum_l [I_theta(l) - I_r(l)],  IDI = ID(u) / ID(o), signed (or
  clipped at 0 per layer when ``clip=True``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["infonce_mi_reference", "idi_reference"]


def infonce_mi_reference(scores: Tensor, y: Tensor) -> float:
    """``scores [N, 2]``: critic scores s(z_i, c) for c in {0, 1}; ``y [N]`` in {0, 1}. Float64, O(N^2)."""
    s = scores.detach().double().cpu()
    y = y.detach().long().cpu()
    n = y.numel()
    S = s[:, y]                                   # S[i, j] = s(z_i, y_j)   [N, N]
    diag = S.diagonal()
    return float((diag - (torch.logsumexp(S, dim=1) - math.log(n))).mean())


def idi_reference(I_u: Sequence[float], I_o: Sequence[float], I_r: Sequence[float], clip: bool = False) -> float:
    """Card 1 normalisation over layers; ``clip`` takes max(0, .) of each layer's difference."""
    def d(a: Sequence[float]) -> float:
        return sum(max(0.0, float(x) - float(r)) if clip else float(x) - float(r) for x, r in zip(a, I_r))
    return d(I_u) / d(I_o)
