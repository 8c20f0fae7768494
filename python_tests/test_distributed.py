"""Data-parallel training under torch.distributed (DESIGN §6; unlearn_fast.distributed): 2 CPU processes
(gloo, torch.multiprocessing.spawn) against the 1-process run with the same seed.

One spawn runs every 2-process scenario (process start-up dominates on 2 cores); the tests read its
results. Model: ``dist_cnn`` (two convs, no BatchNorm), registered here - BatchNorm in train mode
normalises with each rank's own slice, which is a different computation from the 1-process batch
(SyncBatchNorm would fix it, but it runs on CUDA only), so a BatchNorm model would differ by design.

Tolerances: losses that are per-sample means (original training, GA, the loop) give the 1-process
gradient up to float32 summation order: weights within 2e-5 after tens of steps. WF's loss has batch-
level terms (``1 / S_u``, the forget/retain split, random gate rows): ``wf_loss`` computes them from
global sums (one all-reduce of detached statistics) with a shared generator, so WF too matches 1
process up to round-off: alphas within 1e-4 after 30 Adam steps at lr 0.1 and a polish stage (measured
2e-5: Adam's normalised step magnifies round-off in tiny gradients), the same selected state, equal test accuracies; and ``wf_loss`` alone, on any split of a batch
over the 2 ranks (an empty slice, forget-only / retain-only / mixed slices), gives the 1-process loss
and gradient within 1e-5. Evaluation: every rank evaluates the whole split, so metrics are equal exactly.
"""
from __future__ import annotations

