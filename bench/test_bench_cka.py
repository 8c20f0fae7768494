"""Layer-wise linear CKA of ResNet-18 (original vs a perturbed copy) over 10,000 images at 32 px:
time relative to the two models' forward passes alone, pytorch-cka 1.1.3 side by side when
installed, agreement with a float64 reference, peak memory flat in n, and the full evaluation
(accuracy + JS + ZRF + CKA from one forward pass) relative to its forward passes.

Synthetic inputs and random-init weights (no downloads): timing does not depend on the values.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unlearn_fast import _ext
from unlearn_fast.evaluation import metrics as em

from conftest import cuda_time_ms, requires_cuda

N_IMAGES, BATCH = 10_000, 1000
LAYERS = ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1",
          "avgpool", "fc"]

pytestmark = [requires_cuda,
              pytest.mark.skipif(not _ext.HAS_C_CUDA, reason="the CUDA part of unlearn_fast._C was not compiled")]


def _models():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    a = resnet18(num_classes=10).cuda().eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for prm in b.parameters():
            prm.add_(0.05 * prm.std().nan_to_num(0) * torch.randn_like(prm))
    return a, b


@pytest.fixture(scope="module")
def setup():
    torch.backends.cudnn.benchmark = True
    a, b = _models()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N_IMAGES, 3, 32, 32, device="cuda", generator=g)
    return a, b, [x[i:i + BATCH] for i in range(0, N_IMAGES, BATCH)]


def _forwards(a, b, batches):
    with torch.no_grad():
        for xb in batches:
            a(xb)
            b(xb)


def _ours(a, b, batches, pairs, estimator="exact"):
    m = em.LinearCKA(a, b, LAYERS, estimator=estimator, pairs=pairs)
    for xb in batches:
        m.update(xb)
    out = m.compute()
    m.remove_hooks()
    return out


def _pytorch_cka(a, b, batches):
    cka = pytest.importorskip("cka", reason="pytorch-cka 1.1.3 is not installed (pip install pytorch-cka==1.1.3)")
    loader = [(xb, torch.zeros(xb.shape[0], dtype=torch.long, device="cuda")) for xb in batches]
    return cka.compute_cka(a, b, [loader], layers=LAYERS, device="cuda")


@pytest.mark.parametrize("variant", ["diagonal", "all", "minibatch_all", "pytorch_cka"])
def test_bench_cka_resnet18(benchmark, record, setup, variant):
    a, b, batches = setup
    if variant == "pytorch_cka":
        fn = lambda: _pytorch_cka(a, b, batches)  # noqa: E731
        fn()  # skips here when the package is missing
    elif variant == "minibatch_all":
        fn = lambda: _ours(a, b, batches, "all", "minibatch")  # noqa: E731
    else:
        fn = lambda: _ours(a, b, batches, variant)  # noqa: E731
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    t_fwd = cuda_time_ms(lambda: _forwards(a, b, batches))
    t = cuda_time_ms(fn, reps=3)
    record(f"cka_resnet18_32px_{variant}", {
        "n_images": N_IMAGES, "batch": BATCH, "layers": len(LAYERS), "forward_passes_ms": t_fwd, "ms": t,
        "ratio_to_forward": t / t_fwd, "target_ratio": 1.10,
    })


def test_bench_cka_agrees_with_float64(record, setup):
    a, b, batches = setup
    feats = {("a", n): [] for n in LAYERS} | {("b", n): [] for n in LAYERS}
    for tag, m in (("a", a), ("b", b)):
        mods = dict(m.named_modules())
        hs = [mods[n].register_forward_hook(lambda _m, _i, o, k=(tag, n): feats[k].append(
            em.pool_features(o, "avg").double().cpu())) for n in LAYERS]
        with torch.no_grad():
            for xb in batches:
                m(xb)
        for h in hs:
            h.remove()
    want = np.empty((len(LAYERS), len(LAYERS)))
    for i, la in enumerate(LAYERS):
        X = torch.cat(feats["a", la]).numpy()
        X = X - X.mean(0)
        for j, lb in enumerate(LAYERS):
            Y = torch.cat(feats["b", lb]).numpy()
            Y = Y - Y.mean(0)
            want[i, j] = np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))
    got = _ours(a, b, batches, "all")["cka"].numpy()
    err = float(np.abs(got - want).max())
    record("cka_resnet18_32px_agreement", {"max_abs_err_vs_float64": err, "target": 1e-6})
    assert err < 1e-6


@pytest.mark.parametrize("n", [10_000, 100_000, 1_280_000])
def test_bench_cka_peak_memory_flat_in_n(record, n):
    """Streams synthetic pooled features of ResNet-18 widths; peak memory must not grow with n."""
    widths = [64, 64, 64, 128, 128, 256, 256, 512, 512, 512, 10]
    g = torch.Generator(device="cuda").manual_seed(0)
    metric = em.LinearCKA.for_features([f"l{i}" for i in range(len(widths))], pairs="all")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    chunk = 4096
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        fa = [torch.randn(k, w, device="cuda", generator=g) for w in widths]
        fb = [f + 0.1 * torch.randn_like(f) for f in fa]
        metric.update_features(fa, fb)
    out = metric.compute()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    record(f"cka_peak_memory_n{n}", {"n": n, "chunk": chunk, "peak_bytes_above_inputs": int(peak),
                                     "mean_diag_cka": float(out["cka"].diagonal().mean())})
    assert out["n"] == n


def test_bench_full_evaluation(record, setup):
    """Accuracy + per-class JS + ZRF + layer-wise CKA of one model, all fed from the same forward passes."""
    a, b, batches = setup
    from torchvision.models import resnet18

    rnd = resnet18(num_classes=10).cuda().eval()
    labels = [torch.randint(0, 10, (xb.shape[0],), device="cuda") for xb in batches]

    def forwards_only():
        with torch.no_grad():
            for xb in batches:
                a(xb), b(xb), rnd(xb)

    def full():
        cka = em.LinearCKA(a, b, LAYERS, pairs="all")
        js = em.JSDivergence(num_groups=10)
        zrf = em.ZRF()
        correct = torch.zeros((), device="cuda")
        for xb, yb in zip(batches, labels):
            la, lb = cka.update(xb)
            with torch.no_grad():
                lr = rnd(xb)
            js.update(lb, la, yb)
            zrf.update(lb, lr)
            correct += (lb.argmax(1) == yb).sum()
        out = (cka.compute(), js.compute(), zrf.compute(), float(correct) / N_IMAGES)
        cka.remove_hooks()
        return out

    t_fwd = cuda_time_ms(forwards_only)
    t_full = cuda_time_ms(full, reps=3)
    record("full_evaluation_resnet18_32px", {"forward_passes_ms": t_fwd, "full_ms": t_full,
                                             "ratio_to_forward": t_full / t_fwd, "target_ratio": 1.2})
