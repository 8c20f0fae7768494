"""WF layers (WF-Net Sec. 3.2-3.3, DESIGN §3): a frozen conv / linear plus per-class gate matrices.

``alpha_w, alpha_b : [N_classes, O]`` (raw, pre-sigmoid), initialised to ``alpha_init`` (3 in the
paper). The gate of sample i is row ``forget_labels[i]``. Labels reach the layer through a shared
:class:`GateContext` set by :class:`~unlearn_fast.nn.wrap.WFModel`; with no labels set the layer runs
its original module untouched (the original model bit for bit).
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from unlearn_fast import ops
from unlearn_fast.ops.wf_gate import check_labels, mark_labels_checked


class GateContext:
    """State shared by all WF layers of one model: the current gate labels ``[B]`` and the gate scale
    ``s`` (effective gate ``s * sigmoid(alpha)``; 1 in the paper, ``1 / sigmoid(alpha_init)`` for
    unit gates - an untouched gate then passes the layer exactly, see ``WFModel.gate_scale``)."""

    def __init__(self) -> None:
        self.labels: Tensor | None = None
        self.scale: float = 1.0


_SCALED: dict[int, tuple] = {}  # id(frozen tensor) -> (weakref, version, s, s * tensor)


def _scaled(t: Tensor | None, s: float) -> Tensor | None:
    """``s * t`` for the gated path (``s * g * (W x) + s * gb * b == g * (sW x) + gb * (s b)``).

    A frozen tensor is scaled once per (tensor, version, s) and the product reused: the fused conv path
    packs a weight once per tensor version, so a new product at every forward would repack every step."""
    if t is None or s == 1.0:
        return t
    if t.requires_grad or torch.is_inference_mode_enabled():
        return t * s
    key = id(t)
    hit = _SCALED.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == s:
        return hit[3]
    if hit is None or hit[0]() is not t:
        weakref.finalize(t, _SCALED.pop, key, None)  # the entry goes with the tensor
    out = (t * s).detach()
    _SCALED[key] = (weakref.ref(t), t._version, s, out)
    return out


class _WFLayer(nn.Module):
    def __init__(self, inner: nn.Module, num_classes: int, out_features: int, has_bias: bool,
                 ctx: GateContext, alpha_init: float) -> None:
        super().__init__()
        self.inner = inner
        for p in inner.parameters():
            p.requires_grad_(False)
        dev = inner.weight.device
        self.alpha_w = nn.Parameter(torch.full((num_classes, out_features), float(alpha_init), device=dev))
        self.alpha_b = nn.Parameter(torch.full((num_classes, out_features), float(alpha_init), device=dev)) if has_bias else None
        self._ctx = ctx

    @property
    def num_classes(self) -> int:
        return self.alpha_w.shape[0]

    def alphas(self) -> list[Tensor]:
        return [a for a in (self.alpha_w, self.alpha_b) if a is not None]

    def gate(self, row: int | Tensor) -> tuple[Tensor, Tensor | None]:
        """Gate vectors ``sigmoid(alpha)[row]`` (``[O]``) for one class, or a composed ``[O]`` row."""
        gw = torch.sigmoid(self.alpha_w[row])
        gb = torch.sigmoid(self.alpha_b[row]) if self.alpha_b is not None else None
        return gw, gb


class WFConv2d(_WFLayer):
    """Gated ``nn.Conv2d``: ``y_i = sigmoid(alpha_w)[c_i] * conv(x_i, W) + sigmoid(alpha_b)[c_i] * b``."""

    def __init__(self, conv: nn.Conv2d, num_classes: int, ctx: GateContext, alpha_init: float = 3.0) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"WFConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        super().__init__(conv, num_classes, conv.out_channels, conv.bias is not None, ctx, alpha_init)

    def forward(self, x: Tensor) -> Tensor:
        labels = self._ctx.labels
        c = self.inner
        if labels is None:
            return c(x)
        s = self._ctx.scale
        return ops.wf_conv2d(x, _scaled(c.weight, s), _scaled(c.bias, s), self.alpha_w, self.alpha_b, labels,
                             c.stride, c.padding, c.dilation, c.groups)


class WFLinear(_WFLayer):
    """Gated ``nn.Linear`` (ViT/Swin qkv): input ``[B, T, F]`` or ``[B, F]``; all tokens share the sample's gate."""

    def __init__(self, linear: nn.Linear, num_classes: int, ctx: GateContext, alpha_init: float = 3.0) -> None:
        super().__init__(linear, num_classes, linear.out_features, linear.bias is not None, ctx, alpha_init)

    def forward(self, x: Tensor) -> Tensor:
        labels = self._ctx.labels
        lin = self.inner
        if labels is None:
            return lin(x)
        weight, bias = _scaled(lin.weight, self._ctx.scale), _scaled(lin.bias, self._ctx.scale)
        if x.dim() > 3:  # Swin windows: [B*nW, N, C] arrive flattened; other layouts flatten to [B, T, F]
            shp = x.shape
            y = ops.wf_linear(x.reshape(shp[0], -1, shp[-1]), weight, bias, self.alpha_w, self.alpha_b, labels)
            return y.reshape(*shp[:-1], y.shape[-1])
        if x.shape[0] != labels.shape[0]:
            # Swin attention sees [B * n_windows, N, C]: repeat each sample's label over its windows.
            if x.shape[0] % labels.shape[0] != 0:
                raise RuntimeError(f"WFLinear: batch {x.shape[0]} is not a multiple of {labels.shape[0]} gate labels")
            check_labels(labels, labels.shape[0], self.num_classes)  # cached: no sync when WFModel checked
            labels = labels.repeat_interleave(x.shape[0] // labels.shape[0])
            mark_labels_checked(labels, self.num_classes)  # same values: the layer's op skips its sync
        return ops.wf_linear(x, weight, bias, self.alpha_w, self.alpha_b, labels)
