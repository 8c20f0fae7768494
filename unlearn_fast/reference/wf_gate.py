"""Pure-PyTorch WF gate (DESIGN §3): the test oracle and the CPU path.

Shapes: ``x`` conv ``[B, C_in, H, W]`` / linear ``[B, T, F_in]`` or ``[B, F_in]``;
``weight`` conv ``[O, C_in/groups, kh, kw]`` / linear ``[O, F_in]``; ``bias [O]`` or None;
``alpha_w, alpha_b [N_classes, O]`` (raw, pre-sigmoid); ``labels [B]`` int64 gate rows.

Two forms:
* ``wf_conv2d`` / ``wf_linear``: run the frozen layer once, then scale its output per sample and
  channel by ``sigmoid(alpha_w)[labels]`` and add ``sigmoid(alpha_b)[labels] * bias`` - algebraically
  equal to masking the weights (the gate is per output channel, so it commutes with the GEMM).
* ``wf_conv2d_literal`` / ``wf_linear_literal``: WF Alg. 1 as written - build every sample's masked
  weights ``g_i * W`` and run them (grouped conv / batched matmul). Memory ``B x |W|``: the naive
  baseline and the proof that the fast form is the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["wf_conv2d", "wf_linear", "wf_conv2d_literal", "wf_linear_literal", "gate_rows"]


def gate_rows(alpha: Tensor, labels: Tensor) -> Tensor:
    """``sigmoid(alpha)[labels]``: ``[B, O]``."""
    return torch.sigmoid(alpha).index_select(0, labels)


def wf_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
              labels: Tensor, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    g = gate_rows(alpha_w, labels).to(z.dtype)
    y = z * g[:, :, None, None]
    if bias is not None:
        gb = gate_rows(alpha_b, labels).to(z.dtype) if alpha_b is not None else torch.ones_like(g)
        y = y + (gb * bias.to(z.dtype))[:, :, None, None]
    return y


def wf_linear(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
              labels: Tensor) -> Tensor:
    z = F.linear(x, weight, None)
    g = gate_rows(alpha_w, labels).to(z.dtype)
    shape = (g.shape[0],) + (1,) * (z.dim() - 2) + (g.shape[1],)
    y = z * g.view(shape)
    if bias is not None:
        gb = gate_rows(alpha_b, labels).to(z.dtype) if alpha_b is not None else torch.ones_like(g)
        y = y + (gb * bias.to(z.dtype)).view(shape)
    return y


def wf_conv2d_literal(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
                      labels: Tensor, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """WF Alg. 1: per-sample masked weights ``[B, O, C_in/groups, kh, kw]`` run as one grouped conv."""
    B = x.shape[0]
    O = weight.shape[0]
    g = gate_rows(alpha_w, labels).to(weight.dtype)  # [B, O]
    w_i = g[:, :, None, None, None] * weight.unsqueeze(0)  # [B, O, I/g, kh, kw]
    b_i = None
    if bias is not None:
        gb = gate_rows(alpha_b, labels).to(bias.dtype) if alpha_b is not None else torch.ones_like(g)
        b_i = (gb * bias.unsqueeze(0)).reshape(B * O)
    xs = x.reshape(1, B * x.shape[1], *x.shape[2:])
    y = F.conv2d(xs, w_i.reshape(B * O, *weight.shape[1:]), b_i, stride, padding, dilation, groups * B)
    return y.reshape(B, O, *y.shape[2:])


def wf_linear_literal(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
                      labels: Tensor) -> Tensor:
    """WF Alg. 1 for a linear layer: per-sample masked weights ``[B, O, F_in]`` (batched matmul)."""
    squeeze = x.dim() == 2
    xt = x.unsqueeze(1) if squeeze else x  # [B, T, F]
    g = gate_rows(alpha_w, labels).to(weight.dtype)
    w_i = g[:, :, None] * weight.unsqueeze(0)  # [B, O, F]
    y = torch.bmm(xt, w_i.transpose(1, 2))
    if bias is not None:
        gb = gate_rows(alpha_b, labels).to(bias.dtype) if alpha_b is not None else torch.ones_like(g)
        y = y + (gb * bias.unsqueeze(0))[:, None, :]
    return y.squeeze(1) if squeeze else y
