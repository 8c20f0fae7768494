"""Streaming representation and output metrics (DESIGN §4), torchmetrics-shaped.

Each metric keeps float64 sufficient statistics, has ``update()`` / ``compute()`` / ``reset()``,
``sync(process_group=None)`` (all-reduce SUM of the statistics under torch.distributed), and a
functional twin:

- :class:`JSDivergence` / :func:`js_divergence`: mean JS divergence of softmax(p), softmax(q).
- :class:`ActivationDistance` / :func:`activation_distance`: mean L2 between the probability vectors.
- :class:`ZRF` / :func:`zrf`: 1 - mean JS(model, randomly initialised model) (WF Eq. 4).
- :class:`LinearCKA` / :func:`linear_cka`: layer-wise linear CKA of two models over a dataset,
  every hooked layer in one pass, exact streaming form or the unbiased minibatch estimator.

``num_groups=K`` on the divergence metrics keeps K streams in one pass: ``update(p, q, groups)``
with ``groups`` int64 [B] in [0, K), ``compute()`` -> [K] (NaN for a group that saw no rows).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from unlearn_fast.ops import metrics as ops

__all__ = [
    "JSDivergence",
    "ActivationDistance",
    "ZRF",
    "LinearCKA",
    "js_divergence",
    "activation_distance",
    "zrf",
    "linear_cka",
    "pool_features",
    "exact_state_bytes",
    "ESTIMATORS",
    "hooked_module_name",
]


class _Metric:
    """Named float64 state tensors, reset / sync / to(device)."""

    _state_names: tuple[str, ...] = ()

    def _states(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self._state_names}

    def to(self, device: torch.device | str) -> "_Metric":
        for k, v in self._states().items():
            setattr(self, k, v.to(device))
        return self

    def sync(self, process_group: Any = None) -> None:
        """All-reduce (SUM) every statistic across ranks when torch.distributed is initialised; no-op otherwise."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for v in self._states().values():
            dist.all_reduce(v, op=dist.ReduceOp.SUM, group=process_group)


# --------------------------------------------------------------------------------- divergences
class _DivergenceStats(_Metric):
    """Streams js_sum, l2_sum, count [K] through one fused op per batch."""

    _state_names = ("js_sum", "l2_sum", "count")

    def __init__(self, num_groups: int | None = None, device: torch.device | str = "cpu") -> None:
        if num_groups is not None and (not isinstance(num_groups, int) or num_groups < 1):
            raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")
        self.num_groups = num_groups
        self._device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        k = self.num_groups or 1
        self.js_sum = torch.zeros(k, dtype=torch.float64, device=self._device)
        self.l2_sum = torch.zeros(k, dtype=torch.float64, device=self._device)
        self.count = torch.zeros(k, dtype=torch.float64, device=self._device)

    def update(self, p_logits: Tensor, q_logits: Tensor, groups: Tensor | None = None) -> None:
        """Add a batch: p_logits, q_logits [B, C]; groups int64 [B] in [0, num_groups) iff num_groups is set."""
        if (groups is None) != (self.num_groups is None):
            raise ValueError("pass groups [B] exactly when the metric was built with num_groups=K "
                             f"(num_groups={self.num_groups}, groups given: {groups is not None})")
        if self.js_sum.device != p_logits.device:
            self.to(p_logits.device)
            self._device = p_logits.device
        if groups is not None:
            groups = groups.to(device=p_logits.device, dtype=torch.long)
        ops.divergence_accumulate(p_logits.detach(), q_logits.detach(), groups, self.js_sum, self.l2_sum, self.count)

    def _mean(self, s: Tensor) -> Tensor:
        m = s / self.count  # NaN for an empty group
        return m if self.num_groups is not None else m[0]


class JSDivergence(_DivergenceStats):
    """Mean Jensen-Shannon divergence (natural log, in [0, ln 2]) between softmax(p) and softmax(q).

    ``compute()`` -> float64 scalar, or [K] with ``num_groups=K``.
    """

    def compute(self) -> Tensor:
        return self._mean(self.js_sum)


