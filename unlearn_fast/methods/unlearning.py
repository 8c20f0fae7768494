"""Shared machinery of the class-unlearning methods (EC and the baselines): the forget request,
paired forget/retain batches, one training stage on the common loop, and model selection by the
H-Mean of forgetting and retaining on the validation split during unlearning.

A method subclasses :class:`UnlearningMethod`, declares its hyper-parameters as a dataclass deriving
from :class:`UnlearnHparams`, and implements ``unlearn(u: UnlearnContext) -> nn.Module``, typically
as one or more :meth:`UnlearningMethod.stage` calls. The base class loads the original model, writes
``<method>.safetensors`` and resumes every stage from ``state/<method>.<stage>.pt``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unlearn_fast.data.pipeline import eval_loader
from unlearn_fast.evaluation.accuracy import predict_logits
from unlearn_fast.evaluation.unlearn_eval import h_mean as hmean  # noqa: F401  (re-exported)
from unlearn_fast.methods.base import Method, MethodOutput, RunContext, artefact_meta
from unlearn_fast.methods.loop import LoopConfig, LoopResult, fit
from unlearn_fast.methods.schedule import fit_schedule
from unlearn_fast.models.io import load_model, save_model

__all__ = ["UnlearnHparams", "UnlearnContext", "UnlearningMethod", "PairedBatches", "hmean", "make_optimizer", "SELECT_BY"]


@dataclass
class UnlearnHparams:
    """Common knobs of every unlearning method (each method overrides the defaults from its card)."""

    epochs: int = 10
    lr: float = 0.01
    optimizer: str = "sgd"                 # "sgd" | "adam" | "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64                   # forget batch (or retain batch for retain-driven stages)
    retain_batch_size: int | None = None   # None: = batch_size
    omega: int = 1                         # retain batches per forget batch
    evals_per_epoch: int = 1               # evaluation during unlearning (validation FA/RA)
    eval_every: int | None = None          # ... or every k optimizer steps (replaces evals_per_epoch)
    select_best: bool = True               # keep the state with the best validation H-Mean
    patience: int | None = None            # early stopping on that score (in evaluations)
    max_steps: int | None = None
    amp: bool = True                       # bf16 autocast on CUDA
    select_by: str = "hmean"               # validation score for the best state / early stopping: see SELECT_BY
    fit_to_data: bool = True               # raise an epoch-defined stage to min_steps optimizer steps on small sets
    min_steps: int = 100                   # floor of optimizer steps per stage (epochs raised; early stop waits)


# Validation scores (all in [0, 1], higher is better) for ``UnlearnHparams.select_by``; FA / RA are the
# forget / retain accuracy and CKA the linear CKA to the original model at the layer before the
# classifier on the validation forget samples - the EC App. B.6 H-Mean terms available on validation.
SELECT_BY = {
    "hmean": "H-Mean(1 - FA, RA)",
    "hmean_cka": "H-Mean(1 - FA, RA, 1 - CKA)",
    "forget": "1 - FA",
    "retain": "RA",
}


def make_optimizer(params, hp: UnlearnHparams, lr: float | None = None) -> torch.optim.Optimizer:
    lr = hp.lr if lr is None else lr
    params = [p for p in params if p.requires_grad] if not isinstance(params, list) or not params or not isinstance(params[0], dict) else params
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay)
    raise ValueError(f"optimizer must be sgd, adam or adamw, got {hp.optimizer!r}")


class PairedBatches:
    """Deterministic paired batches: per step one forget batch and ``omega`` retain batches (concatenated).

    ``drive="forget"``: an epoch is one pass over the forget set; retain batches come from a fresh
    permutation of the retain set, cycled. ``drive="retain"``: one pass over the retain set, the forget
    set cycled. Either side may be None (forget-only / retain-only methods). Order is a pure function of
    (seed, epoch), so ``__call__(epoch, start)`` resumes mid-epoch exactly.
    """

    def __init__(self, forget: Dataset | None, retain: Dataset | None, batch_size: int, retain_batch_size: int,
                 omega: int = 1, drive: str = "forget", seed: int = 0) -> None:
        if drive not in ("forget", "retain"):
            raise ValueError(f"drive must be 'forget' or 'retain', got {drive!r}")
        if (drive == "forget" and not forget) or (drive == "retain" and not retain):
            raise ValueError(f"PairedBatches: the {drive} set is empty")
        self.forget, self.retain, self.bf, self.br, self.omega, self.drive, self.seed = (
            forget, retain, batch_size, retain_batch_size, omega, drive, seed)

    def __len__(self) -> int:
        n, b = (len(self.forget), self.bf) if self.drive == "forget" else (len(self.retain), self.br)
        return math.ceil(n / b)

    def _perm(self, n: int, epoch: int, salt: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7 + salt)
        return torch.randperm(n, generator=g)

    @staticmethod
    def _fetch(ds: Dataset, idx: Tensor) -> tuple[Tensor, Tensor]:
        items = ds.__getitems__(idx.tolist()) if hasattr(ds, "__getitems__") else [ds[i] for i in idx.tolist()]
        xs, ys = zip(*items)
        return torch.stack(list(xs)), torch.as_tensor(ys, dtype=torch.long)

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, tuple[Tensor, Tensor] | None]]:
        pf = self._perm(len(self.forget), epoch, 1) if self.forget else None
        pr = self._perm(len(self.retain), epoch, 2) if self.retain else None
        per_f, per_r = (self.bf, self.br * self.omega) if self.drive == "forget" else (self.bf, self.br)
        for i in range(start, len(self)):
            out: dict[str, Any] = {"forget": None, "retain": None}
            if pf is not None:
                out["forget"] = self._fetch(self.forget, _cyc(pf, i * per_f, per_f))
            if pr is not None:
                out["retain"] = self._fetch(self.retain, _cyc(pr, i * per_r, per_r))
            yield out


def _cyc(perm: Tensor, start: int, n: int) -> Tensor:
    return perm[(torch.arange(start, start + n) % len(perm))]


@dataclass
class UnlearnContext:
    """What an unlearning method sees: the run, the frozen original model and the data of the request."""

    run: RunContext
    original: nn.Module                  # frozen, eval mode
    forget_classes: list[int]
    method_name: str

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def data(self):
        return self.run.data

    @property
    def num_classes(self) -> int:
        return self.run.data.num_classes

    @property
    def retain_classes(self) -> list[int]:
        return [c for c in range(self.num_classes) if c not in set(self.forget_classes)]

    def forget_set(self, split: str = "train") -> Dataset:
        return self.data.subset(split, classes=self.forget_classes)

    def retain_set(self, split: str = "train") -> Dataset:
        return self.data.subset(split, exclude=self.forget_classes)

    def copy_original(self) -> nn.Module:
        m = copy.deepcopy(self.original)
        for p in m.parameters():
            p.requires_grad_(True)
        return m.to(self.device)

    def state_path(self, stage: str):
        return self.run.state_dir / f"{self.method_name}.{stage}.pt"


class UnlearningMethod(Method):
    """Base of every class-unlearning method; see the module docstring."""

    @dataclass
    class Hparams(UnlearnHparams):
        pass

    CHOICES = {"optimizer": ("sgd", "adam", "adamw"), "select_by": tuple(SELECT_BY)}

    # -- to implement ----------------------------------------------------------------------
    def unlearn(self, u: UnlearnContext) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    # -- shared pieces ---------------------------------------------------------------------
    def validation_score(self, u: UnlearnContext, model: nn.Module) -> float:
        """The ``select_by`` score on the validation split, in [0, 1] (default: H-Mean of 1 - FA and RA)."""
        sel = getattr(self.hp, "select_by", "hmean")
        if sel not in SELECT_BY:
            raise ValueError(f"{self.name}: select_by must be one of {sorted(SELECT_BY)}, got {sel!r}")
        logits, y = predict_logits(model, u.data.val, u.device)
        if not len(y):
            return float("nan")
        pred = logits.argmax(1)
        f = torch.isin(y, torch.tensor(u.forget_classes))
        fa = float((pred[f] == y[f]).float().mean()) if f.any() else 0.0
        ra = float((pred[~f] == y[~f]).float().mean()) if (~f).any() else 1.0
        if sel == "forget":
            return 1.0 - fa
        if sel == "retain":
            return ra
        terms = [1.0 - fa, ra]
        if sel == "hmean_cka":
            terms.append(1.0 - self._validation_cka(u, model))
        return hmean(terms)

    def _validation_cka(self, u: UnlearnContext, model: nn.Module) -> float:
        """Linear CKA to the original model at the layer before the classifier, validation forget samples
        (NaN - left out of the H-Mean - when the model is not a created backbone or there are < 2 samples)."""
        from unlearn_fast.evaluation.metrics import LinearCKA
        from unlearn_fast.evaluation.unlearn_eval import penultimate_layer

        fset = u.forget_set("val")
        if len(fset) < 2 or getattr(model, "unlearn_fast_name", None) is None:
            return float("nan")
        cka = LinearCKA(model, u.original, [penultimate_layer(model)])
        try:
            res = cka.run(eval_loader(fset, 512), u.device, progress=False)
        finally:
            cka.remove_hooks()
        return float(res["cka"][0])

    def stage(self, u: UnlearnContext, name: str, model: nn.Module, loss_fn: Callable[[dict, dict], Tensor], *,
              params: Sequence[Tensor] | None = None, optimizer: torch.optim.Optimizer | None = None,
              epochs: int | None = None, drive: str = "forget", forget: Dataset | None | str = "default",
              retain: Dataset | None | str = "default", batch_size: int | None = None, omega: int | None = None,
              owner: nn.Module | Sequence[nn.Module] | None = None, select_best: bool | None = None,
              after_step: Callable[[], None] | None = None, generators: dict[str, torch.Generator] | None = None,
              evaluate_model: nn.Module | None = None,
              batches: Callable[[int, int], Iterator[dict]] | None = None, n_batches: int | None = None,
              min_steps: int | None = None) -> LoopResult:
        """One resumable training stage over paired batches ``{"forget": (x, y) | None, "retain": (x, y) | None}``.

        ``loss_fn(batch, info)`` returns the loss of one step. Evaluation during unlearning runs
        ``evals_per_epoch`` times per epoch; with ``select_best`` the state with the best validation
        H-Mean is restored at the end (EC-style model selection; off = keep the last state).
        ``batches(epoch, start)`` with ``n_batches`` per epoch replaces the paired batches by another
        deterministic batch order (e.g. SalUn's sequential forget-pass-then-retain-pass epochs).
        ``min_steps`` overrides the floor of optimizer steps (``hp.min_steps``; 0 for a stage that is one
        part of an alternating schedule, e.g. SCRUB's max/min epochs).
        """
        hp = self.hp
        params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        opt = optimizer or make_optimizer(params, hp)
        fset = u.forget_set() if forget == "default" else forget
        rset = u.retain_set() if retain == "default" else retain
        bs = batch_size or hp.batch_size
        if batches is None:
            pb = PairedBatches(fset, rset, bs, hp.retain_batch_size or bs, omega or hp.omega, drive, u.run.seed)
            batches, n_batches = pb, len(pb)
        elif not n_batches:
            raise ValueError(f"{self.name} {name}: batches= needs n_batches= (micro-batches per epoch, > 0)")
        sel = hp.select_best if select_best is None else select_best
        eval_m = evaluate_model or model

        def val() -> float:
            s = self.validation_score(u, eval_m)
            model.train()
            return s

        def step(batch, info):
            model.train()
            return loss_fn(batch, info)

        evaluate = sel or hp.patience is not None  # early stopping alone also needs the score
        sched = fit_schedule(f"{self.name} {name}", n_batches, batch_size=1, epochs=epochs if epochs is not None else hp.epochs,
                             min_steps=hp.min_steps if min_steps is None else min_steps, adapt=hp.fit_to_data,
                             min_steps_per_epoch=1)
        cfg = LoopConfig(batch_size=bs, max_epochs=sched.epochs, max_steps=hp.max_steps,
                         evals_per_epoch=hp.evals_per_epoch, eval_every=hp.eval_every, patience=hp.patience,
                         min_steps=sched.min_steps, restore_best=sel, mode="max", seed=u.run.seed,
                         **u.run.loop_options(amp=hp.amp),
                         progress=u.run.progress, desc=self.name if name == self.name else f"{self.name} {name}")
        if owner is not None and not isinstance(owner, nn.Module):
            owner = nn.ModuleList(list(owner))
        res = fit(params_owner=owner if owner is not None else model, trainable=params, optimizer=opt, dataset=None,
                  cfg=cfg, loss_fn=step, val_fn=val if evaluate else None, state_path=u.state_path(name),
                  generators=generators, after_step=after_step, device=u.device, batches=batches, n_batches=n_batches,
                  fingerprint=f"{getattr(self, '_fingerprint', None)}:{name}", log_path=u.run.run_dir / "log.csv")
        model.eval()
        rec = {"steps": int(res.steps), "epochs": float(res.epochs), "min_steps": int(sched.min_steps),
               "max_steps": hp.max_steps, "stopped_early": bool(res.stopped_early), "seconds": float(res.seconds),
               "notes": [n.replace(f"{self.name} {name}: ", "") for n in sched.notes]}
        self.__dict__.setdefault("_stages", {})[name] = rec
        return res

    def run(self, ctx: RunContext) -> MethodOutput:
        if not ctx.forget:
            raise ValueError(f"{self.name}: no forget request; pass forget=[classes] (or 'random:K', 'similar:K:SPEC')")
        if getattr(self.hp, "select_by", "hmean") not in SELECT_BY:
            raise ValueError(f"{self.name}: select_by must be one of {sorted(SELECT_BY)}, got {self.hp.select_by!r}")
        out = ctx.run_dir / f"{self.name}.safetensors"
        orig_path = ctx.run_dir / "original.safetensors"
        if not orig_path.exists():
            raise FileNotFoundError(f"{orig_path} is missing: train the original model first (method='original')")
        hp_rec = {"preset": self.preset, **self.hparams()}
        inputs = {"original": artefact_meta(orig_path).get("digest"), "forget": sorted(int(c) for c in ctx.forget)}
        self._fingerprint = ctx.fingerprint(self.name, hp_rec, inputs)
        self._stages: dict[str, dict] = {}
        if ctx.current(out, self._fingerprint):
            meta = artefact_meta(out)
            return MethodOutput(load_model(out, ctx.device), {self.name: out},
                                {"skipped": "exists", "stages": meta.get("stages", {})})
        ctx.seed_method(self.name)
        original = load_model(orig_path, ctx.device)
        for p in original.parameters():
            p.requires_grad_(False)
        u = UnlearnContext(ctx, original, sorted(int(c) for c in ctx.forget), self.name)
        model = self.unlearn(u)
        save_model(model, out, method=self.name, forget=u.forget_classes, preset=self.preset or "default",
                   fingerprint=self._fingerprint, hparams=hp_rec, inputs=inputs, stages=self._stages)
        return MethodOutput(model, {self.name: out}, {"forget": u.forget_classes, "stages": dict(self._stages)})
