"""WF gates on attention input projections that are not called as an ``nn.Linear`` module (WF-Net Sec. 3.3).

* :class:`WFMultiheadAttention` - ``nn.MultiheadAttention`` (torchvision ViT): its packed ``in_proj_weight``
  ``[3E, E]`` is gated like a qkv Linear (``alpha: [N_classes, 3E]``); self-attention only (query is key is
  value), which is how classifiers use it. With no labels set it runs the original module untouched.
* :class:`WFFunctionalQKV` - an attention module whose ``forward`` reads ``self.qkv.weight`` itself and calls
  ``F.linear`` (torchvision Swin's ``shifted_window_attention``, timm BEiT with ``q_bias``/``v_bias``). The
  module is run inside a ``TorchFunctionMode`` that replaces exactly the ``F.linear`` call whose weight is
  ``qkv.weight`` by the gated op; whatever bias the module passes is used (BEiT: ``cat(q_bias, 0, v_bias)``,
  Swin-V2: the bias with its k part zeroed). Bias gates exist only when ``qkv`` itself has a bias.

Inputs ``[B * n, T, C]`` (Swin windows) take each sample's label for its ``n`` windows, as ``WFLinear`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from unlearn_fast import ops
from unlearn_fast.nn.wf_layers import GateContext, _scaled, _WFLayer
from unlearn_fast.ops.wf_gate import check_labels, mark_labels_checked

__all__ = ["WFMultiheadAttention", "WFFunctionalQKV", "gated_linear"]


def gated_linear(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
                 labels: Tensor) -> Tensor:
    """``ops.wf_linear`` for ``x [B*n, T, F]`` / ``[B, ..., F]`` with ``labels [B]`` (windows share a label)."""
    if x.dim() > 3:
        shp = x.shape
        y = gated_linear(x.reshape(shp[0], -1, shp[-1]), weight, bias, alpha_w, alpha_b, labels)
        return y.reshape(*shp[:-1], y.shape[-1])
    if x.shape[0] != labels.shape[0]:
        if x.shape[0] % labels.shape[0] != 0:
            raise RuntimeError(f"WF attention gate: batch {x.shape[0]} is not a multiple of {labels.shape[0]} labels")
        check_labels(labels, labels.shape[0], alpha_w.shape[0])
        labels = labels.repeat_interleave(x.shape[0] // labels.shape[0])
        mark_labels_checked(labels, alpha_w.shape[0])
    return ops.wf_linear(x, weight, bias, alpha_w, alpha_b, labels)


class _AlphaLayer(_WFLayer):
    """A WF layer whose gated weight is not ``inner.weight`` (``gated_params`` says which it is)."""

    def __init__(self, inner: nn.Module, weight: Tensor, has_bias: bool, num_classes: int, ctx: GateContext,
                 alpha_init: float) -> None:
        nn.Module.__init__(self)
        self.inner = inner
        for p in inner.parameters():
            p.requires_grad_(False)
        shape = (num_classes, weight.shape[0])
        self.alpha_w = nn.Parameter(torch.full(shape, float(alpha_init), device=weight.device))
        self.alpha_b = nn.Parameter(torch.full(shape, float(alpha_init), device=weight.device)) if has_bias else None
        self._ctx = ctx


class WFMultiheadAttention(_AlphaLayer):
    """Gated ``nn.MultiheadAttention`` (packed in-projection; see module doc). Same call signature."""

    def __init__(self, mha: nn.MultiheadAttention, num_classes: int, ctx: GateContext, alpha_init: float = 3.0):
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("WFMultiheadAttention: needs a packed in_proj_weight (kdim == vdim == embed_dim), "
                             "no bias_k/bias_v and add_zero_attn=False")
        super().__init__(mha, mha.in_proj_weight, mha.in_proj_bias is not None, num_classes, ctx, alpha_init)

    def gated_params(self) -> tuple[Tensor, Tensor | None]:
        return self.inner.in_proj_weight, self.inner.in_proj_bias

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        m: nn.MultiheadAttention = self.inner
        labels = self._ctx.labels
        if labels is None:
            return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                     attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not (query is key and key is value):
            raise RuntimeError("WF gates nn.MultiheadAttention in self-attention only (query is key is value)")
        x = query if m.batch_first else query.transpose(0, 1)  # [B, T, E]
        B, T, E = x.shape
        h = m.num_heads
        s = self._ctx.scale
        qkv = gated_linear(x, _scaled(m.in_proj_weight, s), _scaled(m.in_proj_bias, s), self.alpha_w, self.alpha_b,
                           labels)
        q, k, v = (t.reshape(B, T, h, E // h).transpose(1, 2) for t in qkv.split(E, dim=-1))
        mask = None
        if attn_mask is not None:
            am = attn_mask
            if am.dtype == torch.bool:
                am = torch.zeros(am.shape, dtype=q.dtype, device=q.device).masked_fill(am, float("-inf"))
            mask = am.reshape(1, 1, T, T) if am.dim() == 2 else am.reshape(B, h, T, T)
        if key_padding_mask is not None:
            kp = key_padding_mask
            if kp.dtype == torch.bool:
                kp = torch.zeros(kp.shape, dtype=q.dtype, device=q.device).masked_fill(kp, float("-inf"))
            kp = kp.reshape(B, 1, 1, T).to(q.dtype)
            mask = kp if mask is None else mask + kp
        p = m.dropout if m.training else 0.0
        weights = None
        if need_weights:
            att = (q @ k.transpose(-2, -1)) * (E // h) ** -0.5
            if mask is not None:
                att = att + mask
            elif is_causal:
                att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            att = att.softmax(-1)
            weights = att.mean(1) if average_attn_weights else att
            out = F.dropout(att, p, m.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal and mask is None)
        out = F.linear(out.transpose(1, 2).reshape(B, T, E), m.out_proj.weight, m.out_proj.bias)
        return (out if m.batch_first else out.transpose(0, 1)), weights


class _QKVMode(TorchFunctionMode):
    def __init__(self, layer: "WFFunctionalQKV", labels: Tensor) -> None:
        super().__init__()
        self.layer, self.labels = layer, labels
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if w is self.layer.qkv.weight:
                x = args[0] if args else kwargs["input"]
                b = args[2] if len(args) > 2 else kwargs.get("bias")
                s = self.layer._ctx.scale
                self.hits += 1
                return gated_linear(x, _scaled(w, s), _scaled(b, s), self.layer.alpha_w, self.layer.alpha_b,
                                    self.labels)
        return func(*args, **kwargs)


class WFFunctionalQKV(_AlphaLayer):
    """Gates ``inner.qkv`` of an attention module that calls ``F.linear(x, self.qkv.weight, bias)`` itself."""

    def __init__(self, attn: nn.Module, num_classes: int, ctx: GateContext, alpha_init: float = 3.0,
                 qkv: str = "qkv") -> None:
        lin = attn.get_submodule(qkv)
        super().__init__(attn, lin.weight, lin.bias is not None, num_classes, ctx, alpha_init)
        self.qkv_name = qkv

    @property
    def qkv(self) -> nn.Linear:
        return self.inner.get_submodule(self.qkv_name)

    def gated_params(self) -> tuple[Tensor, Tensor | None]:
        return self.qkv.weight, self.qkv.bias

    def forward(self, *args, **kwargs):
        labels = self._ctx.labels
        if labels is None:
            return self.inner(*args, **kwargs)
        mode = _QKVMode(self, labels)
        with mode:
            out = self.inner(*args, **kwargs)
        if mode.hits == 0:
            raise RuntimeError(f"WF gate: {type(self.inner).__name__} did not use its {self.qkv_name} weight in F.linear")
        return out
