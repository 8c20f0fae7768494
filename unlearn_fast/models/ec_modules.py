"""EC modules: Contrastive-Deep-Supervision branches on the intermediate stages of a backbone
(EC Sec. 3.2, App. B.3; CDS = card 4).

For a backbone with N stages, the module after stage k (k = 1..N-1) is (N-k) CDS ``SepConv`` blocks
(each halves H and W; block j outputs the channels of backbone stage k+j, so the last block matches
stage N: 2048 for ResNet-50, 512 for ResNet-18, 768 for Swin-T), then global average pooling; its
L2-normalised output is the embedding ``z^l`` of EC Eq. 1 and a linear classifier ``g^l`` on the pooled
(unnormalised) vector gives the layer-``l`` logits of Eq. 2. Stage N has no module (``a^N`` = identity):
its embedding is the backbone's pooled feature (the input of the original classifier) and its
logits are the model's own output. Supervision points, in forward order:

=============  ===================================  ===========================  ======================
model          points after stages 1..N-1           stage N (pooled, orig. FC)   extra points (ablation)
=============  ===================================  ===========================  ======================
resnet18/50    layer1, layer2, layer3 (NCHW)        input of ``fc``              layer4.0 .. layer4.<n-2>
swin_tiny      layers.0, layers.1, layers.2 (NHWC)  input of ``head.fc``         layers.3.blocks.0
vit_*          blocks.<d/4-1>, <d/2-1>, <3d/4-1>    input of ``head``            blocks.<3d/4> .. <d-2>
small_cnn      block1, block2 (NCHW; N = 3)         input of ``fc``              none (block3 is one layer)
=============  ===================================  ===========================  ======================

Any other backbone (``timm:<name>`` / ``tv:<name>``, or a model created with ``feature_layers=``) gets its points
by rule from :func:`unlearn_fast.models.stages.stage_info` - timm ``feature_info``, else the last module of each
spatial resolution (a dry forward with hooks), else four even cuts of its transformer blocks - each point in
its own layout, the classifier found by the same rule as the head (``extra_points`` is not available there).

ViT has one resolution and width throughout, so it is cut into four virtual stages of d/4 blocks;
its patch tokens (prefix/class tokens dropped) are reshaped to the ``[B, D, gh, gw]`` grid and every
block keeps D channels. ``small_cnn`` (three conv blocks) is the CPU analogue with N = 3: two CDS
modules (2 and 1 SepConvs, width w -> 2w -> 4w) plus its pooled feature - three supervision points.

Ablations of EC Table 4: ``with_blocks=False`` ("w/o EC modules": a point's embedding is the global
average of the raw stage feature and its classifier is linear on it), ``extra_points=n``
("+ final backbone blocks": the first n blocks of stage N are supervised too, with no conv block -
they already have stage N's shape).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SepConv", "ECPoint", "ECBranch", "ECModules", "ECOutput", "ec_points", "build_ec_modules",
           "ec_forward", "capture_features", "ec_heads", "ECNet", "supported_models"]

_LAYOUTS = ("nchw", "nhwc", "tokens")


class SepConv(nn.Module):
    """CDS conv block: dw 3x3 stride 2 -> 1x1 -> BN -> ReLU -> dw 3x3 -> 1x1 (C_in -> C_out) -> BN -> ReLU.

    ``[B, C_in, H, W] -> [B, C_out, ceil(H/2), ceil(W/2)]``; convs without bias (each is followed by BN or
    a pointwise conv), as in the official CDS code."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=False),
        )
        for m in self.op:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


@dataclass(frozen=True)
class ECPoint:
    """One intermediate supervision point: the hooked module, its output layout and the channel path
    ``(C_in, C_block1, ..., C_blockK)`` of its branch (K = 0: pooling only)."""

    module: str
    layout: str                       # "nchw" | "nhwc" | "tokens"
    channels: tuple[int, ...]
    grid: tuple[int, int] | None = None   # token grid (layout "tokens")
    prefix_tokens: int = 0                # class/register tokens dropped before the reshape


