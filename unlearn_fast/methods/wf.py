"""``wf``: WF-Net untraining of every class in one round (WF-Net Alg. 2, Eq. 3, Sec. 4.3).

Each micro-batch of B samples is split in halves. The first half unlearns: each image runs with the
gate row of its own class and gives S_u = CE. The second half retains: it runs chi times, each time
with a random gate row *other than its own class* ("every class will randomly retain on one of the
other rows", Sec. 3.4), and S_r is the mean CE over the chi x B/2 predictions. The loss is

    L = lambda0 * S_r + lambda1 / S_u + lambda2 * R(1 - alpha)

with R the mean of ``1 - sigmoid(alpha)`` within each layer, then over layers (Sec. 3.4). The
forget half and the chi retain copies run as ONE forward pass with mixed gate labels. Alphas start
at 3 and are clipped to [-3, 3] after every optimizer step (App. A). The original weights and
BatchNorm statistics stay frozen.

Defaults vs the paper (``preset="paper"``): the paper states lr 100 but not the optimizer. Run with
SGD at lr 100 (DESIGN §8, measured on Fashion-MNIST/ResNet-18) it left 2 of 10 classes unforgotten,
while Adam at lr 0.1 forgot all 10; the defaults are therefore Adam, lr 0.1, and the paper's batch
128 x 16-step accumulation, chi 3 and patience 10 on a validation score evaluated 5 times per epoch
(paper lambdas (1,10,1) CNN / (1,100,1) ViT; the CNN default is (1,2,1), see the study below). With
``select="loss"`` the validation score is the same L on the validation split with a fixed seed for the
random retain rows, so successive evaluations are comparable. ``untrain_split="val"`` untrains on the validation split instead of the training set
(WF Table 3); early stopping then uses a held-out fifth of it.

Fidelity levers (issue 13; study and commands in docs/wf_fidelity.md, ``preset="paper"`` = all off):
``select`` (best state by validation loss or by :func:`gate_selection_score`), ``forget_stop`` (lambda
scheduling: forgotten samples leave the forget term), ``reg_form`` / ``reg_layer_weights``,
``forget_frac`` / ``chi`` (sampling), ``gate_layers`` / ``gate_bias`` (what the gates cover),
``alpha_init`` / ``alpha_clip`` (gate ceiling), ``gate_norm`` (unit gates: the effective gate is
``sigmoid(alpha) / sigmoid(alpha_init)``, so the gated model starts as the original model instead of one
whose every layer is scaled by sigmoid(3) = 0.95), ``polish_steps`` (retain polish, gates only open).
Defaults chosen from these rows of the study (Adam 0.1, same original per set,
``python bench/wf_fidelity_study.py --data SET --levers ...``; 10 classes: mnist5k 16 px small_cnn width 16;
48 classes: glyphs:48:100 16 px small_cnn width 48):

    lever                                 classes  orig   mean Acc_r   worst row   max row drop   max Acc_f   steps
    paper levers                          10       94.8   71.6         60.5        34.7           0.0         168
    forget_stop=1 + hmean                 10       94.8   90.7         83.8        11.3           0.0         168
    + gate_norm                           10       94.8   91.9         88.8         6.3           0.0         168
    + gate_norm, longer (patience 10)     10       94.8   94.2         93.0         1.8           0.0         420
    + gate_norm, longer                   48       98.7   94.4         89.5         9.3           0.0         390
    + gate_norm, longer, lambdas (1,3,1)  48       98.7   96.6         93.3         5.4           0.0         390
    + gate_norm, longer, lambdas (1,2,1)  48       98.7   97.0         94.7         4.0           0.0         390   <- defaults
    + gate_norm, longer, lambdas (1,2,1)  10       94.8   94.5         93.4         1.8           1.0         420   <- defaults

i.e. ``select="hmean"``, ``forget_stop=1.0``, ``gate_norm=True`` and lambdas (1, 2, 1) for CNNs (the
paper's (1, 10, 1) closes filters the other classes share: -4.3 points at 48 classes), with the paper's
budget (100 epochs, patience 10); every other lever keeps the paper's value. ViTs keep the paper's
(1, 100, 1): no ViT row was measured on this CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from unlearn_fast import distributed as ddp
from unlearn_fast.data.pipeline import eval_loader
from unlearn_fast.methods.base import Method, MethodOutput, RunContext, artefact_meta
from unlearn_fast.methods.loop import LoopConfig, fit
from unlearn_fast.methods.original import stage_record
from unlearn_fast.methods.schedule import fit_schedule
from unlearn_fast.methods.registry import register_method
from unlearn_fast.models import model_family
from unlearn_fast.models.io import load_model

DEFAULT_CNN_LAMBDAS = (1.0, 2.0, 1.0)   # docs/wf_fidelity.md, unit_gate_long_l2 rows (10 and 48 classes)
from unlearn_fast.nn import WFModel, save_wf, wrap
from unlearn_fast.nn.wf_layers import _WFLayer
from unlearn_fast.nn.wrap import gate_summary

__all__ = ["WF", "wf_loss", "gate_selection_score", "gate_regularizer", "gated_layers"]


GATE_LAYERS = ("all", "skip_first", "last")
REG_FORMS = ("layer_mean", "sqrt")
SELECT = ("loss", "hmean")
# the paper's behaviour for every fidelity lever (part of preset="paper")
PAPER_LEVERS = {"alpha_init": 3.0, "alpha_clip": 3.0, "select": "loss", "forget_stop": None, "forget_frac": 0.5, "reg_form": "layer_mean",
                "reg_layer_weights": None, "gate_layers": "all", "gate_bias": True, "polish_steps": 0,
                "gate_norm": False}


def default_lambdas(model_name: str, preset: str | None) -> tuple[float, float, float]:
    """(lambda0, lambda1, lambda2) when none are given: the paper's (1,10,1) CNN / (1,100,1) ViT under
    ``preset="paper"``, else (1,2,1) for CNNs (study) and the paper's value for ViTs (not measured here)."""
    if model_family(model_name) == "vit":
        return (1.0, 100.0, 1.0)
    return (1.0, 10.0, 1.0) if preset == "paper" else DEFAULT_CNN_LAMBDAS


