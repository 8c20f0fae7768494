"""``retrain``: the gold standard - the original recipe without class c, for each class c."""
from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from unlearn_fast.methods.base import Method, MethodOutput, RunContext
from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.supervised import ClassifierRecipe, train_classifier
from unlearn_fast.models.io import load_model, save_model


def retrain_path(run_dir, cls: int):
    return run_dir / "retrain" / f"c{cls}.safetensors"


@register_method("retrain")
class Retrain(Method):
    """One model per class in ``classes`` (default: every class), each trained without that class
    on train and val (WF-Net App. A). Writes ``retrain/c<k>.safetensors``; finished classes are skipped
    on resume, an interrupted class continues from its checkpoint."""

    @dataclass
    class Hparams(ClassifierRecipe):
        classes: list[int] | None = None

    def run(self, ctx: RunContext) -> MethodOutput:
        classes = self.hp.classes if self.hp.classes is not None else list(range(ctx.data.num_classes))
        recipe = ClassifierRecipe(**{k: v for k, v in self.hparams().items() if k != "classes"})
        models, paths, info = {}, {}, {}
        for c in tqdm(classes, desc="retrain", disable=not ctx.progress):
            path = retrain_path(ctx.run_dir, c)
            if path.exists():
                models[c] = load_model(path, ctx.device)
            else:
                model = ctx.new_model()
                res = train_classifier(model, ctx.model_name, ctx.data.subset("train", exclude=[c]),
                                       ctx.data.subset("val", exclude=[c]), recipe, hflip_default=ctx.data.hflip,
                                       device=ctx.device, seed=ctx.seed + 1000 * (c + 1),
                                       state_path=ctx.state_dir / f"retrain_c{c}.pt", desc=f"retrain c{c}",
                                       progress=ctx.progress)
                save_model(model, path, forgotten_class=c, best_val_acc=res.best_score, seconds=res.seconds)
                info[c] = {"val_acc": res.best_score, "seconds": res.seconds}
                models[c] = model
            paths[f"retrain_c{c}"] = path
        return MethodOutput(models, paths, info)
