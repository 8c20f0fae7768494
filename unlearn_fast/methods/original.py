"""``original``: train the model to be unlearned (WF-Net App. A recipe, fitted to the data)."""
from __future__ import annotations

from dataclasses import dataclass

from unlearn_fast.methods.base import Method, MethodOutput, RunContext
from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.supervised import PAPER_RECIPE, ClassifierRecipe, train_classifier
from unlearn_fast.models.io import load_model, save_model


def stage_record(res, sched) -> dict:
    """What a finished training stage reports: steps, epochs, floor, early stop, time, adaptations."""
    return {"steps": int(res.steps), "epochs": float(res.epochs), "min_steps": int(sched.min_steps),
            "stopped_early": bool(res.stopped_early), "seconds": float(res.seconds), "notes": list(sched.notes),
            "batch_size": int(sched.batch_size)}


@register_method("original")
class Original(Method):
    """Trains ``ctx.model_name`` on the full train split; writes ``original.safetensors`` (reused while
    its fingerprint - data, model, seed, recipe - matches)."""

    @dataclass
    class Hparams(ClassifierRecipe):
        pass

    @classmethod
    def presets(cls):
        return {"paper": dict(PAPER_RECIPE)}

    def run(self, ctx: RunContext) -> MethodOutput:
        out = ctx.run_dir / "original.safetensors"
        hp = {"preset": self.preset, **self.hparams()}
        fp = ctx.fingerprint("original", hp)
        if ctx.current(out, fp):
            return MethodOutput(load_model(out, ctx.device), {"original": out}, {"skipped": "exists"})
        ctx.seed_method("original")
        model = ctx.new_model()
        res, sched = train_classifier(model, ctx.model_name, ctx.data.train, ctx.data.val, self.hp,
                                      hflip_default=ctx.data.hflip, device=ctx.device, seed=ctx.seed,
                                      state_path=ctx.state_dir / "original.pt", desc="original",
                                      progress=ctx.progress, log_path=ctx.run_dir / "log.csv", fingerprint=fp,
                                      loop_options=ctx.loop_options())
        stage = stage_record(res, sched)
        save_model(model, out, best_val_acc=res.best_score, epochs=res.epochs, seconds=res.seconds,
                   fingerprint=fp, hparams=hp, stages={"original": stage})
        return MethodOutput(model, {"original": out}, {"val_acc": res.best_score, "stages": {"original": stage}})