def _to_nchw(f: Tensor, p: ECPoint) -> Tensor:
    if p.layout == "nchw":
        return f
    if p.layout == "nhwc":
        return f.permute(0, 3, 1, 2)
    gh, gw = p.grid
    t = f[:, p.prefix_tokens:]
    if t.shape[1] != gh * gw:
        raise ValueError(f"EC point {p.module}: expected {gh}x{gw} patch tokens after {p.prefix_tokens} prefix "
                         f"tokens, got {tuple(f.shape)}")
    return t.reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)


class ECBranch(nn.Module):
    """EC module ``a^l`` (SepConvs + global average pool) with its classifier ``g^l``.

    ``forward(feature) -> (embedding [B, C] unnormalised, logits [B, num_classes])``."""

    def __init__(self, point: ECPoint, num_classes: int) -> None:
        super().__init__()
        self.point = point
        ch = point.channels
        self.blocks = nn.Sequential(*[SepConv(a, b) for a, b in zip(ch[:-1], ch[1:])])
        self.fc = nn.Linear(ch[-1], num_classes)

    def embed(self, feature: Tensor) -> Tensor:
        """``a^l``: the stage feature (its native layout) -> SepConvs -> global average pool ``[B, C_last]``."""
        x = _to_nchw(feature, self.point)
        if x.shape[1] != self.point.channels[0]:
            raise ValueError(f"EC branch at {self.point.module}: expected {self.point.channels[0]} channels, "
                             f"got feature {tuple(feature.shape)}")
        return self.blocks(x).mean(dim=(2, 3))

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.embed(feature)
        return emb, self.fc(emb)


class ECOutput(NamedTuple):
    """``logits [B, K]`` of the model; per supervision point l = 1..L (forward order, the last is
    stage N): ``embeddings[l] [B, D_l]`` L2-normalised and ``layer_logits[l] [B, K]``."""

    logits: Tensor
    embeddings: list[Tensor]
    layer_logits: list[Tensor]


class ECModules(nn.Module):
    """The EC modules of one backbone (one :class:`ECBranch` per intermediate point) plus the name of
    the backbone's classifier, whose input is the stage-N pooled feature. Built by
    :func:`build_ec_modules`; ``config`` rebuilds the same layout."""

    def __init__(self, points: Sequence[ECPoint], head: str, num_classes: int, config: dict | None = None) -> None:
        super().__init__()
        self.points = list(points)
        self.head = head
        self.branches = nn.ModuleList([ECBranch(p, num_classes) for p in self.points])
        self.config = dict(config or {})

    @property
    def num_points(self) -> int:
        """L: intermediate points + stage N."""
        return len(self.points) + 1

    def extra_repr(self) -> str:
        return f"points={[p.module for p in self.points]} + {self.head!r} input"


