"""``original``: train the model to be unlearned (WF-Net App. A recipe)."""
from __future__ import annotations

from dataclasses import dataclass

from unlearn_fast.methods.base import Method, MethodOutput, RunContext
from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.supervised import ClassifierRecipe, train_classifier
from unlearn_fast.models.io import load_model, save_model


@register_method("original")
class Original(Method):
    """Trains ``ctx.model_name`` on the full train split; writes ``original.safetensors``."""

    @dataclass
    class Hparams(ClassifierRecipe):
        pass

    def run(self, ctx: RunContext) -> MethodOutput:
        out = ctx.run_dir / "original.safetensors"
        if out.exists():
            return MethodOutput(load_model(out, ctx.device), {"original": out}, {"skipped": "exists"})
        ctx.seed_method("original")
        model = ctx.new_model()
        res = train_classifier(model, ctx.model_name, ctx.data.train, ctx.data.val, self.hp,
                               hflip_default=ctx.data.hflip, device=ctx.device, seed=ctx.seed,
                               state_path=ctx.state_dir / "original.pt", desc="original",
                               progress=ctx.progress, log_path=ctx.run_dir / "log.csv")
        save_model(model, out, best_val_acc=res.best_score, epochs=res.epochs, seconds=res.seconds)
        return MethodOutput(model, {"original": out},
                            {"val_acc": res.best_score, "epochs": res.epochs, "seconds": res.seconds})
