"""``cola``: COLA, COLlapse-and-Align - a two-stage, feature-level unlearner (card 2).

**This is a reconstruction.** The COLA paper's body could not be read; card 2 rebuilds the method
from summaries and reviews, and its defaults were not recovered. What is implemented:

1. Collapse: a fresh projection head ``Linear(d, d) - ReLU - Linear(d, proj_dim)`` on the pooled
   feature ``phi`` (the classifier head's input); the encoder and the head are trained with the
   supervised contrastive loss (card 4, ``temperature`` = ``base_temperature`` = 0.07) on **retain
   samples only**, two augmented views per image. The forget classes lose their own cluster and
   fall into retain-class clusters. The head is dropped afterwards.
2. Align: ``CE(fc(phi(x)), y)`` on D_r over all parameters (encoder and classifier).

Choices of this reconstruction (all parameters): SGD (momentum 0.9, wd 5e-4); ``collapse_epochs``
passes at ``collapse_lr``, then ``epochs`` passes at ``lr``; views are random translations by up to
``shift`` of the image side (zero fill) plus, when the dataset's recipe flips (CIFAR) or ``hflip`` says
so, random horizontal flips - a light stand-in for SimCLR augmentation that also suits small digits.
The collapse stage keeps its last state (the classifier is stale there, so validation H-Mean says
little); the align stage selects by validation H-Mean (``select_best``). The SupCon loss is
:func:`unlearn_fast.ops.supcon.supcon_loss` (NaN-safe for anchors without a positive).

Both stages are retain-only (``forget=None``); the ``cola+ec`` plug-in, which wraps ``self.stage``'s
loss, draws forget batches for its own terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.data.augment import random_view
from unlearn_fast.methods.baselines.duck import features_and_logits, head_module
from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod, make_optimizer
from unlearn_fast.ops.supcon import supcon_loss

__all__ = ["Cola", "random_view"]


@register_method("cola")
class Cola(UnlearningMethod):
    """COLA (card 2, a reconstruction); see the module docstring."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 5                   # align passes over D_r
        lr: float = 0.01                  # align lr
        optimizer: str = "sgd"
        momentum: float = 0.9
        weight_decay: float = 5e-4
        batch_size: int = 128             # retain batch of both stages
        collapse_epochs: int = 5
        collapse_lr: float = 0.05
        temperature: float = 0.07
        base_temperature: float = 0.07
        proj_dim: int = 128
        shift: float = 0.125
        hflip: bool | None = None         # None: the dataset's recipe

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {"ec_table10": {}}   # EC Table 10 lists nothing for this method: its defaults

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        hp = self.hp
        model = u.copy_original()
        rset = u.retain_set()
        hflip = u.data.hflip if hp.hflip is None else hp.hflip

        # 1. collapse ---------------------------------------------------------------------------
        if hp.collapse_epochs > 0:
            d = head_module(model).in_features
            torch.manual_seed(u.run.seed)
            proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, hp.proj_dim)).to(u.device)
            head = head_module(model)
            enc_params = [p for p in model.parameters() if all(p is not q for q in head.parameters())]
            owner = nn.ModuleDict({"model": model, "proj": proj})
            params = enc_params + list(proj.parameters())
            opt = make_optimizer(params, hp, lr=hp.collapse_lr)
            gen = torch.Generator().manual_seed(u.run.seed + 101)

            def collapse(batch, _info):
                x, y = batch["retain"]
                v = torch.cat([random_view(x, gen, hp.shift, hflip), random_view(x, gen, hp.shift, hflip)])
                phi, _ = features_and_logits(model, v)
                z = F.normalize(proj(phi).float(), dim=1)
                return supcon_loss(z, torch.cat([y, y]), hp.temperature, hp.base_temperature)

            self.stage(u, "collapse", model, collapse, params=params, optimizer=opt, owner=owner,
                       epochs=hp.collapse_epochs, drive="retain", forget=None, retain=rset, select_best=False,
                       generators={"aug": gen}, evaluate_model=model)

        # 2. align ------------------------------------------------------------------------------
        def align(batch, _info):
            x, y = batch["retain"]
            return F.cross_entropy(model(x).float(), y)

        self.stage(u, "align", model, align, epochs=hp.epochs, drive="retain", forget=None, retain=rset)
        return model