@contextlib.contextmanager
def _capture(model: nn.Module, names: Sequence[str], head: str) -> Iterator[dict[str, Tensor]]:
    mods = dict(model.named_modules())
    missing = [n for n in [*names, head] if n not in mods]
    if missing:
        raise ValueError(f"EC modules: the model has no modules {missing}; build the EC modules for this model "
                         "(build_ec_modules(model))")
    store: dict[str, Tensor] = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in names]
    hooks.append(mods[head].register_forward_pre_hook(lambda m, i: store.__setitem__("__head__", i[0])))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def capture_features(model: nn.Module, modules: ECModules, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    """One forward of ``model`` on ``x``: ``(logits [B, K], raw features at the intermediate points,
    pooled stage-N feature [B, D] entering the classifier)``. Wrap in ``torch.no_grad()`` for a frozen
    backbone (SupCon pre-training)."""
    with _capture(model, [p.module for p in modules.points], modules.head) as feats:
        logits = model(x)
    missing = [p.module for p in modules.points if p.module not in feats]
    if missing or "__head__" not in feats:
        raise RuntimeError(f"EC modules: {missing or modules.head} did not run in the forward pass")
    return logits, [feats[p.module] for p in modules.points], feats["__head__"].flatten(1)


def ec_heads(modules: ECModules, feats: Sequence[Tensor], pooled: Tensor, logits: Tensor) -> ECOutput:
    """Apply the branches to captured features; point L is ``(pooled, logits)`` of the backbone."""
    embs, outs = [], []
    for br, f in zip(modules.branches, feats):
        e, lg = br(f)
        embs.append(e)
        outs.append(lg)
    embs.append(pooled)
    outs.append(logits)
    return ECOutput(logits, [F.normalize(e.float(), dim=1) for e in embs], outs)


def ec_forward(model: nn.Module, modules: ECModules, x: Tensor) -> ECOutput:
    """One forward of ``model`` on ``x [B, C, H, W]`` with the EC branches on its intermediate features.

    Point L (stage N) uses the pooled feature that enters the original classifier and the model's logits."""
    logits, feats, pooled = capture_features(model, modules, x)
    return ec_heads(modules, feats, pooled, logits)


class ECNet(nn.Module):
    """The model being unlearned plus its EC modules, as one module (one state dict for resume).

    ``forward(x) -> ECOutput``; ``self.model`` alone is the deployable classifier."""

    def __init__(self, model: nn.Module, ec: ECModules) -> None:
        super().__init__()
        self.model = model
        self.ec = ec

    def forward(self, x: Tensor) -> ECOutput:
        return ec_forward(self.model, self.ec, x)


# ------------------------------------------------------------------------------------ layouts
def supported_models() -> tuple[str, ...]:
    """Names with a table entry; ``timm:``/``tv:`` models and any model created with ``feature_layers=``
    get their points by rule (:func:`_generic_points`)."""
    return ("small_cnn", "resnet18", "resnet50", "swin_tiny", "vit_tiny", "vit_small")


def _arch(model: nn.Module, name: str | None) -> str:
    name = name or getattr(model, "unlearn_fast_name", None)
    if name is None:
        raise ValueError("EC modules: pass name= (the model was not made by unlearn_fast.models.create)")
    if ":" in name or (getattr(model, "unlearn_fast_config", None) or {}).get("feature_layers"):
        return "generic"  # timm:/tv: names and explicit feature_layers: stages by rule (models.stages)
    if name.startswith("resnet"):
        return "resnet"
    if name.startswith("swin"):
        return "swin"
    if name.startswith("vit"):
        return "vit"
    if name == "small_cnn":
        return "small_cnn"
    raise ValueError(f"EC modules are defined for {', '.join(supported_models())} (and other resnet*/swin*/vit* "
                     f"models of the same layout); got {name!r}")


def _stages(model: nn.Module, arch: str) -> tuple[list[str], list[str], str, str]:
    """(stage module names 1..N, candidate extra points inside stage N, head name, layout)."""
    if arch == "resnet":
        n4 = len(model.layer4)
        return ["layer1", "layer2", "layer3", "layer4"], [f"layer4.{i}" for i in range(n4 - 1)], "fc", "nchw"
    if arch == "small_cnn":
        return ["block1", "block2", "block3"], [], "fc", "nchw"
    if arch == "swin":
        n = len(model.layers)
        last = len(model.layers[n - 1].blocks)
        return ([f"layers.{s}" for s in range(n)], [f"layers.{n - 1}.blocks.{b}" for b in range(last - 1)],
                "head.fc", "nhwc")
    d = len(model.blocks)
    if d < 4:
        raise ValueError(f"EC modules on a ViT need depth >= 4 (four virtual stages), got {d}")
    cuts = [d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1]
    return [f"blocks.{c}" for c in cuts], [f"blocks.{i}" for i in range(cuts[2] + 1, d - 1)], "head", "tokens"


@torch.no_grad()
def _probe(model: nn.Module, names: Sequence[str], head: str, in_chans: int, img_size: int) -> dict[str, tuple]:
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, in_chans, img_size, img_size, device=p.device, dtype=p.dtype)
        with _capture(model, names, head) as feats:
            model(x)
        return {k: tuple(v.shape) for k, v in feats.items()}
    finally:
        model.train(was)


