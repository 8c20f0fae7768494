"""The data pipeline a GPU needs (issue 11 item 5): lazily decoded folder data, DataLoader workers that do
not change results, run options (workers / channels_last / bf16) from the CLI and API down to LoopConfig,
and fingerprints that run options other than bf16 leave alone.

References: files decoded with PIL + NumPy (float64) here, PIL's float-mode bilinear resize; golden
fingerprints recorded from the code before this change."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_fast.data import load, make_loader
from unlearn_fast.data.pipeline import (
    MAX_DEFAULT_WORKERS,
    default_workers,
    eval_loader,
    eval_workers,
    lazily_decoded,
    set_eval_workers,
)
from unlearn_fast.methods import RunContext
from unlearn_fast.methods.run_options import RunOptions
from unlearn_fast.run_files import fingerprint

LUMA_REF = np.array([0.299, 0.587, 0.114])  # BT.601, written out here (not imported from the package)


def make_tree(root: Path, n_classes: int = 3, per_class: int = 7, seed: int = 0, size: tuple[int, int] | None = None,
              fmt: str = "png") -> None:
    """``root/c<k>/<i>.<fmt>``: odd sizes (9..22 px) unless ``size``; RGB, gray and palette images."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = os.path.join(root, f"c{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            h, w = size or (int(rng.integers(9, 23)), int(rng.integers(9, 23)))
            arr = (rng.random((h, w, 3)) * 120 + 40 * c).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if i % 3 == 1:
                img = img.convert("L")
            elif i % 3 == 2 and fmt == "png":
                img = img.convert("P")
            img.save(os.path.join(d, f"{i}.{fmt}"))


def ref_image(path: str, in_chans: int, size: int, mode: str) -> np.ndarray:
    """Independent decode: PIL -> float64 [0, 1], channel adaptation, PIL float bilinear resize (+ centre crop)."""
    img = Image.open(path)
    if img.mode in ("L", "LA", "1"):
        a = np.asarray(img.convert("L"), dtype=np.float64)[None] / 255.0
    else:
        a = np.asarray(img.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0
    if a.shape[0] == 3 and in_chans == 1:
        a = (a * LUMA_REF[:, None, None]).sum(0, keepdims=True)
    h, w = a.shape[1:]
    if mode == "stretch" or h == w:
        oh, ow = size, size
    elif h < w:
        oh, ow = size, max(size, round(w * size / h))
    else:
        oh, ow = max(size, round(h * size / w)), size
    if (oh, ow) != (h, w):
        a = np.stack([np.asarray(Image.fromarray(ch.astype(np.float32), mode="F").resize((ow, oh), Image.BILINEAR))
                      for ch in a]).astype(np.float64)
    top, left = (oh - size) // 2, (ow - size) // 2
    a = a[:, top:top + size, left:left + size]
    if a.shape[0] == 1 and in_chans == 3:
        a = np.repeat(a, 3, axis=0)
    return a


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    make_tree(root)
    return root


def _all(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


# -- lazy decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,in_chans,size,resize", [("folder", 3, 13, "crop"), ("folder", 1, 8, "stretch"),
                                                       ("folder", 3, 16, "stretch"), ("faces", 1, 12, "stretch")])
def test_lazy_folder_matches_reference_decode(tree, kind, in_chans, size, resize):
    b = load(f"{kind}:{tree}", img_size=size, in_chans=in_chans, resize=resize, cache=False, mean=[0.0], std=[1.0])
    assert lazily_decoded(b.train) and not b.train.is_cached
    for split in ("train", "val", "test"):
        ds = b.split(split)
        for i in range(len(ds)):
            x, y = ds[i]
            ref = ref_image(ds.files[i], in_chans, size, resize)
            assert x.dtype == torch.float32 and tuple(x.shape) == (in_chans, size, size)
            np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=2e-6, err_msg=ds.files[i])
            assert y == int(Path(ds.files[i]).parent.name[1:])


def test_lazy_equals_eager_cache_and_same_fingerprint(tree):
    lazy = load(f"folder:{tree}", img_size=11, cache=False)
    eager = load(f"folder:{tree}", img_size=11, cache=True)
    assert eager.train.is_cached and not lazy.train.is_cached
    for s in ("train", "val", "test"):
        xl, yl = _all(lazy.split(s))
        xe, ye = _all(eager.split(s))
        assert torch.equal(xl, xe) and torch.equal(yl, ye)
        xb, yb = next(iter(make_loader(lazy.split(s), 64, shuffle=False)))  # the batched path (__getitems__)
        assert torch.equal(xb, xe[: len(xb)]) and torch.equal(yb, ye[: len(yb)])
    assert lazy.manifest() == eager.manifest()


