"""``ec``: Erase at the Core (EC paper Alg. 1, Eqs. 1-3, App. B.3, Tables 4 and 10).

Two stages, both resumable from ``state/``:

1. **SupCon pre-training of the EC modules** (App. B.3, card 4), once per run directory: the CDS
   branches of :mod:`unlearn_fast.models.ec_modules` on the *original* model, backbone and classifier
   frozen (eval mode, no grad), trained on the whole train split D with the supervised contrastive
   loss of two augmented views (summed over the branches, as CDS does); anchors with no positive are
   masked. The per-branch classifiers stay at their random init (they learn during unlearning).
   Result: ``ec_modules.safetensors`` in the run dir (``ec_modules-<hash>.safetensors`` when the
   pre-training knobs differ from the defaults), reused by ``ec`` and every ``<method>+ec``.
2. **Unlearning** (Alg. 1): each forget batch B_f is paired with ``omega`` consecutive retain batches
   B_r, one optimizer step per pair (the CU code's ``retain_sampling_freq``, EC Table 10's omega = 2).
   One forward of ``cat(B_f, B_r)`` (BatchNorm sees the joint batch) gives, per supervision point l,
   the normalised embeddings z^l and the logits; the loss is Eq. 3
   ``sum_l w_l (lambda_CU L_CU^l + lambda_CE L_CE^l)`` with L_CU^l = Eq. 1 (mean over all forget x retain
   pairs of -z_i.z_j/tau, no positive-set denominator - Eq. 1 has none) and L_CE^l = Eq. 2 (CE of the
   layer-l logits on B_r). Backbone, classifier and modules are all trained. The model kept is the one
   with the best validation H-Mean of (1 - FA, RA) (evaluation during unlearning, ``select_best``).

Choices the paper leaves open (stated here, all overridable):
- Table 11 (lr / epochs / batch of the unlearning stage) is not in the text: SGD (CU's optimizer)
  momentum 0.9, wd 5e-4, lr 0.01, 5 epochs, forget and retain batch 64.
- Pre-training optimizer: SGD momentum 0.9, wd 1e-4 (CDS ImageNet recipe), constant lr 2e-2, 80
  epochs, batch 1024 (App. B.3), tau = tau_base = 0.07 (card 4).
- Views (card 4): view 1 = random-resized crop (scale ``view1_crop_scale``), view 2 = random-resized
  crop (``view2_crop_scale``) + brightness/contrast/saturation jitter (p 0.8) + grayscale (p 0.2, RGB
  only); both with a horizontal flip when the dataset allows flips. Jitter acts on the normalised
  tensors (brightness = additive shift in std units; contrast/saturation = scaling about the mean).
- Layer weights are aligned to the deepest points: a model with fewer points than ``layer_weights``
  (small_cnn: L = 3) uses the last L entries, (0.4, 0.8, 1.0).
- Swin-Tiny runs without layer-wise CE by default (App. A.3): ``layer_ce=None`` resolves to False for
  ``swin_*`` models and True otherwise (:meth:`ECSettings.for_model`).
- Ablations (Table 4): ``layer_ce=False`` keeps CE only at point L (the final classifier - removing it
  too would leave nothing preserving utility); ``use_modules=False`` puts L_CU / L_CE on the globally
  pooled raw stage features (linear classifier per point, no pre-training); ``extra_points=n``
  supervises the first n blocks of the last stage too (ResNet-50: layer4.0, layer4.1), weight
  ``extra_weight`` each, placed before point L.
"""
from __future__ import annotations

import time

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.methods.base import artefact_meta
from unlearn_fast.methods.loop import LoopConfig, fit
from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import PairedBatches, UnlearnContext, UnlearnHparams, UnlearningMethod, _cyc
from unlearn_fast.models.ec_modules import ECModules, ECNet, ECOutput, build_ec_modules, capture_features
from unlearn_fast.models.io import load_tensors, save_tensors
from unlearn_fast.ops.supcon import ec_unlearning_loss, supcon_loss