def gated_layers(wf: WFModel, which: str = "all") -> list[tuple[str, _WFLayer]]:
    """The WF layers whose gates train: ``all`` (paper), ``skip_first`` (all but the first, whose filters
    every class shares) or ``last`` (the last gated layer only)."""
    layers = list(wf.wf_layers())
    if which == "all":
        return layers
    if which == "skip_first":
        return layers[1:] if len(layers) > 1 else layers
    if which == "last":
        return layers[-1:]
    raise ValueError(f"gate_layers must be one of {GATE_LAYERS}, got {which!r}")


def trainable_alphas(layers: Sequence[tuple[str, _WFLayer]], gate_bias: bool = True) -> list[torch.Tensor]:
    """The alpha tensors that train: ``alpha_w`` of each layer, plus ``alpha_b`` when ``gate_bias``."""
    out = []
    for _, layer in layers:
        out.append(layer.alpha_w)
        if gate_bias and layer.alpha_b is not None:
            out.append(layer.alpha_b)
    return out


def gate_regularizer(layers: Sequence[tuple[str, _WFLayer]], form: str = "layer_mean",
                     layer_weights: Sequence[float] | None = None, gate_bias: bool = True) -> torch.Tensor:
    """R of WF Alg. 2 over the trained gates. ``layer_mean`` (paper): mean of ``1 - sigmoid(alpha)`` within
    each layer, then over layers; ``sqrt``: mean of ``sqrt(1 - sigmoid(alpha))`` (concave: a few gates shut
    cost less than many half-shut ones, i.e. sparser rows). ``layer_weights``: one weight per layer
    (normalised to sum 1) instead of the plain mean over layers."""
    if form not in REG_FORMS:
        raise ValueError(f"reg_form must be one of {REG_FORMS}, got {form!r}")
    terms = []
    for _, layer in layers:
        a = torch.cat([t.reshape(-1) for t in trainable_alphas([("", layer)], gate_bias)])
        closed = 1 - torch.sigmoid(a)
        terms.append((closed.clamp_min(1e-12).sqrt() if form == "sqrt" else closed).mean())
    t = torch.stack(terms)
    if layer_weights is None:
        return t.mean()
    w = torch.as_tensor(list(layer_weights), dtype=t.dtype, device=t.device)
    if w.numel() != t.numel():
        raise ValueError(f"reg_layer_weights has {w.numel()} values but {t.numel()} layers are gated")
    return (w * t).sum() / w.sum()


