"""JS divergence, activation distance and ZRF: math properties, a float64 NumPy oracle, streaming
and per-group metrics, on the extension path and the reference path."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unlearn_fast import _ext
from unlearn_fast.evaluation import metrics as em
from unlearn_fast.ops import metrics as om
from unlearn_fast.ops.backend import use_backend

BACKENDS = ["torch", pytest.param("auto", marks=pytest.mark.skipif(not _ext.HAS_C, reason="_C not built"))]


def np_js_l2(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    a, b = softmax(p.astype(np.float64)), softmax(q.astype(np.float64))
    m = 0.5 * (a + b)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = lambda x: np.where(x > 0, x * np.log(x / m), 0.0).sum(1)  # noqa: E731
        js = 0.5 * kl(a) + 0.5 * kl(b)
    return js, np.sqrt(((a - b) ** 2).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,C", [(1, 1), (1, 2), (7, 3), (64, 10), (3, 257), (2, 1000)])
def test_matches_numpy(backend, B, C):
    rng = np.random.default_rng(B * 7 + C)
    p, q = rng.normal(0, 3, (B, C)).astype(np.float32), rng.normal(0, 3, (B, C)).astype(np.float32)
    js_np, l2_np = np_js_l2(p, q)
    with use_backend(backend):
        js = om.js_divergence(torch.from_numpy(p), torch.from_numpy(q))
        l2 = om.activation_distance(torch.from_numpy(p), torch.from_numpy(q))
    np.testing.assert_allclose(js.numpy(), js_np, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l2.numpy(), l2_np, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties_and_saturated_logits(backend):
    g = torch.Generator().manual_seed(0)
    p, q = 5 * torch.randn(50, 13, generator=g), 5 * torch.randn(50, 13, generator=g)
    with use_backend(backend):
        assert torch.equal(om.js_divergence(p, p), torch.zeros(50))
        assert torch.equal(om.activation_distance(p, p), torch.zeros(50))
        torch.testing.assert_close(om.js_divergence(p, q), om.js_divergence(q, p), rtol=1e-6, atol=1e-7)
        js = om.js_divergence(p, q)
        assert (js >= 0).all() and (js <= math.log(2)).all()
        # saturated +-1e4 logits: one-hot rows; disjoint -> ln 2, equal -> 0, never NaN
        sat_p = torch.full((4, 10), -1e4)
        sat_q = torch.full((4, 10), -1e4)
        sat_p[:, 0] = 1e4
        sat_q[:, 9] = 1e4
        sat_q[1, 0] = 1e4  # row 1: q has two equal maxima
        js = om.js_divergence(sat_p, sat_q)
        l2 = om.activation_distance(sat_p, sat_q)
        assert not torch.isnan(js).any() and not torch.isnan(l2).any()
        torch.testing.assert_close(js[0], torch.tensor(math.log(2)), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(l2[0], torch.tensor(math.sqrt(2)), rtol=1e-6, atol=1e-7)
        assert 0 < js[1] < math.log(2)
        assert (om.js_divergence(sat_p, sat_p) == 0).all()
        half = torch.tensor([[1e4, -1e4]]).half()
        assert not torch.isnan(om.js_divergence(half, half.flip(1))).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_metrics_equal_one_batch(backend):
    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(101, 9, generator=g), torch.randn(101, 9, generator=g)
    groups = torch.randint(0, 4, (101,), generator=g)
    groups[groups == 3] = 2  # group 3 stays empty
    js_np, l2_np = np_js_l2(p.numpy(), q.numpy())
    with use_backend(backend):
        mets = {"js": em.JSDivergence(), "ad": em.ActivationDistance(), "zrf": em.ZRF()}
        grouped = em.JSDivergence(num_groups=4)
        for a, b in [(0, 1), (1, 40), (40, 41), (41, 101)]:  # uneven batches, one of size 1
            for m in mets.values():
                m.update(p[a:b], q[a:b])
            grouped.update(p[a:b], q[a:b], groups[a:b])
        np.testing.assert_allclose(float(mets["js"].compute()), js_np.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(mets["ad"].compute()), l2_np.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(mets["zrf"].compute()), 1 - js_np.mean(), rtol=1e-6)
        per = grouped.compute()
        assert per.shape == (4,) and torch.isnan(per[3])
        for k in range(3):
            np.testing.assert_allclose(float(per[k]), js_np[groups.numpy() == k].mean(), rtol=1e-6)
        # functional twins
        np.testing.assert_allclose(float(em.js_divergence(p, q)), js_np.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(em.activation_distance(p, q)), l2_np.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(em.zrf(p, q)), 1 - js_np.mean(), rtol=1e-6)
        assert em.js_divergence(p, q, reduction="none").shape == (101,)
        mets["js"].reset()
        assert float(mets["js"].count.sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_errors(backend):
    with use_backend(backend):
        with pytest.raises((ValueError, RuntimeError), match="same shape"):
            om.js_divergence(torch.randn(3, 4), torch.randn(3, 5))
        m = em.ZRF(num_groups=3)
        with pytest.raises(ValueError, match="groups"):
            m.update(torch.randn(2, 4), torch.randn(2, 4))
        with pytest.raises((IndexError, RuntimeError), match=r"\[0, 3\)"):
            m.update(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="num_groups"):
            em.JSDivergence(num_groups=0)


def test_backend_cuda_without_cuda_part_raises():
    if _ext.HAS_C_CUDA:
        pytest.skip("the CUDA part is compiled in")
    if not torch.cuda.is_available():
        # on CPU tensors the cuda backend means "the extension": works iff _C loaded
        with use_backend("cuda"):
            if _ext.HAS_C:
                om.js_divergence(torch.randn(2, 3), torch.randn(2, 3))
            else:
                with pytest.raises(RuntimeError, match="UNLEARN_FAST_BACKEND=cuda"):
                    om.js_divergence(torch.randn(2, 3), torch.randn(2, 3))
