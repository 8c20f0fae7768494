"""``<method>+ec``: EC as a plug-in (EC Sec. 4.2, Table 3) - a baseline's own loss plus EC's multi-layer
supervision (Eq. 3) on the same model and batches.

:func:`ec_plugin` builds, for any registered :class:`UnlearningMethod`, a subclass that

* adds ``ec_``-prefixed copies of every :class:`ECSettings` knob to the base's hyper-parameters
  (``ec_tau``, ``ec_lambda_cu``, ``ec_layer_weights``, ``ec_pretrain_epochs``, ...), plus ``ec_stages``
  (comma-separated stage names that get the EC terms; None = every stage) and ``ec_include_final``
  (False drops point L - the pooled feature and the original classifier - leaving only the
  intermediate points);
* records the model being unlearned (the first ``u.copy_original()`` the base makes; failing that, the
  first sub-module of the stage's model built by ``models.create`` that is not the frozen original);
* overrides :meth:`stage`: every step computes the base's loss, then one more forward of
  ``cat(B_f, B_r)`` through that model with the (SupCon-pre-trained, shared ``ec_modules*.safetensors``)
  EC modules and adds ``sum_l w_l (lambda_CU L_CU^l + lambda_CE L_CE^l)``. The EC modules join the
  stage's trainable parameters (a new param group when the base brings its own optimizer) and its
  checkpointed state, so resume stays exact. A stage the base runs without forget (or retain) batches
  gets them added for the EC terms; the base's loss still sees ``None`` there. A step whose batch has
  no retain rows (a custom batch order) gets no EC term.

Registered: ``ft+ec``, ``duck+ec``, ``cola+ec`` (the latter two once those baselines exist).
``ec_plugin("ga")`` makes and registers any other one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from unlearn_fast.methods.ec import ECSettings, ec_loss, layer_weights_for, prepare_ec_modules
from unlearn_fast.methods.registry import get_method_class, list_methods, register_method, register_suffix
from unlearn_fast.methods.unlearning import UnlearnContext, UnlearningMethod
from unlearn_fast.models.ec_modules import ECModules, ec_forward

__all__ = ["ec_plugin", "ECPlugin", "REGISTERED_BASES"]

REGISTERED_BASES = ("ft", "duck", "cola")


class ECPlugin(UnlearningMethod):
    """Mixin placed before the base method in the MRO of every ``<method>+ec`` class (see module doc)."""

    base_name: str = "?"

    # -- settings ------------------------------------------------------------------------------
    def ec_settings(self) -> ECSettings:
        return ECSettings.from_hparams(self.hp, prefix="ec_")

    def _ec_applies(self, stage_name: str) -> bool:
        stages = getattr(self.hp, "ec_stages", None)
        if not stages:
            return True
        wanted = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages)]
        return stage_name in wanted

    # -- the run -------------------------------------------------------------------------------
    def unlearn(self, u: UnlearnContext) -> nn.Module:
        state: dict[str, Any] = {"student": None, "modules": None, "for": None}
        self._ec_state = state
        copy_fn = u.copy_original

        def recording_copy() -> nn.Module:
            m = copy_fn()
            if state["student"] is None:
                state["student"] = m
            return m

        u.copy_original = recording_copy  # instance attribute: shadows the method for this run only
        try:
            return super().unlearn(u)
        finally:
            del u.copy_original
            self._ec_state = None

    def _student(self, u: UnlearnContext, model: nn.Module) -> nn.Module:
        st = self._ec_state
        if st is not None and st["student"] is not None:
            return st["student"]
        for m in model.modules():
            if m is not u.original and getattr(m, "unlearn_fast_name", None):
                return m
        raise ValueError(f"{self.name}: cannot find the classifier being unlearned in this stage; make it with "
                         "u.copy_original() (or models.create) so the EC terms know which model to supervise")

    def _modules_for(self, u: UnlearnContext, student: nn.Module, s: ECSettings) -> ECModules:
        st = self._ec_state
        if st is None:
            raise RuntimeError(f"{self.name}: stage() was called outside unlearn()")
        if st["for"] is not student:
            ec = prepare_ec_modules(u, student, s).to(u.device)
            for p in ec.parameters():
                p.requires_grad_(True)
            st["modules"], st["for"] = ec, student
        return st["modules"]

    def stage(self, u: UnlearnContext, name: str, model: nn.Module, loss_fn: Callable[[dict, dict], Tensor],
              **kw: Any):
        if not self._ec_applies(name):
            return super().stage(u, name, model, loss_fn, **kw)
        s = self.ec_settings().for_model(u.run.model_name)
        student = self._student(u, model)
        ec = self._modules_for(u, student, s)
        weights = layer_weights_for(s, ec)
        if not getattr(self.hp, "ec_include_final", True):
            weights[-1] = 0.0
        ec_params = list(ec.parameters())

        # data: make sure both sides are drawn; hide what the base did not ask for
        hide_f = "batches" not in kw and kw.get("forget", "default") is None
        hide_r = "batches" not in kw and kw.get("retain", "default") is None
        if hide_f:
            kw["forget"] = u.forget_set()
        if hide_r:
            kw["retain"] = u.retain_set()

        # parameters, optimizer, checkpointed owner
        base_params = list(kw["params"]) if kw.get("params") is not None else list(model.parameters())
        have = {id(p) for p in base_params}
        kw["params"] = base_params + [p for p in ec_params if id(p) not in have]
        opt = kw.get("optimizer")
        if opt is not None:
            in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
            new = [p for p in ec_params if id(p) not in in_opt]
            if new:
                opt.add_param_group({"params": new})
        owner = kw.get("owner") or model
        parts: dict[str, nn.Module] = ({"base": owner} if isinstance(owner, nn.Module)
                                       else {f"base{i}": m for i, m in enumerate(owner)})
        if not any(student is m for part in parts.values() for m in part.modules()):
            parts["student"] = student
        parts["ec"] = ec
        kw["owner"] = nn.ModuleDict(parts)

        def loss(batch: dict, info: dict) -> Tensor:
            base_batch = batch
            if hide_f or hide_r:
                base_batch = dict(batch)
                if hide_f:
                    base_batch["forget"] = None
                if hide_r:
                    base_batch["retain"] = None
            out = loss_fn(base_batch, info)
            f, r = batch.get("forget"), batch.get("retain")
            if r is None:
                return out
            ec.train()
            xs = [f[0], r[0]] if f is not None else [r[0]]
            n_f = f[0].shape[0] if f is not None else 0
            return out + ec_loss(ec_forward(student, ec, torch.cat(xs)), n_f, r[1], weights, s)

        # EC's gradient also reaches student parameters this stage does not train (e.g. the classifier
        # in COLA's collapse stage); drop it so it cannot leak into a later stage's first step.
        trained = {id(p) for p in kw["params"]}
        frozen = [p for p in student.parameters() if id(p) not in trained]
        for p in frozen:
            p.grad = None
        try:
            return super().stage(u, name, model, loss, **kw)
        finally:
            for p in frozen:
                p.grad = None


def _plugin_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    out = []
    for f in dataclasses.fields(ECSettings):
        out.append((f"ec_{f.name}", f.type, dataclasses.field(default=f.default)))
    out.append(("ec_stages", "str | None", dataclasses.field(default=None)))
    out.append(("ec_include_final", "bool", dataclasses.field(default=True)))
    return out


def ec_plugin(base: str | type, register: bool = True) -> type:
    """The ``<base>+ec`` method class for a registered unlearning method (registered under that name
    unless ``register=False``; an existing registration is returned as is)."""
    base_cls = get_method_class(base) if isinstance(base, str) else base
    if not (isinstance(base_cls, type) and issubclass(base_cls, UnlearningMethod)):
        raise ValueError(f"ec_plugin: {base!r} is not an UnlearningMethod (EC adds terms to an unlearning stage)")
    base_name = base_cls.name
    name = f"{base_name}+ec"
    if register and name in list_methods():
        return get_method_class(name)
    hp_cls = dataclasses.make_dataclass(f"{base_cls.__name__}ECHparams", _plugin_fields(), bases=(base_cls.Hparams,))
    doc = (f"``{name}``: ``{base_name}`` plus EC's multi-layer supervision (EC Table 3; see "
           f"unlearn_fast.methods.ec_plugin).\n\nBase method:\n{base_cls.__doc__ or ''}")
    cls = type(f"{base_cls.__name__}PlusEC", (ECPlugin, base_cls),
               {"Hparams": hp_cls, "base_name": base_name, "__doc__": doc, "__module__": __name__})
    if register:
        cls = register_method(name)(cls)
    else:
        cls.name = name
    return cls


register_suffix("+ec", ec_plugin)


def _register_defaults(bases: Sequence[str] = REGISTERED_BASES) -> None:
    import importlib

    for b in bases:
        if b not in list_methods():
            try:  # baselines are imported before this module; this covers a direct import
                importlib.import_module(f"unlearn_fast.methods.baselines.{b}")
            except ModuleNotFoundError:
                continue
        if b in list_methods():
            ec_plugin(b)


_register_defaults()
