"""One epoch of a lazily decoded ``folder:`` set through ``make_loader`` (issue 11 item 5): images/s with
0 vs 2 DataLoader workers, with and without pinned memory (pinning needs CUDA: skipped without it).

    pytest --benchmark-only bench/test_data_pipeline.py

Data: 2,000 generated 32 x 32 RGB images in 10 class folders (half PNG, half JPEG quality 90), decoded
per item (``load(..., cache=False)``), batch 256, shuffled. Results go to ``bench/results/<device>.json``
section ``data_pipeline_folder_32px`` (``img_s`` per variant, median of 3 epochs)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

N_CLASSES, PER_CLASS, SIZE, BATCH = 10, 200, 32, 256


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    from unlearn_fast.data import load

    root = tmp_path_factory.mktemp("folder32")
    rng = np.random.default_rng(0)
    for c in range(N_CLASSES):
        d = root / f"class{c:02d}"
        d.mkdir()
        for i in range(PER_CLASS):
            arr = (rng.random((SIZE, SIZE, 3)) * 200 + 5 * c).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if i % 2:
                img.save(d / f"{i}.jpg", quality=90)
            else:
                img.save(d / f"{i}.png")
    bundle = load(f"folder:{root}", img_size=SIZE, cache=False, val_fraction=0.0, test_fraction=0.0)
    assert not bundle.train.is_cached and len(bundle.train) == N_CLASSES * PER_CLASS
    return bundle.train


@pytest.mark.parametrize("pin", [False, True], ids=["nopin", "pin"])
@pytest.mark.parametrize("workers", [0, 2])
def test_folder_epoch(benchmark, folder, record, workers, pin):
    from unlearn_fast.data import make_loader

    if pin and not torch.cuda.is_available():
        pytest.skip("pinned memory needs a CUDA device")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def epoch() -> int:
        n = 0
        for x, y in make_loader(folder, BATCH, shuffle=True, seed=0, epoch=0, num_workers=workers, pin_memory=pin):
            x = x.to(dev, non_blocking=pin)
            n += x.shape[0]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return n

    n = benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    assert n == len(folder)
    img_s = n / benchmark.stats.stats.median
    benchmark.extra_info["img_s"] = img_s
    record("data_pipeline_folder_32px", {
        f"workers{workers}_{'pin' if pin else 'nopin'}_img_s": round(img_s, 1),
        "images": n, "batch": BATCH, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        f"workers{workers}_{'pin' if pin else 'nopin'}_loadavg_1min": round(os.getloadavg()[0], 1),
        "data": f"{N_CLASSES} x {PER_CLASS} generated {SIZE}px RGB files, half PNG half JPEG, decoded per item",
    })
