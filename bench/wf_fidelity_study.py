"""WF-Net fidelity study (issue 13): per-class Acc_f / Acc_r of WF for each lever, on CPU, one thread.

For each data set: train the original small_cnn once (capped epochs), then run WF once per lever
(``LEVERS``: hyper-parameter overrides on top of ``BASE``), evaluate every gate row on the test split
(``gate_accuracy_table``) and compare with the original's per-row retain accuracy. Writes
``bench/results/wf_fidelity/<set>.json`` (per-row numbers) and prints a Markdown table.

    OMP_NUM_THREADS=1 python bench/wf_fidelity_study.py --data mnist5k --levers paper_adam,stop,hmean
    OMP_NUM_THREADS=1 python bench/wf_fidelity_study.py --data glyphs48 --levers all

Data sets: ``mnist5k`` = ``idx:/work/shared/data/mnist5k`` (real MNIST, 10 classes; override the path with
``--mnist DIR``) at 16 px; ``glyphs48`` = ``glyphs:48:100`` at 16 px (generated, 48 classes).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {
    "mnist5k": {"spec": "idx:{mnist}", "img_size": 16, "orig_epochs": 15},
    "glyphs48": {"spec": "glyphs:48:100", "img_size": 16, "orig_epochs": 20},
    "glyphs12": {"spec": "glyphs:12:100", "img_size": 16, "orig_epochs": 20},
}

# Every WF run: capped for a 2-core CPU shared with other jobs (batch 128, no accumulation, 2 evaluations
# per epoch, at most MAX_EPOCHS epochs).
BASE = {"batch_size": 128, "grad_accum": 1, "evals_per_epoch": 2, "patience": 6, "min_steps": 0,
        "fit_to_data": False}
MAX_EPOCHS = 6
PAPER = {"alpha_init": 3.0, "alpha_clip": 3.0, "select": "loss", "forget_stop": None, "forget_frac": 0.5, "reg_form": "layer_mean", "gate_layers": "all",
         "gate_bias": True, "polish_steps": 0, "gate_norm": False, "optimizer": "adam", "lr": 0.1,
         "lambdas": [1, 10, 1]}
LEVERS: dict[str, dict] = {
    "paper_adam": {**PAPER},                                               # paper values, Adam 0.1 (old default)
    "lambda1_3": {**PAPER, "lambdas": [1, 3, 1]},                          # the old demo setting
    "hmean": {**PAPER, "select": "hmean"},                                 # model selection by H-Mean
    "stop": {**PAPER, "forget_stop": 1.0},                                 # lambda scheduling
    "stop_hmean": {**PAPER, "forget_stop": 1.0, "select": "hmean"},
    "reg_sqrt": {**PAPER, "forget_stop": 1.0, "select": "hmean", "reg_form": "sqrt"},
    "reg_x5": {**PAPER, "forget_stop": 1.0, "select": "hmean", "lambdas": [1, 10, 5]},
    "frac_025": {**PAPER, "forget_stop": 1.0, "select": "hmean", "forget_frac": 0.25},
    "chi_6": {**PAPER, "forget_stop": 1.0, "select": "hmean", "chi": 6},
    "skip_first": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_layers": "skip_first"},
    "no_bias_gate": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_bias": False},
    "polish": {**PAPER, "forget_stop": 1.0, "select": "hmean", "polish_steps": 40, "polish_lr": 0.05},
    "ceiling": {**PAPER, "forget_stop": 1.0, "select": "hmean", "alpha_init": 6.0, "alpha_clip": 6.0},
    "ceiling_polish": {**PAPER, "forget_stop": 1.0, "select": "hmean", "alpha_init": 6.0, "alpha_clip": 6.0,
                       "polish_steps": 40, "polish_lr": 0.05},
    "combo": {**PAPER, "forget_stop": 1.0, "select": "hmean", "forget_frac": 0.25, "polish_steps": 40,
              "polish_lr": 0.05},
    "unit_gate": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True},   # gate 1 at init
    "unit_gate_frac": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "forget_frac": 0.25},
    "unit_gate_polish": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "forget_frac": 0.25,
                         "polish_steps": 40, "polish_lr": 0.05},
    "unit_gate_l5": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "lambdas": [1, 5, 1]},
    "unit_gate_long": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "max_epochs": 15,
                       "patience": 10},
    "unit_gate_long_l5": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "max_epochs": 15,
                          "patience": 10, "lambdas": [1, 5, 1]},
    "unit_gate_long_polish": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "max_epochs": 15,
                              "patience": 10, "polish_steps": 60, "polish_lr": 0.05},
    "unit_gate_long_l3": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "max_epochs": 15,
                          "patience": 10, "lambdas": [1, 3, 1]},
    "unit_gate_xlong_l5": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "max_epochs": 25,
                           "patience": 15, "lambdas": [1, 5, 1]},
    "unit_gate_long_l2": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "max_epochs": 15,
                          "patience": 10, "lambdas": [1, 2, 1]},
    "unit_gate_xlong_l3": {**PAPER, "forget_stop": 1.0, "select": "hmean", "gate_norm": True, "max_epochs": 25,
                           "patience": 15, "lambdas": [1, 3, 1]},
    "default": {},                                                         # the WF defaults as they stand
}


def _original_rows(model, ds, n: int) -> list[float]:
    """The original model's Acc_r for every row c (accuracy on the test samples of the other classes), %."""
    from torch.utils.data import DataLoader

    cor = torch.zeros(n, dtype=torch.float64)
    tot = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for x, y in DataLoader(ds, batch_size=512):
            ok = (model(x).argmax(1) == y).double()
            cor += torch.bincount(y, weights=ok, minlength=n)
            tot += torch.bincount(y, minlength=n).double()
    return [float(100 * (cor.sum() - cor[c]) / (tot.sum() - tot[c])) for c in range(n)]


