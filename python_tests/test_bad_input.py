"""Bad input, checked before any work: every case ends in ONE line that names the problem (exit code 2)
and leaves the run directory byte for byte as it was (or not created at all).

The table of cases (argv -> words the message must contain) doubles as the documentation of what is
refused; ``python -m pytest python_tests/test_bad_input.py -q -rA`` lists them.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import unlearn_fast
from unlearn_fast.cli import main

TINY = ["--max-per-class", "20"]


def snapshot(d: Path) -> dict[str, str] | None:
    """path -> sha256 of every file under ``d`` (None when ``d`` does not exist)."""
    if not d.exists():
        return None
    if d.is_file():
        return {"": hashlib.sha256(d.read_bytes()).hexdigest()}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run dir holding a trained original model (tiny recipe)."""
    d = tmp_path_factory.mktemp("finished")
    res = unlearn_fast.train(method="original", data="digits", run_dir=d, device="cpu", progress=False,
                             max_per_class=20, max_epochs=2, fit_to_data=False)
    assert (res.run_dir / "original.safetensors").exists()
    return d


def _idx(path: Path, arr: np.ndarray) -> None:
    dims = arr.shape
    head = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def stray_label_idx(root: Path) -> Path:
    rng = np.random.default_rng(0)
    lab = np.repeat(np.arange(3), 12)
    lab[-1] = 200  # one stray label: a 201-class problem with 198 empty classes
    _idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (36, 7, 7)))
    _idx(root / "train-labels-idx1-ubyte.gz", lab)
    _idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (9, 7, 7)))
    _idx(root / "t10k-labels-idx1-ubyte.gz", np.repeat(np.arange(3), 3))
    return root


def one_class_folder(root: Path) -> Path:
    from PIL import Image

    (root / "only").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(root / "only" / f"{i}.png")
    return root


