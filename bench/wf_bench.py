"""WF untraining step and all-class evaluation benchmarks (DESIGN §8, issue 10 items 8-9): the shared
code of ``test_bench_wf_step.py``, ``test_bench_wf_layers.py`` and ``gpu_check.py``.

Fair baselines. WF freezes every original weight and trains only the alphas, so the plain model it
must match is a forward plus a *data-gradient-only* backward: ``plain_fwd_dgrad`` freezes every weight
and lets the gradient start at the stem's output (a zero scalar with ``requires_grad`` is added to it),
so there is no weight gradient and no gradient into the image - the WF step computes neither. Eager
and ``torch.compile``; channels-last (``_cl``) for the CNNs. TF32 on for matmul and conv (explicit, via
``kernels._tf32``), as in DESIGN §8. Each variant's alpha gradients (or logits) are checked against
the eager reference before it is timed; a variant that disagrees is recorded as an error, not timed.

Results go to ``bench/results/<device>.json`` (``conftest.write_results``; one file per device).
"""
from __future__ import annotations

import contextlib
import copy
import time
import traceback
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

BATCH, NUM_CLASSES = 256, 10
MODELS = {  # bench id -> (registry name, img_size, create kwargs)
    "resnet18_32": ("resnet18", 32, {}),
    "resnet18_224": ("resnet18", 224, {}),
    "vit_s16_224": ("vit_small", 224, {}),
}
# GPU_CHECK_DRY=1 (CPU, Triton interpreter): the same code on models small enough for the interpreter
DRY_MODELS = {
    "resnet18_32": ("small_cnn", 8, {}),
    "resnet18_224": ("small_cnn", 16, {}),
    "vit_s16_224": ("vit_tiny", 16, {"depth": 1, "patch_size": 8}),
}
STEP_VARIANTS = ("plain_fwd", "plain_fwd_dgrad", "plain_fwd_dgrad_compiled", "eager_scale", "compiled_scale",
                 "loop", "unlearn_fast", "unlearn_fast_compiled")
CL_VARIANTS = ("plain_fwd_dgrad_cl", "plain_fwd_dgrad_compiled_cl", "unlearn_fast_cl", "unlearn_fast_compiled_cl")
EVAL_VARIANTS = ("plain_fwd", "unlearn_fast", "unlearn_fast_compiled")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ implementations
def wf_conv2d_loop(x, weight, bias, alpha_w, alpha_b, labels, stride=1, padding=0, dilation=1, groups=1):
    """Per-class loop: one conv per class present, with that class's gate baked into the weights."""
    out = None
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        g = torch.sigmoid(alpha_w[c])
        b = bias * torch.sigmoid(alpha_b[c]) if bias is not None and alpha_b is not None else bias
        yc = F.conv2d(x.index_select(0, idx), weight * g.view(-1, 1, 1, 1), b, stride, padding, dilation, groups)
        out = (yc.new_zeros((x.shape[0],) + yc.shape[1:]) if out is None else out).index_copy(0, idx, yc)
    return out


def wf_linear_loop(x, weight, bias, alpha_w, alpha_b, labels):
    """Per-class loop for a linear layer (``x [B, T, F]`` or ``[B, F]``)."""
    out = None
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        g = torch.sigmoid(alpha_w[c])
        b = bias * torch.sigmoid(alpha_b[c]) if bias is not None and alpha_b is not None else bias
        yc = F.linear(x.index_select(0, idx), weight * g[:, None], b)
        out = (yc.new_zeros((x.shape[0],) + yc.shape[1:]) if out is None else out).index_copy(0, idx, yc)
    return out


def impls(variant: str):
    """``(wf_conv2d, wf_linear, backend)`` of a WF variant (``_compiled`` / ``_cl`` suffixes stripped)."""
    from unlearn_fast import ops
    from unlearn_fast.reference import wf_gate as ref

    base = variant.replace("_compiled", "").replace("_cl", "").replace("_fusedconv", "")
    if base == "literal":
        return ref.wf_conv2d_literal, ref.wf_linear_literal, "torch"
    if base == "loop":
        return wf_conv2d_loop, wf_linear_loop, "torch"
    if base in ("eager_scale", "compiled_scale"):
        return ops.wf_conv2d, ops.wf_linear, "torch"
    if base == "unlearn_fast":
        return ops.wf_conv2d, ops.wf_linear, "triton"
    raise ValueError(f"unknown WF variant {variant!r}")


@contextlib.contextmanager
def wf_impl(variant: str):
    """Route the WF layers of ``unlearn_fast.nn`` to one implementation while the block runs."""
    from unlearn_fast.nn import wf_layers
    from unlearn_fast.ops import use_backend

    conv, lin, backend = impls(variant)
    old = wf_layers.ops
    wf_layers.ops = types.SimpleNamespace(wf_conv2d=conv, wf_linear=lin)
    try:
        with use_backend(backend):
            yield
    finally:
        wf_layers.ops = old


