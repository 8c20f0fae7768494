"""Wrap a classifier into a WF-Net (WF-Net Sec. 3.3) and export forgotten models from it.

* :func:`wrap` gates every ``nn.Conv2d`` of a CNN (kernel and bias; grouped / depthwise too); in a
  transformer (a model with attention input projections: ``qkv`` Linears of timm ViT / DeiT / BEiT / Swin and
  torchvision Swin, torchvision's ``nn.MultiheadAttention``) it gates only those, as WF-Net Sec. 3.3 does -
  the patch embedding conv too only with ``gate_patch_embed=True``. The rule is :func:`gate_plan`;
  ``WFModel.gated_layers`` lists what was gated.
* :func:`bake` returns a plain model (same class as the original) whose weights carry one class's
  gate: ``W <- g ⊙ W``, ``b <- gb ⊙ b`` per output channel. It equals ``WFModel(x, c)`` exactly in
  exact arithmetic; it is the deployable artefact and what representation metrics must be run on.
* :func:`compose` (experimental) forgets a *set* of classes at once by multiplying their gates
  elementwise, ``g = Π_c sigmoid(alpha[c])``: a filter closed by any of the classes stays closed.
  WF-Net trains each row for one class alone, so the composed gate is not what any row was trained
  for; retain accuracy typically drops with each added class. Measure before you deploy it.
"""
from __future__ import annotations

import copy
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from unlearn_fast.nn.wf_attention import WFFunctionalQKV, WFMultiheadAttention
from unlearn_fast.nn.wf_layers import GateContext, WFConv2d, WFLinear, _WFLayer
from unlearn_fast.ops.wf_gate import check_labels

__all__ = ["WFModel", "wrap", "bake", "compose", "is_gated_linear", "gate_targets", "gate_plan", "attention_targets",
           "gate_summary"]


def is_gated_linear(name: str, module: nn.Module) -> bool:
    """The linear layers WF gates: attention ``qkv`` projections (timm ViT / Swin / DeiT / BEiT, torchvision Swin)."""
    return isinstance(module, nn.Linear) and name.split(".")[-1] == "qkv"


def _reads_qkv_weight(parent: nn.Module, child: str) -> bool:
    """True when ``parent.forward`` reads ``self.<child>.weight`` (calls ``F.linear`` itself) - torchvision
    Swin's attention, timm BEiT's - so the Linear module's own forward may never run."""
    import inspect

    try:
        src = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return False
    return f"self.{child}.weight" in src


def _plain_conv(m: nn.Module) -> str | None:
    """None when ``m`` is an ``nn.Conv2d`` WF can gate exactly (its forward is nn.Conv2d's: grouped and
    depthwise convs included), else why not."""
    if type(m).forward is not nn.Conv2d.forward or type(m)._conv_forward is not nn.Conv2d._conv_forward:
        return f"{type(m).__name__} overrides the conv forward (e.g. weight standardisation / dynamic padding)"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros' is gated)"
    return None