def run(data_name: str, levers: list[str], out_dir: Path, mnist: str, width: int | None) -> dict:
    from unlearn_fast.data import load
    from unlearn_fast.evaluation.wf_eval import gate_accuracy_table
    from unlearn_fast.methods import RunContext, create_method
    from unlearn_fast.models.io import load_model

    d = DATASETS[data_name]
    spec = d["spec"].format(mnist=mnist)
    data = load(spec, img_size=d["img_size"], seed=0)
    tag = data_name + (f"_w{width}" if width else "")
    base = ROOT / "runs" / "wf_fidelity" / tag  # run directories (git-ignored); results go to out_dir
    base.mkdir(parents=True, exist_ok=True)
    kw = {"width": width} if width else {}
    ctx = RunContext(data=data, model_name="small_cnn", run_dir=base, device=torch.device("cpu"), seed=0,
                     progress=False, model_kwargs=kw)
    t0 = time.perf_counter()
    create_method("original", max_epochs=d["orig_epochs"], patience=4).run(ctx)
    orig_s = time.perf_counter() - t0
    original = load_model(base / "original.safetensors", "cpu").eval()
    o_rows = _original_rows(original, data.test, data.num_classes)
    res = {"data": spec, "img_size": d["img_size"], "num_classes": data.num_classes, "width": width,
           "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
           "original": {"acc_r": o_rows, "mean_acc_r": sum(o_rows) / len(o_rows), "seconds": orig_s}, "levers": {}}
    for name in levers:
        hp = {**BASE, "max_epochs": MAX_EPOCHS, **LEVERS[name]}
        rd = base / name
        if rd.exists():
            shutil.rmtree(rd)
        rd.mkdir(parents=True)
        shutil.copy(base / "original.safetensors", rd / "original.safetensors")
        c = RunContext(data=data, model_name="small_cnn", run_dir=rd, device=torch.device("cpu"), seed=0,
                       progress=False, model_kwargs=kw)
        t0 = time.perf_counter()
        out = create_method("wf", **hp).run(c)
        secs = time.perf_counter() - t0
        acc_f, acc_r = gate_accuracy_table(out.model, data.test, torch.device("cpu"), progress=False)
        drop = [o - r for o, r in zip(o_rows, acc_r)]
        row = {"hparams": hp, "acc_f": acc_f, "acc_r": acc_r, "mean_acc_r": sum(acc_r) / len(acc_r),
               "worst_acc_r": min(acc_r), "max_drop": max(drop), "max_acc_f": max(acc_f),
               "mean_acc_f": sum(acc_f) / len(acc_f), "steps": out.info.get("steps"), "seconds": secs,
               "stages": out.info.get("stages")}
        res["levers"][name] = row
        print(f"{tag} {name}: mean Acc_r {row['mean_acc_r']:.1f} (orig {res['original']['mean_acc_r']:.1f}), "
              f"worst {row['worst_acc_r']:.1f}, max drop {row['max_drop']:.1f}, max Acc_f {row['max_acc_f']:.1f}, "
              f"{row['steps']} steps, {secs:.0f} s", flush=True)
        shutil.rmtree(rd / "state", ignore_errors=True)
    return res


def table(res: dict) -> str:
    o = res["original"]["mean_acc_r"]
    lines = [f"`{res['data']}` at {res['img_size']} px, {res['num_classes']} classes, small_cnn"
             f"{' width ' + str(res['width']) if res['width'] else ''}; original mean Acc_r {o:.1f}",
             "", "| lever | mean Acc_r (Δ) | worst row Acc_r | max row drop | max Acc_f | mean Acc_f | steps | untrain s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["levers"].items():
        lines.append(f"| {name} | {r['mean_acc_r']:.1f} ({r['mean_acc_r'] - o:+.1f}) | {r['worst_acc_r']:.1f} | "
                     f"{r['max_drop']:.1f} | {r['max_acc_f']:.1f} | {r['mean_acc_f']:.2f} | {r['steps']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist5k", choices=sorted(DATASETS))
    ap.add_argument("--levers", default="all", help="comma-separated names from LEVERS, or 'all'")
    ap.add_argument("--mnist", default="/work/shared/data/mnist5k")
    ap.add_argument("--width", type=int, default=None, help="small_cnn width (default: the model's own)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "wf_fidelity"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    levers = list(LEVERS) if args.levers == "all" else args.levers.split(",")
    bad = [n for n in levers if n not in LEVERS]
    if bad:
        raise SystemExit(f"unknown lever(s) {bad}; known: {list(LEVERS)}")
    out = Path(args.out)
    res = run(args.data, levers, out, args.mnist, args.width)  # (rows are also printed as they finish)
    tag = args.data + (f"_w{args.width}" if args.width else "")
    path = out / f"{tag}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("original", {}).get("acc_r") == res["original"]["acc_r"]:
        res["levers"] = {**old.get("levers", {}), **res["levers"]}  # same original: merge lever rows
    path.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
