"""Per-layer-shape WF conv path benchmark; writes the committed dispatch table (issue 10 item 6).

    python bench/conv_table.py [--models resnet18_32,resnet18_224] [--budget-s 150] [--out DIR] [--no-write]
    GPU_CHECK_DRY=1 python bench/conv_table.py      # CPU dry run: Triton interpreter, tiny model and batch

For every distinct conv geometry of the models (batch 256, channels-last, fp32 with TF32, 10 classes,
mixed labels) it first checks both WF paths - ``fused`` (implicit GEMM, ``kernels.wf_conv``) and
``epilogue`` (cuDNN conv + Triton gate epilogue, ``kernels.wf_epilogue``) - against the eager reference
(y, dx, dalpha_w; relative error <= 2e-2 under TF32), then times one WF layer step (forward + backward to
x and alpha) of each, and the bar they must meet: the plain frozen conv, forward + data gradient only
(cuDNN; the stem, whose input needs no gradient, forward only - and the WF stem step computes dalpha
only). Median of ``triton.testing.do_bench`` (CUDA events) on a GPU.

Results: section ``conv_paths`` of ``bench/results/<device>.json`` and ``DIR/conv_paths.json``, written
after every shape (a time limit or a crash keeps what was measured); the table
``kernels/conv_dispatch_table.py`` (the faster path per shape; ``fused`` only when it beats ``epilogue`` by
more than 2%; shapes where a path failed its check get the other one) rewritten after every shape on a
GPU (never in a dry run). Commit both files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

DRY = os.environ.get("GPU_CHECK_DRY", "0") == "1"
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wf_bench as wb  # noqa: E402
from conftest import device_slug, write_results  # noqa: E402

from unlearn_fast.kernels import conv_dispatch  # noqa: E402
from unlearn_fast.ops.backend import set_tf32  # noqa: E402

TABLE_FILE = Path(__file__).resolve().parents[1] / "kernels" / "conv_dispatch_table.py"
MARGIN = 0.98  # fused must be at least 2% faster than the epilogue path to be chosen


def conv_layers(model_id: str, batch: int) -> list[dict]:
    """One entry per distinct conv geometry of the model: module, input shape, stem flag, shape key."""
    from unlearn_fast.models import create

    name, size, kw = (wb.DRY_MODELS if DRY else wb.MODELS)[model_id]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = create(name, wb.NUM_CLASSES, 3, size, **kw).to(dev).eval()
    stem = wb.stem_of(model)
    found: dict[str, dict] = {}
    hooks = []
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str):
            def hook(mod, inp, out, mname=mname):
                C, H, W = inp[0].shape[1:]
                key = conv_dispatch.shape_key(C, mod.out_channels, *mod.kernel_size, mod.stride, mod.padding,
                                              mod.dilation, H, W)
                found.setdefault(key, {"name": mname, "module": mod, "shape": (batch, C, H, W), "key": key,
                                       "stem": mod is stem})
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.randn(2, 3, size, size, device=dev))
    for h in hooks:
        h.remove()
    return list(found.values())


def _timer():
    if torch.cuda.is_available():
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    return lambda fn: wb.time_ms(fn, reps=1, warmup=0)["median_ms"]


def layer_case(spec: dict) -> dict:
    """Inputs of one layer step: x (channels-last; grad unless the stem), frozen weight / bias, alphas,
    labels, upstream gradient."""
    mod, shape = spec["module"], spec["shape"]
    dev = mod.weight.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, device=dev, generator=gen).contiguous(memory_format=torch.channels_last)
    w = mod.weight.detach()
    b = mod.bias.detach() if mod.bias is not None else None
    aw = torch.empty((wb.NUM_CLASSES, w.shape[0]), device=dev).uniform_(-3, 3, generator=gen)
    ab = torch.empty_like(aw).uniform_(-3, 3, generator=gen) if b is not None else None
    lab = torch.randint(0, wb.NUM_CLASSES, (shape[0],), device=dev, generator=gen)
    geo = (list(mod.stride), list(mod.padding), list(mod.dilation))
    return {"x": x, "w": w, "b": b, "aw": aw, "ab": ab, "lab": lab, "geo": geo, "need_dx": not spec["stem"]}


def wf_step(case: dict, path: str | None):
    """``fn() -> (y, dx, dalpha_w)``: one WF layer step on ``path`` (None: the eager reference)."""
    from unlearn_fast.ops.wf_triton import wf_conv2d_triton
    from unlearn_fast.reference import wf_gate as ref

    xg = case["x"].detach().requires_grad_(case["need_dx"])
    aw = case["aw"].clone().requires_grad_()
    ab = case["ab"].clone().requires_grad_() if case["ab"] is not None else None
    op = ref.wf_conv2d if path is None else wf_conv2d_triton
    dy = {}

    def fn():
        xg.grad = None
        aw.grad = None
        if ab is not None:
            ab.grad = None
        with wb.conv_path_env(path):
            y = op(xg, case["w"], case["b"], aw, ab, case["lab"], *case["geo"])
        if "dy" not in dy:
            dy["dy"] = torch.randn(y.shape, device=y.device, generator=torch.Generator(device=y.device).manual_seed(1))
            dy["dy"] = dy["dy"].contiguous(memory_format=torch.channels_last)
        y.backward(dy["dy"])
        return y.detach(), xg.grad, aw.grad
    return fn


def plain_step(case: dict):
    """The bar: frozen conv forward + data gradient (forward only for the stem), cuDNN."""
    xg = case["x"].detach().requires_grad_(case["need_dx"])
    s, p, d = case["geo"]

    def fn():
        if not case["need_dx"]:
            with torch.no_grad():
                return F.conv2d(xg, case["w"], case["b"], s, p, d)
        xg.grad = None
        y = F.conv2d(xg, case["w"], case["b"], s, p, d)
        y.backward(torch.ones_like(y))
        return y
    return fn


def measure_shape(spec: dict, tol: float) -> dict:
    case = layer_case(spec)
    timer = _timer()
    entry: dict = {"layer": spec["name"], "input": list(spec["shape"]), "stem": spec["stem"]}
    ref_out = wf_step(case, None)()
    for path in conv_dispatch.PATHS:
        t0 = time.perf_counter()
        try:
            fn = wf_step(case, path)
            out = fn()
            errs = [wb.rel_err(a, r) for a, r in zip(out, ref_out) if r is not None]
            entry[f"{path}_check_rel_err"] = max(errs)
            if not max(errs) <= tol:
                entry[f"{path}_error"] = f"correctness check failed: rel err {max(errs):.3g} > {tol}"
                continue
            entry[f"{path}_ms"] = timer(fn)
        except torch.cuda.OutOfMemoryError:
            entry[f"{path}_error"] = "OOM"
        except Exception as exc:  # recorded; the other path and the other shapes still run
            entry[f"{path}_error"] = f"{type(exc).__name__}: {exc}"[:400]
            entry[f"{path}_trace"] = traceback.format_exc()[-1200:]
        entry[f"{path}_seconds_incl_compile"] = round(time.perf_counter() - t0, 1)
    try:
        entry["plain_ms"] = timer(plain_step(case))
    except Exception as exc:
        entry["plain_error"] = f"{type(exc).__name__}: {exc}"[:400]
    f, e = entry.get("fused_ms"), entry.get("epilogue_ms")
    entry["choice"] = ("fused" if f is not None and (e is None or f < MARGIN * e) else
                       "epilogue" if e is not None else None)
    if entry.get("plain_ms"):
        for path in conv_dispatch.PATHS:
            if entry.get(f"{path}_ms") is not None:
                entry[f"{path}_over_plain"] = entry[f"{path}_ms"] / entry["plain_ms"]
    return entry


def write_table(results: dict, device: str) -> Path:
    """Rewrite ``kernels/conv_dispatch_table.py`` from the measured shapes (deterministic order)."""
    rows = {k: v for k, v in sorted(results.items()) if isinstance(v, dict) and v.get("choice")}
    lines = ['"""Generated by bench/conv_table.py - do not edit by hand (rerun it on a GPU and commit).',
             "",
             f"Measured on {device}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, batch {wb.BATCH}, "
             "channels-last, fp32 with TF32.",
             "Per shape: the WF layer step (forward + backward) of each path in ms, and the plain frozen conv",
             '(forward + data gradient; the stem: forward only) for reference."""', "",
             "TABLE: dict[str, str] = {"]
    for k, v in rows.items():
        def ms(name):
            val = v.get(f"{name}_ms")
            return "-" if val is None else f"{val:.3f}"
        lines.append(f'    "{k}": "{v["choice"]}",  # fused {ms("fused")}, epilogue {ms("epilogue")}, '
                     f'plain {ms("plain")} ms')
    lines += ["}", ""]
    tmp = TABLE_FILE.with_suffix(".py.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, TABLE_FILE)
    return TABLE_FILE


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18_32,resnet18_224")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_CONV_S", 150)))
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-write", action="store_true", help="do not rewrite kernels/conv_dispatch_table.py")
    args = ap.parse_args()
    set_tf32(True)  # DESIGN §8: fp32 with TF32 for torch and the Triton kernels alike
    torch.backends.cudnn.benchmark = True
    os.environ.pop("UNLEARN_FAST_CONV_PATH", None)
    batch = 4 if DRY else wb.BATCH
    tol = 1e-4 if DRY else 2e-2
    device = device_slug()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "conv_paths.json"
    results: dict = {"_device": device, "_dry_run": DRY, "_batch": batch, "_torch": torch.__version__,
                     "_autotune": os.environ.get("UNLEARN_FAST_AUTOTUNE", "1")}
    write = not DRY and not args.no_write and torch.cuda.is_available()
    t_start = time.perf_counter()
    for model_id in [m for m in args.models.split(",") if m]:
        for spec in conv_layers(model_id, batch):
            key = spec["key"]
            if key in results:
                continue
            if time.perf_counter() - t_start > args.budget_s:
                results[key] = {"skipped": f"time budget {args.budget_s:.0f}s spent", "layer": spec["name"]}
            else:
                results[key] = measure_shape(spec, tol)
                results[key]["model"] = model_id
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            out_file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            if not DRY:
                write_results(device, "conv_paths", {key: results[key]})
            if write:
                write_table(results, device)
            e = results[key]

            def ms(name):
                v = e.get(f"{name}_ms")
                return f"{v:8.3f}" if v is not None else f"{str(e.get(f'{name}_error', e.get('skipped', '-')))[:8]:>8}"
            print(f"[{time.perf_counter() - t_start:6.1f}s] {key:44s} fused {ms('fused')}  epilogue {ms('epilogue')}"
                  f"  plain {ms('plain')}  -> {e.get('choice')}", flush=True)
    errors = [k for k, v in results.items() if isinstance(v, dict) and any(n.endswith("_error") for n in v)]
    print(f"errors: {errors}" if errors else "no errors", flush=True)
    if write:
        print(f"wrote {write_table(results, device)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
