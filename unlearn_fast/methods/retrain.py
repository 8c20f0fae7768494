"""``retrain``: the gold standard - the original recipe without the forgotten classes.

Two modes:

* per class (default, WF-Net App. A): one model per class c in ``classes`` (default: every class),
  each trained without c on train and val -> ``retrain/c<k>.safetensors`` (the WF evaluator reads these);
* ``together=True``: ONE model trained without all classes of the forget request together
  (``classes``, else the run's forget request ``ctx.forget``) -> ``retrain/f<c1>-<c2>-....safetensors``,
  the reference of a multi-class unlearning run (EC's Retrained row). A one-class request is the
  per-class model ``retrain/c<k>.safetensors`` (same data, same seed).

Finished models are skipped on resume; an interrupted one continues from its checkpoint in ``state/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from unlearn_fast.methods.base import Method, MethodOutput, RunContext
from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.original import stage_record
from unlearn_fast.methods.supervised import PAPER_RECIPE, ClassifierRecipe, train_classifier
from unlearn_fast.models.io import load_model, save_model

__all__ = ["Retrain", "retrain_path", "retrain_together_path"]


def retrain_path(run_dir, cls: int) -> Path:
    """``run_dir/retrain/c<cls>.safetensors``: the model trained without class ``cls``."""
    return Path(run_dir) / "retrain" / f"c{cls}.safetensors"


def retrain_together_path(run_dir, classes: Sequence[int]) -> Path:
    """The model trained without all of ``classes``: ``retrain/c<k>`` for one class, else ``retrain/f<c1>-<c2>-...``."""
    cs = sorted({int(c) for c in classes})
    if not cs:
        raise ValueError("retrain_together_path: no classes")
    if len(cs) == 1:
        return retrain_path(run_dir, cs[0])
    return Path(run_dir) / "retrain" / ("f" + "-".join(str(c) for c in cs) + ".safetensors")


@register_method("retrain")
class Retrain(Method):
    """See the module docstring. ``classes``: the classes to leave out (per class: one model each;
    together: one model without all of them); ``together``: one model for the whole forget request."""

    @dataclass
    class Hparams(ClassifierRecipe):
        classes: list[int] | None = None
        together: bool = False

    @classmethod
    def presets(cls):
        return {"paper": dict(PAPER_RECIPE)}

    def _recipe(self) -> ClassifierRecipe:
        return ClassifierRecipe(**{k: v for k, v in self.hparams().items() if k not in ("classes", "together")})

    def _train_without(self, ctx: RunContext, exclude: list[int], path: Path, seed: int, tag: str) -> tuple:
        hp = {"preset": self.preset, **self._recipe().__dict__}
        fp = ctx.fingerprint("retrain", hp, {"exclude": exclude})
        if ctx.current(path, fp):
            return load_model(path, ctx.device), None
        ctx.seed_method(f"retrain_{tag}")
        model = ctx.new_model(seed)  # its own init: retrained from scratch, not from the original's init
        res, sched = train_classifier(model, ctx.model_name, ctx.data.subset("train", exclude=exclude),
                                      ctx.data.subset("val", exclude=exclude), self._recipe(),
                                      hflip_default=ctx.data.hflip, device=ctx.device, seed=seed,
                                      state_path=ctx.state_dir / f"retrain_{tag}.pt", desc=f"retrain {tag}",
                                      progress=ctx.progress, log_path=ctx.run_dir / "log.csv", fingerprint=fp,
                                      loop_options=ctx.loop_options())
        meta = {"forgotten_class": exclude[0]} if len(exclude) == 1 else {"forgotten_classes": exclude}
        stage = stage_record(res, sched)
        save_model(model, path, **meta, best_val_acc=res.best_score, seconds=res.seconds, fingerprint=fp,
                   hparams=hp, stages={f"retrain {tag}": stage})
        return model, {"val_acc": res.best_score, "seconds": res.seconds, "stages": {f"retrain {tag}": stage}}

    def run(self, ctx: RunContext) -> MethodOutput:
        if self.hp.together:
            classes = self.hp.classes if self.hp.classes is not None else ctx.forget
            if not classes:
                raise ValueError("retrain with together=True needs the forget request: pass forget=[classes] "
                                 "(or classes=[...]) to train the model without all of them")
            cs = sorted({int(c) for c in classes})
            bad = [c for c in cs if not 0 <= c < ctx.data.num_classes]
            if bad or len(cs) >= ctx.data.num_classes:
                raise ValueError(f"retrain: classes {cs} must be a proper subset of 0..{ctx.data.num_classes - 1}")
            path = retrain_together_path(ctx.run_dir, cs)
            if len(cs) == 1:
                model, info = self._train_without(ctx, cs, path, ctx.seed + 1000 * (cs[0] + 1), f"c{cs[0]}")
            else:
                tag = "f" + "-".join(map(str, cs))
                model, info = self._train_without(ctx, cs, path, ctx.seed + 7919, tag)
            return MethodOutput(model, {path.stem: path}, {path.stem: info} if info else {"skipped": "exists"})
        classes = self.hp.classes if self.hp.classes is not None else list(range(ctx.data.num_classes))
        models, paths, info = {}, {}, {}
        for c in tqdm(classes, desc="retrain", disable=not ctx.progress):
            path = retrain_path(ctx.run_dir, c)
            models[c], i = self._train_without(ctx, [c], path, ctx.seed + 1000 * (c + 1), f"c{c}")
            if i is not None:
                info[c] = i
            paths[f"retrain_c{c}"] = path
        return MethodOutput(models, paths, info)
