"""Forget requests (issue 6 item 1): explicit lists, seeded random:K, similar:K:<dataset spec>, and the
retrained-together reference model."""
from pathlib import Path

import numpy as np
import pytest
import torch

import unlearn_fast
from unlearn_fast.data import load
from unlearn_fast.forget import random_classes, resolve_forget_request, similar_classes
from unlearn_fast.methods import RunContext, create_method
from unlearn_fast.methods.retrain import retrain_path, retrain_together_path
from unlearn_fast.models.io import load_tensors


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _ctx(data, run_dir, seed=0):
    return RunContext(data=data, model_name="small_cnn", run_dir=Path(run_dir), device=torch.device("cpu"), seed=seed,
                      progress=False)


def test_explicit_lists(digits, tmp_path):
    ctx = _ctx(digits, tmp_path)
    assert resolve_forget_request("3", ctx) == [3]
    assert resolve_forget_request("7, 1,4", ctx) == [1, 4, 7]
    assert resolve_forget_request("4,4,1", ctx) == [1, 4]
    assert resolve_forget_request([2, 0], ctx) == [0, 2]
    for bad, msg in (("10", "0..9"), ("a,b", "random:K"), ("", "non-empty"), ("0,1,2,3,4,5,6,7,8,9", "nothing would be retained"),
                     ("nope:3", "not understood")):
        with pytest.raises(ValueError, match=msg):
            resolve_forget_request(bad, ctx)


def test_random_is_seeded_distinct_and_checked(digits, tmp_path):
    a = resolve_forget_request("random:3", _ctx(digits, tmp_path, seed=0))
    assert a == resolve_forget_request("random:3", _ctx(digits, tmp_path, seed=0))
    assert len(set(a)) == 3 and a == sorted(a) and all(0 <= c < 10 for c in a)
    draws = {tuple(random_classes(3, 10, s)) for s in range(20)}
    assert len(draws) > 10  # the seed matters
    with pytest.raises(ValueError, match="K must be in 1..9"):
        resolve_forget_request("random:10", _ctx(digits, tmp_path))
    with pytest.raises(ValueError, match="integer"):
        resolve_forget_request("random:x", _ctx(digits, tmp_path))


def test_similar_classes_ranks_by_cosine():
    means = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.7, 0.7, 0.0], [0.0, 0.0, 1.0], [5.0, 0.5, 0.0]],
                         dtype=torch.float64)
    target = torch.tensor([1.0, 0.1, 0.0], dtype=torch.float64)
    # cosines: c0 .995, c4 .9999 (scale does not matter), c2 .77, c1 .0995, c3 0
    assert similar_classes(means, target, 1) == [4]
    assert similar_classes(means, target, 2) == [0, 4]
    assert similar_classes(means, target, 3) == [0, 2, 4]
    means[4] = float("nan")  # a class absent from the train split is never picked
    assert similar_classes(means, target, 2) == [0, 2]
    with pytest.raises(ValueError, match="class_means"):
        similar_classes(means, target[:2], 1)


def test_similar_request_end_to_end(digits, tmp_path):
    """A downstream folder holding only images of digit 3 (and 8, as a second folder class) must rank
    the run's classes 3 and 8 first under a trained original model."""
    from PIL import Image

    from sklearn.datasets import load_digits

    run = tmp_path / "run"
    ctx = _ctx(digits, run)
    with pytest.raises(FileNotFoundError, match="train it first"):
        resolve_forget_request("similar:1:digits", ctx)
    unlearn_fast.train(method="original", model="small_cnn", data="digits", run_dir=run, device="cpu", progress=False,
                       max_epochs=8, fit_to_data=False)
    raw = load_digits()
    down = tmp_path / "down"
    for cls in (3, 8):
        (down / f"d{cls}").mkdir(parents=True)
        for i, img in enumerate(raw.images[raw.target == cls][:40]):
            Image.fromarray((img * 255 / 16).astype(np.uint8)).save(down / f"d{cls}" / f"{i}.png")
    got = resolve_forget_request(f"similar:2:folder:{down}", ctx)
    assert got == [3, 8]
    with pytest.raises(ValueError, match="similar:K:<dataset spec>"):
        resolve_forget_request("similar:2", ctx)
    with pytest.raises(ValueError, match="cannot load the downstream dataset"):
        resolve_forget_request(f"similar:2:folder:{tmp_path / 'missing'}", ctx)


def test_retrain_together_writes_one_model_without_all_forget_classes(digits, tmp_path):
    ctx = _ctx(digits, tmp_path)
    ctx.forget = [2, 5]
    with pytest.raises(ValueError, match="forget request"):
        create_method("retrain", together=True, max_epochs=1).run(_ctx(digits, tmp_path))
    out = create_method("retrain", together=True, max_epochs=2, fit_to_data=False).run(ctx)
    path = retrain_together_path(tmp_path, [5, 2])
    assert path.name == "f2-5.safetensors" and path.exists()
    assert retrain_together_path(tmp_path, [4]) == retrain_path(tmp_path, 4)
    _, meta = load_tensors(path)
    assert meta["forgotten_classes"] == [2, 5]
    x, y = digits.tensors("test", classes=[2, 5])
    with torch.no_grad():
        pred = out.model(x).argmax(1)
    assert not torch.isin(pred, torch.tensor([2, 5])).any()  # never trained on them: never predicts them
    again = create_method("retrain", together=True, max_epochs=2, fit_to_data=False).run(ctx)
    assert again.info == {"skipped": "exists"}
