"""Stage outputs of an unknown backbone, by rule (EC Sec. 3.2 supervision points; CKA / IDI layers).

One no-grad forward of a ``[2, in_chans, img_size, img_size]`` input (eval mode, seeded random values) with
hooks on every module gives, in the order modules *finish*, the per-sample outputs (leading dim 2: position
tables and ``[B * windows, ...]`` tensors drop out):

* the **classifier**: the last ``nn.Linear`` whose output is ``[2, num_classes]``;
* the **pre-classifier** module: the last module finishing before it whose output, flattened, equals the
  classifier's input (``avgpool``, ``global_pool``, ``head.drop``, ...), when there is one;
* the **stages** (at most 4, forward order), the first rule that applies:

  1. timm ``feature_info`` with at least two distinct reductions: per reduction its last module;
  2. at least two spatial resolutions among the 4-D outputs (``[B, C, H, W]``, or ``[B, H, W, C]`` when dims
     1 and 2 agree and 3 differs): per run of one resolution, the last module that finishes in it and has
     parameters and is not a norm / activation / pooling / dropout layer (stem runs before the last four drop).
     Side branches (squeeze-excite maps smaller than a later output) and modules inside a down-sampling
     module that still run at its input resolution are ignored, and so is a container holding an earlier
     stage (``features`` of a Sequential backbone: its last child is the stage);
  3. transformer blocks (token outputs ``[B, T, D]``): the longest list of same-class blocks holding attention,
     cut into four even virtual stages (blocks ``d/4-1, d/2-1, 3d/4-1, d-1``) as EC does for ViT.

``stage_info(model)`` returns all of it with each stage's layout (``nchw`` / ``nhwc`` / ``tokens``) and shape;
``stage_feature_layers(model)`` the names in the ``models.feature_layers`` contract: stages, then (CNN family)
the pre-classifier module, then the classifier. ``model.unlearn_fast_config["feature_layers"]`` (``create(...,
feature_layers="a,b,c")``) replaces the stages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["StageInfo", "stage_info", "stage_feature_layers", "parse_layer_names", "check_layer_names"]

_B = 2  # dry-forward batch: tensors without this leading dim (position tables, windows) are not features
_NOT_BLOCK = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Dropout, nn.Identity, nn.Flatten,
              nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.ReLU, nn.GELU, nn.SiLU,
              nn.Hardswish, nn.ReLU6, nn.Sigmoid)


@dataclass
class StageInfo:
    """What the dry forward found; ``layouts`` / ``shapes`` are keyed by stage name."""

    stages: list[str]
    classifier: str
    pre_classifier: str | None
    layouts: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)
    rule: str = ""
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None


def parse_layer_names(value) -> list[str] | None:
    """``"a,b,c"`` or a sequence of names -> list (None stays None); ValueError on anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value if v.strip()]
    else:
        raise ValueError(f"feature_layers must be 'a,b,c' or a list of module names, got {value!r}")
    if not names:
        raise ValueError("feature_layers is empty; give module names like 'layer1,layer2,layer3,layer4'")
    return names


def check_layer_names(model: nn.Module, names: list[str], what: str = "feature_layers") -> None:
    """ValueError naming the unknown module names and a few valid ones."""
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods or n == ""]
    if missing:
        some = [n for n, m in model.named_children()]
        raise ValueError(f"{what}: the model has no modules {missing}; top-level modules: {some} (dotted names as "
                         "in model.named_modules(), e.g. 'layer1' or 'blocks.3')")


def _layout(t: Tensor) -> str:
    if t.dim() == 4:
        return "nhwc" if t.shape[1] == t.shape[2] and t.shape[2] != t.shape[3] else "nchw"
    return "tokens" if t.dim() == 3 else "flat"


def _hw(t: Tensor) -> tuple[int, int]:
    return (t.shape[1], t.shape[2]) if _layout(t) == "nhwc" else (t.shape[2], t.shape[3])