__all__ = ["ECSettings", "EraseAtTheCore", "OmegaBatches", "ec_loss", "layer_weights_for", "two_views",
           "prepare_ec_modules", "pretrain_ec_modules", "ec_modules_path"]

_PRETRAIN_KEYS = ("pretrain_epochs", "pretrain_lr", "pretrain_batch_size", "pretrain_momentum",
                  "pretrain_weight_decay", "pretrain_temperature", "pretrain_max_steps", "view1_crop_scale",
                  "view2_crop_scale", "jitter")


@dataclass
class ECSettings:
    """EC's own knobs (EC Table 10 and App. B.3); shared by ``ec`` and ``<method>+ec`` (there prefixed ``ec_``)."""

    tau: float = 0.07
    lambda_cu: float = 1.5
    lambda_ce: float = 1.5
    layer_weights: tuple[float, ...] = (0.2, 0.4, 0.8, 1.0)
    layer_ce: bool | None = None           # CE at every point; False: only at point L; None: False for Swin (App. A.3)
    use_modules: bool = True               # False: ablation "w/o EC modules"
    extra_points: int = 0                  # > 0: ablation "+ final backbone blocks"
    extra_weight: float = 1.0
    pretrain_epochs: int = 80
    pretrain_lr: float = 2e-2
    pretrain_batch_size: int = 1024
    pretrain_momentum: float = 0.9
    pretrain_weight_decay: float = 1e-4
    pretrain_temperature: float = 0.07
    pretrain_max_steps: int | None = None
    view1_crop_scale: tuple[float, float] = (0.6, 1.0)
    view2_crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: float = 0.4

    def validate(self) -> "ECSettings":
        if not self.tau > 0 or not self.pretrain_temperature > 0:
            raise ValueError(f"EC: temperatures must be > 0, got tau={self.tau}, pretrain_temperature="
                             f"{self.pretrain_temperature}")
        if self.extra_points < 0:
            raise ValueError(f"EC: extra_points must be >= 0, got {self.extra_points}")
        for k in ("view1_crop_scale", "view2_crop_scale"):
            lo, hi = getattr(self, k)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"EC: {k} must be (lo, hi) with 0 < lo <= hi <= 1, got {getattr(self, k)}")
        if not self.layer_weights or any(w < 0 for w in self.layer_weights):
            raise ValueError(f"EC: layer_weights must be non-empty and >= 0, got {self.layer_weights}")
        return self

    def for_model(self, model_name: str) -> "ECSettings":
        """Settings with the model-dependent defaults filled in: ``layer_ce=None`` becomes False for
        Swin (EC App. A.3: "for Swin-Tiny, we use a variant of EC without layer-wise cross-entropy")
        and True otherwise."""
        if self.layer_ce is not None:
            return self
        return dataclasses.replace(self, layer_ce=not str(model_name).startswith("swin"))

    @classmethod
    def from_hparams(cls, hp: Any, prefix: str = "") -> "ECSettings":
        vals = {f.name: getattr(hp, prefix + f.name) for f in dataclasses.fields(cls)}
        for k in ("layer_weights", "view1_crop_scale", "view2_crop_scale"):
            vals[k] = tuple(float(v) for v in vals[k])
        return cls(**vals).validate()


# ------------------------------------------------------------------------------------- the loss
def layer_weights_for(s: ECSettings, modules: ECModules) -> list[float]:
    """w_1..w_L for ``modules`` (intermediate points, then extra points, then point L); see module doc."""
    n_extra = int(modules.config.get("extra_points", 0))
    n_base = modules.num_points - n_extra
    w = [float(v) for v in s.layer_weights]
    if len(w) == n_base + n_extra:
        return w
    if len(w) < n_base:
        raise ValueError(f"EC: layer_weights has {len(w)} entries but the model has {n_base} supervision points; "
                         f"give at least {n_base}")
    w = w[-n_base:]
    return w[:-1] + [float(s.extra_weight)] * n_extra + w[-1:]


