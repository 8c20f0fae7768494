"""``cu``: Contrastive Unlearning - forget samples pushed away from their class, toward other classes (card 3).

Lee, Zhang, Yang, Lou, Xiong, IJCAI 2025, arXiv 2401.10458 [repo Hongkyu-Lee+Contrastive-Unlearning:
core/trainer/unlearn/unlearn.py Loss_v1/Loss_v2, core/args/parse.py]. For each forget batch ``(x_f, y_f)``
of size ``B``, ``omega`` SGD steps, each with the next retain batch truncated to ``B``; one forward of
``[x_f; x_r]`` gives normalised embeddings ``u`` (forget) and ``r`` (retain) and the retain logits::

    s_ij = u_i . r_j / tau - max_j (u_i . r_j / tau)         (row max detached)
    L_UL(i) = -(tau / tau_base) * (1 / |N(i)|) sum_{n in N(i)} [ s_in - log( sum_{p in P(i)} exp(s_ip) + 1e-20 + [P(i) empty] ) ]
    L = lambda_ul * mean_i L_UL(i) + lambda_ce * CE(retain logits, y_r)

``P(i)`` = retain samples with the anchor's label (always empty when whole classes are forgotten: the
denominator is then 1, as the code's ``single_class`` branch), ``N(i)`` the others. :func:`cu_loss` is
the term on its own (card 3's numeric check: 1/tau = 1.4286 at tau = 0.7).

Deviations and choices (all parameters):

* Embedding. CU's models are SupCon ResNets whose logits sit on the projection (``Linear(ReLU(u))``);
  our original is a plain classifier. ``embedding="feature"`` (default) uses the L2-normalised pooled
  feature (the head's input) - a deviation the card names - so the loss acts on the backbone directly.
  ``embedding="mlp"`` attaches a fresh ``Linear(d,d)-ReLU-Linear(d,proj_dim)`` projection, trained
  jointly and discarded (a fresh head can absorb the contrastive loss without moving the backbone).
  The logits are always the model's own classifier on the pooled feature.
* ``temperature`` 0.7 is the CU code default (EC's Table 10 lists 0.07); ``base_temperature=None`` is
  ``temperature`` (factor 1, as in the code). ``weight_decay`` is 0: the code parses one but never
  passes it to the optimizer.
* Stopping: the code stops once forget-class test accuracy <= 1/K; here the trainer's validation
  H-Mean model selection (``select_best``/``patience``) decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn_fast.methods.baselines.duck import RepeatedPairs, features_and_logits, fp32, head_module
from unlearn_fast.methods.registry import register_method
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearnHparams, UnlearningMethod, make_optimizer

__all__ = ["ContrastiveUnlearning", "cu_loss"]


def cu_loss(u: Tensor, r: Tensor, y_u: Tensor, y_r: Tensor, temperature: float,
            base_temperature: float | None = None) -> Tensor:
    """CU's L_UL averaged over anchors: ``u [n, d]`` forget and ``r [m, d]`` retain embeddings
    (already normalised), labels ``y_u [n]``, ``y_r [m]`` -> scalar. Anchors without negatives are skipped."""
    if u.dim() != 2 or r.dim() != 2 or u.shape[1] != r.shape[1]:
        raise ValueError(f"cu_loss: embeddings must be [n, d] and [m, d], got {tuple(u.shape)} and {tuple(r.shape)}")
    if y_u.shape != (u.shape[0],) or y_r.shape != (r.shape[0],):
        raise ValueError(f"cu_loss: labels must be [{u.shape[0]}] and [{r.shape[0]}], got {tuple(y_u.shape)} "
                         f"and {tuple(y_r.shape)}")
    base = temperature if base_temperature is None else base_temperature
    with fp32(u):
        pos = (y_u[:, None] == y_r[None, :]).float()
        neg = 1.0 - pos
        logits = (u.float() @ r.float().T) / temperature
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        pos_sum = ((logits.exp() + 1e-20) * pos).sum(1, keepdim=True) + (pos.sum(1, keepdim=True) == 0).float()
        log_prob = logits * neg - torch.log(pos_sum)
        n_neg = neg.sum(1)
        keep = n_neg > 0
        if not keep.any():
            return logits.sum() * 0.0
        mean_log_prob = (log_prob * neg).sum(1)[keep] / n_neg[keep]
        return -(temperature / base) * mean_log_prob.mean()


@register_method("cu")
class ContrastiveUnlearning(UnlearningMethod):
    """Contrastive Unlearning (card 3); see the module docstring."""

    @dataclass
    class Hparams(UnlearnHparams):
        epochs: int = 3                 # unlearn_epoch (README: 1 for class removal, with the 1/K stop)
        lr: float = 1e-3
        optimizer: str = "sgd"
        momentum: float = 0.9
        weight_decay: float = 0.0       # parsed but never used by the code
        batch_size: int = 64            # README: 64 for single-class, 128 for random-500
        omega: int = 4                  # retain_sampling_freq: steps (retain batches) per forget batch
        temperature: float = 0.7
        base_temperature: float | None = None
        lambda_ul: float = 3.0          # CT_ratio
        lambda_ce: float = 1.0          # CE_ratio
        embedding: str = "feature"      # "feature" | "mlp"
        proj_dim: int = 128

    @classmethod
    def presets(cls) -> dict[str, dict]:
        # EC Table 10: tau 0.07, omega 2, lambda_UL 1, lambda_CE 1
        return {"ec_table10": {"temperature": 0.07, "omega": 2, "lambda_ul": 1.0, "lambda_ce": 1.0}}

    def unlearn(self, u: UnlearnContext) -> nn.Module:
        hp = self.hp
        if hp.embedding not in ("feature", "mlp"):
            raise ValueError(f"cu: embedding must be 'feature' or 'mlp', got {hp.embedding!r}")
        model = u.copy_original()
        proj: nn.Module | None = None
        owner: nn.Module = model
        if hp.embedding == "mlp":
            d = head_module(model).in_features
            torch.manual_seed(u.run.seed)
            proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, hp.proj_dim)).to(u.device)
            owner = nn.ModuleDict({"model": model, "proj": proj})
        fset, rset = u.forget_set(), u.retain_set()
        pairs = RepeatedPairs(fset, rset, hp.batch_size, hp.batch_size, hp.omega, seed=u.run.seed, match_forget=True)
        opt = make_optimizer(list(owner.parameters()), hp)

        def embed(phi: Tensor) -> Tensor:
            return F.normalize((proj(phi) if proj is not None else phi).float(), dim=1)

        def loss(batch, _info):
            (xf, yf), (xr, yr) = batch["forget"], batch["retain"]
            n = xf.shape[0]
            phi, z = features_and_logits(model, torch.cat([xf, xr]))
            e = embed(phi)
            l_ul = cu_loss(e[:n], e[n:], yf, yr, hp.temperature, hp.base_temperature)
            return hp.lambda_ul * l_ul + hp.lambda_ce * F.cross_entropy(z[n:].float(), yr)

        self.stage(u, "cu", model, loss, params=list(owner.parameters()), optimizer=opt, owner=owner,
                   batches=pairs, n_batches=len(pairs), evaluate_model=model)
        return model