import builtins
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from unlearn_fast.data.loader import ResumableBatchSampler
from unlearn_fast.distributed import shard_batch, shard_range
from unlearn_fast.methods.loop import LoopConfig, fit
from unlearn_fast.models import list_models, register_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class DistCNN(nn.Module):
    """conv(8) -> ReLU -> maxpool -> conv(16) -> ReLU -> maxpool -> flatten -> fc; no BatchNorm (module doc)."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(x))), 1))


if "dist_cnn" not in list_models():
    @register_model("dist_cnn", family="cnn", feature_layers=lambda m: ["block1", "block2", "pool", "fc"])
    def _dist_cnn(num_classes: int, in_chans: int = 3, img_size: int = 32) -> nn.Module:
        return DistCNN(num_classes, in_chans)


ORIGINAL = dict(max_epochs=4, batch_size=32, fit_to_data=False, min_steps=0, shift=0.0, hflip=False, patience=50,
                lr=1e-2)
GA = dict(epochs=2, lr=5e-3, batch_size=16, min_steps=0, fit_to_data=False, amp=False)
# batch 31: h = 16 forget rows, slices 15 (forget only) / 16 (1 forget + 15 retain); 4 polish steps
WF = dict(max_steps=30, min_steps=0, batch_size=31, grad_accum=1, evals_per_epoch=1, fit_to_data=False, lr=0.1,
          polish_steps=4)
RUN = dict(model="dist_cnn", data="digits", seed=3, max_per_class=60, img_size=8, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the loop alone
def _toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(33, 3, 6, 5, generator=g)          # 33 samples, batch 8: slices 4/4 ... last 1 -> 0/1 (an empty slice)
    y = torch.randint(0, 4, (33,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _toy_fit(state: Path, *, dataset_path: bool, stop_at: int | None = None, accum: int = 2):
    """fit() on a toy CNN; ``stop_at``: raise KeyboardInterrupt before that global micro-batch (a kill)."""
    torch.manual_seed(0)
    model = DistCNN(4, 3)
    ds = _toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = {"n": 0}

    def loss_fn(batch, info):
        if stop_at is not None and info["epoch"] * 5 + info["micro"] == stop_at:
            raise KeyboardInterrupt("planted kill")
        x, y = batch if isinstance(batch, (list, tuple)) else batch["retain"]
        seen["n"] += 1
        return nn.functional.cross_entropy(model(x), y)

    def batches(epoch, start):  # a custom source yields global batches: fit() slices them
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(100 + epoch))
        for b in range(start, 5):
            idx = order[b * 8:(b + 1) * 8]
            yield {"retain": (ds.tensors[0][idx], ds.tensors[1][idx]), "forget": None}

    cfg = LoopConfig(batch_size=8, grad_accum=accum, max_epochs=3, patience=None, evals_per_epoch=2, seed=4,
                     progress=False, ckpt_interval_s=0.0)
    val = lambda: float(sum(p.detach().double().sum() for p in model.parameters()))  # noqa: E731
    res = fit(params_owner=model, trainable=list(model.parameters()), optimizer=opt,
              dataset=ds if dataset_path else None, cfg=cfg, loss_fn=loss_fn, val_fn=val, state_path=state,
              batches=None if dataset_path else batches, n_batches=None if dataset_path else 5,
              log_path=state.parent / "log.csv")
    return {k: v.clone() for k, v in model.state_dict().items()}, [h["loss"] for h in res.history], res.steps


def _wf_toy(seed: int = 5):
    """A gated toy CNN (4 classes) and a batch of 13 samples."""
    from unlearn_fast.nn import wrap

    torch.manual_seed(seed)
    wf = wrap(DistCNN(4, 3), 4, 3.0)
    g = torch.Generator().manual_seed(seed)
    return wf, torch.randn(13, 3, 8, 8, generator=g), torch.randint(0, 4, (13,), generator=g)


# (forget_stop, split point of the 13 rows between rank 0 and rank 1); h = round(0.4 * 13) = 5
WF_PARTS = [(None, 0), (1.0, 0), (None, 3), (1.0, 5), (1.0, 9), (None, 13)]


def _wf_loss_grads(part_of_rank=None, forget_stop=None, cut: int = 0):
    """wf_loss (chi 2, forget_frac 0.4) loss value and alpha gradients: 1 process (``part_of_rank`` None),
    or this rank's rows of the batch split at ``cut``, backpropagated with the loop's share scaling and
    summed over the ranks (what fit() does)."""
    from unlearn_fast.distributed import allreduce_sum_, flat_grads
    from unlearn_fast.methods.wf import wf_loss

    wf, x, y = _wf_toy()
    gen = torch.Generator().manual_seed(11)
    alphas = list(wf.alpha_parameters())
    if part_of_rank is None:
        loss = wf_loss(wf, x, y, 2, (1.0, 10.0, 1.0), gen, forget_frac=0.4, forget_stop=forget_stop)[0]
        loss.backward()
        return float(loss.detach()), flat_grads(alphas)
    lo, hi = (0, cut) if part_of_rank == 0 else (cut, 13)
    xs, ys = (x[lo:hi], y[lo:hi]) if hi > lo else (None, None)
    loss = wf_loss(wf, xs, ys, 2, (1.0, 10.0, 1.0), gen, forget_frac=0.4, forget_stop=forget_stop,
                   part=(lo, hi, 13))[0]
    if hi > lo:
        (loss * ((hi - lo) / 13)).backward()
    return float(loss.detach()), allreduce_sum_(flat_grads(alphas))


def _toy_accuracy() -> float:
    """accuracy() of a random toy CNN on the 33 toy samples, batches of 5 (sharded 16 / 17 on 2 ranks)."""
    from unlearn_fast.evaluation.accuracy import accuracy

    torch.manual_seed(1)
    return accuracy(DistCNN(4, 3), _toy(), "cpu", batch_size=5)


# --------------------------------------------------------------------------- the pipeline
class _WriteSpy:
    """Records every file this process creates or replaces under ``root`` (open for writing, mkstemp,
    os.replace, torch.save)."""

    def __init__(self, root: Path) -> None:
        self.root, self.paths = str(root), []

    def _note(self, p) -> None:
        p = os.fspath(p) if isinstance(p, (str, os.PathLike)) else ""
        if p and os.path.abspath(p).startswith(self.root):
            self.paths.append(os.path.relpath(os.path.abspath(p), self.root))

    def install(self) -> None:
        o_open, o_mkstemp, o_replace, o_save = builtins.open, tempfile.mkstemp, os.replace, torch.save

        def open_(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+"):
                self._note(file)
            return o_open(file, mode, *a, **k)

        def mkstemp(*a, **k):
            fd, path = o_mkstemp(*a, **k)
            self._note(path)
            return fd, path

        def replace(src, dst, *a, **k):
            self._note(dst)
            return o_replace(src, dst, *a, **k)

        def save(obj, f, *a, **k):
            self._note(f)
            return o_save(obj, f, *a, **k)

        builtins.open, tempfile.mkstemp, os.replace, torch.save = open_, mkstemp, replace, save


def _pipeline(run_dir: Path, report: bool = True) -> dict:
    """original -> ga (forget class 3) -> wf (no evaluation) -> evaluate; returns tensors and metrics."""
    import unlearn_fast
    from unlearn_fast.models.io import load_tensors

    unlearn_fast.train("original", run_dir=run_dir, **RUN, **ORIGINAL)
    unlearn_fast.train("ga", run_dir=run_dir, forget=[3], original_hparams=None, **RUN, **GA)
    unlearn_fast.train("wf", run_dir=run_dir, evaluate=False, **RUN, **WF)
    m = unlearn_fast.evaluate(run_dir, splits=("test",), insertion_steps=2, progress=False, report=report)
    t = m["splits"]["test"]
    return {"original": load_tensors(run_dir / "original.safetensors")[0],
            "ga": load_tensors(run_dir / "ga.safetensors")[0],
            "wf": load_tensors(run_dir / "wf.safetensors")[0],
            "acc_f": list(t["wf"]["acc_f"]), "acc_r": list(t["wf"]["acc_r"]),
            "summary": m["summary"]["rows"]["wf"]}


def _eval_only(run_dir: Path) -> dict:
    import unlearn_fast

    m = unlearn_fast.evaluate(run_dir, splits=("test",), insertion_steps=2, progress=False, report=False)
    return {"wf": m["splits"]["test"]["wf"], "summary": m["summary"]["rows"]["wf"]}


def _worker(rank: int, world: int, port: int, root: str, out: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TQDM_DISABLE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root_p = Path(root)
    res: dict = {}
    try:
        if rank:
            spy = _WriteSpy(root_p)
            spy.install()
        res["acc"] = _toy_accuracy()
        res["wf_parts"] = [_wf_loss_grads(rank, stop, cut) for stop, cut in WF_PARTS]
        for path in (True, False):
            d = root_p / f"loop{int(path)}"
            d.mkdir(exist_ok=True) if rank == 0 else None
            dist.barrier()
            res[f"loop{int(path)}"] = _toy_fit(d / "s.pt", dataset_path=path)
        d = root_p / "resume"
        d.mkdir(exist_ok=True) if rank == 0 else None
        dist.barrier()
        try:
            _toy_fit(d / "s.pt", dataset_path=True, stop_at=7)
        except KeyboardInterrupt:
            pass
        res["resumed"] = _toy_fit(d / "s.pt", dataset_path=True)
        t0 = time.perf_counter()
        res["pipeline"] = _pipeline(root_p / "run")
        res["pipeline_s"] = time.perf_counter() - t0
        res["eval2"] = _eval_only(root_p / "run")
        if rank:
            res["rank1_writes"] = spy.paths
        out[rank] = res
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Results of both ranks of one 2-process spawn, and the 1-process references."""
    one = tmp_path_factory.mktemp("dist1")
    ref = {"acc": _toy_accuracy(), "wf_parts": [_wf_loss_grads(None, stop) for stop, _ in WF_PARTS]}
    for path in (True, False):
        (one / f"loop{int(path)}").mkdir()
        ref[f"loop{int(path)}"] = _toy_fit(one / f"loop{int(path)}" / "s.pt", dataset_path=path)
    ref["pipeline"] = _pipeline(one / "run", report=False)
    root = tmp_path_factory.mktemp("dist2")
    t0 = time.perf_counter()
    # fork where there is one: the ranks inherit the imports made above (torch, sklearn: ~15 s a process here)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.Manager() as mgr:
        out = mgr.dict()
        mp.start_processes(_worker, args=(2, _free_port(), str(root), out), nprocs=2, join=True, start_method=method)
        res = dict(out)
    spawn_s = time.perf_counter() - t0
    ref["eval_of_2proc_run"] = _eval_only(root / "run")
    return {"r0": res[0], "r1": res[1], "ref": ref, "root": root, "spawn_s": spawn_s}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


