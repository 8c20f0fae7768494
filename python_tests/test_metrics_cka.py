"""Linear CKA: float64 NumPy oracle on odd sizes, invariances, streaming == one batch, the
minibatch HSIC estimator, and the hooked two-model LinearCKA metric (exact and minibatch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from unlearn_fast import _ext
from unlearn_fast.evaluation import metrics as em
from unlearn_fast.ops import metrics as om
from unlearn_fast.ops.backend import use_backend
from unlearn_fast.reference import cka as cka_ref

BACKENDS = ["torch", pytest.param("auto", marks=pytest.mark.skipif(not _ext.HAS_C, reason="_C not built"))]


def np_cka(X: np.ndarray, Y: np.ndarray) -> float:
    X = X.astype(np.float64) - X.astype(np.float64).mean(0)
    Y = Y.astype(np.float64) - Y.astype(np.float64).mean(0)
    return float(np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)))


def np_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return float((np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3)))


def stream_cka(X: torch.Tensor, Y: torch.Tensor, cuts: list[int]) -> float:
    d1, d2 = X.shape[1], Y.shape[1]
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    st = ([z(d1, d2)], [z(d1, d1)], [z(d2, d2)], [z(d1)], [z(d2)])
    for a, b in zip([0] + cuts, cuts + [X.shape[0]]):
        om.cka_accumulate([X[a:b]], [Y[a:b]], *st)
    return float(om.cka_finalize(*st, n=X.shape[0])[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d1,d2", [(2, 1, 1), (3, 5, 2), (17, 1, 300), (101, 31, 7), (1000, 64, 129)])
def test_exact_cka_matches_numpy_and_streams(backend, n, d1, d2):
    rng = np.random.default_rng(n + d1 + d2)
    X = rng.normal(1.0, 2.0, (n, d1)).astype(np.float32)
    Y = (X[:, :1] * rng.normal(size=(1, d2)) + rng.normal(-3.0, 1.0, (n, d2))).astype(np.float32)
    want = np_cka(X, Y)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    cuts = sorted({c for c in (1, n // 3, n // 3 + 1, n - 1) if 0 < c < n})  # uneven batches incl. size 1
    with use_backend(backend):
        assert abs(em.linear_cka(Xt, Yt) - want) < 1e-9
        assert abs(stream_cka(Xt, Yt, cuts) - want) < 1e-9
        assert abs(em.linear_cka(Yt, Xt) - want) < 1e-9  # symmetry
    assert abs(cka_ref.linear_cka_ref(Xt, Yt) - want) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariances(backend):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(123, 17, generator=g) + 4.0
    Q, _ = torch.linalg.qr(torch.randn(17, 17, generator=g, dtype=torch.float64))
    with use_backend(backend):
        assert abs(em.linear_cka(X, X) - 1) < 1e-9
        assert abs(em.linear_cka(X, (X.double() @ Q).float()) - 1) < 1e-6  # orthogonal Q
        assert abs(em.linear_cka(X, -2.5 * X + 7.0) - 1) < 1e-6  # a X + b
        assert abs(em.linear_cka(X, X.bfloat16()) - 1) < 1e-3
        Y = torch.randn(123, 9, generator=g)
        assert 0 <= em.linear_cka(X, Y) < 0.5
        assert np.isnan(em.linear_cka(X, torch.ones(123, 3)))  # constant features: undefined, not 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_equal_per_pair(backend):
    g = torch.Generator().manual_seed(1)
    xa = [torch.randn(40, d, generator=g) for d in (3, 8, 1)]
    xb = [xa[0] @ torch.randn(3, 5, generator=g), torch.randn(40, 2, generator=g), xa[2] * 3]
    dims_a, dims_b = [t.shape[1] for t in xa], [t.shape[1] for t in xb]
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    Da, Db = sum(dims_a), sum(dims_b)
    st = (z(Da, Db), z(Da, Da), z(Db, Db), z(Da), z(Db))
    with use_backend(backend):
        for a, b in ((0, 13), (13, 40)):
            om.cka_accumulate([torch.cat([t[a:b] for t in xa], 1)], [torch.cat([t[a:b] for t in xb], 1)],
                              *[[s] for s in st])
        full = om.cka_finalize_blocks(*st, n=40, dims_x=dims_a, dims_y=dims_b)
    want = torch.tensor([[np_cka(a.numpy(), b.numpy()) for b in xb] for a in xa], dtype=torch.float64)
    torch.testing.assert_close(full, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minibatch_hsic_matches_numpy_and_converges(backend):
    g = torch.Generator().manual_seed(2)
    n, B = 1000, 100
    X = torch.randn(n, 30, generator=g)
    Y = X[:, :10] @ torch.randn(10, 20, generator=g) + 0.5 * torch.randn(n, 20, generator=g)
    H = torch.zeros(2, 2, dtype=torch.float64)
    with use_backend(backend):
        om.hsic_minibatch_accumulate([X[:7], Y[:7]], H)
    K, L = (X[:7].double() @ X[:7].double().T).numpy(), (Y[:7].double() @ Y[:7].double().T).numpy()
    np.testing.assert_allclose(H.numpy(), [[np_hsic1(K, K), np_hsic1(K, L)], [np_hsic1(L, K), np_hsic1(L, L)]],
                               rtol=1e-9)
    exact = np_cka(X.numpy(), Y.numpy())
    errs = []
    for nb in (1, 10):  # estimator agreement improves as n grows
        H = torch.zeros(2, 2, dtype=torch.float64)
        with use_backend(backend):
            for i in range(nb):
                om.hsic_minibatch_accumulate([X[i * B:(i + 1) * B], Y[i * B:(i + 1) * B]], H)
        mb = float(om.minibatch_cka_from_hsic(H)[0, 1])
        ref = cka_ref.minibatch_hsic_cka_ref([X[i * B:(i + 1) * B] for i in range(nb)],
                                             [Y[i * B:(i + 1) * B] for i in range(nb)])
        assert abs(mb - ref) < 1e-9
        errs.append(abs(mb - exact))
    assert errs[1] < 0.05 and errs[1] < errs[0] + 0.01


class _Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.conv(x))).flatten(1))


LAYERS = ["conv", "block", "fc"]


def _direct_layer_ckas(a: nn.Module, b: nn.Module, x: torch.Tensor, pool: str) -> np.ndarray:
    feats = {}
    for tag, m in (("a", a), ("b", b)):
        hs = [getattr(m, name).register_forward_hook(
            lambda _m, _i, o, k=(tag, name): feats.__setitem__(k, em.pool_features(o, pool))) for name in LAYERS]
        with torch.no_grad():
            m(x)
        for h in hs:
            h.remove()
    return np.array([[np_cka(feats["a", i].numpy(), feats["b", j].numpy()) for j in LAYERS] for i in LAYERS])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", ["diagonal", "all"])
@pytest.mark.parametrize("pool", ["avg", "flatten"])
def test_linear_cka_metric_two_models(backend, pairs, pool):
    a, b = _Net(0).eval(), _Net(1).eval()
    x = torch.randn(45, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    want = _direct_layer_ckas(a, b, x, pool)
    with use_backend(backend):
        m = em.LinearCKA(a, b, LAYERS, pool=pool, pairs=pairs)
        loader = [(x[i:i + 16], torch.zeros(16)) for i in range(0, 45, 16)]  # 16, 16, 13
        out = m.run(loader, device="cpu", progress=False)
    assert out["layers"] == LAYERS and out["estimator"] == "exact" and out["n"] == 45
    got = out["cka"].numpy()
    np.testing.assert_allclose(got, np.diag(want) if pairs == "diagonal" else want, rtol=1e-6, atol=1e-9)
    # identical models -> CKA 1 on the diagonal
    same = em.LinearCKA(a, a, LAYERS)
    same.update(x)
    np.testing.assert_allclose(same.compute()["cka"].numpy(), 1.0, rtol=1e-9)
    m.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    m.remove_hooks()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cka_minibatch_estimator(backend):
    a, b = _Net(0).eval(), _Net(1).eval()
    x = torch.randn(403, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    want = np.diag(_direct_layer_ckas(a, b, x, "avg"))
    with use_backend(backend):
        m = em.LinearCKA(a, b, LAYERS, estimator="minibatch", pairs="all")
        with pytest.warns(RuntimeWarning, match="skipped a batch of 3"):
            for i in range(0, 403, 100):
                m.update(x[i:i + 100])
        out = m.compute()
    assert out["estimator"] == "minibatch" and out["skipped"] == 3 and out["cka"].shape == (3, 3)
    np.testing.assert_allclose(np.diag(out["cka"].numpy()), want, atol=0.1)


def test_linear_cka_errors():
    a = _Net(0)
    with pytest.raises(KeyError, match="nope"):
        em.LinearCKA(a, a, ["nope"])
    with pytest.raises(ValueError, match="estimator"):
        em.LinearCKA(a, a, ["fc"], estimator="rbf")
    with pytest.raises(ValueError, match="with one n"):
        em.linear_cka(torch.randn(3, 2), torch.randn(4, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_all_pairs_keeps_only_the_read_blocks(backend):
    """pairs='all': S_xy over the summed widths, but S_xx / S_yy per layer only (no D x D over all layers)."""
    g = torch.Generator().manual_seed(5)
    dims_a, dims_b = [3, 8, 1], [5, 2, 4]
    fa = [torch.randn(50, d, generator=g) * 3 + 10 for d in dims_a]
    fb = [fa[0] @ torch.randn(3, 5, generator=g) + 0.1 * torch.randn(50, 5, generator=g),
          torch.randn(50, 2, generator=g), fa[1][:, :4] - 7]
    with use_backend(backend):
        m = em.LinearCKA.for_features(["a", "b", "c"], pairs="all")
        for s in (slice(0, 21), slice(21, 22), slice(22, 50)):
            m.update_features([f[s] for f in fa], [f[s] for f in fb])
        out = m.compute()
    assert [tuple(t.shape) for t in m.sxx] == [(d, d) for d in dims_a]
    assert [tuple(t.shape) for t in m.syy] == [(d, d) for d in dims_b]
    assert len(m.sxy) == 1 and tuple(m.sxy[0].shape) == (sum(dims_a), sum(dims_b))
    want = np.array([[np_cka(a.numpy(), b.numpy()) for b in fb] for a in fa])
    np.testing.assert_allclose(out["cka"].numpy(), want, rtol=0, atol=1e-6)
    assert em.exact_state_bytes(dims_a, dims_b, "all") == 8 * (sum(dims_a) * sum(dims_b) + 9 + 64 + 1 + 25 + 4 + 16
                                                                + sum(dims_a) + sum(dims_b))
    assert em.exact_state_bytes(dims_a, dims_b, "diagonal") == 8 * (15 + 16 + 4 + 9 + 64 + 1 + 25 + 4 + 16 + 12 + 11)


def test_exact_over_memory_refuses_and_auto_switches():
    g = torch.Generator().manual_seed(6)
    fa = [torch.randn(12, 40, generator=g), torch.randn(12, 30, generator=g)]
    fb = [f + 0.3 * torch.randn(12, f.shape[1], generator=g) for f in fa]
    limit = em.exact_state_bytes([40, 30], [40, 30], "all") - 1
    exact = em.LinearCKA.for_features(["a", "b"], pairs="all", memory_limit=limit)
    with pytest.raises(ValueError, match="estimator='minibatch'.*or estimator='auto'"):
        exact.update_features(fa, fb)
    auto = em.LinearCKA.for_features(["a", "b"], pairs="all", estimator="auto", memory_limit=limit)
    auto.update_features(fa, fb)
    out = auto.compute()
    assert out["estimator"] == "minibatch" and out["cka"].shape == (2, 2)
    mb = cka_ref.minibatch_hsic_cka_ref([fa[1]], [fb[0]])
    assert abs(float(out["cka"][1, 0]) - mb) < 1e-6
    fits = em.LinearCKA.for_features(["a", "b"], pairs="all", estimator="auto", memory_limit=limit + 1)
    fits.update_features(fa, fb)
    assert fits.compute()["estimator"] == "exact"
    with pytest.raises(ValueError, match="memory_limit"):
        em.LinearCKA.for_features(["a"], memory_limit=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", ["all", "diagonal"])
def test_minibatch_fused_matches_reference(backend, pairs):
    """The fused minibatch estimator (only A x B pairs and the self terms) against the float64 reference
    estimator, pair by pair, over uneven minibatches (one of 7 rows, the row-block edge cases)."""
    g = torch.Generator().manual_seed(7)
    n = 207
    fa = [torch.randn(n, d, generator=g).abs() + 2 for d in (6, 33, 1)]
    fb = [fa[0] @ torch.randn(6, 3, generator=g), torch.randn(n, 50, generator=g) + fa[1][:, :1], fa[2] * -2 + 1]
    cuts = [(0, 100), (100, 107), (107, n)]
    with use_backend(backend):
        m = em.LinearCKA.for_features(["a", "b", "c"], estimator="minibatch", pairs=pairs)
        for a, b in cuts:
            m.update_features([f[a:b] for f in fa], [f[a:b] for f in fb])
        got = m.compute()["cka"].numpy()
    want = np.array([[cka_ref.minibatch_hsic_cka_ref([x[a:b] for a, b in cuts], [y[a:b] for a, b in cuts])
                      for y in fb] for x in fa])
    np.testing.assert_allclose(got, want if pairs == "all" else np.diag(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_hooks_take_the_module_input(backend):
    """'fc:in' hooks the classifier's input: for _Net that is the flattened pool output."""
    a, b = _Net(0).eval(), _Net(1).eval()
    x = torch.randn(31, 3, 5, 5, generator=torch.Generator().manual_seed(8))
    with use_backend(backend):
        m_in = em.LinearCKA(a, b, ["fc:in", "fc"], pairs="all")
        m_in.update(x)
        m_pool = em.LinearCKA(a, b, ["pool", "fc"], pairs="all")
        m_pool.update(x)
    np.testing.assert_allclose(m_in.compute()["cka"].numpy(), m_pool.compute()["cka"].numpy(), rtol=0, atol=1e-12)
    with pytest.raises(KeyError, match="nope:in"):
        em.LinearCKA(a, b, ["nope:in"])
    assert em.hooked_module_name("head:in") == ("head", True) and em.hooked_module_name("fc") == ("fc", False)


def test_vit_cka_layer_is_the_head_input():
    """ViT/Swin CKA is taken at the classifier's input (after the final norm and token pooling)."""
    from unlearn_fast.evaluation.unlearn_eval import penultimate_layer
    from unlearn_fast.models import create

    torch.manual_seed(0)
    a = create("vit_tiny", num_classes=3, in_chans=1, img_size=16).eval()
    b = create("vit_tiny", num_classes=3, in_chans=1, img_size=16).eval()
    assert penultimate_layer(a) == "head:in"
    x = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    grab = {}
    for tag, net in (("a", a), ("b", b)):
        h = net.head.register_forward_pre_hook(lambda _m, inp, k=tag: grab.__setitem__(k, inp[0].detach()))
        with torch.no_grad():
            net(x)
        h.remove()
    m = em.LinearCKA(a, b, [penultimate_layer(a)])
    m.update(x)
    assert abs(float(m.compute()["cka"][0]) - cka_ref.linear_cka_ref(grab["a"], grab["b"])) < 1e-6