def ec_points(model: nn.Module, name: str | None = None, *, extra_points: int = 0, with_blocks: bool = True,
              in_chans: int | None = None, img_size: int | None = None) -> tuple[list[ECPoint], str]:
    """The intermediate supervision points of ``model`` and its classifier's name (see the module table).

    Channels are read from one no-grad forward of a ``[1, in_chans, img_size, img_size]`` zero image
    (defaults from ``model.unlearn_fast_config``)."""
    arch = _arch(model, name)
    if arch == "generic":
        return _generic_points(model, extra_points, with_blocks, in_chans, img_size)
    stages, extras, head, layout = _stages(model, arch)
    if not 0 <= extra_points <= len(extras):
        raise ValueError(f"extra_points must be in [0, {len(extras)}] for this model (blocks of its last stage "
                         f"before the final one: {extras}), got {extra_points}")
    cfg = getattr(model, "unlearn_fast_config", {}) or {}
    in_chans = in_chans or cfg.get("in_chans")
    img_size = img_size or cfg.get("img_size")
    if not in_chans or not img_size:
        raise ValueError("EC modules: pass in_chans= and img_size= (the model has no unlearn_fast_config)")
    extra = extras[:extra_points]
    shapes = _probe(model, [*stages, *extra], head, in_chans, img_size)
    ch_axis = {"nchw": 1, "nhwc": 3, "tokens": 2}[layout]
    chans = [shapes[s][ch_axis] for s in stages]
    grid = prefix = None
    if layout == "tokens":
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
    pts = []
    n = len(stages)
    for k in range(n - 1):  # after stage k+1: (n-k-1) blocks
        path = (chans[k], *chans[k + 1:]) if with_blocks else (chans[k],)
        pts.append(ECPoint(stages[k], layout, tuple(path), grid, prefix or 0))
    for e in extra:
        pts.append(ECPoint(e, layout, (shapes[e][ch_axis],), grid, prefix or 0))
    return pts, head


_CH_AXIS = {"nchw": 1, "nhwc": 3, "tokens": 2}


def _generic_points(model: nn.Module, extra_points: int, with_blocks: bool, in_chans: int | None,
                    img_size: int | None) -> tuple[list[ECPoint], str]:
    """EC points of a backbone without a table entry: its stages by rule (:func:`models.stages.stage_info`:
    timm ``feature_info``, spatial-resolution changes, or four even transformer-block cuts) or the model's
    ``feature_layers``; each point keeps its own layout; the classifier found by the rule is the head."""
    from unlearn_fast.models.stages import stage_info

    if extra_points:
        raise ValueError("extra_points needs a model with a table entry (resnet*/swin*/vit*); for other models "
                         "list the points with feature_layers=")
    info = stage_info(model, in_chans, img_size)
    bad = [s for s in info.stages if info.layouts[s] not in _CH_AXIS]
    if bad or len(info.stages) < 2:
        raise ValueError(f"EC modules need >= 2 stage outputs shaped [B,C,H,W], [B,H,W,C] or [B,T,D]; got "
                         f"{ {s: info.shapes[s] for s in info.stages} }; pass feature_layers='a,b,c'")
    chans = [info.shapes[s][_CH_AXIS[info.layouts[s]]] for s in info.stages]
    pts = []
    for k in range(len(info.stages) - 1):
        lay = info.layouts[info.stages[k]]
        path = (chans[k], *chans[k + 1:]) if with_blocks else (chans[k],)
        grid = info.grid if lay == "tokens" else None
        pts.append(ECPoint(info.stages[k], lay, tuple(path), grid, info.prefix_tokens if lay == "tokens" else 0))
    return pts, info.classifier


def build_ec_modules(model: nn.Module, name: str | None = None, *, extra_points: int = 0, with_blocks: bool = True,
                     num_classes: int | None = None, in_chans: int | None = None,
                     img_size: int | None = None) -> ECModules:
    """EC modules for ``model`` (randomly initialised, on the model's device), e.g.
    ``build_ec_modules(create("resnet50", 100, 3, 224))`` -> 3 branches ending at 2048 x 7 x 7."""
    points, head = ec_points(model, name, extra_points=extra_points, with_blocks=with_blocks, in_chans=in_chans,
                             img_size=img_size)
    head_mod = dict(model.named_modules())[head]
    k = num_classes or getattr(head_mod, "out_features", None)
    if not k:
        raise ValueError("build_ec_modules: pass num_classes= (the classifier is not an nn.Linear)")
    config = {"model": name or getattr(model, "unlearn_fast_name", None), "extra_points": extra_points,
              "with_blocks": with_blocks, "num_classes": int(k), "points": [asdict(p) for p in points]}
    dev = next(model.parameters()).device
    return ECModules(points, head, int(k), config).to(dev)