# ------------------------------------------------------------------------------------ tests
def test_shard_range_partitions_every_batch():
    for n in (0, 1, 2, 7, 8, 33):
        for w in (1, 2, 3, 5):
            parts = [shard_range(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(h - lo for lo, h in parts) - min(h - lo for lo, h in parts) <= 1
    b = {"forget": (torch.arange(5), torch.arange(5)), "retain": None, "k": 3}
    s = [shard_batch(b, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s[0]["forget"][0], s[1]["forget"][0]]), torch.arange(5)) and s[1]["retain"] is None


def test_sampler_slices_concatenate_to_the_one_process_batches():
    for start in (0, 3):
        one = list(ResumableBatchSampler(29, 6, shuffle=True, seed=2, epoch=1, start_batch=start))
        ranks = [list(ResumableBatchSampler(29, 6, shuffle=True, seed=2, epoch=1, start_batch=start, rank=r,
                                            world_size=3)) for r in range(3)]
        assert [sum((rk[i] for rk in ranks), []) for i in range(len(one))] == one
        assert len(ranks[0]) == len(one)
    with pytest.raises(ValueError, match="rank"):
        ResumableBatchSampler(10, 2, shuffle=False, rank=2, world_size=2)


@pytest.mark.parametrize("key", ["loop1", "loop0"])
def test_loop_two_processes_match_one(two, key):
    """dataset= path (loader shards) and a custom batches() source (fit() shards), an empty last slice on
    rank 0, grad_accum 2, SGD momentum: weights and logged losses within float32 summation noise."""
    w1, l1, s1 = two["ref"][key]
    for r in ("r0", "r1"):
        w2, l2, s2 = two[r][key]
        assert s2 == s1 and len(l2) == len(l1)
        print(f"\n{key} rank {r}: {s1} steps, max|dw| {_max_diff(w1, w2):.3g}, "
              f"max|dloss| {max(abs(a - b) for a, b in zip(l1, l2)):.3g}")
        assert _max_diff(w1, w2) < 2e-5, (key, r, _max_diff(w1, w2))
        assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    assert _max_diff(two["r0"][key][0], two["r1"][key][0]) == 0.0  # ranks stay identical


def test_two_process_resume_mid_epoch_is_exact(two):
    """Killed before global micro-batch 7 (epoch 1, mid accumulation cycle), run again: the same weights
    bit for bit as the uninterrupted 2-process run."""
    for r in ("r0", "r1"):
        w_int, l_int, s_int = two[r]["loop1"]
        w_res, l_res, s_res = two[r]["resumed"]
        assert s_res == s_int and l_res == l_int
        assert _max_diff(w_int, w_res) == 0.0


def test_pipeline_two_processes_match_one(two):
    ref, got = two["ref"]["pipeline"], two["r0"]["pipeline"]
    d_orig = _max_diff(ref["original"], got["original"])
    d_ga = _max_diff(ref["ga"], got["ga"])
    assert d_orig < 2e-5, d_orig
    assert d_ga < 2e-5, d_ga
    assert _max_diff(ref["ga"], ref["original"]) > 1e-2  # GA moved the weights: the comparison means something
    # WF (untraining + polish): the same alphas up to round-off, the same selected state, equal accuracies
    print(f"\n2-proc vs 1-proc: original max|dw| {d_orig:.3g}, ga max|dw| {d_ga:.3g}, wf max|d alpha| "
          f"{_max_diff(ref['wf'], got['wf']):.3g}; wf test acc_f {ref['summary']['acc_f']:.1f} vs "
          f"{got['summary']['acc_f']:.1f}, acc_r {ref['summary']['acc_r']:.1f} vs {got['summary']['acc_r']:.1f}; "
          f"2-process part {two['spawn_s']:.0f} s")
    d_wf = _max_diff(ref["wf"], got["wf"])
    assert d_wf < 1e-4, d_wf
    assert max(float(v.double().sub(3.0).abs().max()) for v in ref["wf"].values()) > 0.1  # the alphas moved
    for k in ("acc_f", "acc_r"):
        assert abs(ref["summary"][k] - got["summary"][k]) < 0.5, (k, ref["summary"], got["summary"])
    assert ref["acc_f"] == got["acc_f"] and ref["acc_r"] == got["acc_r"]
    assert _max_diff(two["r0"]["pipeline"]["wf"], two["r1"]["pipeline"]["wf"]) == 0.0


def test_wf_loss_on_any_split_matches_one_process(two):
    """wf_loss on the 2 ranks' slices (empty, forget-only, retain-only, mixed; with and without
    forget_stop): the 1-process loss on every rank, and the 1-process alpha gradient after share scaling
    and the gradient SUM."""
    for i, (stop, cut) in enumerate(WF_PARTS):
        l1, g1 = two["ref"]["wf_parts"][i]
        assert float(g1.abs().max()) > 1e-3
        for r in ("r0", "r1"):
            l2, g2 = two[r]["wf_parts"][i]
            print(f"\nwf_loss forget_stop {stop}, rows 0-{cut} / {cut}-13, rank {r}: |dL| {abs(l2 - l1):.2g}, "
                  f"max|d grad| {float((g2 - g1).abs().max()):.2g} (max|grad| {float(g1.abs().max()):.2g})")
            assert abs(l2 - l1) <= 1e-5 * abs(l1), (stop, cut, r, l1, l2)
            assert float((g2 - g1).abs().max()) <= 1e-5 * float(g1.abs().max()), (stop, cut, r)


def test_evaluation_equal_on_every_rank_and_in_one_process(two):
    """accuracy() shards and sums (correct, seen); the WF evaluation runs whole on every rank."""
    assert 0 < two["ref"]["acc"] < 1
    assert two["r0"]["acc"] == two["r1"]["acc"] == two["ref"]["acc"]
    one = two["ref"]["eval_of_2proc_run"]
    for r in ("r0", "r1"):
        got = two[r]["eval2"]
        assert got["wf"]["acc_f"] == one["wf"]["acc_f"] and got["wf"]["acc_r"] == one["wf"]["acc_r"]
        assert got["summary"] == one["summary"]


def test_rank0_alone_writes_the_run_directory(two):
    assert two["r1"]["rank1_writes"] == []
    run = two["root"] / "run"
    for f in ("config.yaml", "splits.json", "original.safetensors", "ga.safetensors", "wf.safetensors", "metrics.json",
              "report.md", "log.csv", "state/original.pt", "state/wf.pt", "state/ga.ga.pt"):
        assert (run / f).is_file(), f
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    head, *rows = (run / "log.csv").read_text().splitlines()
    assert head.endswith(",img_s") and rows and all(float(r.split(",")[-1]) > 0 for r in rows)