class ActivationDistance(_DivergenceStats):
    """Mean L2 distance between the probability vectors softmax(p) and softmax(q) (scalar or [K])."""

    def compute(self) -> Tensor:
        return self._mean(self.l2_sum)


class ZRF(_DivergenceStats):
    """Zero Retrain Forgetting score, WF Eq. 4: 1 - mean JS(model, randomly initialised model).

    ``update(model_logits, random_model_logits[, groups])``; ``compute()`` scalar or [K].
    """

    def compute(self) -> Tensor:
        return 1.0 - self._mean(self.js_sum)


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_row.double().mean()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def js_divergence(p_logits: Tensor, q_logits: Tensor, reduction: str = "mean") -> Tensor:
    """Mean (or per-row [B] with reduction='none') JS divergence of softmax(p_logits), softmax(q_logits)."""
    return _reduce(ops.js_divergence(p_logits, q_logits), reduction)


def activation_distance(p_logits: Tensor, q_logits: Tensor, reduction: str = "mean") -> Tensor:
    """Mean (or per-row [B]) L2 distance between softmax(p_logits) and softmax(q_logits)."""
    return _reduce(ops.activation_distance(p_logits, q_logits), reduction)


def zrf(model_logits: Tensor, random_model_logits: Tensor) -> Tensor:
    """ZRF = 1 - mean JS(model, random model) over the rows (WF Eq. 4), float64 scalar."""
    return 1.0 - js_divergence(model_logits, random_model_logits)


# ----------------------------------------------------------------------------------------- CKA
def pool_features(t: Tensor, pool: str) -> Tensor:
    """Feature map -> [B, d]: 'avg' averages spatial dims ([B,C,H,W] -> [B,C]) or tokens ([B,T,D] -> [B,D]);
    'flatten' reshapes to [B, -1]."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    if not isinstance(t, Tensor):
        raise TypeError(f"a hooked layer returned {type(t).__name__}, expected a Tensor")
    t = t.detach()
    if pool == "flatten" or t.dim() <= 2:
        return t.reshape(t.shape[0], -1)
    if pool == "avg":
        if t.dim() == 3:
            return t.mean(1)
        return t.flatten(2).mean(2)
    raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Exact linear CKA of X [n, d1] and Y [n, d2] (float64 statistics; NaN if a side is constant)."""
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"linear_cka needs X [n, d1] and Y [n, d2] with one n, got {tuple(X.shape)}, "
                         f"{tuple(Y.shape)}")
    z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=X.device)  # noqa: E731
    d1, d2 = X.shape[1], Y.shape[1]
    st = ([z(d1, d2)], [z(d1, d1)], [z(d2, d2)], [z(d1)], [z(d2)])
    ops.cka_accumulate([X], [Y], *st)
    return float(ops.cka_finalize(*st, n=X.shape[0])[0])


def channels_last_features(model: nn.Module, layer: str | None = None) -> bool:
    """Whether ``layer``'s output is ``[B, H, W, C]`` (channels last): timm Swin blocks are; for a model
    made by name (``timm:`` / ``tv:``) the stage rule's dry forward saw each stage's layout."""
    name = str(getattr(model, "unlearn_fast_name", ""))
    if ":" in name and layer is not None:
        from unlearn_fast.models.stages import stage_info

        try:
            return stage_info(model).layouts.get(layer) == "nhwc"
        except ValueError:
            return False
    return name.startswith("swin")


INPUT_SUFFIX = ":in"


def hooked_module_name(layer: str) -> tuple[str, bool]:
    """``"head:in"`` -> ``("head", True)`` (the module's input is hooked); ``"fc"`` -> ``("fc", False)``."""
    if layer.endswith(INPUT_SUFFIX):
        return layer[: -len(INPUT_SUFFIX)], True
    return layer, False