def test_parallel_decode_at_load_equals_in_process(tree):
    """The cache and the normalisation statistics decoded in worker processes: same values, same order."""
    lazy = load(f"folder:{tree}", img_size=10, cache=False)
    ds = lazy.train
    ref = torch.cat(list(ds._processed_batches(range(len(ds)), batch=4)))
    got = list(ds._processed_batches(range(len(ds)), batch=4, workers=2))
    assert len(got) == -(-len(ds) // 4) and torch.equal(torch.cat(got), ref)
    assert ds.channel_stats([3, 0, 7], workers=2) == ds.channel_stats([3, 0, 7])
    a = load(f"folder:{tree}", img_size=10, cache=True, workers=2)
    b = load(f"folder:{tree}", img_size=10, cache=True)
    assert torch.equal(a.train._cache, b.train._cache) and (a.mean, a.std) == (b.mean, b.std)
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        load(f"folder:{tree}", workers=-1)


def test_fingerprints_unchanged_golden(tmp_path):
    """Manifest / artefact fingerprints as the code before issue 11 made them (a changed value would make
    every existing run directory recompute its models)."""
    make_tree(tmp_path / "t", seed=0)
    b = load(f"folder:{tmp_path / 't'}", img_size=16)
    m = b.manifest()
    m["name"] = "folder:X"  # the directory is part of the name; the rest must be stable
    assert fingerprint(m) == "33aa69099f204f44"
    d = load("digits")
    assert fingerprint(d.manifest()) == "9a824248094fcabf"
    ctx = RunContext(data=d, model_name="small_cnn", run_dir=tmp_path, device=torch.device("cpu"))
    assert ctx.fingerprint("original", {"lr": 0.001}, {"x": "y"}) == "7ff3514b7d9334ef"


def test_run_options_fingerprint_and_loop_options(tmp_path, capsys):
    d = load("digits")
    want = "7ff3514b7d9334ef"
    try:
        cpu = RunContext(data=d, model_name="small_cnn", run_dir=tmp_path, device=torch.device("cpu"))
        cpu.apply_run_options(RunOptions.make(workers=3, channels_last=True, bf16=True))
        assert "CUDA only" in capsys.readouterr().err  # ignored on the CPU, with a note
        assert cpu.loop_options() == {"num_workers": 3, "channels_last": False, "amp": False}
        assert cpu.loop_options(amp=True)["amp"] is True  # a method's own amp stays
        assert cpu.fingerprint("original", {"lr": 0.001}, {"x": "y"}) == want
        # a CUDA context (nothing here touches the GPU): the options reach the loop; only bf16 is fingerprinted
        gpu = RunContext(data=d, model_name="small_cnn", run_dir=tmp_path, device=torch.device("cuda"))
        gpu.apply_run_options(RunOptions.make(workers=None, channels_last=True))
        assert gpu.loop_options() == {"num_workers": 0, "channels_last": True, "amp": False}  # digits: in memory
        assert gpu.fingerprint("original", {"lr": 0.001}, {"x": "y"}) == want
        gpu._data_fp = None
        gpu.apply_run_options(RunOptions.make(workers=2, bf16=True))
        assert gpu.loop_options() == {"num_workers": 2, "channels_last": False, "amp": True}
        assert gpu.fingerprint("original", {"lr": 0.001}, {"x": "y"}) != want
        assert eval_workers() == 2
    finally:
        set_eval_workers(0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_run_options_validation(bad):
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        RunOptions.make(workers=bad)
    with pytest.raises(ValueError, match="bf16 must be true or false"):
        RunOptions.make(bf16="yes")


def test_default_workers(tree):
    lazy = load(f"folder:{tree}", img_size=8, cache=False)
    cached = load(f"folder:{tree}", img_size=8, cache=True)
    sub = lazy.subset("train", classes=[1])
    assert lazily_decoded(lazy.train) and lazily_decoded(sub) and not lazily_decoded(cached.train)
    assert not lazily_decoded(load("digits").train)
    want = max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))
    assert default_workers(sub, "cuda") == want and default_workers(lazy.train, "cuda:1") == want
    assert default_workers(lazy.train, "cpu") == 0 and default_workers(cached.train, "cuda") == 0