def ec_loss(out: ECOutput, n_forget: int, y_retain: Tensor | None, weights: Sequence[float], s: ECSettings,
            parts: dict[str, float] | None = None) -> Tensor:
    """EC Eq. 3 from one forward of ``cat(B_f, B_r)``: rows ``[:n_forget]`` are the forget batch.

    ``y_retain [B_r]`` labels the remaining rows. Without forget rows only the CE terms remain; without
    retain rows (``y_retain`` None) nothing can be computed and an error is raised. ``parts`` (if given)
    receives the summed unweighted L_CU and L_CE for logging."""
    if y_retain is None or y_retain.numel() == 0:
        raise ValueError("EC loss needs a retain batch (L_CU pairs forget with retain rows; L_CE is on retain rows)")
    L = len(out.embeddings)
    if len(weights) != L:
        raise ValueError(f"EC loss: {len(weights)} layer weights for {L} supervision points")
    total = out.logits.new_zeros((), dtype=torch.float32)
    cu_sum = ce_sum = 0.0
    for l, (z, lg, w) in enumerate(zip(out.embeddings, out.layer_logits, weights)):
        term = z.new_zeros(())
        if n_forget > 0:
            cu = ec_unlearning_loss(z[:n_forget], z[n_forget:], s.tau)
            term = term + s.lambda_cu * cu
            cu_sum += float(cu.detach())
        if s.layer_ce is not False or l == L - 1:  # None (unresolved) = the non-Swin default, True
            ce = F.cross_entropy(lg[n_forget:].float(), y_retain)
            term = term + s.lambda_ce * ce
            ce_sum += float(ce.detach())
        total = total + w * term
    if parts is not None:
        parts.update(cu=cu_sum, ce=ce_sum)
    return total


# ------------------------------------------------------------------------------- augmentation
def _crop_flip(x: Tensor, gen: torch.Generator, scale: tuple[float, float], flip: bool) -> Tensor:
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen).exp()
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _color(x: Tensor, gen: torch.Generator, j: float) -> Tensor:
    b, c = x.shape[:2]
    dev, dt = x.device, x.dtype

    def u(lo: float, hi: float) -> Tensor:
        return torch.empty(b).uniform_(lo, hi, generator=gen).to(device=dev, dtype=dt).view(b, 1, 1, 1)

    apply = (torch.rand(b, generator=gen) < 0.8).to(device=dev, dtype=dt).view(b, 1, 1, 1)
    bright, contrast, sat = u(-j, j), u(1 - j, 1 + j), u(1 - j, 1 + j)
    gray_p = (torch.rand(b, generator=gen) < 0.2).to(device=dev, dtype=dt).view(b, 1, 1, 1)
    y = x + bright
    y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) * contrast + y.mean(dim=(1, 2, 3), keepdim=True)
    if c > 1:
        g = y.mean(dim=1, keepdim=True)
        y = (y - g) * sat + g
    y = apply * y + (1 - apply) * x
    if c > 1:
        y = gray_p * y.mean(dim=1, keepdim=True).expand_as(y) + (1 - gray_p) * y
    return y


def two_views(x: Tensor, gen: torch.Generator, s: ECSettings, hflip: bool) -> tuple[Tensor, Tensor]:
    """Two augmented views of ``x [B, C, H, W]`` (card 4: standard crop; SimCLR-style crop + colour),
    driven by ``gen`` only (resumable)."""
    v1 = _crop_flip(x, gen, s.view1_crop_scale, hflip)
    v2 = _color(_crop_flip(x, gen, s.view2_crop_scale, hflip), gen, s.jitter)
    return v1, v2


# ------------------------------------------------------------------------------- pre-training
def _pretrain_config(s: ECSettings) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in _PRETRAIN_KEYS}


def ec_modules_path(run_dir: Path, s: ECSettings) -> Path:
    """``ec_modules.safetensors`` for the default pre-training, ``ec_modules-<hash8>.safetensors`` otherwise."""
    cfg = _pretrain_config(s)
    if cfg == _pretrain_config(ECSettings()):
        return Path(run_dir) / "ec_modules.safetensors"
    h = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    return Path(run_dir) / f"ec_modules-{h}.safetensors"


