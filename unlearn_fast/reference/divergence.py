"""Plain-PyTorch divergences between the softmax of two logit rows (DESIGN §4).

The oracle for ``torch.ops.unlearn_fast.js_divergence`` / ``activation_distance`` /
``divergence_accumulate`` and the fallback when the extension is missing. Log-softmax based, so
logits of any finite magnitude (±1e4) give no NaN; computed in float64 for float16/bfloat16/float32
inputs, returned as float32 (float64 for float64 logits).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["js_divergence_ref", "activation_distance_ref", "divergence_accumulate_ref", "check_logits_pair"]

LN2 = math.log(2.0)


def check_logits_pair(p_logits: Tensor, q_logits: Tensor, op: str) -> None:
    if p_logits.dim() != 2 or q_logits.dim() != 2:
        raise ValueError(f"{op}: p_logits and q_logits must be 2-D [B, C], got {tuple(p_logits.shape)} and "
                         f"{tuple(q_logits.shape)}")
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"{op}: p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} must have "
                         "the same shape [B, C]")
    if p_logits.shape[1] < 1:
        raise ValueError(f"{op}: need at least one class (C >= 1), got {tuple(p_logits.shape)}")
    if not (p_logits.is_floating_point() and q_logits.is_floating_point()):
        raise TypeError(f"{op}: logits must be floating point, got {p_logits.dtype} and {q_logits.dtype}")
    if p_logits.dtype != q_logits.dtype:
        raise TypeError(f"{op}: p_logits ({p_logits.dtype}) and q_logits ({q_logits.dtype}) must have the same dtype")


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_probs(p_logits: Tensor, q_logits: Tensor) -> tuple[Tensor, Tensor]:
    return p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)


def _xlogy_term(lp: Tensor, lm: Tensor) -> Tensor:
    # p * (log p - log m) with 0 log 0 = 0.
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lm), torch.zeros_like(lp))


def js_divergence_ref(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """JS divergence of softmax(p_logits) and softmax(q_logits) per row, natural log: [B, C] -> [B] in [0, ln 2]."""
    check_logits_pair(p_logits, q_logits, "js_divergence")
    lp, lq = _log_probs(p_logits, q_logits)
    # log of the mixture (p + q) / 2 as hi + log1p(expm1(lo - hi) / 2): exactly lp when lp == lq
    hi, lo = torch.maximum(lp, lq), torch.minimum(lp, lq)
    lm = torch.where(hi == float("-inf"), hi, hi + torch.log1p(0.5 * torch.expm1(lo - hi)))
    js = 0.5 * (_xlogy_term(lp, lm) + _xlogy_term(lq, lm)).sum(-1)
    return js.clamp(0.0, LN2).to(_out_dtype(p_logits))


def activation_distance_ref(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """L2 distance between softmax(p_logits) and softmax(q_logits) per row: [B, C] -> [B] in [0, sqrt 2]."""
    check_logits_pair(p_logits, q_logits, "activation_distance")
    lp, lq = _log_probs(p_logits, q_logits)
    return (lp.exp() - lq.exp()).norm(dim=-1).to(_out_dtype(p_logits))


def divergence_accumulate_ref(p_logits: Tensor, q_logits: Tensor, groups: Tensor | None, js_sum: Tensor,
                              l2_sum: Tensor, count: Tensor) -> None:
    """In place: ``js_sum[g] += JS``, ``l2_sum[g] += ||p - q||``, ``count[g] += 1`` per row (group 0 if None).

    Accumulators float64 [K]; groups int64 [B] in [0, K).
    """
    check_logits_pair(p_logits, q_logits, "divergence_accumulate")
    K = js_sum.shape[0]
    B = p_logits.shape[0]
    if groups is None:
        if K != 1:
            raise ValueError(f"divergence_accumulate: without groups the accumulators must have length 1, got {K}")
        groups = torch.zeros(B, dtype=torch.long, device=p_logits.device)
    elif groups.shape != (B,) or groups.dtype != torch.long:
        raise ValueError(f"divergence_accumulate: groups must be int64 [B]={B}, got {groups.dtype} "
                         f"{tuple(groups.shape)}")
    if B == 0:
        return
    lo, hi = int(groups.min()), int(groups.max())
    if lo < 0 or hi >= K:
        raise IndexError(f"divergence_accumulate: groups must lie in [0, {K}), got range [{lo}, {hi}]")
    js = js_divergence_ref(p_logits, q_logits).double()
    l2 = activation_distance_ref(p_logits, q_logits).double()
    js_sum.index_add_(0, groups, js)
    l2_sum.index_add_(0, groups, l2)
    count.index_add_(0, groups, torch.ones_like(js))