class FeatureHooks:
    """Forward hooks that keep the pooled ``[B, d]`` output of named modules of one model, or their
    first input for names ending in ``":in"`` (``"head:in"``: the classifier's input, the pooled
    feature of a ViT/Swin after its final norm and token pooling). Channels-last block outputs are
    permuted to ``[B, C, H, W]`` before pooling."""

    def __init__(self, model: nn.Module, layers: Sequence[str], pool: str = "avg") -> None:
        mods = dict(model.named_modules())
        missing = [name for name in layers if hooked_module_name(name)[0] not in mods]
        if missing:
            some = [n for n in mods if n][:12]
            raise KeyError(f"layers {missing} are not modules of {type(model).__name__}; some names: {some} "
                           "(see unlearn_fast.models.feature_layers)")
        self.out: dict[str, Tensor] = {}
        self.channels_last = {name: channels_last_features(model, name) for name in layers}
        self.handles = []
        for name in layers:
            mod, on_input = hooked_module_name(name)
            if on_input:
                self.handles.append(mods[mod].register_forward_pre_hook(self._pre_hook(name, pool)))
            else:
                self.handles.append(mods[mod].register_forward_hook(self._hook(name, pool)))
        self.layers = list(layers)

    def _pre_hook(self, name: str, pool: str):
        def fn(_mod, inp):
            self.out[name] = pool_features(inp[0], pool)

        return fn

    def _hook(self, name: str, pool: str):
        def fn(_mod, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if self.channels_last[name] and isinstance(t, Tensor) and t.dim() == 4:
                t = t.permute(0, 3, 1, 2)
            self.out[name] = pool_features(t, pool)

        return fn

    def take(self) -> list[Tensor]:
        feats = [self.out.pop(name, None) for name in self.layers]
        missing = [n for n, f in zip(self.layers, feats) if f is None]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the forward pass")
        return feats  # type: ignore[return-value]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


ESTIMATORS = ("exact", "minibatch", "auto")


def exact_state_bytes(dims_a: Sequence[int], dims_b: Sequence[int], pairs: str) -> int:
    """Bytes of the float64 exact-CKA statistics: ``pairs="all"``: S_xy over the summed widths
    [sum d_a, sum d_b] plus per-layer S_xx, S_yy (the diagonal blocks only); ``"diagonal"``: per layer
    S_xy, S_xx, S_yy. Plus the sums s_x, s_y."""
    sq = sum(d * d for d in dims_a) + sum(d * d for d in dims_b) + sum(dims_a) + sum(dims_b)
    cross = sum(dims_a) * sum(dims_b) if pairs == "all" else sum(a * b for a, b in zip(dims_a, dims_b))
    return 8 * (sq + cross)


class LinearCKA(_Metric):
    """Layer-wise linear CKA between two models, all layers in one pass over the data.

    Hooks ``layers`` (module names, e.g. ``["layer1.0", "layer4.1", "avgpool", "fc"]``; ``"name:in"``
    hooks the module's *input*, e.g. ``"head:in"`` = the classifier's input) in both models.
    ``update(x)`` runs both models without grad and adds the batch; ``compute()`` returns
    ``{"layers", "cka", "estimator", "pairs", "n"}`` with ``cka`` float64 [L] (``pairs="diagonal"``:
    layer i of A vs layer i of B) or [L, L] (``pairs="all"``: row = layer of A, column = layer of B).

    estimator="exact": streamed S_xy, S_xx, S_yy, s_x, s_y (float64, any n). Only what is read is
    kept: for ``pairs="all"`` S_xy over the concatenated widths (every block is read) but S_xx / S_yy
    per layer (only their diagonal blocks enter the denominators). Its memory,
    :func:`exact_state_bytes`, is checked at the first batch against ``memory_limit`` (bytes, default
    4 GiB): over it, "exact" raises a ValueError that names the estimator to use.
    estimator="minibatch": the unbiased HSIC of Nguyen et al. 2021 summed over minibatches (the
    pytorch-cka estimator; O(n^2) per batch, any width), fused over all read layer pairs; batches of
    fewer than 4 samples are skipped and counted.
    estimator="auto": "exact" when it fits ``memory_limit``, else "minibatch"; ``compute()["estimator"]``
    says which one produced the numbers.
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, layers: Sequence[str],
                 estimator: Literal["exact", "minibatch", "auto"] = "exact", pool: Literal["avg", "flatten"] = "avg",
                 pairs: Literal["diagonal", "all"] = "diagonal", memory_limit: int | None = None) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        if pairs not in ("diagonal", "all"):
            raise ValueError(f"pairs must be 'diagonal' or 'all', got {pairs!r}")
        if not layers:
            raise ValueError("LinearCKA needs at least one layer name")
        if memory_limit is not None and memory_limit <= 0:
            raise ValueError(f"memory_limit must be a positive number of bytes or None, got {memory_limit!r}")
        self.model_a, self.model_b = model_a, model_b
        self.layers = list(layers)
        self.requested_estimator = estimator
        self.estimator, self.pool, self.pairs = estimator, pool, pairs
        self.memory_limit = int(memory_limit) if memory_limit is not None else 4 << 30
        self._hooks_a = FeatureHooks(model_a, self.layers, pool)
        self._hooks_b = FeatureHooks(model_b, self.layers, pool) if model_b is not model_a else self._hooks_a
        self.reset()

    @classmethod
    def for_features(cls, layers: Sequence[str], estimator: Literal["exact", "minibatch", "auto"] = "exact",
                     pairs: Literal["diagonal", "all"] = "diagonal", memory_limit: int | None = None) -> "LinearCKA":
        """A LinearCKA without models or hooks, fed with :meth:`update_features` (features captured elsewhere)."""
        ident = nn.Identity()
        self = cls(ident, ident, [""], estimator=estimator, pairs=pairs, memory_limit=memory_limit)
        self.remove_hooks()
        self.model_a = self.model_b = None  # type: ignore[assignment]
        self.layers = list(layers)
        return self

    # -- state
    def reset(self) -> None:
        self._state_names = ()
        self.estimator = self.requested_estimator
        self.dims_a: list[int] | None = None
        self.dims_b: list[int] | None = None
        self.n = torch.zeros((), dtype=torch.float64)
        self.skipped = 0

    def _resolve_estimator(self, dims_a: list[int], dims_b: list[int]) -> str:
        if self.requested_estimator == "minibatch":
            return "minibatch"
        need = exact_state_bytes(dims_a, dims_b, self.pairs)
        if need <= self.memory_limit:
            return "exact"
        if self.requested_estimator == "auto":
            return "minibatch"
        raise ValueError(
            f"LinearCKA(estimator='exact', pairs={self.pairs!r}, pool={self.pool!r}) needs {need / 2**30:.2f} GiB of "
            f"float64 statistics for feature widths {dims_a} / {dims_b}, over memory_limit="
            f"{self.memory_limit / 2**30:.2f} GiB: use estimator='minibatch' (unbiased HSIC, O(n^2) per batch, any "
            "width) or estimator='auto', or pool='avg', or raise memory_limit")

    def _init_state(self, fa: list[Tensor], fb: list[Tensor]) -> None:
        dev = fa[0].device
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=dev)  # noqa: E731
        dims_a = [f.shape[1] for f in fa]
        dims_b = [f.shape[1] for f in fb]
        self.estimator = self._resolve_estimator(dims_a, dims_b)
        self.dims_a, self.dims_b = dims_a, dims_b
        self.n = self.n.to(dev)
        L = len(self.layers)
        if self.estimator == "minibatch":
            self.hxy = z(L, L) if self.pairs == "all" else z(L)
            self.hxx, self.hyy = z(L), z(L)
            self._state_names = ("n", "hxy", "hxx", "hyy")
            return
        if self.pairs == "all":
            self.sxy = [z(sum(dims_a), sum(dims_b))]
        else:
            self.sxy = [z(a, b) for a, b in zip(dims_a, dims_b)]
        self.sxx = [z(a, a) for a in dims_a]
        self.syy = [z(b, b) for b in dims_b]
        self.sx = [z(a) for a in dims_a]
        self.sy = [z(b) for b in dims_b]
        self._state_names = ("n",)

    def _states(self) -> dict[str, Tensor]:
        st = super()._states()
        if self.estimator == "exact" and self.dims_a is not None:
            for name in ("sxy", "sxx", "syy", "sx", "sy"):
                for i, t in enumerate(getattr(self, name)):
                    st[f"{name}.{i}"] = t
        return st

    def to(self, device: torch.device | str) -> "LinearCKA":
        self.n = self.n.to(device)
        if self.estimator == "minibatch" and self.dims_a is not None:
            for name in ("hxy", "hxx", "hyy"):
                setattr(self, name, getattr(self, name).to(device))
        elif self.dims_a is not None:
            for name in ("sxy", "sxx", "syy", "sx", "sy"):
                setattr(self, name, [t.to(device) for t in getattr(self, name)])
        return self

    # -- streaming
    @torch.no_grad()
    def update(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run both models on x (no grad), add the hooked features; returns (logits_a, logits_b) for reuse."""
        if self.model_a is None:
            raise RuntimeError("this LinearCKA was built with for_features(); feed it with update_features()")
        out_a = self.model_a(x)
        fa = self._hooks_a.take()
        out_b = self.model_b(x)
        fb = self._hooks_b.take()
        self.update_features(fa, fb)
        return out_a, out_b

    @torch.no_grad()
    def update_features(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> None:
        """Add features captured elsewhere: feats_a[l], feats_b[l] [n, d_l] (already pooled), one per layer."""
        fa, fb = list(feats_a), list(feats_b)
        L = len(self.layers)
        if len(fa) != L or len(fb) != L:
            raise ValueError(f"expected {L} feature tensors per model (one per layer), got {len(fa)} and {len(fb)}")
        n = fa[0].shape[0]
        if any(f.dim() != 2 or f.shape[0] != n for f in fa + fb):
            raise ValueError(f"features must be [n={n}, d] for every layer, got {[tuple(f.shape) for f in fa + fb]}")
        if self.dims_a is None:
            self._init_state(fa, fb)
        elif [f.shape[1] for f in fa] != self.dims_a or [f.shape[1] for f in fb] != self.dims_b:
            raise ValueError("feature widths changed between batches (use pool='avg' or a fixed input size)")
        if self.estimator == "minibatch":
            if n < 4:
                self.skipped += n
                warnings.warn(f"LinearCKA(minibatch): skipped a batch of {n} < 4 samples", RuntimeWarning,
                              stacklevel=2)
                return
            ops.hsic_cross_accumulate(fa, fb, self.hxy, self.hxx, self.hyy, all_pairs=self.pairs == "all")
        elif self.pairs == "all":
            ops.cka_accumulate_cross(fa, fb, self.sxy[0], self.sxx, self.syy, self.sx, self.sy)
        else:
            ops.cka_accumulate(fa, fb, self.sxy, self.sxx, self.syy, self.sx, self.sy)
        self.n += n

    def compute(self) -> dict[str, Any]:
        """{"layers": [...], "cka": float64 [L] or [L, L], "estimator", "pairs", "n", "skipped"}."""
        if self.dims_a is None or float(self.n) == 0:
            raise RuntimeError("LinearCKA.compute() called before any update()")
        if self.estimator == "minibatch":
            cka = ops.minibatch_cka_cross(self.hxy, self.hxx, self.hyy)
        elif self.pairs == "all":
            cka = ops.cka_finalize_cross(self.sxy[0], self.sxx, self.syy, self.sx, self.sy, float(self.n))
        else:
            cka = ops.cka_finalize(self.sxy, self.sxx, self.syy, self.sx, self.sy, float(self.n))
        return {"layers": list(self.layers), "cka": cka, "estimator": self.estimator, "pairs": self.pairs,
                "n": int(self.n), "skipped": self.skipped}

    def run(self, loader: Iterable, device: torch.device | str | None = None, progress: bool = True) -> dict[str, Any]:
        """One pass over ``loader`` (batches ``x`` or ``(x, ...)``) on ``device``; returns :meth:`compute`."""
        from tqdm.auto import tqdm

        for batch in tqdm(loader, desc="linear CKA", disable=not progress, leave=False):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if device is not None:
                x = x.to(device, non_blocking=True)
            self.update(x)
        return self.compute()

    def remove_hooks(self) -> None:
        """Detach the forward hooks from both models."""
        self._hooks_a.remove()
        if self._hooks_b is not self._hooks_a:
            self._hooks_b.remove()