def pretrain_ec_modules(original: nn.Module, data, s: ECSettings, *, state_path: Path, device: torch.device,
                        seed: int = 0, progress: bool = False, amp: bool = True, fingerprint: str | None = None,
                        loop_options: dict | None = None) -> ECModules:
    """SupCon pre-training of fresh EC modules on ``data.train`` with ``original`` frozen (see module doc).
    ``loop_options``: the run options as ``LoopConfig`` fields (``RunContext.loop_options()``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + 2)
        modules = build_ec_modules(original, with_blocks=True, extra_points=0)
    params = [p for br in modules.branches for p in br.blocks.parameters()]
    opt = torch.optim.SGD(params, lr=s.pretrain_lr, momentum=s.pretrain_momentum, weight_decay=s.pretrain_weight_decay)
    gen = torch.Generator().manual_seed(seed + 77)
    original.eval()

    def loss_fn(batch, _):
        x, y = batch
        modules.train()
        v1, v2 = two_views(x, gen, s, bool(getattr(data, "hflip", False)))
        with torch.no_grad():
            _, feats, _ = capture_features(original, modules, torch.cat([v1, v2]))
        yy = torch.cat([y, y])
        loss = x.new_zeros((), dtype=torch.float32)
        for br, f in zip(modules.branches, feats):
            emb = br.embed(f)
            loss = loss + supcon_loss(F.normalize(emb.float(), dim=1), yy, s.pretrain_temperature,
                                      s.pretrain_temperature)
        return loss

    cfg = LoopConfig(batch_size=s.pretrain_batch_size, max_epochs=s.pretrain_epochs, max_steps=s.pretrain_max_steps,
                     patience=None, seed=seed, progress=progress, desc="ec_modules SupCon",
                     **{**(loop_options or {}), "amp": amp or bool((loop_options or {}).get("amp"))})
    fit(params_owner=modules, trainable=params, optimizer=opt, dataset=data.train, cfg=cfg, loss_fn=loss_fn,
        val_fn=None, state_path=state_path, generators={"aug": gen}, device=device, fingerprint=fingerprint)
    modules.eval()
    return modules


def _load_modules(path: Path, modules: ECModules) -> None:
    tensors, meta = load_tensors(path)
    want = json.loads(json.dumps(modules.config.get("points")))  # tuples -> lists, as stored
    if meta.get("ec_modules", {}).get("points") != want:
        raise ValueError(f"{path}: EC modules were built for another layout ({meta.get('ec_modules', {}).get('model')}); "
                         f"delete the file to pre-train again for this model")
    missing, unexpected = modules.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: EC module tensors do not match: missing {missing[:4]}, unexpected {unexpected[:4]}; "
                         "delete the file to pre-train again")


def prepare_ec_modules(u: UnlearnContext, model: nn.Module, s: ECSettings) -> ECModules:
    """EC modules for unlearning ``model`` (a copy of ``u.original``): pre-trained branches from the run
    dir (pre-training them first if the file is missing), extended by the ablation's extra points; or,
    with ``use_modules=False``, pooling-only points (nothing to pre-train)."""
    def build(m: nn.Module, salt: int, **kw) -> ECModules:
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG untouched
            torch.manual_seed(u.run.seed * 1009 + salt)
            return build_ec_modules(m, **kw)

    if not s.use_modules:
        return build(model, 1, with_blocks=False, extra_points=s.extra_points)
    path = ec_modules_path(u.run.run_dir, s)
    orig_digest = artefact_meta(u.run.run_dir / "original.safetensors").get("digest")
    if path.exists() and artefact_meta(path).get("original") == orig_digest:
        base = build(u.original, 2, with_blocks=True, extra_points=0)
        _load_modules(path, base)
    else:  # missing, or pre-trained on another original model (stale)
        t0 = time.perf_counter()
        base = pretrain_ec_modules(u.original, u.data, s, state_path=u.run.state_dir / f"{path.stem}.pretrain.pt",
                                   device=u.device, seed=u.run.seed, progress=u.run.progress, fingerprint=orig_digest,
                                   loop_options=u.run.loop_options())
        save_tensors(base.state_dict(), path, {"ec_modules": base.config, "pretrain": _pretrain_config(s),
                                               "seconds": time.perf_counter() - t0, "original": orig_digest})
    if not s.extra_points:
        return base
    full = build(model, 3, with_blocks=True, extra_points=s.extra_points)
    missing, unexpected = full.load_state_dict(base.state_dict(), strict=False)
    n = len(base.branches)
    if unexpected or any(not k.startswith("branches.") or int(k.split(".")[1]) < n for k in missing):
        raise RuntimeError(f"EC: extending the pre-trained modules failed: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return full


# -------------------------------------------------------------------------------- the batches
class OmegaBatches(PairedBatches):
    """Forget-driven batches with CU/EC's omega: forget batch i // omega paired with retain batch i, so each
    forget batch is used for ``omega`` consecutive steps, each with a fresh retain batch (the retain
    permutation is cycled). Deterministic in (seed, epoch): resumes mid-epoch exactly."""

    def __init__(self, forget, retain, batch_size: int, retain_batch_size: int, omega: int = 2, seed: int = 0) -> None:
        if omega < 1:
            raise ValueError(f"omega must be >= 1, got {omega}")
        if not retain:
            raise ValueError("OmegaBatches: the retain set is empty")
        super().__init__(forget, retain, batch_size, retain_batch_size, omega, "forget", seed)

    def __len__(self) -> int:
        return math.ceil(len(self.forget) / self.bf) * self.omega

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        pf = self._perm(len(self.forget), epoch, 1)
        pr = self._perm(len(self.retain), epoch, 2)
        nf = len(self.forget)
        for i in range(start, len(self)):
            fi = i // self.omega
            f_idx = pf[fi * self.bf: min(nf, (fi + 1) * self.bf)]
            yield {"forget": self._fetch(self.forget, f_idx), "retain": self._fetch(self.retain, _cyc(pr, i * self.br, self.br))}


# ------------------------------------------------------------------------------------- method
@register_method("ec")
class EraseAtTheCore(UnlearningMethod):
    """EC (see the module docstring): SupCon-pre-trained CDS modules, then multi-layer L_CU + L_CE."""

    @dataclass
    class Hparams(UnlearnHparams, ECSettings):
        epochs: int = 5
        lr: float = 0.01
        optimizer: str = "sgd"
        momentum: float = 0.9
        weight_decay: float = 5e-4
        batch_size: int = 64
        omega: int = 2

    @classmethod
    def presets(cls) -> dict[str, dict]:
        # EC Table 10 (= the defaults): tau 0.07, omega 2, lambda_CU = lambda_CE = 1.5, w = (0.2, 0.4, 0.8, 1.0)
        return {"ec_table10": {"tau": 0.07, "omega": 2, "lambda_cu": 1.5, "lambda_ce": 1.5,
                               "layer_weights": (0.2, 0.4, 0.8, 1.0)}}

    def settings(self) -> ECSettings:
        return ECSettings.from_hparams(self.hp)

    def step_loss(self, net: ECNet, batch: dict, weights: Sequence[float], s: ECSettings) -> Tensor:
        """Eq. 3 for one (B_f, B_r) pair: one forward of ``cat(B_f, B_r)``."""
        xf, _ = batch["forget"]
        xr, yr = batch["retain"]
        out = net(torch.cat([xf, xr]))
        return ec_loss(out, xf.shape[0], yr, weights, s)

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        s = self.settings().for_model(u.run.model_name)
        model = u.copy_original()
        modules = prepare_ec_modules(u, model, s).to(u.device)
        for p in modules.parameters():
            p.requires_grad_(True)
        net = ECNet(model, modules)
        weights = layer_weights_for(s, modules)
        hp = self.hp
        batches = OmegaBatches(u.forget_set(), u.retain_set(), hp.batch_size, hp.retain_batch_size or hp.batch_size,
                               hp.omega, u.run.seed)

        def loss(batch, _info):
            return self.step_loss(net, batch, weights, s)

        self.stage(u, "ec", net, loss, owner=net, evaluate_model=model, batches=batches, n_batches=len(batches))
        return model