# (id, argv with {run}/{tmp} placeholders, words the message must contain, which run dir: "new" | "finished")
CASES = [
    # -- method hyper-parameters ------------------------------------------------------------
    ("lr-not-number", ["train", "--set", "lr=abc"], ["lr", "number"], "finished"),
    ("batch-zero", ["train", "--set", "batch_size=0"], ["batch_size", ">= 1"], "finished"),
    ("batch-fraction", ["train", "--set", "batch_size=2.5"], ["batch_size", "integer"], "finished"),
    ("epochs-zero", ["train", "--set", "max_epochs=0"], ["max_epochs", ">= 1"], "finished"),
    ("epochs-negative", ["train", "--set", "max_epochs=-1"], ["max_epochs", ">= 1"], "finished"),
    ("lr-inf", ["train", "--set", "lr=.inf"], ["lr", "finite"], "finished"),
    ("lr-negative", ["train", "--set", "lr=-0.1"], ["lr", "> 0"], "finished"),
    ("unknown-hparam", ["train", "--set", "lambda=3"], ["unknown hyper-parameter", "lambda", "known"], "finished"),
    ("lambdas-length", ["train", "--set", "lambdas=[1,2]"], ["lambdas", "3 values"], "finished"),
    ("lambdas-type", ["train", "--set", "lambdas=abc"], ["lambdas", "list"], "finished"),
    ("bad-choice", ["train", "--set", "optimizer=rmsprop"], ["optimizer", "one of"], "finished"),
    ("bad-preset", ["train", "--set", "preset=fast"], ["preset", "fast", "available"], "finished"),
    ("momentum-range", ["train", "--set", "momentum=1.5"], ["momentum", "[0, 1)"], "finished"),
    ("chi-zero", ["train", "--set", "chi=0"], ["chi", ">= 1"], "finished"),
    ("accum-zero", ["train", "--set", "grad_accum=0"], ["grad_accum", ">= 1"], "finished"),
    ("split-choice", ["train", "--set", "untrain_split=test"], ["untrain_split", "one of"], "finished"),
    ("set-no-equals", ["train", "--set", "lr"], ["--set", "key=value"], "finished"),
    ("original-lr", ["train", "--original-set", "lr=0"], ["original", "lr", "> 0"], "finished"),
    ("original-batch", ["train", "--original-set", "batch_size=-3"], ["original", "batch_size"], "finished"),
    ("baseline-hparam", ["train", "--method", "ga", "--forget", "1", "--set", "epochs=0"], ["ga", "epochs"], "finished"),
    # -- data ----------------------------------------------------------------------------------
    ("unknown-data", ["train", "--data", "mnistt"], ["unknown dataset spec", "mnistt"], "new"),
    ("missing-dir", ["train", "--data", "idx:{tmp}/nowhere"], ["nowhere"], "new"),
    ("stray-label", ["train", "--data", "idx:{stray}"], ["no training sample", "200"], "new"),
    ("one-class", ["train", "--data", "folder:{oneclass}"], ["at least 2 classes"], "new"),
    ("cap-zero", ["train", "--max-per-class", "0"], ["max_per_class", ">= 1"], "new"),
    ("fraction-range", ["train", "--data-fraction", "1.5"], ["data_fraction", "(0, 1]"], "new"),
    ("img-size-zero", ["train", "--img-size", "0"], ["img_size", ">= 1"], "new"),
    ("in-chans", ["train", "--in-chans", "2"], ["in_chans", "1 or 3"], "new"),
    ("unknown-model", ["train", "--model", "resnet19"], ["unknown model", "resnet19"], "new"),
    ("seed-negative", ["train", "--seed", "-1"], ["seed", "non-negative"], "new"),
    ("other-run", ["train", "--data", "digits", "--seed", "3"], ["holds another run", "seed"], "finished"),
    # -- forget requests -----------------------------------------------------------------------
    ("forget-range", ["train", "--forget", "12"], ["forget", "0..9", "12"], "finished"),
    ("forget-all", ["train", "--forget", "0,1,2,3,4,5,6,7,8,9"], ["nothing would be retained"], "finished"),
    ("forget-random-k", ["train", "--forget", "random:0"], ["K must be in 1..9"], "finished"),
    ("forget-similar-form", ["train", "--forget", "similar:2"], ["similar:K:<dataset spec>"], "finished"),
    ("forget-similar-data", ["train", "--forget", "similar:2:idx:{tmp}/nowhere"], ["does not exist"], "finished"),
    ("forget-words", ["train", "--forget", "cats"], ["not understood", "cats"], "finished"),
    ("forget-original", ["train", "--method", "original", "--forget", "1"], ["forget", "original"], "finished"),
    # -- run directories -------------------------------------------------------------------------
    ("run-dir-file", ["train"], ["is a file"], "file"),
    ("run-dir-under-file", ["train", "--run-dir", "{file}/sub"], ["is a file"], "file"),
    ("corrupt-config", ["train"], ["config.yaml", "corrupt"], "corrupt-config"),
    ("corrupt-splits", ["train"], ["splits.json", "corrupt"], "corrupt-splits"),
    ("evaluate-not-run", ["evaluate", "--run-dir", "{tmp}/empty"], ["not an unlearn_fast run directory"], "new"),
    ("evaluate-no-wf", ["evaluate"], ["wf.safetensors", "missing"], "finished"),
    ("eval-splits", ["evaluate", "--eval-splits", "train"], ["eval_splits", "test"], "finished"),
    # -- environment -----------------------------------------------------------------------------
    ("device-tpu", ["train", "--device", "tpu"], ["device", "tpu"], "new"),
    ("device-cuda-index", ["train", "--device", "cuda:7"], ["cuda:7"], "new"),
    ("threads-negative", ["train", "--threads", "-1"], ["--threads", ">= 1"], "new"),
    ("threads-zero", ["train", "--threads", "0"], ["--threads", ">= 1"], "new"),
    # -- config files ----------------------------------------------------------------------------
    ("config-missing", ["train", "--config", "{tmp}/none.yaml"], ["none.yaml", "does not exist"], "new"),
    ("config-corrupt", ["train", "--config", "{cfg_corrupt}"], ["not valid YAML"], "new"),
    ("config-unknown-key", ["train", "--config", "{cfg_unknown}"], ["unknown key", "learning_rate", "known"], "new"),
    ("config-hparams-list", ["train", "--config", "{cfg_hp_list}"], ["hparams must be a mapping"], "new"),
    ("config-not-mapping", ["train", "--config", "{cfg_list}"], ["must hold a mapping"], "new"),
    # -- compare: every method and --set checked before the original model trains ----------------
    ("compare-unknown-method", ["compare", "--methods", "ga,sgd", "--forget", "1"], ["unknown method", "sgd"], "new"),
    ("compare-bad-set", ["compare", "--methods", "ga", "--forget", "1", "--set", "ga.foo=1"], ["ga", "foo"], "new"),
    ("compare-bad-value", ["compare", "--methods", "ga,ft", "--forget", "1", "--set", "ft.lr=-1"], ["ft", "lr"], "new"),
    ("compare-retrain", ["compare", "--methods", "ga,retrain", "--forget", "1"], ["retrain", "always"], "new"),
    ("compare-missing-weights", ["compare", "--methods", "ga", "--forget", "1", "--weights", "{tmp}/none.pth"],
     ["weights file not found", "none.pth"], "new"),
    ("compare-bad-feature-layers", ["compare", "--methods", "ga", "--forget", "1", "--feature-layers", "nope1"],
     ["feature_layers", "nope1"], "new"),
    ("compare-set-other", ["compare", "--methods", "ga", "--forget", "1", "--set", "ft.lr=0.1"], ["ft", "not in methods"], "new"),
    ("compare-set-form", ["compare", "--methods", "ga", "--forget", "1", "--set", "lr=0.1"], ["METHOD.KEY"], "new"),
    ("compare-no-forget", ["compare", "--methods", "ga"], ["--forget"], "new"),
    ("compare-forget-range", ["compare", "--methods", "ga", "--forget", "10"], ["forget", "10"], "new"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    t = tmp_path_factory.mktemp("inputs")
    (t / "stray").mkdir()
    stray_label_idx(t / "stray")
    one_class_folder(t / "oneclass")
    (t / "corrupt.yaml").write_text("model: [small_cnn\n")
    (t / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (t / "hp_list.yaml").write_text("hparams: [1, 2]\n")
    (t / "list.yaml").write_text("- model\n- data\n")
    (t / "afile").write_text("not a directory\n")
    return t


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_and_run_dir_untouched(case, finished, inputs, tmp_path, capsys):
    name, argv, words, where = case
    if name == "device-cuda-index" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    run = {"new": tmp_path / "run", "finished": finished, "file": inputs / "afile"}.get(where)
    if where in ("corrupt-config", "corrupt-splits"):
        run = tmp_path / "run"
        import shutil

        shutil.copytree(finished, run)
        if where == "corrupt-config":
            (run / "config.yaml").write_text("model: small_cnn\ndata: [digits\n")
        else:
            (run / "splits.json").write_text('{"name": "digits", "split_')
    fmt = {"tmp": tmp_path, "stray": inputs / "stray", "oneclass": inputs / "oneclass", "file": inputs / "afile",
           "cfg_corrupt": inputs / "corrupt.yaml", "cfg_unknown": inputs / "unknown.yaml",
           "cfg_hp_list": inputs / "hp_list.yaml", "cfg_list": inputs / "list.yaml"}
    argv = [a.format(**fmt) for a in argv]
    if "--run-dir" not in argv:
        argv += ["--run-dir", str(run)]
    if argv[0] in ("train", "compare") and "--max-per-class" not in argv and where == "new":
        argv += TINY
    argv += ["--device", "cpu"] if "--device" not in argv else []
    argv += ["--quiet"]
    watched = [run, tmp_path / "run", inputs]
    before = [snapshot(d) for d in watched]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.splitlines() if not ln.startswith("unlearn_fast: data:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert [snapshot(d) for d in watched] == before, "the command changed files although it was refused"


def test_cuda_without_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    rc = main(["train", "--device", "cuda", "--run-dir", str(tmp_path / "r"), "--quiet", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to a read-only directory")
def test_read_only_run_dir_is_refused_up_front(finished, tmp_path, capsys):
    import shutil

    d = tmp_path / "ro"
    shutil.copytree(finished, d)
    before = snapshot(d)
    os.chmod(d, 0o555)
    try:
        rc = main(["train", "--run-dir", str(d), "--device", "cpu", "--quiet"])
    finally:
        os.chmod(d, 0o755)
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err
    assert snapshot(d) == before


def test_busy_run_dir_is_refused(finished, capsys):
    """A second process on a run dir that another one holds gets one line naming the holder's pid."""
    code = ("import sys, time; from unlearn_fast.run_files import RunLock\n"
            "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(finished)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(finished)
        rc = main(["train", "--run-dir", str(finished), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and "in use by another unlearn_fast process" in err and f"pid {holder.pid}" in err, err
        assert snapshot(finished) == before
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process: the same run dir is usable again
    t0 = time.time()
    from unlearn_fast.run_files import RunLock

    with RunLock(finished):
        pass
    assert time.time() - t0 < 5