# -- workers do not change results ----------------------------------------------------------------
def test_workers_give_identical_batches(tree):
    b = load(f"folder:{tree}", img_size=9, cache=False)
    ds = b.train

    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = make_loader(ds, 4, shuffle=True, seed=3, epoch=1, num_workers=workers)
        return [(x.clone(), y.clone()) for x, y in loader]

    ref = batches(0)
    got = batches(2)
    assert len(ref) == len(got) == -(-len(ds) // 4)
    for (x0, y0), (x2, y2) in zip(ref, got):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))
    assert torch.equal(torch.cat([y for _, y in got]), ds.targets[order])  # the sampler's order, not the workers'
    try:
        plain = [y for _, y in eval_loader(ds, 5)]
        set_eval_workers(2)
        assert eval_loader(ds, 5).num_workers == 2
        assert eval_loader(load("digits").train, 5).num_workers == 0  # in-memory data: in process
        for (x, y), y0 in zip(eval_loader(ds, 5), plain):
            assert torch.equal(y, y0)
        assert torch.equal(torch.cat([x for x, _ in eval_loader(ds, 5)]), _all(ds)[0])
    finally:
        set_eval_workers(0)


# -- CLI and API ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["train", "--data", "digits"], ["evaluate"],
                                 ["compare", "--methods", "ft", "--forget", "1"], ["demo"]])
def test_cli_bad_workers_is_one_line_exit_2(cmd, tmp_path, capsys):
    from unlearn_fast.cli import main

    rc = main([*cmd, "--run-dir", str(tmp_path / "r"), "--workers", "-1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: workers must be an integer >= 0"), err
    assert not (tmp_path / "r").exists()


class _Stop(Exception):
    pass


def _spy(monkeypatch, module, seen: dict, stop: bool):
    real = module.fit

    def fit(*a, **kw):
        seen.setdefault(kw["cfg"].desc, kw["cfg"])
        if stop:
            raise _Stop(kw["cfg"].desc)
        return real(*a, **kw)

    monkeypatch.setattr(module, "fit", fit)


def test_run_options_reach_every_loop(tmp_path, monkeypatch, capsys):
    """A tiny run with --workers/--channels-last/--bf16 through the CLI: on the CPU channels_last/bf16 are
    dropped with a note and workers reach LoopConfig; with the options forced on (as on CUDA), every
    LoopConfig call site (original, wf, an unlearning method, EC pre-training) receives them."""
    import unlearn_fast
    from unlearn_fast.cli import main
    from unlearn_fast.methods import ec, supervised, unlearning, wf

    seen: dict = {}
    _spy(monkeypatch, supervised, seen, stop=False)
    rc = main(["train", "--method", "original", "--data", "digits", "--max-per-class", "12", "--device", "cpu",
               "--run-dir", str(tmp_path / "r"), "--quiet", "--workers", "1", "--channels-last", "--bf16",
               "--set", "max_epochs=1", "--set", "fit_to_data=false"])
    assert rc in (0, 1)
    assert "applies on CUDA only" in capsys.readouterr().err
    cfg = seen["original"]
    assert (cfg.num_workers, cfg.channels_last, cfg.amp) == (1, False, False)

    forced = {"num_workers": 0, "channels_last": True, "amp": True}
    monkeypatch.setattr(RunContext, "loop_options", lambda self, amp=False: dict(forced))
    seen.clear()
    for mod in (supervised, wf, unlearning, ec):
        _spy(monkeypatch, mod, seen, stop=True)
    kw = dict(data="digits", run_dir=tmp_path / "r", device="cpu", progress=False, max_per_class=12, evaluate=False)
    for method, extra in (("retrain", {}), ("wf", {}), ("ft", {"forget": "1"}), ("ec", {"forget": "1"})):
        with pytest.raises(_Stop):
            unlearn_fast.train(method=method, **kw, **extra)
    assert {"retrain c0", "wf untrain", "ft", "ec_modules SupCon"} <= set(seen), sorted(seen)
    for desc, cfg in seen.items():
        assert (cfg.num_workers, cfg.channels_last, cfg.amp) == (0, True, True), desc


def test_train_on_lazy_folder_same_model_for_any_worker_count(tmp_path, monkeypatch):
    """End to end: the original model trained on lazily decoded files with 0 and 2 workers (training loop
    and evaluation passes) is the same model, bit for bit."""
    import unlearn_fast
    from unlearn_fast.methods.base import artefact_meta

    monkeypatch.setenv("UNLEARN_FAST_DATA_CACHE_MB", "0")  # too big to cache: decoded per item
    make_tree(tmp_path / "data", n_classes=3, per_class=12, size=(10, 10))
    digests = []
    try:
        for w in (0, 2):
            r = unlearn_fast.train(method="original", data=f"folder:{tmp_path / 'data'}", run_dir=tmp_path / f"r{w}",
                                   device="cpu", progress=False, workers=w, img_size=10, max_epochs=2,
                                   fit_to_data=False, batch_size=8)
            assert eval_workers() == w
            digests.append(artefact_meta(r.run_dir / "original.safetensors")["digest"])
    finally:
        set_eval_workers(0)
    assert digests[0] == digests[1]
