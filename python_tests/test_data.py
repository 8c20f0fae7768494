"""unlearn_fast.data: the embedded digits set, splits, preprocessing, bundle API and the resumable loader."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.data import (
    ResumableBatchSampler,
    cap_per_class,
    list_datasets,
    load,
    make_loader,
    parse_spec,
    stratified_split,
)
from unlearn_fast.data.transforms import LUMA, Preprocess, adapt_channels, resize


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _raw_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.images, dtype=np.float32) / 16.0, np.asarray(d.target)


# ---------------------------------------------------------------- digits + splits


def test_digits_shapes_and_metadata(digits):
    b = digits
    assert b.name == "digits" and b.num_classes == 10 and b.in_chans == 1 and b.img_size == 8
    assert b.class_names == [str(i) for i in range(10)] and b.hflip is False
    assert len(b.train) + len(b.val) + len(b.test) == 1797
    x, y = b.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    for s in ("train", "val", "test"):
        assert b.targets[s].dtype == torch.int64 and b.targets[s].numel() == len(b.split(s))
        assert b.split_sources[s] == "all"


def test_digits_pixels_match_source_and_normalisation_uses_train(digits):
    b = digits
    imgs, labels = _raw_digits()
    mean, std = b.mean[0], b.std[0]
    tr = b.split_indices["train"]
    # statistics are those of the train split (not of the whole set)
    assert mean == pytest.approx(float(imgs[tr].astype(np.float64).mean()), rel=1e-6)
    assert std == pytest.approx(float(imgs[tr].astype(np.float64).std()), rel=1e-6)
    assert mean != pytest.approx(float(imgs.astype(np.float64).mean()), rel=1e-9, abs=1e-12)
    for split in ("train", "test"):
        idx = b.split_indices[split]
        for j in (0, len(idx) // 2, len(idx) - 1):
            x, y = b.split(split)[j]
            np.testing.assert_allclose(x[0].numpy() * std + mean, imgs[idx[j]], atol=1e-6)
            assert y == labels[idx[j]]


def test_split_disjoint_complete_stratified_and_seeded(digits):
    b = digits
    idx = b.split_indices
    allidx = np.concatenate([idx["train"], idx["val"], idx["test"]])
    assert np.array_equal(np.sort(allidx), np.arange(1797))
    _, labels = _raw_digits()
    for c in range(10):
        n = (labels == c).sum()
        assert (labels[idx["test"]] == c).sum() == round(n * 0.2)
        assert (labels[idx["val"]] == c).sum() == round(n * 0.1)
    again = load("digits")
    other = load("digits", seed=1)
    for s in ("train", "val", "test"):
        assert np.array_equal(again.split_indices[s], idx[s])
        assert torch.equal(again.targets[s], b.targets[s])
    assert not np.array_equal(other.split_indices["test"], idx["test"])


def test_stratified_split_properties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=503)
    labels[:2] = 7  # a class with only 2 samples stays in train
    sp = stratified_split(labels, val_fraction=0.15, test_fraction=0.25, seed=3)
    assert sorted(np.concatenate(list(sp.values())).tolist()) == list(range(503))
    for c in range(7):
        n = (labels == c).sum()
        assert (labels[sp["test"]] == c).sum() == round(n * 0.25)
        assert (labels[sp["val"]] == c).sum() == round(n * 0.15)
    assert set(labels[sp["train"]]) == set(range(8)) and 7 not in labels[sp["test"]]
    # a class's split does not depend on the other classes present
    only3 = np.where(labels == 3)[0]
    sub = stratified_split(labels[only3], val_fraction=0.15, test_fraction=0.25, seed=3)
    assert np.array_equal(only3[sub["test"]], sp["test"][labels[sp["test"]] == 3])
    # test set of a seed does not move when val_fraction changes
    sp2 = stratified_split(labels, val_fraction=0.05, test_fraction=0.25, seed=3)
    assert np.array_equal(sp2["test"], sp["test"])
    # small classes still appear in every split
    tiny = np.repeat(np.arange(4), 5)
    sp3 = stratified_split(tiny, val_fraction=0.1, test_fraction=0.1, seed=0)
    for s in ("train", "val", "test"):
        assert set(tiny[sp3[s]]) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="must be < 1"):
        stratified_split(tiny, val_fraction=0.5, test_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        stratified_split(tiny, val_fraction=0.1, test_fraction=0.1, seed=-1)


def test_max_per_class():
    b = load("digits", max_per_class=20, seed=5)
    total = torch.cat([b.targets[s] for s in ("train", "val", "test")])
    assert torch.equal(torch.bincount(total, minlength=10), torch.full((10,), 20))
    assert b.class_counts("test").tolist() == [4] * 10 and b.class_counts("val").tolist() == [2] * 10
    labels = np.array([0] * 50 + [1] * 3)
    keep = cap_per_class(labels, 10, seed=0)
    assert np.bincount(labels[keep]).tolist() == [10, 3] and np.array_equal(keep, np.sort(keep))
    assert np.array_equal(keep, cap_per_class(labels, 10, seed=0))
    with pytest.raises(ValueError, match="max_per_class"):
        cap_per_class(labels, 0, seed=0)


# ---------------------------------------------------------------- resizing / channels


def test_resize_and_channels_match_reference():
    imgs, _ = _raw_digits()
    b = load("digits", img_size=13, in_chans=3)
    assert b.in_chans == 3 and b.img_size == 13 and len(b.mean) == 3 and b.train.is_cached
    idx = b.split_indices["val"]
    x, _ = b.val[5]
    assert x.shape == (3, 13, 13)
    raw = torch.from_numpy(imgs[idx[5]])[None, None]
    ref = F.interpolate(raw, size=(13, 13), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    for c in range(3):
        np.testing.assert_allclose(x[c] * b.std[c] + b.mean[c], ref, atol=1e-5)
    # uncached path gives the same tensor as the cached one
    nc = load("digits", img_size=13, in_chans=3, cache=False)
    assert not nc.val.is_cached
    assert torch.allclose(nc.val[5][0], x, atol=1e-6)


def test_transform_primitives():
    x = torch.rand(3, 10, 7)
    g = adapt_channels(x, 1)
    assert torch.allclose(g[0], LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2])
    assert torch.equal(adapt_channels(g, 3), g.expand(3, 10, 7))
    with pytest.raises(ValueError, match="channels"):
        adapt_channels(torch.rand(2, 4, 4), 3)
    c = resize(x, 5, "crop")  # shorter side (7) -> 5, centre crop of the longer
    assert c.shape == (3, 5, 5)
    full = F.interpolate(x[None], size=(round(10 * 5 / 7), 5), mode="bilinear", antialias=True)[0]
    top = (full.shape[1] - 5) // 2
    assert torch.allclose(c, full[:, top : top + 5])
    assert resize(x, 6, "stretch").shape == (3, 6, 6)
    with pytest.raises(ValueError, match="resize mode"):
        resize(x, 6, "pad")
    # preprocess order does not matter numerically (both linear per pixel)
    p = Preprocess(in_chans=1, img_size=9)(x)
    ref = adapt_channels(resize(x, 9), 1)
    assert torch.allclose(p, ref, atol=1e-6)


def test_user_statistics_and_bad_arguments():
    b = load("digits", mean=[0.5], std=[0.25])
    assert b.mean == (0.5,) and b.std == (0.25,)
    imgs, _ = _raw_digits()
    np.testing.assert_allclose(b.train[0][0][0].numpy(), (imgs[b.split_indices["train"][0]] - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="both mean and std"):
        load("digits", mean=[0.5])
    with pytest.raises(ValueError, match="in_chans"):
        load("digits", in_chans=2)
    with pytest.raises(ValueError, match="3 channels"):
        load("digits", in_chans=3, mean=[0.1, 0.2], std=[1, 1])


# ---------------------------------------------------------------- specs


def test_specs():
    assert set(list_datasets()) == {"digits", "idx", "cifar10", "cifar100", "folder", "faces", "glyphs"}
    assert parse_spec("mnist:/x/y") == ("idx", "/x/y")
    with pytest.raises(ValueError, match="unknown dataset spec 'svhn:/data'.*cifar10:DIR"):
        load("svhn:/data")
    with pytest.raises(ValueError, match="needs a directory"):
        load("cifar10")
    with pytest.raises(ValueError, match="takes no directory"):
        load("digits:/tmp")


# ---------------------------------------------------------------- bundle API


def test_subset_classes_and_exclude(digits):
    b = digits
    s = b.subset("train", classes=[2, 7])
    assert set(s.targets.tolist()) == {2, 7} and len(s) == int(b.class_counts("train")[[2, 7]].sum())
    assert all(s[i][1] in (2, 7) for i in range(0, len(s), 17))
    r = b.subset("test", exclude=[0, 1, 2])
    assert len(r) == len(b.test) - int(b.class_counts("test")[:3].sum()) and 0 not in r.targets
    both = b.subset("val", classes=[1, 2, 3], exclude=torch.tensor([2]))
    assert set(both.targets.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="out of range"):
        b.subset("train", classes=[10])
    with pytest.raises(ValueError, match="unknown split"):
        b.subset("holdout")
    x, y = b.tensors("val", classes=[4])
    assert x.shape == (int(b.class_counts("val")[4]), 1, 8, 8) and (y == 4).all()


def test_manifest_roundtrip(digits):
    m = json.loads(json.dumps(digits.manifest()))
    assert m["sizes"] == {s: len(digits.split(s)) for s in ("train", "val", "test")}
    digits.check_manifest(m)
    with pytest.raises(ValueError, match="split differs"):
        load("digits", seed=2).check_manifest(m)


# ---------------------------------------------------------------- loader


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_order_is_the_documented_permutation(digits):
    ds = digits.val
    loader = make_loader(ds, 32, shuffle=True, seed=7, epoch=3)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(7 * 1_000_003 + 3))
    ys = torch.cat([y for _, y in loader])
    assert torch.equal(ys, ds.targets[order])
    assert len(loader) == -(-len(ds) // 32)
    plain = torch.cat([y for _, y in make_loader(ds, 50, shuffle=False)])
    assert torch.equal(plain, ds.targets)
    other = torch.cat([y for _, y in make_loader(ds, 32, shuffle=True, seed=7, epoch=4)])
    assert not torch.equal(other, ys)


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_resume_equivalence(digits, drop_last):
    ds = digits.test
    full = _batches(make_loader(ds, 24, shuffle=True, seed=2, epoch=1, drop_last=drop_last))
    for k in (0, 5, len(full) - 1, len(full)):
        resumed = make_loader(ds, 24, shuffle=True, seed=2, epoch=1, start_batch=k, drop_last=drop_last)
        assert len(resumed) == len(full) - k
        rb = _batches(resumed)
        assert len(rb) == len(full) - k
        for (xa, ya), (xb, yb) in zip(full[k:], rb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    if drop_last:
        assert all(len(y) == 24 for _, y in full) and len(full) == len(ds) // 24
    with pytest.raises(ValueError, match="start_batch"):
        make_loader(ds, 24, shuffle=True, start_batch=len(full) + 1, drop_last=drop_last)


def test_resume_skips_without_loading():
    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.seen = []

        def __len__(self):
            return 100

        def __getitem__(self, i):
            self.seen.append(i)
            return torch.tensor([float(i)]), i

    ds = Counting()
    loader = make_loader(ds, 10, shuffle=True, seed=1, start_batch=8)
    ys = torch.cat([y for _, y in loader])
    assert len(ds.seen) == 20 and ys.tolist() == ds.seen
    sampler = ResumableBatchSampler(100, 10, shuffle=True, seed=1)
    assert ys.tolist() == sampler.order()[80:].tolist()


def test_loader_leaves_global_rng_alone(digits):
    state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    for _ in make_loader(digits.val, 64, shuffle=True, seed=3):
        pass
    assert torch.equal(torch.random.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_loader_with_workers_matches(digits):
    a = _batches(make_loader(digits.val, 40, shuffle=True, seed=4, epoch=2, start_batch=1))
    b = _batches(make_loader(digits.val, 40, shuffle=True, seed=4, epoch=2, start_batch=1, num_workers=2))
    assert len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("kw", [{}, {"img_size": 11, "in_chans": 3, "cache": False}, {"img_size": 11}])
def test_batched_fetch_matches_items(kw):
    b = load("digits", max_per_class=30, **kw)
    for ds in (b.train, b.subset("train", exclude=[3])):
        idx = [5, 0, len(ds) - 1, 17, -2]
        batch = ds.__getitems__(idx)
        ref = torch.stack([ds[i][0] for i in idx])
        assert torch.allclose(batch.x, ref, atol=1e-6)
        assert batch.y.tolist() == [ds[i][1] for i in idx]
        # it is also a plain list of samples, so torch's default_collate works on it
        x, y = torch.utils.data.default_collate(batch)
        assert torch.equal(x, batch.x) and torch.equal(y, batch.y)
        plain = torch.utils.data.DataLoader(ds, batch_size=7)
        xs, ys = next(iter(plain))
        assert torch.allclose(xs, torch.stack([ds[i][0] for i in range(7)]), atol=1e-6)
        with pytest.raises(IndexError):
            ds.__getitems__([0, len(ds)]) if ds is b.train else ds.dataset.__getitems__([len(ds.dataset)])


def test_check_manifest_rejects_other_data(digits):
    m = digits.manifest()
    bad = dict(m, name="cifar10:/x")
    with pytest.raises(ValueError, match="for dataset 'cifar10:/x'"):
        digits.check_manifest(bad)
    with pytest.raises(ValueError, match="source_sizes"):
        digits.check_manifest(dict(m, source_sizes={"all": 10}))
