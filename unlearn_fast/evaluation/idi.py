"""IDI, the Information Difference Index (methods card 1; Jeon et al. 2026; EC App. B.6, EC Table 1 |IDI|).

For each layer l of a model theta, an InfoNCE critic estimates I_theta(Z_l; Y), the mutual information
between the layer's feature Z_l and the *forget membership* label Y (1 for a sample of a forget class,
0 for a retain sample; card 1 "Labels"). Then

    ID(theta) = sum_l [ I_theta(Z_l; Y) - I_retrained(Z_l; Y) ],     IDI(theta_u) = ID(theta_u) / ID(theta_o)

so IDI(original) = 1 and IDI(retrained) = 0. The sum is signed (card 1: the paper reports negative IDI);
``clip=True`` takes max(0, .) per layer instead. EC Table 1 reports |IDI| and its H-Mean uses
s_IDI = 100 * clip(1 - |IDI|, 0.1, 1).

Critic of layer l (card 1 "Critics"): f_nu = a copy of the evaluated model whose *prefix* (every
parameter that Z_l depends on, found by back-propagating from Z_l once) is frozen and whose suffix
(the blocks after l up to the classifier input) is trained from the model's own weights, followed by a
fresh projection head Linear(d, d) - ReLU - Linear(d, dim) on the classifier input (the CU/SimCLR
projection shape: an assumption, the IDI paper's head is not recoverable); g_eta = an embedding table
with the two vectors g(0), g(1) in R^dim. Score s(z, y) = f_nu(z)^T g_eta(y). The whole copy runs in
eval mode (BatchNorm uses its running statistics, card 1 pitfall "BN in eval mode for the frozen
prefix"; the suffix's BN statistics are not updated either), and its classifier is frozen and unused.

InfoNCE (card 1) on a batch {(z_i, y_i)}: I = (1/N) sum_i [ s(z_i, y_i) - log((1/N) sum_j exp s(z_i, y_j)) ].
With binary y the inner mean is exactly p0 exp s(z_i, 0) + p1 exp s(z_i, 1) with the batch fractions
p0, p1 (:func:`infonce_binary`), so the estimate costs O(N), and it saturates at H(p) = the entropy of
the forget fraction (ln 2 for balanced pairs; card 1 pitfall). The critic maximises it on train-split
pairs (D_f u D_r, the natural forget fraction, identical sample order for all three models: same
seed); it is read out once on the held-out **test** split pairs with the global fractions (held out,
so that a critic that memorised its training pairs does not inflate the estimate; ``eval_split``).

Settings (:data:`IDI_PRESETS`):

* ``"ec"`` - EC App. B.6: batch 512, 5 epochs of at most 800 steps, d = 128, lr 3e-5 for the pretrained
  suffix of f_nu and 5e-4 for the fresh head and g_eta (this lr mapping is card 1's assumption), Adam
  (the optimizer is not stated in EC; card 1's summary says SGD, which at these learning rates barely
  moves a fresh head: ``optimizer="sgd"`` is available).
* ``"cpu"`` - the cheap setting for CPU runs and small sets: batch 128, 10 epochs of at most 40 steps,
  d = 64, lr 3e-4 (suffix) / 3e-3 (head), Adam (digits / small CNN: about 2 s per model and layer on
  one CPU thread; seed-to-seed spread of a layer's estimate about 0.03 nats - average ``seeds``).

Layers (:func:`idi_layers`): the last three feature blocks before global pooling and the classifier -
for ResNet-50 ``layer4.0, layer4.1, layer4.2`` (EC App. B.6); ResNet-18 (two blocks per stage)
``layer3.1, layer4.0, layer4.1``; ViT/Swin the last three transformer blocks; VGG the last three feature
layers before the final classifier; small CNN ``block1, block2, block3``. ``layers=`` overrides.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unlearn_fast.data.pipeline import eval_loader

__all__ = ["IDIConfig", "IDI_PRESETS", "idi_config", "infonce_binary", "idi_layers", "layer_mutual_information",
           "idi_from_mi", "compute_idi"]


@dataclass(frozen=True)
class IDIConfig:
    """Critic training settings (see the module docstring; ``"ec"`` is EC App. B.6)."""

    batch_size: int = 512
    epochs: int = 5
    max_steps: int = 800          # per epoch
    dim: int = 128                # critic output dimension d
    lr_suffix: float = 3e-5       # f_nu: the model's own blocks after layer l
    lr_head: float = 5e-4         # the fresh projection head and g_eta
    optimizer: str = "adam"       # "adam" | "sgd" (momentum 0.9)
    seeds: int = 1                # independent critic trainings averaged (Jeon et al. use 5)
    eval_split: str = "test"      # "test" (held out) | "train"
    max_eval: int | None = None   # cap on read-out pairs (a seeded random subset)


IDI_PRESETS: dict[str, IDIConfig] = {
    "ec": IDIConfig(),
    "cpu": IDIConfig(batch_size=128, epochs=10, max_steps=40, dim=64, lr_suffix=3e-4, lr_head=3e-3),
}


def idi_config(config: str | IDIConfig | dict[str, Any] | None = None, **overrides: Any) -> IDIConfig:
    """A preset name (``"ec"``, ``"cpu"``), an :class:`IDIConfig`, or a dict of fields (over ``"ec"``)."""
    if config is None:
        config = "ec"
    if isinstance(config, str):
        if config not in IDI_PRESETS:
            raise ValueError(f"IDI preset {config!r} is unknown; use one of {sorted(IDI_PRESETS)} or an IDIConfig")
        cfg = IDI_PRESETS[config]
    elif isinstance(config, IDIConfig):
        cfg = config
    elif isinstance(config, dict):
        base = IDI_PRESETS[config.get("preset", "ec")] if isinstance(config.get("preset", "ec"), str) else IDIConfig()
        config = {k: v for k, v in config.items() if k != "preset"}
        overrides = {**config, **overrides}
        cfg = base
    else:
        raise ValueError(f"IDI config must be a preset name, an IDIConfig or a dict, got {type(config).__name__}")
    fields = set(asdict(cfg))
    bad = set(overrides) - fields
    if bad:
        raise ValueError(f"IDI config has no fields {sorted(bad)}; fields are {sorted(fields)}")
    cfg = replace(cfg, **overrides)
    if cfg.batch_size < 2 or cfg.epochs < 1 or cfg.max_steps < 1 or cfg.dim < 1 or cfg.seeds < 1:
        raise ValueError(f"IDI config needs batch_size >= 2 and epochs, max_steps, dim, seeds >= 1, got {cfg}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise ValueError(f"IDI optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    if cfg.eval_split not in ("test", "train"):
        raise ValueError(f"IDI eval_split must be 'test' or 'train', got {cfg.eval_split!r}")
    return cfg


def infonce_binary(scores: Tensor, y: Tensor) -> Tensor:
    """Card 1's InfoNCE estimate for binary labels in O(N): ``scores [N, 2]`` = s(z_i, c), ``y [N]`` in {0, 1}.

    Equal to the N x N form (:func:`unlearn_fast.reference.idi.infonce_mi_reference`); 0 when one label
    is absent. Returns a scalar tensor (nats), differentiable in ``scores``."""
    if scores.dim() != 2 or scores.shape[1] != 2 or y.shape != scores.shape[:1]:
        raise ValueError(f"infonce_binary: need scores [N, 2] and y [N], got {tuple(scores.shape)} and {tuple(y.shape)}")
    y = y.long()
    n = y.numel()
    log_p = torch.log(torch.bincount(y, minlength=2).to(scores.dtype) / n)
    pos = scores.gather(1, y[:, None]).squeeze(1)
    return (pos - torch.logsumexp(scores + log_p, dim=1)).mean()


_POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def idi_layers(model: nn.Module, n: int = 3) -> list[str]:
    """The last ``n`` feature layers before global pooling and the classifier (``models.feature_layers``)."""
    from unlearn_fast.models import feature_layers

    name = getattr(model, "unlearn_fast_name", None)
    if name is None:
        raise ValueError("idi_layers: the model was not made by unlearn_fast.models.create; pass layers= explicitly")
    names = feature_layers(model, name)[:-1]  # the last one is the classifier
    mods = dict(model.named_modules())
    names = [k for k in names if not isinstance(mods[k], _POOL_TYPES) and "pool" not in k.rsplit(".", 1)[-1]]
    return names[-n:]


class _Stop(Exception):
    pass


def _first(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _prefix_param_names(net: nn.Module, layer: str, x: Tensor) -> set[str]:
    """Names of the parameters that the output of ``layer`` depends on (one backward from it)."""
    named = list(net.named_parameters())
    flags = [p.requires_grad for _, p in named]
    for _, p in named:
        p.requires_grad_(True)
    found: dict[str, set[str]] = {}

    def hook(_m, _i, out):
        t = _first(out)
        grads = torch.autograd.grad(t.float().sum(), [p for _, p in named], allow_unused=True)
        found["names"] = {n for (n, _), g in zip(named, grads) if g is not None}
        raise _Stop

    h = net.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            net(x)
    except _Stop:
        pass
    finally:
        h.remove()
        for (_, p), f in zip(named, flags):
            p.requires_grad_(f)
    if "names" not in found:
        raise ValueError(f"IDI: layer {layer!r} did not run in the model's forward pass")
    return found["names"]


class _LayerCritic(nn.Module):
    """s(x, y) for y in {0, 1}: ``forward(x) -> [B, 2]`` (f_nu = frozen prefix + trainable suffix + head)."""

    def __init__(self, model: nn.Module, layer: str, classifier: str, dim: int, probe_x: Tensor) -> None:
        super().__init__()
        self.net = copy.deepcopy(model).eval()
        prefix = _prefix_param_names(self.net, layer, probe_x)
        clf = self.net.get_submodule(classifier)
        clf_params = {id(p) for p in clf.parameters()}
        self.suffix: list[nn.Parameter] = []
        for n, p in self.net.named_parameters():
            train = n not in prefix and id(p) not in clf_params
            p.requires_grad_(train)
            if train:
                self.suffix.append(p)
        self._h: list[Tensor] = []
        self._handle = clf.register_forward_hook(lambda m, inp, out: self._h.append(inp[0]))
        with torch.no_grad():
            self.net(probe_x)
        d = self._h.pop().flatten(1).shape[1]
        self._h.clear()
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, dim)).to(probe_x.device)
        self.g = nn.Embedding(2, dim).to(probe_x.device)

    def train(self, mode: bool = True) -> "_LayerCritic":  # the copied model always stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        self._h.clear()
        self.net(x)
        h = self._h.pop().flatten(1).float()
        return self.head(h) @ self.g.weight.t()

    def close(self) -> None:
        self._handle.remove()


class _Membership(Dataset):
    """``(x, class) -> (x, 1 if class in forget else 0)``."""

    def __init__(self, ds: Dataset, forget: Sequence[int]) -> None:
        self.ds, self.forget = ds, set(int(c) for c in forget)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return x, int(int(y) in self.forget)


def _classifier_name(model: nn.Module, classifier: str | None) -> str:
    if classifier is not None:
        return classifier
    from unlearn_fast.models import feature_layers

    name = getattr(model, "unlearn_fast_name", None)
    if name is None:
        raise ValueError("IDI: the model was not made by unlearn_fast.models.create; pass classifier= (the name of "
                         "the final classifier module, whose input is the critic's feature)")
    return feature_layers(model, name)[-1]


@torch.no_grad()
def _read_out(critic: _LayerCritic, ds: Dataset, device, batch_size: int) -> float:
    critic.eval()
    s, ys = [], []
    for x, y in eval_loader(ds, batch_size):  # workers for lazily decoded data (data.pipeline)
        s.append(critic(x.to(device)).double().cpu())
        ys.append(torch.as_tensor(y))
    return float(infonce_binary(torch.cat(s), torch.cat(ys)))


def _estimate_layer(model: nn.Module, layer: str, classifier: str, train: Dataset, evald: Dataset,
                    cfg: IDIConfig, device, seed: int) -> float:
    probe_x = torch.stack([train[i][0] for i in range(min(4, len(train)))]).to(device)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        critic = _LayerCritic(model, layer, classifier, cfg.dim, probe_x)
    try:
        head = list(critic.head.parameters()) + list(critic.g.parameters())
        groups = [{"params": head, "lr": cfg.lr_head}]
        if critic.suffix:
            groups.append({"params": critic.suffix, "lr": cfg.lr_suffix})
        opt = (torch.optim.Adam(groups) if cfg.optimizer == "adam" else torch.optim.SGD(groups, lr=cfg.lr_head, momentum=0.9))
        gen = torch.Generator().manual_seed(seed)
        critic.train()
        with torch.enable_grad():  # callers may run under no_grad (evaluate_unlearned)
            for _ in range(cfg.epochs):
                order = torch.randperm(len(train), generator=gen).tolist()
                loader = DataLoader(train, batch_size=cfg.batch_size, sampler=order, drop_last=len(train) > cfg.batch_size)
                for step, (x, y) in enumerate(loader):
                    if step >= cfg.max_steps:
                        break
                    loss = -infonce_binary(critic(x.to(device)), torch.as_tensor(y).to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return _read_out(critic, evald, device, max(cfg.batch_size, 256))
    finally:
        critic.close()


def layer_mutual_information(model: nn.Module, train: Dataset, evald: Dataset, forget: Sequence[int],
                             layers: Sequence[str] | None = None, *, config: str | IDIConfig | dict | None = None,
                             classifier: str | None = None, device: torch.device | str | None = None,
                             seed: int = 0) -> dict[str, float]:
    """I(Z_l; Y) in nats per layer (InfoNCE, card 1), ``Y = [class in forget]``, averaged over ``config.seeds``.

    ``train`` / ``evald``: datasets of ``(x, class)`` - the critic trains on ``train`` and is read out on
    ``evald``. ``layers``: module names (default :func:`idi_layers`); ``classifier``: the final classifier
    module (default from ``models.feature_layers``). The same ``seed`` gives the same sample order for
    every model (card 1 pitfall)."""
    cfg = idi_config(config)
    forget = sorted({int(c) for c in forget})
    if not forget:
        raise ValueError("IDI: forget must name at least one class")
    if len(train) < 2 or len(evald) < 2:
        raise ValueError(f"IDI: need at least 2 train and 2 read-out samples, got {len(train)} and {len(evald)}")
    classifier = _classifier_name(model, classifier)
    layers = list(layers) if layers is not None else idi_layers(model)
    mods = dict(model.named_modules())
    missing = [k for k in [*layers, classifier] if k not in mods]
    if missing:
        raise ValueError(f"IDI: the model has no modules {missing}; layers must be names from "
                         "unlearn_fast.models.feature_layers(model, name)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    train_m, eval_m = _Membership(train, forget), _Membership(evald, forget)
    if cfg.max_eval is not None and len(eval_m) > cfg.max_eval:
        from torch.utils.data import Subset

        keep = torch.randperm(len(eval_m), generator=torch.Generator().manual_seed(seed + 1))[: cfg.max_eval]
        eval_m = Subset(eval_m, sorted(keep.tolist()))
    out = {}
    for layer in layers:
        vals = [_estimate_layer(model, layer, classifier, train_m, eval_m, cfg, device, seed + 1000 * s)
                for s in range(cfg.seeds)]
        out[layer] = float(sum(vals) / len(vals))
    return out


def idi_from_mi(mi_u: dict[str, float], mi_o: dict[str, float], mi_r: dict[str, float], clip: bool = False,
                min_denominator: float = 1e-3) -> dict[str, Any]:
    """Card 1 normalisation: ``{"IDI", "ID_u", "ID_o", "note"}``; IDI is NaN (with a note) when
    |ID(original)| < ``min_denominator`` nats (Original ~ Retrained on these layers: card 1 pitfall)."""
    layers = list(mi_o)
    if set(mi_u) != set(layers) or set(mi_r) != set(layers):
        raise ValueError(f"idi_from_mi: the three models were measured on different layers: "
                         f"{sorted(mi_u)}, {sorted(mi_o)}, {sorted(mi_r)}")

    def d(m: dict[str, float]) -> float:
        return sum(max(0.0, m[k] - mi_r[k]) if clip else m[k] - mi_r[k] for k in layers)

    id_u, id_o = d(mi_u), d(mi_o)
    if abs(id_o) < min_denominator:
        return {"IDI": float("nan"), "ID_u": id_u, "ID_o": id_o,
                "note": f"ID(original) = {id_o:.2e} nats: the original and retrained models carry the same "
                        "information on these layers, so IDI is undefined"}
    return {"IDI": id_u / id_o, "ID_u": id_u, "ID_o": id_o, "note": ""}


def compute_idi(model: nn.Module, original: nn.Module, retrained: nn.Module, data, forget: Sequence[int], *,
                layers: Sequence[str] | None = None, config: str | IDIConfig | dict | None = None,
                device: torch.device | str | None = None, seed: int = 0, clip: bool = False,
                cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Signed IDI of ``model`` against ``original`` and ``retrained`` on the run's ``DataBundle``.

    ``cache``: a dict kept by the caller across models of one comparison; the original's and the
    retrained model's per-layer estimates are stored there and reused (same layers, config, seed).
    Returns ``{"IDI", "IDI_abs", "ID_u", "ID_o", "mi": {"unlearned", "original", "retrained"}, "layers",
    "H_Y", "config", "note"}`` (mutual information in nats)."""
    cfg = idi_config(config)
    layers = list(layers) if layers is not None else idi_layers(model)
    ev = data.test if cfg.eval_split == "test" else data.train
    kw = dict(config=cfg, device=device, seed=seed)
    key = repr((layers, asdict(cfg), seed, sorted(int(c) for c in forget)))
    cache = cache if cache is not None else {}
    ref = cache.get("idi_reference")
    if ref is None or ref.get("key") != key:
        ref = {"key": key,
               "original": layer_mutual_information(original, data.train, ev, forget, layers, **kw),
               "retrained": layer_mutual_information(retrained, data.train, ev, forget, layers, **kw)}
        cache["idi_reference"] = ref
    if model is original:
        mi_u = ref["original"]
    elif model is retrained:
        mi_u = ref["retrained"]
    else:
        mi_u = layer_mutual_information(model, data.train, ev, forget, layers, **kw)
    res = idi_from_mi(mi_u, ref["original"], ref["retrained"], clip=clip)
    y = torch.isin(torch.as_tensor(data.targets[cfg.eval_split]), torch.tensor(sorted(forget)))
    p = float(y.double().mean())
    h = -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)
    if not res["note"] and abs(res["ID_o"]) < 0.1 * h:
        res["note"] = (f"IDI is unreliable here: ID(original) = {res['ID_o']:.3f} nats is under 10% of H(Y) = {h:.3f}, "
                       "the size of the estimator's seed-to-seed spread; average more critic seeds (seeds=) or use "
                       "the EC App. B.6 setting (idi='ec')")
    return {**res, "IDI_abs": abs(res["IDI"]), "mi": {"unlearned": mi_u, "original": ref["original"],
                                                      "retrained": ref["retrained"]},
            "layers": layers, "H_Y": h, "config": asdict(cfg), "clip": clip}