def wf_loss(wf: WFModel, x: torch.Tensor, y: torch.Tensor, chi: int, lambdas: tuple[float, float, float],
            gen: torch.Generator, *, forget_frac: float = 0.5, forget_stop: float | None = None,
            reg: Callable[[], torch.Tensor] | None = None,
            part: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """WF Alg. 2 on one micro-batch ``x [B,...]``, ``y [B]``: returns (L, parts).

    The first ``round(forget_frac * B)`` samples unlearn on their own gate row (paper: half), the rest
    retain on ``chi`` random other rows each. ``forget_stop`` (lambda scheduling; None = paper): a forget
    sample whose class is already forgotten on its row - predicted wrong and true-class probability below
    ``forget_stop / N`` (``1.0``: below chance) - leaves S_u, and the forget term is scaled by the fraction
    of samples still active, so it vanishes once every class in the batch is forgotten while the retain
    and regulariser terms keep working. ``reg``: the regulariser (default: ``wf.regularizer()``).

    ``part = (start, stop, n)`` (``fit()``'s ``step_ctx["slice"]``): in a process group, ``x`` / ``y``
    (None when empty) are rows ``[start, stop)`` of a global micro-batch of ``n`` rows and the loss is
    :func:`_wf_loss_part`'s surrogate, whose gradients summed over the ranks (each scaled by its share
    ``(stop - start) / n``) are the 1-process gradient. Ignored in 1 process (the code below, unchanged)."""
    if part is not None and ddp.is_distributed():
        return _wf_loss_part(wf, x, y, chi, lambdas, gen, forget_frac, forget_stop, reg, part)
    n_cls = wf.num_classes
    h = int(round(x.shape[0] * forget_frac))
    h = min(max(h, 1), x.shape[0] - 1)
    if x.shape[0] < 2:
        raise ValueError("wf_loss needs at least 2 samples per micro-batch")
    x_u, y_u, x_r, y_r = x[:h], y[:h], x[h:], y[h:]
    shifts = torch.randint(1, max(n_cls, 2), (chi, y_r.shape[0]), generator=gen).to(y.device)
    rows_r = (y_r.unsqueeze(0) + shifts) % n_cls  # [chi, B-h], never the sample's own class
    xs = torch.cat([x_u] + [x_r] * chi)
    rows = torch.cat([y_u, rows_r.reshape(-1)])
    logits = wf(xs, rows)
    ce_u = F.cross_entropy(logits[:h], y_u, reduction="none")
    s_r = F.cross_entropy(logits[h:], y_r.repeat(chi))
    reg_v = wf.regularizer() if reg is None else reg()
    l0, l1, l2 = lambdas
    if forget_stop is None:
        s_u = ce_u.mean()
        forget_term = l1 / s_u
        active = torch.ones((), device=x.device)
    else:
        with torch.no_grad():
            lu = logits[:h].detach()
            p_true = torch.softmax(lu.float(), 1).gather(1, y_u[:, None]).squeeze(1)
            done = (lu.argmax(1) != y_u) & (p_true < forget_stop / n_cls)
            keep = (~done).float()
            active = keep.mean()
        s_u = (ce_u * keep).sum() / keep.sum().clamp_min(1.0)
        forget_term = l1 * active / s_u.clamp_min(1e-6) if bool(keep.any()) else s_u * 0.0
    loss = l0 * s_r + forget_term + l2 * reg_v
    return loss, {"S_u": ce_u.mean().detach(), "S_r": s_r.detach(), "R": reg_v.detach(), "active": active}


def _wf_loss_part(wf: WFModel, x: torch.Tensor | None, y: torch.Tensor | None, chi: int,
                  lambdas: tuple[float, float, float], gen: torch.Generator, forget_frac: float,
                  forget_stop: float | None, reg: Callable[[], torch.Tensor] | None,
                  part: tuple[int, int, int]) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`wf_loss` of one rank's slice ``[lo, hi)`` of a global micro-batch of ``n`` rows, exact.

    Forget vs retain by global index (< h = round(forget_frac n)); the retain shifts are drawn for all
    n - h global retain rows from ``gen`` (identical on every rank: a shared generator) and sliced. The
    loss is a function of global sums of per-sample terms, L = l0 C_r / (chi (n - h)) + f(C_u, K) + l2 R
    (C_r: retain CE sum, C_u: forget CE sum, keep-masked with ``forget_stop``, K: kept count). One SUM
    all-reduce of the detached local sums gives the global ones; with ``tot(c) = c - c.detach() + C``
    (value C, gradient dc of this rank's part) the terms below have the global value and gradient
    f'(C) dc_r, whose sum over ranks is df. Returned: ``D.detach() + (D - D.detach()) / share + l2 R``
    (D the data terms): value = the 1-process L on every rank; after the loop's share scaling and
    gradient SUM, sum_r dD_r + (sum_r share_r) l2 dR = dL. Every rank must call this for every
    micro-batch (empty slice: x None) - ``fit(collective_loss=True)``."""
    lo, hi, n = part
    if n < 2:
        raise ValueError("wf_loss needs at least 2 samples per micro-batch")
    n_cls = wf.num_classes
    h = min(max(int(round(n * forget_frac)), 1), n - 1)
    shifts = torch.randint(1, max(n_cls, 2), (chi, n - h), generator=gen)  # the 1-process draw, every rank
    reg_v = wf.regularizer() if reg is None else reg()
    dev = reg_v.device
    hu = max(0, min(hi, h) - lo)                    # local forget rows: global [lo, lo + hu)
    r0 = max(lo, h) - h                             # first local retain row's global retain index
    if hi > lo:
        x_u, y_u, x_r, y_r = x[:hu], y[:hu], x[hu:], y[hu:]
        rows_r = (y_r.unsqueeze(0) + shifts[:, r0:r0 + y_r.shape[0]].to(y.device)) % n_cls
        logits = wf(torch.cat([x_u] + [x_r] * chi), torch.cat([y_u, rows_r.reshape(-1)]))
        ce_u = F.cross_entropy(logits[:hu], y_u, reduction="none")
        c_r = F.cross_entropy(logits[hu:], y_r.repeat(chi), reduction="sum")
        with torch.no_grad():
            lu = logits[:hu].detach()
            if forget_stop is None:
                keep = torch.ones_like(ce_u)
            else:
                p_true = torch.softmax(lu.float(), 1).gather(1, y_u[:, None]).squeeze(1)
                keep = (~((lu.argmax(1) != y_u) & (p_true < forget_stop / n_cls))).float()
    else:
        ce_u = keep = torch.zeros(0, device=dev)
        c_r = torch.zeros((), device=dev)
    c_u, c_k = ce_u.sum(), (ce_u * keep).sum()
    g_u, g_k, g_keep, g_r = ddp.sum_across_ranks(
        torch.stack([c_u.detach(), c_k.detach(), keep.sum(), c_r.detach()]).double().cpu().tolist())

    def tot(c: torch.Tensor, glob: float) -> torch.Tensor:
        return c - c.detach() + glob

    l0, l1, l2 = lambdas
    s_r = tot(c_r, g_r) / (chi * (n - h))
    if forget_stop is None:
        forget_term = l1 / (tot(c_u, g_u) / h)
        active = torch.ones((), device=dev)
    else:
        active = torch.tensor(g_keep / h, dtype=torch.float32, device=dev)
        s_u = tot(c_k, g_k) / max(g_keep, 1.0)
        forget_term = l1 * active / s_u.clamp_min(1e-6) if g_keep > 0 else s_u * 0.0
    data = l0 * s_r + forget_term
    share = (hi - lo) / n
    if share > 0:
        loss = data.detach() + (data - data.detach()) / share + l2 * reg_v
    else:  # not backpropagated (fit() skips share 0); the value only
        loss = data.detach() + l2 * reg_v.detach()
    return loss, {"S_u": torch.tensor(g_u / h, device=dev), "S_r": s_r.detach(), "R": reg_v.detach(), "active": active}


@torch.no_grad()
def gate_selection_score(wf: WFModel, dataset, device: torch.device, rows_per_image: int = 8, seed: int = 0,
                         batch_size: int = 512) -> tuple[float, list[float], list[float]]:
    """Model selection by what WF should achieve, on ``dataset`` (the validation split).

    Each image runs with its own gate row (forget) and with ``rows_per_image`` other rows, drawn once
    from ``seed`` (all other rows when there are fewer), so successive calls are comparable. Per row c:
    Acc_f (own class) and Acc_r (other classes) in %, and H_c = H-Mean(100 - Acc_f, Acc_r). The score is
    ``(mean_c H_c + min_c H_c) / 2``: the average row and the worst row count alike. Rows without a
    sample score NaN and are left out. Returns (score, acc_f per row, acc_r per row)."""
    n = wf.num_classes
    k = min(rows_per_image, n - 1)
    cor = torch.zeros(2, n, dtype=torch.float64)
    tot = torch.zeros(2, n, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    img_bs = max(1, batch_size // (k + 1))
    for x, y in eval_loader(dataset, img_bs):  # workers for lazily decoded data (data.pipeline)
        b = y.shape[0]
        other = torch.rand(b, n - 1, generator=g).argsort(1)[:, :k] + 1   # distinct shifts in 1..n-1
        rows = torch.cat([y[:, None], (y[:, None] + other) % n], 1)         # [b, k+1]
        xs = x.to(device).repeat_interleave(k + 1, 0)
        pred = wf(xs, rows.reshape(-1).to(device)).argmax(1).cpu()
        ok = (pred == y.repeat_interleave(k + 1)).double()
        r = rows.reshape(-1)
        is_f = (r == y.repeat_interleave(k + 1)).long()
        key = (1 - is_f) * n + r                                           # 0..n-1 forget, n..2n-1 retain
        cor += torch.bincount(key, weights=ok, minlength=2 * n).view(2, n)
        tot += torch.bincount(key, minlength=2 * n).view(2, n).double()
    acc = 100 * cor / tot.clamp_min(1)
    acc[tot == 0] = float("nan")
    acc_f, acc_r = acc[0], acc[1]
    f, r = 100 - acc_f, acc_r
    h = torch.where((f > 0) & (r > 0), 2 * f * r / (f + r), torch.zeros_like(f))
    h = h[~torch.isnan(acc_f) & ~torch.isnan(acc_r)]
    score = float((h.mean() + h.min()) / 2) if h.numel() else float("nan")
    return score, acc_f.tolist(), acc_r.tolist()


OPEN = 30.0  # alpha of a gate that does not train: sigmoid(30) == 1 in fp32, the original layer exactly


@register_method("wf")
class WF(Method):
    """WF-Net untraining (all classes, one round). Needs ``original.safetensors`` in the run directory.

    Fidelity levers (defaults chosen in docs/wf_fidelity.md; ``preset="paper"`` turns every one off)."""

    @dataclass
    class Hparams:
        optimizer: str = "adam"               # "adam" | "sgd"
        lr: float = 0.1
        momentum: float = 0.0                 # SGD only
        betas: tuple[float, float] = (0.9, 0.999)  # Adam only
        batch_size: int = 128
        grad_accum: int = 16
        chi: int = 3                          # label expansion: retain copies per retain sample (Alg. 2)
        lambdas: tuple[float, float, float] | None = None   # None: (1,2,1) CNN (study) / (1,100,1) ViT (paper)
        alpha_init: float = 3.0               # gate start (paper 3: sigmoid(3) = 0.953 scales every gated layer; 6 -> 0.998)
        alpha_clip: float = 3.0               # alphas clipped to [-alpha_clip, alpha_clip] after each step (paper 3)
        max_epochs: int = 100
        max_steps: int | None = None
        patience: int | None = 10
        evals_per_epoch: int = 5
        untrain_split: str = "train"          # "train" | "val" (WF Table 3)
        val_batch_size: int = 256
        fit_to_data: bool = True              # fewer accumulation steps / smaller batch on small splits (schedule.py)
        min_steps: int = 50                   # floor of optimizer steps before early stopping may fire (fit_to_data)
        select: str = "hmean"                 # best state by "loss" (paper: validation untraining loss) or "hmean" (gate_selection_score)
        select_rows: int = 8                  # select="hmean": other gate rows each validation image runs with
        forget_stop: float | None = 1.0       # lambda scheduling: drop forget samples already below forget_stop/N probability (None: paper)
        forget_frac: float = 0.5              # share of each micro-batch that unlearns (paper 0.5; the rest retains chi times)
        reg_form: str = "layer_mean"          # regulariser: "layer_mean" (paper) | "sqrt" (sparser rows)
        reg_layer_weights: tuple[float, ...] | None = None  # one weight per gated layer (None: plain mean)
        gate_layers: str = "all"              # gates that train: "all" (paper) | "skip_first" | "last"
        gate_bias: bool = True                # train the bias gates alpha_b too (paper); False keeps biases as they are
        gate_norm: bool = True                # unit gates: effective gate sigmoid(alpha)/sigmoid(alpha_init), 1 at init
        polish_steps: int = 0                 # retain polish after forgetting: optimizer steps where gates may only open
        polish_lr: float | None = None        # polish learning rate (None: lr)

    CHOICES = {"optimizer": ("adam", "sgd"), "untrain_split": ("train", "val"), "select": SELECT,
               "reg_form": REG_FORMS, "gate_layers": GATE_LAYERS}

    @classmethod
    def presets(cls):
        return {"paper": {"optimizer": "sgd", "lr": 100.0, "momentum": 0.0, "fit_to_data": False, "min_steps": 0,
                          **PAPER_LEVERS}}

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        hp = self.hp
        if not 0 < hp.forget_frac < 1:
            raise ValueError(f"wf: hyper-parameter forget_frac must be in (0, 1), got {hp.forget_frac!r}")
        if hp.forget_stop is not None and hp.forget_stop <= 0:
            raise ValueError(f"wf: hyper-parameter forget_stop must be > 0 or null, got {hp.forget_stop!r}")
        if hp.polish_steps < 0:
            raise ValueError(f"wf: hyper-parameter polish_steps must be >= 0, got {hp.polish_steps!r}")
        if hp.select_rows < 1:
            raise ValueError(f"wf: hyper-parameter select_rows must be >= 1, got {hp.select_rows!r}")
        if hp.reg_layer_weights is not None and (not hp.reg_layer_weights or min(hp.reg_layer_weights) < 0
                                                 or sum(hp.reg_layer_weights) <= 0):
            raise ValueError(f"wf: hyper-parameter reg_layer_weights must be non-negative with a positive sum, "
                             f"got {hp.reg_layer_weights!r}")

    def run(self, ctx: RunContext) -> MethodOutput:
        hp = self.hp
        out = ctx.run_dir / "wf.safetensors"
        orig_path = ctx.run_dir / "original.safetensors"
        if not orig_path.exists():
            raise FileNotFoundError(f"{orig_path} is missing: train the original model first (method='original')")
        ctx.seed_method(self.name)
        original = load_model(orig_path, ctx.device)
        wf = wrap(original, ctx.data.num_classes, hp.alpha_init).to(ctx.device)
        if hp.gate_norm:
            wf.gate_scale = 1.0 / float(torch.sigmoid(torch.tensor(hp.alpha_init, dtype=torch.float64)))
        layers = gated_layers(wf, hp.gate_layers)
        ctx.say(gate_summary(wf) + (f" ({len(layers)} of them train: gate_layers={hp.gate_layers!r})"
                                     if len(layers) != len(wf.gated_layers) else ""))
        params = trainable_alphas(layers, hp.gate_bias)
        with torch.no_grad():  # gates that do not train stay fully open: those layers are the original ones
            ids = {id(p) for p in params}
            for a in wf.alpha_parameters():
                if id(a) not in ids:
                    a.fill_(hp.alpha_init if hp.gate_norm else OPEN)
        lambdas = tuple(hp.lambdas) if hp.lambdas is not None else default_lambdas(ctx.model_name, self.preset)
        # the resolved lambdas, not None: a change of the default must not reuse a stale wf.safetensors
        hp_rec = {"preset": self.preset, **self.hparams(), "lambdas": [float(v) for v in lambdas]}
        fp = ctx.fingerprint("wf", hp_rec, {"original": artefact_meta(orig_path).get("digest")})
        if ctx.current(out, fp):
            from unlearn_fast.models.io import load_tensors

            wf.load_state_dict(load_tensors(out)[0], strict=False)
            return MethodOutput(wf, {"wf": out}, {"skipped": "exists"})
        if hp.untrain_split == "train":
            untrain_ds, stop_ds = ctx.data.train, ctx.data.val
        elif hp.untrain_split == "val":
            n = len(ctx.data.val)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed + 5)).tolist()
            k = max(2, n // 5)
            untrain_ds, stop_ds = Subset(ctx.data.val, perm[k:]), Subset(ctx.data.val, perm[:k])
        else:
            raise ValueError(f"untrain_split must be 'train' or 'val', got {hp.untrain_split!r}")

        if hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.betas))
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum)
        else:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {hp.optimizer!r}")
        gen = torch.Generator().manual_seed(ctx.seed + 31)

        def reg() -> torch.Tensor:
            return gate_regularizer(layers, hp.reg_form, hp.reg_layer_weights, hp.gate_bias)

        def loss_fn(batch, step_ctx):
            x, y = batch if batch is not None else (None, None)  # None: this rank's slice is empty
            return wf_loss(wf, x, y, hp.chi, lambdas, gen, forget_frac=hp.forget_frac, forget_stop=hp.forget_stop,
                           reg=reg, part=step_ctx.get("slice"))[0]

        def val_loss() -> float:
            g = torch.Generator().manual_seed(ctx.seed + 97)
            tot, n = 0.0, 0
            with torch.no_grad():
                for x, y in eval_loader(stop_ds, hp.val_batch_size):
                    if x.shape[0] < 2:
                        continue
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    tot += float(wf_loss(wf, x, y, hp.chi, lambdas, g, forget_frac=hp.forget_frac,
                                         forget_stop=hp.forget_stop, reg=reg)[0]) * x.shape[0]
                    n += x.shape[0]
            return tot / max(n, 1)

        def val_score() -> float:
            return gate_selection_score(wf, stop_ds, ctx.device, hp.select_rows, ctx.seed + 97, hp.val_batch_size)[0]

        def clip() -> None:
            with torch.no_grad():
                for a in params:
                    a.clamp_(-hp.alpha_clip, hp.alpha_clip)

        def load_best(sd) -> None:
            wf.load_state_dict({k: v.to(ctx.device) for k, v in sd.items()}, strict=False)

        sched = fit_schedule("wf untrain", len(untrain_ds), batch_size=hp.batch_size, grad_accum=hp.grad_accum,
                             epochs=hp.max_epochs, min_steps=hp.min_steps, min_batch=2,
                             drop_last=len(untrain_ds) > hp.batch_size, adapt=hp.fit_to_data)
        by_loss = hp.select == "loss"
        cfg = LoopConfig(batch_size=sched.batch_size, grad_accum=sched.grad_accum, max_epochs=sched.epochs,
                         max_steps=hp.max_steps, evals_per_epoch=hp.evals_per_epoch, patience=hp.patience,
                         min_steps=sched.min_steps, mode="min" if by_loss else "max", seed=ctx.seed,
                         drop_last=len(untrain_ds) > sched.batch_size, progress=ctx.progress, desc="wf untrain",
                         **ctx.loop_options())
        res = fit(params_owner=wf.alpha_state_dict, trainable=params, optimizer=opt, dataset=untrain_ds, cfg=cfg,
                  loss_fn=loss_fn, val_fn=val_loss if by_loss else val_score, state_path=ctx.state_dir / "wf.pt",
                  generators={"labels": gen}, after_step=clip, device=ctx.device,
                  log_path=ctx.run_dir / "log.csv", load_best=load_best, fingerprint=fp,
                  shared_generators=("labels",), collective_loss=True)
        stage = {**stage_record(res, sched), "grad_accum": sched.grad_accum}
        stages = {"wf untrain": stage}
        seconds = res.seconds
        if hp.polish_steps:
            pol = self._polish(ctx, wf, params, untrain_ds, lambdas, val_score, load_best, sched, fp)
            stages["wf polish"] = pol
            seconds += pol["seconds"]
        info_sel = {"best_val_loss": res.best_score} if by_loss else {"best_val_score": res.best_score}
        save_wf(wf, out, **info_sel, steps=res.steps, seconds=seconds,
                lambdas=list(lambdas), preset=self.preset or "default", fingerprint=fp, hparams=hp_rec,
                stages=stages, inputs={"original": artefact_meta(orig_path).get("digest")})
        return MethodOutput(wf, {"wf": out}, {**info_sel, "steps": res.steps,
                                              "epochs": res.epochs, "seconds": seconds,
                                              "stopped_early": res.stopped_early, "lambdas": list(lambdas),
                                              "stages": stages})

    def _polish(self, ctx: RunContext, wf: WFModel, params: list[torch.Tensor], untrain_ds, lambdas, val_score,
                load_best, sched, fp: str) -> dict:
        """Retain polish: ``polish_steps`` Adam steps on ``lambda0 S_r`` plus the scheduled forget term as a
        guard (it only acts on samples that came back above chance), no regulariser; after every step each
        alpha is clamped to ``[its value after forgetting, alpha_clip]`` - gates may only open. The polished
        state is kept only if its validation score beats the state it started from."""
        hp = self.hp
        floor = [a.detach().clone() for a in params]
        start_state = {k: v.detach().clone().cpu() for k, v in wf.alpha_state_dict().items()}
        start_score = val_score()
        opt = torch.optim.Adam(params, lr=hp.polish_lr if hp.polish_lr is not None else hp.lr, betas=tuple(hp.betas))
        gen = torch.Generator().manual_seed(ctx.seed + 43)
        stop = hp.forget_stop if hp.forget_stop is not None else 1.0

        def loss_fn(batch, step_ctx):
            x, y = batch if batch is not None else (None, None)  # None: this rank's slice is empty
            return wf_loss(wf, x, y, hp.chi, (lambdas[0], lambdas[1], 0.0), gen, forget_frac=hp.forget_frac,
                           forget_stop=stop, reg=lambda: torch.zeros((), device=ctx.device),
                           part=step_ctx.get("slice"))[0]

        def only_open() -> None:
            with torch.no_grad():
                for a, lo in zip(params, floor):
                    torch.maximum(a, lo, out=a)
                    a.clamp_(max=hp.alpha_clip)

        per_epoch = max(1, sched.steps_per_epoch)
        cfg = LoopConfig(batch_size=sched.batch_size, grad_accum=sched.grad_accum,
                         max_epochs=hp.polish_steps // per_epoch + 2, max_steps=hp.polish_steps,
                         eval_every=max(1, hp.polish_steps // 4), patience=None, mode="max", seed=ctx.seed + 1,
                         drop_last=len(untrain_ds) > sched.batch_size, progress=ctx.progress, desc="wf polish",
                         **ctx.loop_options())
        res = fit(params_owner=wf.alpha_state_dict, trainable=params, optimizer=opt, dataset=untrain_ds, cfg=cfg,
                  loss_fn=loss_fn, val_fn=val_score, state_path=ctx.state_dir / "wf_polish.pt",
                  generators={"labels": gen}, after_step=only_open, device=ctx.device,
                  log_path=ctx.run_dir / "log.csv", load_best=load_best, fingerprint=fp + ":polish",
                  shared_generators=("labels",), collective_loss=True)
        kept = res.best_score > start_score
        if not kept:
            load_best(start_state)
        return {"steps": int(res.steps), "seconds": float(res.seconds), "score_before": float(start_score),
                "score_after": float(res.best_score), "kept": bool(kept)}