def attention_targets(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(reported name, kind, module to replace)`` of every attention input projection WF gates:
    ``"linear"`` a ``qkv`` nn.Linear called as a module (or the ``linear`` of a ``qkv`` Linear+norm block,
    LeViT); ``"functional"`` a ``qkv`` whose parent calls
    ``F.linear(x, self.qkv.weight, ...)`` (the parent is replaced); ``"mha"`` an ``nn.MultiheadAttention``
    (its packed in-projection; reported as ``<name>.in_proj``)."""
    out = []
    mods = dict(model.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out.append((f"{name}.in_proj" if name else "in_proj", "mha", m))
        elif name.split(".")[-1] == "qkv" and not isinstance(m, nn.Linear) and \
                isinstance(getattr(m, "linear", None), nn.Linear):
            out.append((f"{name}.linear", "linear", m.linear))  # LeViT: qkv = Linear + BatchNorm
        elif is_gated_linear(name, m):
            parent_name, _, child = name.rpartition(".")
            parent = mods[parent_name] if parent_name else model
            if _reads_qkv_weight(parent, child):
                out.append((name, "functional", parent))
            else:
                out.append((name, "linear", m))
    return out


def gate_plan(model: nn.Module, gate_patch_embed: bool = False) -> tuple[list[tuple[str, str, nn.Module]], dict[str, str]]:
    """What :func:`wrap` gates, by rule (WF-Net Sec. 3.3): ``([(reported name, kind, module)], {skipped: why})``.

    A model with attention (``attention_targets``) gets its attention input projections; every other model
    every ``nn.Conv2d`` (grouped / depthwise too); ``gate_patch_embed=True`` adds the convs of an attention
    model (its patch embedding). Conv subclasses that change the conv's forward are skipped and listed."""
    attn = attention_targets(model)
    skipped: dict[str, str] = {}
    convs = []
    if not attn or gate_patch_embed:
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                why = _plain_conv(m)
                if why:
                    skipped[n] = why
                else:
                    convs.append((n, "conv", m))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    key = lambda t: order.get(t[0].rsplit(".", 1)[0] if t[1] == "mha" else t[0], 0)  # noqa: E731
    return sorted(attn + convs, key=key), skipped


def gate_targets(model: nn.Module, gate_patch_embed: bool = False) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers WF gates (see :func:`gate_plan`); names as reported by ``wrap``."""
    return [(n, m) for n, _, m in gate_plan(model, gate_patch_embed)[0]]


class WFModel(nn.Module):
    """A classifier with WF gates. ``forward(x [B,...], forget_labels [B] | None) -> logits``.

    ``forget_labels=None`` runs the original model exactly; otherwise sample ``i`` is computed with
    gate row ``forget_labels[i]`` (any mix of labels in one batch). Only the alphas are trainable;
    :meth:`train` keeps the wrapped model in eval mode (BatchNorm statistics and dropout frozen).
    """

    def __init__(self, model: nn.Module, num_classes: int, alpha_init: float = 3.0,
                 gate_patch_embed: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.alpha_init = float(alpha_init)
        self.gate_patch_embed = bool(gate_patch_embed)
        self._ctx = GateContext()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():
            # The fused op saves its output for the alpha gradient; an in-place op after it (VGG's
            # ReLU(inplace=True)) would overwrite it. Same values, one more activation buffer.
            if isinstance(getattr(m, "inplace", None), bool):
                m.inplace = False
        targets, skipped = gate_plan(model, gate_patch_embed)
        if not targets:
            why = f"; skipped: {skipped}" if skipped else ""
            raise ValueError("wrap(): the model has no nn.Conv2d and no attention input projection (qkv nn.Linear, "
                             f"nn.MultiheadAttention) to gate{why}")
        for name, kind, m in targets:
            if kind == "conv":
                _set_submodule(model, name, WFConv2d(m, num_classes, self._ctx, alpha_init))
            elif kind == "linear":
                _set_submodule(model, name, WFLinear(m, num_classes, self._ctx, alpha_init))
            elif kind == "mha":
                _set_submodule(model, name.rsplit(".", 1)[0] if "." in name else "",
                               WFMultiheadAttention(m, num_classes, self._ctx, alpha_init))
            else:  # functional: the attention module holding qkv is replaced
                parent, _, child = name.rpartition(".")
                _set_submodule(model, parent, WFFunctionalQKV(m, num_classes, self._ctx, alpha_init, qkv=child))
        self.model = model
        self.model.eval()
        #: names of the gated layers (``...conv``, ``...attn.qkv``, ``...self_attention.in_proj``), forward order
        self.gated_layers: list[str] = [n for n, _, _ in targets]
        #: convs left ungated, with the reason
        self.skipped_layers: dict[str, str] = skipped

    @property
    def gate_scale(self) -> float:
        """``s`` in the effective gate ``s * sigmoid(alpha)`` (1: the paper). ``1 / sigmoid(alpha_init)``
        makes an untouched gate exactly 1, so the gated model starts as the original model instead of
        one whose every layer is scaled by ``sigmoid(3) = 0.95``."""
        return self._ctx.scale

    @gate_scale.setter
    def gate_scale(self, s: float) -> None:
        if not (isinstance(s, (int, float)) and s > 0):
            raise ValueError(f"gate_scale must be a positive number, got {s!r}")
        self._ctx.scale = float(s)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor, forget_labels: Tensor | None = None) -> Tensor:
        if forget_labels is not None:
            forget_labels = _prepare_labels(forget_labels, x, self.num_classes)
        self._ctx.labels = forget_labels
        try:
            return self.model(x)
        finally:
            self._ctx.labels = None

    def train(self, mode: bool = True) -> "WFModel":
        # The original network stays in eval mode: BN statistics and dropout are part of the
        # frozen original model (DESIGN §3); only the alphas learn.
        super().train(mode)
        self.model.eval()
        return self

    # -- alphas ----------------------------------------------------------------------------
    def wf_layers(self) -> Iterator[tuple[str, _WFLayer]]:
        for name, m in self.model.named_modules():
            if isinstance(m, _WFLayer):
                yield name, m

    def alpha_parameters(self) -> list[nn.Parameter]:
        return [a for _, layer in self.wf_layers() for a in layer.alphas()]

    def alpha_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.endswith(("alpha_w", "alpha_b"))}

    @torch.no_grad()
    def clip_alphas(self, lo: float = -3.0, hi: float = 3.0) -> None:
        for a in self.alpha_parameters():
            a.clamp_(lo, hi)

    @torch.no_grad()
    def reset_alphas(self, value: float | None = None) -> None:
        for a in self.alpha_parameters():
            a.fill_(self.alpha_init if value is None else value)

    def regularizer(self) -> Tensor:
        """R(1 - alpha) of WF Alg. 2: mean of ``1 - sigmoid(alpha)`` within each layer, then over layers."""
        per_layer = [torch.cat([(1 - torch.sigmoid(a)).reshape(-1) for a in layer.alphas()]).mean()
                     for _, layer in self.wf_layers()]
        return torch.stack(per_layer).mean()

    def original_model(self) -> nn.Module:
        """A deep copy of the plain original model (gates removed)."""
        return _unwrap(copy.deepcopy(self.model))


@torch.compiler.disable
def _prepare_labels(forget_labels, x: Tensor, num_classes: int) -> Tensor:
    """``[B]`` int64 labels on x's device, range-checked once per forward (IndexError naming the range).
    Runs eagerly even inside ``torch.compile`` (one graph break), so a compiled model checks too and
    the gated layers find the labels already checked (no host sync per layer)."""
    labels = torch.as_tensor(forget_labels, device=x.device)
    if labels.dim() == 0:
        labels = labels.expand(x.shape[0])
    labels = labels.long()
    check_labels(labels, x.shape[0], num_classes)
    return labels


def wrap(model: nn.Module, num_classes: int, alpha_init: float = 3.0, gate_patch_embed: bool = False) -> WFModel:
    """Gate ``model`` (modified in place) by rule (:func:`gate_plan`): every Conv2d of a CNN; only the attention
    input projections of a transformer (timm ``qkv`` Linears, torchvision ``nn.MultiheadAttention`` / Swin
    ``qkv``; WF-Net Sec. 3.3), and its convs (patch embedding) too with ``gate_patch_embed=True``.
    ``wrap(...).gated_layers`` lists the gated layers, ``.skipped_layers`` the convs left out and why."""
    if isinstance(model, WFModel):
        raise ValueError("wrap(): the model is already a WFModel")
    return WFModel(model, num_classes, alpha_init, gate_patch_embed)


def gate_summary(wf: WFModel, show: int = 6) -> str:
    """One line: ``gated N layers: a, b, ..., z`` (+ skipped convs) for logs and reports."""
    names = wf.gated_layers
    shown = names if len(names) <= show else [*names[: show // 2], "...", *names[-(show // 2):]]
    line = f"gated {len(names)} layers: {', '.join(shown)}"
    if wf.skipped_layers:
        line += f"; skipped {len(wf.skipped_layers)}: {', '.join(list(wf.skipped_layers)[:3])}"
    return line


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _unwrap(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_modules()):
        if isinstance(m, _WFLayer):
            _set_submodule(model, name, m.inner)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _composed_gates(layer: _WFLayer, classes: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=layer.alpha_w.device)
    s = layer._ctx.scale
    gw = (s * torch.sigmoid(layer.alpha_w.index_select(0, idx))).prod(0)
    gb = (s * torch.sigmoid(layer.alpha_b.index_select(0, idx))).prod(0) if layer.alpha_b is not None else None
    return gw, gb


@torch.no_grad()
def _bake_rows(wf: WFModel, classes: Sequence[int]) -> nn.Module:
    for c in classes:
        if not 0 <= int(c) < wf.num_classes:
            raise IndexError(f"class {c} is out of range [0, {wf.num_classes})")
    plain = copy.deepcopy(wf.model)
    for name, layer in list(plain.named_modules()):
        if not isinstance(layer, _WFLayer):
            continue
        gw, gb = _composed_gates(layer, classes)
        inner = layer.inner
        w, b = layer.gated_params() if hasattr(layer, "gated_params") else (inner.weight, inner.bias)
        w.copy_(w * gw.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
        if b is not None and gb is not None:
            b.copy_(b * gb.to(b.dtype))
        _set_submodule(plain, name, inner)
    for p in plain.parameters():
        p.requires_grad_(True)
    plain.eval()
    return plain


def bake(wf: WFModel, cls: int) -> nn.Module:
    """A plain model (the original's class) whose weights carry gate row ``cls``: forgets ``cls``."""
    return _bake_rows(wf, [int(cls)])


def compose(wf: WFModel, classes: Iterable[int]) -> nn.Module:
    """Experimental: a plain model forgetting several classes, gates multiplied (see module doc)."""
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("compose(): give at least one class")
    return _bake_rows(wf, classes)