@contextlib.contextmanager
def conv_path_env(path: str | None):
    """Force ``UNLEARN_FAST_CONV_PATH`` (``kernels.conv_dispatch``) while the block runs."""
    import os

    old = os.environ.get("UNLEARN_FAST_CONV_PATH")
    if path is not None:
        os.environ["UNLEARN_FAST_CONV_PATH"] = path
    try:
        yield
    finally:
        if path is not None:
            if old is None:
                os.environ.pop("UNLEARN_FAST_CONV_PATH", None)
            else:
                os.environ["UNLEARN_FAST_CONV_PATH"] = old


def stem_of(model: nn.Module) -> nn.Module:
    """The input layer: ``patch_embed`` (ViT/Swin), else the first Conv2d."""
    if hasattr(model, "patch_embed"):
        return model.patch_embed
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


class DgradFromStem(nn.Module):
    """The plain model with frozen weights whose backward starts at the stem output: the output of
    ``stem_of(model)`` gets ``+ zero`` (a 0-d parameter, value 0), the only tensor that needs a grad.
    Forward values are the model's, bit for bit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.zero = nn.Parameter(torch.zeros((), device=next(model.parameters()).device))
        stem_of(model).register_forward_hook(lambda m, i, o: o + self.zero)

    def forward(self, x):
        return self.model(x)


# ------------------------------------------------------------------------------ setup and steps
def setup(model_id: str, dry: bool = False, batch: int = BATCH, channels_last: bool = False):
    """``(model, wf, x, y, labels)``: random-init backbone (frozen, eval), its WF wrap with alphas uniform
    in WF's clip range, a batch, targets and mixed forget labels (seeded)."""
    from unlearn_fast.models import create
    from unlearn_fast.nn import wrap

    name, size, kw = (DRY_MODELS if dry else MODELS)[model_id]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = create(name, NUM_CLASSES, 3, size, **kw).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    wf = wrap(copy.deepcopy(model), NUM_CLASSES)
    with torch.no_grad():
        for a in wf.alpha_parameters():
            a.uniform_(-3, 3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(dev)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(dev)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        wf = wf.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, wf, x, y, labels


def step_fn(variant: str, model, wf, x, y, labels) -> tuple[Callable[[], Any], Callable[[], torch.Tensor]]:
    """``(fn, probe)``: ``fn()`` runs one step of ``variant``; ``probe()`` runs one and returns what the
    correctness check compares (the flattened alpha grads, or the logits for the plain variants)."""
    compiled = "_compiled" in variant or variant == "compiled_scale"
    if variant.startswith("plain"):
        if variant.startswith("plain_fwd_dgrad"):
            net = DgradFromStem(copy.deepcopy(model))  # its stem hook stays off the shared model
            run = torch.compile(net) if compiled else net

            def fn():
                net.zero.grad = None
                out = run(x)
                F.cross_entropy(out, y).backward()
                return out
        else:
            run = torch.compile(model) if compiled else model

            def fn():
                with torch.no_grad():
                    return run(x)
        return fn, lambda: fn().detach().float().flatten()
    net = torch.compile(wf) if compiled else wf
    alphas = wf.alpha_parameters()
    impl = "eager_scale" if variant == "compiled_scale" else variant
    conv_path = "fused" if "_fusedconv" in variant else None  # else the committed per-shape table

    def fn():
        for a in alphas:
            a.grad = None
        with wf_impl(impl), conv_path_env(conv_path):
            F.cross_entropy(net(x, labels), y).backward()

    def probe():
        fn()
        return torch.cat([a.grad.flatten() for a in alphas])
    return fn, probe


def eval_fn(variant: str, model, wf, x, labels) -> Callable[[], Any]:
    """All-class evaluation: ``wf(x, labels)`` under inference mode, or plain inference."""
    compiled = variant.endswith("_compiled")
    if variant.startswith("plain"):
        net = torch.compile(model) if compiled else model

        def fn():
            with torch.inference_mode():
                return net(x)
        return fn
    net = torch.compile(wf) if compiled else wf

    def fn():
        with torch.inference_mode(), wf_impl(variant):
            return net(x, labels)
    return fn


def reference_probe(variant: str, model, wf, x, y, labels) -> torch.Tensor:
    """What ``variant``'s probe must match: eager plain logits, or the eager-scale alpha grads."""
    ref = "plain_fwd" if variant.startswith("plain") else "eager_scale"
    return step_fn(ref, model, wf, x, y, labels)[1]()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def time_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median / min wall ms over ``reps`` synchronised calls after ``warmup``; peak CUDA memory above
    the memory allocated before one call (MiB)."""
    for _ in range(warmup):
        fn()
    sync()
    peak = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return {"median_ms": ts[len(ts) // 2], "min_ms": ts[0], "peak_mib": peak, "reps": reps}


def measure(kind: str, variant: str, model_id: str, state, reps: int, tol: float) -> dict[str, Any]:
    """Check then time one variant; never raises (errors and OOM are recorded in the entry)."""
    model, wf, x, y, labels = state
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        if kind == "step":
            fn, probe = step_fn(variant, model, wf, x, y, labels)
            if variant != "plain_fwd":
                err = rel_err(probe(), reference_probe(variant, model, wf, x, y, labels))
                if not err <= tol:
                    return {"error": f"correctness check failed: rel err {err:.3g} > {tol}", "check_rel_err": err}
            else:
                err = 0.0
        else:
            fn = eval_fn(variant, model, wf, x, labels)
            out = fn().float()
            ref = eval_fn("plain_fwd" if variant.startswith("plain") else "eager_scale", model, wf, x, labels)
            err = rel_err(out, ref().float())
            if not err <= tol:
                return {"error": f"correctness check failed: rel err {err:.3g} > {tol}", "check_rel_err": err}
        entry = time_ms(fn, reps)
        entry["check_rel_err"] = err
    except torch.cuda.OutOfMemoryError:
        entry = {"oom": True}
    except Exception as exc:  # recorded, so one failing variant does not lose the others
        entry = {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()[-1500:]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    entry["seconds_incl_compile"] = round(time.perf_counter() - t0, 1)
    return entry


# ------------------------------------------------------------------------------ report
def _ms(res: dict, key: str):
    e = res.get(key)
    return e.get("median_ms") if isinstance(e, dict) else None


def ratio_rows(res: dict, model_ids) -> list[tuple[str, str, str]]:
    """``(model, comparison, value)`` rows: the issue-10 table of ratios from ``res`` ("kind|model|variant")."""
    rows = []

    def best(model_id, names):
        vals = [(_ms(res, f"step|{model_id}|{n}"), n) for n in names]
        vals = [v for v in vals if v[0] is not None]
        return min(vals) if vals else (None, None)

    for m in model_ids:
        uf, uf_name = best(m, ["unlearn_fast", "unlearn_fast_compiled", "unlearn_fast_cl", "unlearn_fast_compiled_cl",
                               "unlearn_fast_fusedconv", "unlearn_fast_compiled_fusedconv"])

        def r(num, den, fmt="{:.2f}"):
            return fmt.format(num / den) if num is not None and den else "—"
        for label, names in (("plain fwd+dgrad eager", ["plain_fwd_dgrad", "plain_fwd_dgrad_cl"]),
                             ("plain fwd+dgrad compiled", ["plain_fwd_dgrad_compiled", "plain_fwd_dgrad_compiled_cl"])):
            base, base_name = best(m, names)
            rows.append((m, f"WF step ({uf_name}) / {label} ({base_name}) [target <= 1.05]", r(uf, base)))
        for label, n in (("eager gate", "eager_scale"), ("torch.compile gate", "compiled_scale"),
                         ("per-class loop", "loop")):
            rows.append((m, f"{label} / WF step [speed-up]", r(_ms(res, f"step|{m}|{n}"), uf)))
        pe = _ms(res, f"eval|{m}|plain_fwd")
        ue = min([v for v in (_ms(res, f"eval|{m}|unlearn_fast"), _ms(res, f"eval|{m}|unlearn_fast_compiled"))
                  if v is not None], default=None)
        rows.append((m, "all-class eval throughput / plain inference [target >= 0.95]", r(pe, ue)))
    return rows


def render(res: dict, model_ids) -> str:
    lines = ["| model | variant | median ms | peak MiB | check rel err |", "|---|---|---|---|---|"]
    for key, e in sorted(res.items()):
        if not isinstance(e, dict) or "|" not in key:
            continue
        kind, m, v = key.split("|")
        if e.get("median_ms") is not None:
            pk = "—" if e.get("peak_mib") is None else f"{e['peak_mib']:.0f}"
            lines.append(f"| {m} | {kind} {v} | {e['median_ms']:.2f} | {pk} | {e.get('check_rel_err', 0):.1e} |")
        else:
            why = "OOM" if e.get("oom") else e.get("error", e.get("skipped", "?"))
            lines.append(f"| {m} | {kind} {v} | {str(why)[:80]} | | |")
    lines += ["", "| model | ratio | value |", "|---|---|---|"]
    lines += [f"| {m} | {c} | {v} |" for m, c, v in ratio_rows(res, model_ids)]
    return "\n".join(lines) + "\n"
