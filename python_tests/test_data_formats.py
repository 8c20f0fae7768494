"""unlearn_fast.data on-disk formats: IDX, CIFAR pickles, ImageFolder trees, face folders, and their errors.

Every test writes tiny files in the real format into ``tmp_path``.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unlearn_fast.data import ImageFileDataset, load
from unlearn_fast.data.idx import parse_idx

# ---------------------------------------------------------------- writers


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    head = struct.pack(">BBBB", 0, 0, type_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    data = idx_bytes(arr)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def make_mnist(root, gz: bool, n_train=60, n_test=20, hw=(7, 7), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    data = {}
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        y = (np.arange(n) % 3).astype(np.uint8)
        write_idx(os.path.join(root, f"{stem}-images-idx3-ubyte"), x, gz)
        write_idx(os.path.join(root, f"{stem}-labels-idx1-ubyte"), y, gz)
        data[split] = (x, y)
    return data


def write_pickle(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root, per_batch=6, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    names = [f"c{i}" for i in range(10)]
    train_x, train_y = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        write_pickle(os.path.join(root, f"data_batch_{b}"), {b"batch_label": b"x", b"data": x, b"labels": y})
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    ty = [i % 10 for i in range(n_test)]
    write_pickle(os.path.join(root, "test_batch"), {b"data": tx, b"labels": ty}, protocol=5)
    write_pickle(os.path.join(root, "batches.meta"), {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    return np.concatenate(train_x), np.array(train_y), tx, np.array(ty), names


def save_image(path, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_pixels_labels_and_keeps_test_split(tmp_path, gz):
    data = make_mnist(tmp_path / "mnist", gz)
    b = load(f"idx:{tmp_path / 'mnist'}", val_fraction=0.2)
    assert b.num_classes == 3 and b.in_chans == 1 and b.img_size == 7 and b.class_names == ["0", "1", "2"]
    assert b.split_sources == {"train": "train", "val": "train", "test": "test"}
    assert len(b.test) == 20 and np.array_equal(b.split_indices["test"], np.arange(20))
    assert len(b.val) == 12 and len(b.train) == 48  # 20% of each class's 20 train samples
    tx, ty = data["test"]
    for j in (0, 7, 19):
        x, y = b.test[j]
        assert x.shape == (1, 7, 7) and y == ty[j]
        np.testing.assert_allclose(x[0].numpy() * b.std[0] + b.mean[0], tx[j] / 255.0, atol=1e-6)
    trx = data["train"][0][b.split_indices["train"]] / 255.0
    assert b.mean[0] == pytest.approx(trx.mean(), rel=1e-6) and b.std[0] == pytest.approx(trx.std(), rel=1e-6)


def test_idx_resize_to_rgb_classes_txt_and_raw_subdir(tmp_path):
    data = make_mnist(tmp_path / "m" / "raw", gz=True, hw=(6, 6))
    (tmp_path / "m" / "classes.txt").write_text("zero\none\ntwo\n")
    b = load(f"mnist:{tmp_path / 'm'}", img_size=10, in_chans=3)
    assert b.class_names == ["zero", "one", "two"]
    x, _ = b.test[3]
    assert x.shape == (3, 10, 10)
    ref = F.interpolate(torch.from_numpy(data["test"][0][3] / 255.0).float()[None, None], size=(10, 10),
                        mode="bilinear", antialias=True)[0, 0]
    for c in range(3):
        assert torch.allclose(x[c] * b.std[c] + b.mean[c], ref, atol=1e-5)


def test_parse_idx_dtypes_and_header_errors(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    assert np.array_equal(parse_idx(idx_bytes(a, 0x0C)), a)
    f = np.linspace(0, 1, 6, dtype=np.float32)
    assert np.array_equal(parse_idx(idx_bytes(f, 0x0D)), f)
    good = idx_bytes(np.zeros((4, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="bad magic number 01000803"):
        parse_idx(b"\x01" + good[1:], "x.idx")
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(good[:-1], "x.idx")
    with pytest.raises(ValueError, match="longer than its header"):
        parse_idx(good + b"\x00", "x.idx")
    with pytest.raises(ValueError, match="inside its header"):
        parse_idx(good[:9], "x.idx")


def test_idx_file_errors_name_the_file(tmp_path):
    root = tmp_path / "mnist"
    make_mnist(root, gz=False)
    bad = root / "t10k-images-idx3-ubyte"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:-5])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load(f"idx:{root}")
    bad.write_bytes(b"\x00\x00\x07\x03" + raw[4:])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*bad magic"):
        load(f"idx:{root}")
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 5)  # claims to be gzip
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*gzip"):
        load(f"idx:{root}")
    # image/label count mismatch
    write_idx(bad, np.zeros((19, 7, 7), np.uint8), gz=False)
    with pytest.raises(ValueError, match="19 images but .*t10k-labels-idx1-ubyte.* 20 labels"):
        load(f"idx:{root}")
    # labels where images should be
    write_idx(bad, np.zeros(20, np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"expected uint8 \[n, H, W\]"):
        load(f"idx:{root}")
    os.remove(bad)
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-images-idx3-ubyte.*expected all of"):
        load(f"idx:{root}")
    with pytest.raises(FileNotFoundError, match="does not exist.*train-images-idx3-ubyte"):
        load(f"idx:{tmp_path / 'nowhere'}")


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("parent", [False, True])
def test_cifar10_layout_pixels_and_names(tmp_path, parent):
    folder = tmp_path / "cifar-10-batches-py"
    trx, try_, tx, ty, names = make_cifar10(folder)
    b = load(f"cifar10:{tmp_path if parent else folder}", val_fraction=0.0)
    assert b.class_names == names and b.num_classes == 10 and b.hflip is True
    assert (b.in_chans, b.img_size) == (3, 32) and b.root == str(folder)
    assert len(b.train) == 30 and len(b.val) == 0 and len(b.test) == 10
    x, y = b.test[4]
    img = tx[4].reshape(3, 32, 32) / 255.0  # R plane, then G, then B
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy() * b.std[c] + b.mean[c], img[c], atol=1e-6)
    assert y == ty[4]
    assert torch.equal(b.targets["train"], torch.from_numpy(try_))
    m = trx.reshape(-1, 3, 1024) / 255.0
    np.testing.assert_allclose(b.mean, m.mean(axis=(0, 2)), rtol=1e-6)


def test_cifar10_gray_is_luma(tmp_path):
    _, _, tx, _, _ = make_cifar10(tmp_path)
    b = load(f"cifar10:{tmp_path}", in_chans=1, img_size=16)
    img = torch.from_numpy(tx[2].reshape(3, 32, 32) / 255.0).float()
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    ref = F.interpolate(luma[None, None], size=(16, 16), mode="bilinear", antialias=True)[0, 0]
    x, _ = b.test[2]
    assert x.shape == (1, 16, 16)
    assert torch.allclose(x[0] * b.std[0] + b.mean[0], ref, atol=1e-5)


def test_cifar100_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    os.makedirs(root)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(40, 3072), dtype=np.uint8)
    fine = [i % 100 for i in range(0, 400, 10)]
    write_pickle(root / "train", {b"data": x, b"fine_labels": fine, b"coarse_labels": [0] * 40})
    write_pickle(root / "test", {b"data": x[:8], b"fine_labels": fine[:8], b"coarse_labels": [0] * 8})
    write_pickle(root / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                 b"coarse_label_names": [b"c"] * 20})
    b = load(f"cifar100:{tmp_path}", val_fraction=0.0)
    assert b.num_classes == 100 and b.class_names[37] == "f37"
    assert b.targets["test"].tolist() == fine[:8] and b.targets["train"].tolist() == fine


def test_cifar_errors(tmp_path):
    root = tmp_path / "c"
    make_cifar10(root)
    with pytest.raises(FileNotFoundError, match="does not exist.*data_batch_1"):
        load(f"cifar10:{tmp_path / 'none'}")
    (root / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"cannot unpickle CIFAR file .*data_batch_3"):
        load(f"cifar10:{root}")
    write_pickle(root / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_3.*no key b'labels'"):
        load(f"cifar10:{root}")
    write_pickle(root / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_3.*expected uint8 \[n, 3072\]"):
        load(f"cifar10:{root}")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    write_pickle(root / "data_batch_3", {b"data": Evil(), b"labels": [0]})
    with pytest.raises(ValueError, match=r"data_batch_3.*not allowed"):
        load(f"cifar10:{root}")
    os.remove(root / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        load(f"cifar10:{root}")


# ---------------------------------------------------------------- ImageFolder


def make_tree(root, splits=("train", "val"), classes=("cat", "dog", "emu"), n=(6, 2), seed=0):
    rng = np.random.default_rng(seed)
    for split, k in zip(splits, n):
        for ci, c in enumerate(classes):
            for j in range(k):
                h, w = int(rng.integers(9, 20)), int(rng.integers(9, 20))
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                ext = ("png", "jpg", "bmp")[j % 3]
                save_image(os.path.join(root, split, c, f"{j}.{ext}") if split else os.path.join(root, c, f"{j}.{ext}"), arr)


def test_folder_split_layout_is_lazy_and_cropped(tmp_path):
    make_tree(tmp_path, n=(6, 2))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    b = load(f"folder:{tmp_path}", img_size=8, cache=False, val_fraction=0.34)
    assert isinstance(b.train, ImageFileDataset) and not b.train.is_cached
    assert b.class_names == ["cat", "dog", "emu"] and b.hflip is True and b.resize_mode == "crop"
    assert b.split_sources["test"] == "test" and len(b.test) == 6 and b.source_sizes == {"train": 18, "test": 6}
    assert b.class_counts("val").tolist() == [2, 2, 2] and len(b.train) == 12
    f = b.test.files[0]
    assert f.endswith(os.path.join("val", "cat", "0.png"))
    x, y = b.test[0]
    arr = torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255.0).permute(2, 0, 1)
    h, w = arr.shape[1:]
    oh, ow = (8, max(8, round(w * 8 / h))) if h <= w else (max(8, round(h * 8 / w)), 8)
    full = F.interpolate(arr[None], size=(oh, ow), mode="bilinear", antialias=True)[0]
    t, l = (oh - 8) // 2, (ow - 8) // 2
    ref = full[:, t : t + 8, l : l + 8]
    assert x.shape == (3, 8, 8) and y == 0
    for c in range(3):
        assert torch.allclose(x[c] * b.std[c] + b.mean[c], ref[c], atol=1e-5)
    cached = load(f"folder:{tmp_path}", img_size=8, val_fraction=0.34)
    assert cached.test.is_cached and torch.allclose(cached.test[0][0], x, atol=1e-5)


def test_folder_three_splits_and_flat_layout(tmp_path):
    make_tree(tmp_path / "a", splits=("train", "val", "test"), n=(3, 2, 1))
    b = load(f"imagefolder:{tmp_path / 'a'}", img_size=6, in_chans=1, resize="stretch")
    assert b.split_sources == {"train": "train", "val": "val", "test": "test"}
    assert [len(b.train), len(b.val), len(b.test)] == [9, 6, 3] and b.train[0][0].shape == (1, 6, 6)
    make_tree(tmp_path / "flat", splits=(None,), n=(10,))
    f = load(f"folder:{tmp_path / 'flat'}", img_size=5, seed=1)
    assert f.split_sources["train"] == "all" and [len(f.train), len(f.val), len(f.test)] == [21, 3, 6]
    assert f.class_counts("test").tolist() == [2, 2, 2]


def test_folder_errors(tmp_path):
    make_tree(tmp_path / "t", n=(2, 1))
    os.makedirs(tmp_path / "t" / "train" / "fox")
    with pytest.raises(ValueError, match=r"class folder .*train.fox' is empty"):
        load(f"folder:{tmp_path / 't'}", img_size=4)
    os.rmdir(tmp_path / "t" / "train" / "fox")
    os.makedirs(tmp_path / "t" / "val" / "yak")
    save_image(str(tmp_path / "t" / "val" / "yak" / "0.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"not present in the train split: \['yak'\]"):
        load(f"folder:{tmp_path / 't'}", img_size=4)
    os.remove(tmp_path / "t" / "val" / "yak" / "0.png")
    os.rmdir(tmp_path / "t" / "val" / "yak")
    bad = tmp_path / "t" / "val" / "dog" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"cannot decode image .*dog.0\.png"):
        load(f"folder:{tmp_path / 't'}", img_size=4)  # decoded while caching
    lazy = load(f"folder:{tmp_path / 't'}", img_size=4, cache=False)
    j = lazy.test.files.index(str(bad))
    with pytest.raises(ValueError, match=r"cannot decode image .*dog.0\.png"):
        lazy.test[j]
    flat_val = tmp_path / "imnet"
    make_tree(flat_val, splits=("train",), n=(1,))
    save_image(str(flat_val / "val" / "ILSVRC2012_val_00000001.JPEG"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="holds 1 images directly"):
        load(f"folder:{flat_val}", img_size=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(f"folder:{tmp_path / 'missing'}")


# ---------------------------------------------------------------- faces


def make_faces(root, people=11, per=5, hw=(12, 10), seed=0):
    rng = np.random.default_rng(seed)
    for p in range(1, people + 1):
        for j in range(1, per + 1):
            save_image(os.path.join(root, f"s{p}", f"{j}.pgm"), rng.integers(0, 256, size=hw, dtype=np.uint8))
    (root / "README").write_text("AT&T faces")


def test_faces_orl_layout(tmp_path):
    make_faces(tmp_path)
    b = load(f"faces:{tmp_path}")
    assert b.class_names == [f"s{i}" for i in range(1, 12)]  # natural order: s2 before s10
    assert (b.in_chans, b.img_size, b.hflip, b.num_classes) == (1, 64, False, 11)
    assert b.native_size == (12, 10)
    assert [len(b.train), len(b.val), len(b.test)] == [33, 11, 11]
    x, y = b.test[0]
    f = b.test.files[0]
    assert x.shape == (1, 64, 64) and b.class_names[y] == os.path.basename(os.path.dirname(f))
    raw = torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255.0)
    ref = F.interpolate(raw[None, None], size=(64, 64), mode="bilinear", antialias=True)[0, 0]
    assert torch.allclose(x[0] * b.std[0] + b.mean[0], ref, atol=1e-5)
    rgb = load(f"faces:{tmp_path}", in_chans=3, img_size=12, max_per_class=3)
    assert rgb.train[0][0].shape == (3, 12, 12) and len(rgb.train) + len(rgb.val) + len(rgb.test) == 33


def test_faces_errors(tmp_path):
    make_faces(tmp_path, people=2, per=3)
    os.makedirs(tmp_path / "s3")
    (tmp_path / "s3" / "info.txt").write_text("x")
    with pytest.raises(ValueError, match=r"person folder .*s3' is empty"):
        load(f"faces:{tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"faces folder .* does not exist"):
        load(f"faces:{tmp_path / 'nope'}")


def test_folder_stats_sample_a_bounded_number_of_files(tmp_path, monkeypatch):
    import unlearn_fast.data.datasets as dsmod
    import unlearn_fast.data.registry as reg

    make_tree(tmp_path, splits=(None,), n=(8,))
    monkeypatch.setattr(reg, "STATS_MAX_FILES", 5)
    calls = []
    real = dsmod.read_image
    monkeypatch.setattr(dsmod, "read_image", lambda p: calls.append(p) or real(p))
    b = load(f"folder:{tmp_path}", img_size=4, cache=False)
    assert len(calls) == 5 and set(calls) <= set(b.train.files)  # no image decoded beyond the stats sample
    again = load(f"folder:{tmp_path}", img_size=4, cache=False)
    assert again.mean == b.mean and len(b.mean) == 3


def test_cifar_pickles_from_old_numpy_load(tmp_path):
    """The official batches name ``numpy.core.multiarray`` (numpy 1.x) rather than ``numpy._core``."""
    from unlearn_fast.data.cifar import load_pickle

    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": x, b"labels": [3, 4]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    (tmp_path / "b").write_bytes(raw)
    d = load_pickle(str(tmp_path / "b"))
    assert np.array_equal(d["data"], x) and d["labels"] == [3, 4]