def _trace(model: nn.Module, in_chans: int, img_size: int) -> list[tuple[str, nn.Module, Tensor | None, Tensor]]:
    """``(name, module, first input, output)`` in the order modules finish (tensor outputs only)."""
    rec: list = []
    seen: set[str] = set()

    def hook(name):
        def fn(m, inp, out):
            if name in seen:
                return
            out = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor) else out
            if isinstance(out, Tensor) and out.dim() >= 2 and out.shape[0] == _B:  # per-sample tensors only
                seen.add(name)
                x = inp[0] if inp and isinstance(inp[0], Tensor) else None
                # copies: a later in-place op (ReLU(inplace=True)) must not change what was recorded
                rec.append((name, m, x.clone() if x is not None else None, out.clone()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    was = model.training
    try:
        model.eval()
        p = next(iter(model.parameters()), None)
        dev, dt = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(_B, in_chans, img_size, img_size, generator=g).to(dev, dt)
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return rec


def _has_attention(module: nn.Module) -> bool:
    from unlearn_fast.nn.wrap import attention_targets

    return bool(attention_targets(module))


def _block_list(model: nn.Module) -> list[str]:
    """Names of the longest container of same-class children that hold attention (transformer blocks)."""
    best: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Sequential, nn.ModuleList)):
            continue
        kids = list(m.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1 or not _has_attention(kids[0][1]):
            continue
        if len(kids) > len(best):
            best = [f"{name}.{k}" if name else k for k, _ in kids]
    return best


def _even(blocks: list[str], n: int = 4) -> list[str]:
    d = len(blocks)
    if d < n:
        return blocks
    return [blocks[(k + 1) * d // n - 1] for k in range(n)]


def stage_info(model: nn.Module, in_chans: int | None = None, img_size: int | None = None,
               num_classes: int | None = None) -> StageInfo:
    """Stages, classifier and pre-classifier of ``model`` (see the module doc); cached on the model."""
    cfg = getattr(model, "unlearn_fast_config", None) or {}
    in_chans = in_chans or cfg.get("in_chans")
    img_size = img_size or cfg.get("img_size")
    num_classes = num_classes or cfg.get("num_classes")
    if not (in_chans and img_size and num_classes):
        raise ValueError("stage_info: pass in_chans=, img_size=, num_classes= (the model has no unlearn_fast_config)")
    explicit = cfg.get("feature_layers")
    key = (in_chans, img_size, num_classes, tuple(explicit or ()))
    cached = getattr(model, "_unlearn_fast_stage_info", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    rec = _trace(model, in_chans, img_size)
    pos = {n: i for i, (n, *_rest) in enumerate(rec)}
    heads = [i for i, (n, m, x, y) in enumerate(rec) if isinstance(m, nn.Linear) and tuple(y.shape) == (_B, num_classes)]
    if not heads:
        raise ValueError(f"{cfg.get('name', type(model).__name__)}: no nn.Linear classifier with {num_classes} outputs "
                         "ran in a forward pass; this model is not supported by the stage rule")
    ci = heads[-1]
    classifier, cx = rec[ci][0], rec[ci][2]
    pre = None
    for n, m, x, y in reversed(rec[:ci]):
        if cx is not None and y.numel() == cx.numel() and not classifier.startswith(n + ".") and \
                torch.equal(y.reshape(-1), cx.reshape(-1)):
            pre = n
            break
    body = rec[: pos[pre] if pre is not None else ci]
    info = StageInfo([], classifier, pre)
    if explicit:
        check_layer_names(model, list(explicit))
        missing = [n for n in explicit if n not in pos]
        if missing:
            raise ValueError(f"feature_layers {missing} did not run (or returned no tensor) in a forward pass")
        info.stages, info.rule = list(explicit), "explicit"
    else:
        fi = getattr(model, "feature_info", None)
        try:
            fi = [(d["module"], d["reduction"]) for d in fi] if fi is not None else []
        except (TypeError, KeyError):
            fi = []
        by_red: dict = {}
        for mod, red in fi:
            if mod in pos:
                by_red[red] = mod
        if len(by_red) >= 2:
            info.stages = sorted(by_red.values(), key=pos.__getitem__)[-4:]
            info.rule = "timm feature_info"
        else:
            # modules inside a down-sampling module that still run at its input resolution (an expansion conv
            # before the strided one) are not stage outputs
            io = {n: (_hw(x) if x is not None and x.dim() == 4 else None, _hw(y) if y.dim() == 4 else None)
                  for n, m, x, y in rec}

            def inside_downsampler(n: str, hw: tuple) -> bool:
                parts = n.split(".")
                for i in range(1, len(parts)):
                    a = io.get(".".join(parts[:i]))
                    if a is not None and a[0] == hw and a[1] != hw:
                        return True
                return False

            spatial = [(n, m, y) for n, m, x, y in body if y.dim() == 4 and not inside_downsampler(n, _hw(y))]
            # side branches (squeeze-excite: a 1x1 map while the main path is larger) are outputs smaller than
            # a later one: the main path's resolution never grows
            last_at = {_hw(y): i for i, (n, m, y) in enumerate(spatial)}
            keep, cur = [], None
            for i, (n, m, y) in enumerate(spatial):
                hw = _hw(y)
                if cur is not None and hw[0] * hw[1] < cur[0] * cur[1] and last_at[cur] > i:
                    continue  # the main path comes back to the current resolution later: a side branch
                keep.append((n, m, y))
                cur = hw
            runs: list[tuple[tuple, str | None, Tensor | None]] = []
            for n, m, y in keep:
                hw = _hw(y)
                if not runs or runs[-1][0] != hw:
                    runs.append((hw, None, None))
                # a container holding an earlier stage (``features`` of a Sequential backbone) is not a stage
                earlier = any(c is not None and c.startswith(n + ".") for _, c, _ in runs[:-1])
                if not isinstance(m, _NOT_BLOCK) and any(True for _ in m.parameters()) and not earlier:
                    runs[-1] = (hw, n, y)
            stages = [n for _, n, _ in runs if n is not None]
            if len({hw for hw, n, _ in runs if n is not None}) >= 2:
                info.stages, info.rule = stages[-4:], "spatial resolution"
            else:
                blocks = [b for b in _block_list(model) if b in pos]
                if not blocks:
                    raise ValueError(f"{cfg.get('name', type(model).__name__)}: no stages found (one resolution and no "
                                     "transformer blocks); pass feature_layers='a,b,c'")
                info.stages, info.rule = _even(blocks), "transformer blocks"
    outs = {n: y for n, m, x, y in rec}
    for s in info.stages:
        info.layouts[s] = _layout(outs[s])
        info.shapes[s] = tuple(outs[s].shape)
    if any(v == "tokens" for v in info.layouts.values()):
        t = next(outs[s].shape[1] for s in info.stages if info.layouts[s] == "tokens")
        prefix = getattr(model, "num_prefix_tokens", None)
        if not isinstance(prefix, int):
            prefix = t - math.isqrt(t) ** 2
        g = math.isqrt(t - prefix)
        if g * g != t - prefix:
            raise ValueError(f"stage tokens: {t} tokens minus {prefix} prefix tokens is not a square grid")
        info.prefix_tokens, info.grid = prefix, (g, g)
    model._unlearn_fast_stage_info = (key, info)
    return info


def stage_feature_layers(model: nn.Module, family: str = "cnn") -> list[str]:
    """``models.feature_layers`` for ``timm:`` / ``tv:`` models: stages, [pre-classifier (CNN family)], classifier."""
    info = stage_info(model)
    tail = [info.classifier]
    if info.pre_classifier is not None and family == "cnn":
        tail.insert(0, info.pre_classifier)
    return [s for s in info.stages if s not in tail] + tail
