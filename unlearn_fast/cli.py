"""``unlearn-fast``: demo | train | evaluate | report | compare | list | recipe.

Every subcommand takes ``--config FILE.yaml`` whose keys are the long option names (``run_dir``,
``model``, ``data``, ``method``, ``seed``, ...) plus an ``hparams:`` mapping (and ``original_hparams:``);
flags given on the command line win over the file; unknown keys are an error. ``--set key=value``
(repeatable) overrides one method hyper-parameter (values parsed as YAML: ``--set lr=0.05 --set
lambdas=[1,10,1]``), ``--original-set`` one of the original model's recipe.

Exit codes: 0 ok (warnings are printed), 1 a stage or method failed its health check (see the
verdict printed and metrics.json), 2 bad input or environment (one line on stderr, nothing written),
130 interrupted (progress is checkpointed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from unlearn_fast.config_keys import COMMAND_KEYS, COMPARE_API_KEYS, RUN_KEYS, TRAIN_KEYS

# The demo recipe: digits (embedded, 8x8), the small CNN, every class untrained in one round, WF's
# defaults (docs/wf_fidelity.md) with two changes for a 1.3k-image, 8x8 training set (both measured):
# * batch 128 without accumulation: 128 x 16 = 2,048 images per step is more than the whole set;
# * lambda_1 = 3 instead of the default 2: at 2 the 18-image validation rows select a state where class 9
#   keeps Acc_f 13.9% on the test split (health: WARN); at 3 every class is at Acc_f <= 2.8%.
# `--set preset=paper` runs the paper's values.
DEMO = {
    "model": "small_cnn", "data": "digits", "run_dir": "runs/demo", "seed": 0, "retrain": True,
    "hparams": {"batch_size": 128, "grad_accum": 1, "max_epochs": 40, "lambdas": [1, 3, 1]},
}

EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPT = 1, 2, 130


class InputError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def _parse_set(items: Sequence[str] | None, flag: str = "--set") -> dict[str, Any]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise InputError(f"{flag} expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise InputError(f"{flag} {it!r}: the value is not valid YAML (quote strings, e.g. key='a b')") from None
    return out


def _load_config(path: str | None, known: Sequence[str]) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file {p} does not exist" if not p.exists() else f"config file {p} is not a file")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        raise InputError(f"config file {p} is not valid YAML" + (f" (line {where.line + 1})" if where else "")) from None
    if not isinstance(cfg, dict):
        raise InputError(f"config file {p} must hold a mapping of option: value, got a {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise InputError(f"config file {p}: unknown key(s) {unknown}; known: {sorted(known)}")
    for k in ("hparams", "original_hparams"):
        if cfg.get(k) is not None and not isinstance(cfg[k], dict):
            raise InputError(f"config file {p}: {k} must be a mapping (key: value), got a {type(cfg[k]).__name__}")
    return cfg


def _merged(args: argparse.Namespace, keys: Sequence[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    known = [*keys, "hparams", "original_hparams"]
    cfg = {**(base or {}), **_load_config(getattr(args, "config", None), known)}
    for k in keys:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    hp = dict(cfg.get("hparams") or {})
    hp.update(_parse_set(getattr(args, "set", None)))
    cfg["hparams"] = hp
    if "original_hparams" in cfg or getattr(args, "original_set", None):
        orig = dict(cfg.get("original_hparams") or {})
        orig.update(_parse_set(getattr(args, "original_set", None), "--original-set"))
        cfg["original_hparams"] = orig
    return cfg


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with any of these options (flags win)")
    p.add_argument("--run-dir", dest="run_dir", help="run directory (created; re-running resumes)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--threads", type=int, help="torch CPU threads (demo default: 1 - the small CNN's ops are too small to split)")


def _data_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="backbone name (unlearn-fast list), or timm:<name> / tv:<name>")
    p.add_argument("--weights", metavar="FILE", help="local .pt/.pth/.safetensors (timm / torchvision / unlearn_fast) "
                                                     "the model starts from; the classifier is resized to the data's classes")
    p.add_argument("--feature-layers", dest="feature_layers", metavar="A,B,C",
                   help="module names of the stage outputs used for EC and CKA / IDI (default: chosen by stage)")
    p.add_argument("--data", help="dataset spec: digits | idx:DIR | cifar10:DIR | cifar100:DIR | folder:DIR | faces:DIR")
    p.add_argument("--seed", type=int)
    p.add_argument("--img-size", dest="img_size", type=int, help="input size in px (default 32; the small CNN keeps the data's size)")
    p.add_argument("--in-chans", dest="in_chans", type=int, help="input channels (default: the data's)")
    p.add_argument("--max-per-class", dest="max_per_class", type=int, help="keep at most N images per class (seeded)")
    p.add_argument("--data-fraction", dest="data_fraction", type=float, help="keep this fraction of each class (seeded)")
    p.add_argument("--original-set", dest="original_set", action="append", metavar="KEY=VALUE",
                   help="override the original / retrained models' recipe (e.g. max_epochs=20; unlearn-fast list original)")


def _run_opts(p: argparse.ArgumentParser) -> None:
    """Run options (unlearn_fast.methods.run_options): how the run uses the machine, not what it computes."""
    p.add_argument("--workers", type=int, metavar="N",
                   help="DataLoader worker processes decoding images (default: 0 on CPU; on CUDA min(8, CPUs) "
                        "for folder:/faces: data too big to cache in memory)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="NHWC memory layout for training (CUDA only; ignored with a note elsewhere)")
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 autocast in every training stage (CUDA only; ignored with a note elsewhere; "
                        "recorded in the artefacts' fingerprints)")


def _eval_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-splits", dest="eval_splits", help="splits WF is evaluated on: test[,train][,val] (default test,train)")
    p.add_argument("--eval-train-max", dest="eval_train_max", type=int,
                   help="train images evaluated under every gate row (stratified; default 2000, 0 = all)")


def _splits(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    return tuple(t.strip() for t in (v.split(",") if isinstance(v, str) else v) if t.strip())


def _print_health(health: dict[str, Any] | None) -> None:
    if not health:
        return
    print(f"\nverdict: {health['status'].upper()}")
    for r in health.get("reasons", []):
        print(f"  - {r}")
    for n in health.get("notes", []):
        print(f"  note: {n}")


def _print_summary(metrics: dict[str, Any]) -> None:
    from unlearn_fast.evaluation.report import wf_table_markdown

    print(wf_table_markdown(metrics))
    t = metrics["splits"]["test"]
    names = metrics["class_names"]
    print("\nper class (test):  class  Acc_f%  Acc_r%")
    for c, n in enumerate(names):
        print(f"  {n:>12}  {t['wf']['acc_f'][c]:6.1f}  {t['wf']['acc_r'][c]:6.1f}")
    print(f"original model test accuracy: {t['original']['acc']:.1f}%")
    for name, st in (metrics.get("health", {}).get("stages") or {}).items():
        print(f"stage {name}: {st.get('steps')} optimizer steps, {st.get('epochs')} epochs, {st.get('seconds', 0):.1f} s"
              + (", early-stopped" if st.get("stopped_early") else ""))


def _set_threads(n: int | None) -> None:
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"--threads must be an integer >= 1, got {n!r}")
        import torch

        torch.set_num_threads(n)


def _status_code(health: dict[str, Any] | None) -> int:
    return EXIT_FAIL if health and health.get("status") == "fail" else 0


def _train_kwargs(cfg: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    kw = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    if "eval_splits" in kw:
        kw["eval_splits"] = _splits(kw["eval_splits"])
    return kw


def cmd_demo(args: argparse.Namespace) -> int:
    import unlearn_fast

    cfg = _merged(args, COMMAND_KEYS["demo"], DEMO)
    # Measured here: one WF step of the small CNN took 40 ms on 1 thread and 660 ms on 2 busy cores.
    _set_threads(cfg.get("threads") or 1)
    t0 = time.perf_counter()
    res = unlearn_fast.train(method="wf", progress=not args.quiet, original_hparams=cfg.get("original_hparams"),
                             **_train_kwargs(cfg, TRAIN_KEYS), **cfg["hparams"])
    _print_summary(res.metrics)
    _print_health(res.health)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; report: {res.run_dir / 'report.md'}")
    return _status_code(res.health)


def cmd_train(args: argparse.Namespace) -> int:
    import unlearn_fast

    cfg = _merged(args, COMMAND_KEYS["train"])
    _set_threads(cfg.get("threads"))
    kw = _train_kwargs(cfg, TRAIN_KEYS)
    if args.no_eval:
        kw["evaluate"] = False
    if isinstance(kw.get("forget"), list):
        kw["forget"] = ",".join(map(str, kw["forget"]))
    method = cfg.get("method", "wf")
    res = unlearn_fast.train(method=method, progress=not args.quiet, original_hparams=cfg.get("original_hparams"),
                             **kw, **cfg["hparams"])
    if res.metrics:
        _print_summary(res.metrics)
    if "test_acc" in res.info:
        print(f"{method} model test accuracy: {res.info['test_acc']:.1f}%")
    fr = res.info.get("forget_request")
    if fr:
        print(f"forget request {fr['classes']} ({fr['mode']}, {fr['file']}): "
              + ", ".join(f"class {c} Acc_f {v:.1f}% (original {fr['original_acc_f'][c]:.1f}%)" for c, v in fr["acc_f"].items())
              + f"; Acc_r {fr['acc_r']:.1f}% (original {fr['original_acc_r']:.1f}%)")
    _print_health(res.health)
    print(f"run directory: {res.run_dir}")
    return _status_code(res.health)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import unlearn_fast

    cfg = _merged(args, COMMAND_KEYS["evaluate"])
    _set_threads(cfg.get("threads"))
    if not cfg.get("run_dir"):
        raise InputError("evaluate needs --run-dir")
    kw = {}
    if cfg.get("eval_splits") is not None:
        kw["splits"] = _splits(cfg["eval_splits"])
    if cfg.get("eval_train_max") is not None:
        kw["train_max"] = cfg["eval_train_max"]
    for k in ("representation", "knn_data", *RUN_KEYS):
        if cfg.get(k) is not None:
            kw[k] = cfg[k]
    m = unlearn_fast.evaluate(cfg["run_dir"], device=cfg.get("device"), batch_size=cfg.get("batch_size", 512),
                              insertion_steps=cfg.get("insertion_steps", 10), progress=not args.quiet, **kw)
    _print_summary(m)
    _print_health(m.get("health"))
    return _status_code(m.get("health"))


def cmd_report(args: argparse.Namespace) -> int:
    from unlearn_fast.evaluation.report import write_report

    cfg = _merged(args, ["run_dir"])
    if not cfg.get("run_dir"):
        raise InputError("report needs --run-dir")
    print(write_report(cfg["run_dir"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from unlearn_fast import _ext
    from unlearn_fast.data import list_datasets
    from unlearn_fast.methods import get_method_class, list_methods
    from unlearn_fast.methods.hparams import describe_hparams
    from unlearn_fast.models import list_models, list_prefixes

    if args.what == "recipes":
        from unlearn_fast.recipes import format_list

        print(format_list())
        return 0
    if args.what:
        cls = get_method_class(args.what)
        rows = describe_hparams(cls.Hparams)
        presets = cls.presets()
        if args.json:
            print(json.dumps({"method": args.what, "hparams": rows, "presets": presets}, indent=1, default=str))
            return 0
        print(f"{args.what}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
        w = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"  {r['name']:<{w}}  {r['type']:<28} default {r['default']!r:<14} {r['meaning']}")
        if presets:
            print("presets: " + "; ".join(f"{k} = {v}" for k, v in presets.items()))
        return 0
    out = {"methods": list_methods(), "models": list_models(), "model prefixes": list(list_prefixes().values()),
           "datasets": list_datasets(),
           "extension": {"loaded": _ext.HAS_C, "cuda": _ext.HAS_C_CUDA}}
    print(json.dumps(out, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def _parse_method_sets(items: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``--set ga.lr=0.01`` -> ``{"ga": {"lr": 0.01}}`` (values parsed as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in _parse_set(items).items():
        meth, dot, key = k.rpartition(".")
        if not dot or not meth or not key:
            raise InputError(f"compare --set expects METHOD.KEY=VALUE (e.g. ga.lr=0.01), got {k!r}")
        out.setdefault(meth, {})[key] = v
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    import unlearn_fast
    from unlearn_fast.evaluation.compare_report import compare_table_markdown

    keys = COMMAND_KEYS["compare"]
    file_cfg = _load_config(getattr(args, "config", None), [*keys, "hparams", "original_hparams"])
    cfg = {**file_cfg, **{k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}}
    _set_threads(cfg.get("threads"))
    hp = {m: dict(v or {}) for m, v in (file_cfg.get("hparams") or {}).items()}
    for m, v in _parse_method_sets(args.set).items():
        hp.setdefault(m, {}).update(v)
    orig_hp = dict(file_cfg.get("original_hparams") or {})
    orig_hp.update(_parse_set(args.original_set, "--original-set"))
    methods = cfg.get("methods")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods or cfg.get("forget") is None:
        raise InputError("compare needs --methods (e.g. ft,ga,ec) and --forget (e.g. 1,3 | random:2 | similar:2:SPEC)")
    forget = cfg["forget"]
    forget = ",".join(map(str, forget)) if isinstance(forget, list) else str(forget)
    kw = {k: cfg[k] for k in COMPARE_API_KEYS if cfg.get(k) is not None}
    if cfg.get("idi") is not None:
        kw["representation_options"] = {"idi": cfg["idi"]}
    res = unlearn_fast.compare(methods=methods, forget=forget, hparams=hp,
                               original_hparams=orig_hp if (orig_hp or "original_hparams" in file_cfg) else None,
                               progress=not args.quiet, **kw)
    print(compare_table_markdown(res.metrics))
    _print_health(res.health)
    print(f"report: {res.report}")
    return _status_code(res.health)


def cmd_recipe(args: argparse.Namespace) -> int:
    """``recipe NAME [--check]``: run a recipe (recipes/NAME.yaml or a path) and, with --check, compare its
    metrics.json with the recipe's ranges (exit 1 when one is out or the health verdict is not accepted)."""
    from unlearn_fast import recipes

    if args.list or args.name == "list":
        print(recipes.format_list())
        return 0
    if not args.name:
        raise InputError(f"recipe needs a NAME (one of {', '.join(recipes.list_recipes())}) or --list")
    rec = recipes.load(args.name)
    recipes.resolve(rec, args.data_root)  # the data it needs exists: checked before any work
    run_dir = Path(args.run_dir or Path("runs") / "recipes" / rec.name)
    _set_threads(args.threads)
    rc = recipes.run(rec, run_dir, main, data_root=args.data_root, quiet=args.quiet)
    if rc not in (0, EXIT_FAIL):
        return rc
    if not args.check:
        return rc
    mpath = run_dir / "metrics.json"
    if not mpath.is_file():
        raise InputError(f"{mpath} is missing after the run: nothing to check")
    res = recipes.check(rec, json.loads(mpath.read_text()), rc)
    print("\n" + recipes.format_check(rec, res))
    return 0 if res.ok else EXIT_FAIL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn-fast", description="Make an image classifier forget classes, fast, and prove it.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="digits + small CNN: train, retrain, WF-untrain all classes, evaluate, report")
    _common(d)
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a WF hyper-parameter")
    d.add_argument("--original-set", dest="original_set", action="append", metavar="KEY=VALUE",
                   help="override the original / retrained models' recipe")
    _run_opts(d)
    d.set_defaults(func=cmd_demo)
    t = sub.add_parser("train", help="train the original model, the retrained models, or unlearn (--method)")
    _common(t)
    t.add_argument("--method", help="original | retrain | wf | ... (unlearn-fast list)")
    _data_opts(t)
    t.add_argument("--retrain", action="store_true", default=None, help="also train the per-class retrained models (needed for Act-Dist / JS-Div)")
    t.add_argument("--forget", help="forget request: 3 | 1,4,7 | random:K | similar:K:SPEC (wf: bake/compose those gate rows)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method hyper-parameter (repeatable)")
    _eval_opts(t)
    t.add_argument("--no-eval", action="store_true", help="do not evaluate after WF untraining")
    _run_opts(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="evaluate every class of a run's WF-Net; writes metrics.json and report.md")
    _common(e)
    e.add_argument("--batch-size", dest="batch_size", type=int)
    e.add_argument("--insertion-steps", dest="insertion_steps", type=int)
    _eval_opts(e)
    e.add_argument("--representation", help="per-class representation metrics of each baked gate row: all | idi,probe,knn,mia")
    e.add_argument("--knn-data", dest="knn_data", action="append", metavar="SPEC", help="downstream data for k-NN (repeatable)")
    _run_opts(e)
    e.set_defaults(func=cmd_evaluate)
    r = sub.add_parser("report", help="re-write report.md and figures from metrics.json")
    _common(r)
    r.set_defaults(func=cmd_report)
    c = sub.add_parser("compare", help="several unlearning methods on one original model and forget request: "
                       "metrics.json, report.md (EC Table 1) and figures")
    _common(c)
    c.add_argument("--methods", help="comma-separated method names, e.g. ft,ga,scrub,ec (unlearn-fast list)")
    c.add_argument("--forget", help="forget request: 3 | 1,4,7 | random:K | similar:K:DATASET_SPEC")
    _data_opts(c)
    c.add_argument("--tsne-method", dest="tsne_method", help="method shown in the t-SNE figure (default: best H-Mean)")
    c.add_argument("--representation", help="representation metrics for every row: all | a comma list of idi,probe,knn,mia")
    c.add_argument("--knn-data", dest="knn_data", action="append", metavar="SPEC",
                   help="downstream dataset spec for EC's k-NN columns (repeatable; EC uses three)")
    c.add_argument("--idi", help="IDI critic setting: ec (EC App. B.6) | cpu (cheap; the default on CPU)")
    c.add_argument("--set", action="append", metavar="METHOD.KEY=VALUE", help="override a method hyper-parameter (repeatable)")
    _run_opts(c)
    c.set_defaults(func=cmd_compare)
    li = sub.add_parser("list", help="methods, models, datasets, extension status; `list METHOD`: its hyper-parameters")
    li.add_argument("what", nargs="?", help="a method name: every hyper-parameter with its default and meaning")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_list)
    rc = sub.add_parser("recipe", help="run a recipe (settings + the metric ranges it must land in); --check compares them")
    rc.add_argument("name", nargs="?", help="recipe name (recipe --list) or a path to a recipe .yaml")
    rc.add_argument("--check", action="store_true", help="print each metric with its range; exit 1 if any is out of range")
    rc.add_argument("--list", action="store_true", help="list the shipped recipes with where their ranges come from")
    rc.add_argument("--run-dir", dest="run_dir", help="run directory (default runs/recipes/NAME; re-running resumes)")
    rc.add_argument("--data-root", dest="data_root", help="folder that ${DATA} in a recipe names (default: $UNLEARN_FAST_DATA, "
                    "else ../shared/data beside the source checkout)")
    rc.add_argument("--threads", type=int, help="torch CPU threads for this process")
    rc.add_argument("--quiet", action="store_true", help="no progress output")
    rc.set_defaults(func=cmd_recipe)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from unlearn_fast.methods.loop import NonFiniteError

    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # logs, CI, pipes: one line per evaluation from the loop instead of progress bars
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return _run_ranked(args)
    except KeyboardInterrupt:
        print("\ninterrupted: progress is checkpointed; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPT
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:  # disk full, read-only file system, ...
        print(f"error: {exc.strerror or exc} ({exc.filename or 'run directory'}); fix it and run the same command again",
              file=sys.stderr)
        return EXIT_INPUT


def _run_ranked(args: argparse.Namespace) -> int:
    """``args.func(args)``; under ``torchrun --nproc_per_node N`` first joins the process group (NCCL and
    ``cuda:LOCAL_RANK`` on CUDA, gloo on the CPU; unlearn_fast.distributed) - rank 0 prints and writes,
    the other ranks train their data shard silently."""
    from unlearn_fast import distributed as ddp

    dev = ddp.init_from_env(getattr(args, "device", None))
    if dev is None:
        return args.func(args)
    import torch.distributed as dist

    if hasattr(args, "device"):
        args.device = str(dev)
    quiet = None
    if ddp.rank() > 0:
        os.environ["TQDM_DISABLE"] = "1"
        if hasattr(args, "quiet"):
            args.quiet = True  # progress bars are rank 0's
        quiet, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        return args.func(args)
    finally:
        if quiet is not None:
            sys.stdout.close()
            sys.stdout = quiet
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
