"""WF step and all-class evaluation benchmark driver of ``gpu_check.sh`` (issue 10 item 9).

    python bench/gpu_check.py [--budget-s 200] [--out DIR]       # GPU: ResNet-18 32/224 px, ViT-S 224 px, batch 256
    GPU_CHECK_DRY=1 python bench/gpu_check.py                    # CPU dry run: Triton interpreter, tiny models

Measures, per model, in priority order (most important first, so a time budget cuts the least useful):
the eager variants (plain fwd, plain fwd+dgrad, WF fused, eager gate, per-class loop, all-class
evaluation; ``unlearn_fast`` uses the per-shape conv table of ``kernels.conv_dispatch``,
``unlearn_fast_fusedconv`` forces the implicit-GEMM conv kernels), then the compiled ones and the
channels-last ones. Each result is merged into
``bench/results/<device>.json`` (section ``wf_gpu_check``) and ``DIR/wf_gpu_check.json`` as soon as it
exists, so a crash or timeout keeps everything measured before it. Prints the table of ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

DRY = os.environ.get("GPU_CHECK_DRY", "0") == "1"
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wf_bench as wb  # noqa: E402
from conftest import device_slug, write_results  # noqa: E402

from unlearn_fast.ops.backend import set_tf32  # noqa: E402


def plan(model_ids, cnn):
    """``[(phase, kind, model_id, variant, channels_last)]`` in priority order."""
    eager = [("step", v) for v in ("plain_fwd", "plain_fwd_dgrad", "unlearn_fast", "eager_scale", "loop",
                                   "unlearn_fast_fusedconv")]
    eager += [("eval", v) for v in ("plain_fwd", "unlearn_fast")]
    compiled = [("step", v) for v in ("plain_fwd_dgrad_compiled", "unlearn_fast_compiled", "compiled_scale")]
    compiled += [("eval", "unlearn_fast_compiled")]
    cl = [("step", v) for v in ("plain_fwd_dgrad_cl", "unlearn_fast_cl", "plain_fwd_dgrad_compiled_cl",
                                "unlearn_fast_compiled_cl", "unlearn_fast_fusedconv_cl")]
    out = []
    for phase, items in (("eager", eager), ("compiled", compiled), ("channels_last", cl)):
        for m in model_ids:
            if phase == "channels_last" and not cnn(m):
                continue
            out += [(phase, k, m, v, v.endswith("_cl")) for k, v in items]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BENCH_S", 210)))
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--models", default=",".join(wb.MODELS))
    args = ap.parse_args()
    set_tf32(True)  # DESIGN §8: fp32 with TF32, for torch and the Triton kernels alike (explicit)
    torch.backends.cudnn.benchmark = True
    batch = 4 if DRY else wb.BATCH
    reps = 2 if DRY else 10
    tol = 1e-4 if DRY else 2e-2  # alpha-grad / logit agreement with the eager reference (TF32 on the GPU)
    model_ids = [m for m in args.models.split(",") if m]
    device = device_slug()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "wf_gpu_check.json"
    results: dict = {"device": device, "dry_run": DRY, "batch": batch, "torch": torch.__version__,
                     "autotune": os.environ.get("UNLEARN_FAST_AUTOTUNE", "1"),
                     "triton_config": os.environ.get("UNLEARN_FAST_TRITON_CONFIG", "")}
    t_start = time.perf_counter()
    states: dict = {}

    def save(key, entry):
        results[key] = entry
        out_file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        if not DRY:
            write_results(device, "wf_gpu_check", {key: entry})

    save("_started", time.strftime("%Y-%m-%d %H:%M:%S"))
    # a time limit (timeout's SIGTERM) still prints the table of what was measured
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(124)))
    try:
        _run_plan(plan(model_ids, lambda m: "resnet" in m), args, states, save, batch, reps, tol, t_start)
    finally:
        table = wb.render({k: v for k, v in results.items() if isinstance(v, dict)}, model_ids)
        print(table, flush=True)
        (out_dir / "wf_gpu_check.md").write_text(table)
    save("_finished", time.strftime("%Y-%m-%d %H:%M:%S"))
    errors = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    print(f"errors: {errors}" if errors else "no errors")
    return 1 if errors else 0


def _run_plan(items, args, states, save, batch, reps, tol, t_start) -> None:
    for phase, kind, m, v, cl in items:
        key = f"{kind}|{m}|{v}"
        if time.perf_counter() - t_start > args.budget_s:
            save(key, {"skipped": f"time budget {args.budget_s:.0f}s spent"})
            continue
        sk = (m, cl)
        if sk not in states:
            states.clear()  # one model in memory at a time
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            states[sk] = wb.setup(m, dry=DRY, batch=batch, channels_last=cl)
        entry = wb.measure(kind, v, m, states[sk], reps=reps if v not in ("loop",) else max(2, reps // 2), tol=tol)
        entry["phase"] = phase
        save(key, entry)
        brief = (f"{entry['median_ms']:.2f} ms" if "median_ms" in entry else
                 "OOM" if entry.get("oom") else entry.get("error", entry.get("skipped", "?")))
        print(f"[{time.perf_counter() - t_start:6.1f}s] {key}: {brief} ({entry['seconds_incl_compile']}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
