"""The unlearn_fast._C metric ops: opcheck (schemas, fake kernels, in-place mutations) and
agreement with the plain-PyTorch references on odd shapes, CPU (CUDA when a GPU is present)."""
from __future__ import annotations

import pytest
import torch

from unlearn_fast import _ext
from unlearn_fast.ops import metrics as M  # noqa: F401  (registers the fake kernels)
from unlearn_fast.reference import cka as cka_ref
from unlearn_fast.reference import divergence as div_ref

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason=f"unlearn_fast._C not built: {_ext.LOAD_ERROR}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _ext.HAS_C_CUDA else [])
if not (torch.cuda.is_available() and _ext.HAS_C_CUDA):
    DEVICES.append(pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device / CUDA part not compiled")))


def _z(*shape, device="cpu"):
    return torch.zeros(*shape, dtype=torch.float64, device=device)


def _ops():
    return torch.ops.unlearn_fast


def test_has_cuda_flag_matches_ext():
    assert _ops().has_cuda() == _ext.HAS_C_CUDA


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,C", [(1, 1), (5, 7), (3, 33), (4, 1000), (2, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_divergence_rows_match_reference(device, B, C, dtype):
    g = torch.Generator().manual_seed(B * 1000 + C)
    p = (4 * torch.randn(B, C, generator=g)).to(device=device, dtype=dtype)
    q = (4 * torch.randn(B, C, generator=g)).to(device=device, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for op, ref in ((_ops().js_divergence, div_ref.js_divergence_ref),
                    (_ops().activation_distance, div_ref.activation_distance_ref)):
        got, want = op(p, q), ref(p, q)
        assert got.dtype == want.dtype and got.shape == (B,)
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_divergence_accumulate_matches_reference(device):
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(37, 11, generator=g).to(device), torch.randn(37, 11, generator=g).to(device)
    groups = torch.randint(0, 5, (37,), generator=g).to(device)
    got = [_z(5, device=device) for _ in range(3)]
    want = [_z(5, device=device) for _ in range(3)]
    for _ in range(2):  # accumulates
        _ops().divergence_accumulate(p, q, groups, *got)
        div_ref.divergence_accumulate_ref(p, q, groups, *want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"groups must lie in \[0, 5\)"):
        _ops().divergence_accumulate(p, q, groups + 1, *got)
    with pytest.raises(RuntimeError, match="same shape"):
        _ops().js_divergence(p, q[:, :3])


@pytest.mark.parametrize("device", DEVICES)
def test_cka_ops_match_reference(device):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(13, d, generator=g).to(device) + 1.5 for d in (3, 1, 6)]
    ys = [torch.randn(13, d, generator=g).to(device, torch.bfloat16) for d in (4, 2, 6)]
    def stats():
        return ([_z(x.shape[1], y.shape[1], device=device) for x, y in zip(xs, ys)],
                [_z(x.shape[1], x.shape[1], device=device) for x in xs],
                [_z(y.shape[1], y.shape[1], device=device) for y in ys],
                [_z(x.shape[1], device=device) for x in xs], [_z(y.shape[1], device=device) for y in ys])
    got, want = stats(), stats()
    _ops().cka_accumulate(xs, ys, *got)
    cka_ref.cka_accumulate_ref(xs, ys, *want)
    for ga, wa in zip(got, want):
        for a, b in zip(ga, wa):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-12, atol=1e-12)
    s, s1, s2 = got[0][2], got[3][2], got[4][2]
    for o1, o2 in (([0, 6], [0, 6]), ([0, 2, 6], [0, 1, 5, 6])):
        torch.testing.assert_close(_ops().cka_centered_sqnorm(s, s1, s2, 13.0, o1, o2).cpu(),
                                   cka_ref.cka_centered_sqnorm_ref(s, s1, s2, 13.0, o1, o2).cpu(), rtol=1e-12,
                                   atol=1e-12)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        _ops().cka_centered_sqnorm(s, s1, s2, 13.0, [0, 3, 3, 6], [0, 6])
    with pytest.raises(RuntimeError, match="must be float64"):
        _ops().cka_accumulate(xs[:1], ys[:1], [_z(3, 3, device=device)], *[t[:1] for t in got[1:]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [4, 9, 30])
def test_hsic_accumulate_matches_reference(device, n):
    g = torch.Generator().manual_seed(n)
    feats = [torch.randn(n, d, generator=g).to(device) for d in (5, 2, 40)]
    got, want = _z(3, 3, device=device), _z(3, 3, device=device)
    _ops().hsic_minibatch_accumulate(feats, got)
    cka_ref.hsic_minibatch_accumulate_ref(feats, want)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match="n >= 4"):
        _ops().hsic_minibatch_accumulate([f[:3] for f in feats], got)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    ops = _ops()
    p, q = r(5, 7), r(5, 7)
    torch.library.opcheck(ops.js_divergence, (p, q))
    torch.library.opcheck(ops.activation_distance, (p, q))
    torch.library.opcheck(ops.js_divergence, (p.double(), q.double()))
    groups = torch.tensor([0, 2, 2, 1, 0], device=device)
    torch.library.opcheck(ops.divergence_accumulate, (p, q, groups, _z(3, device=device), _z(3, device=device),
                                                      _z(3, device=device)))
    torch.library.opcheck(ops.divergence_accumulate, (p, q, None, _z(1, device=device), _z(1, device=device),
                                                      _z(1, device=device)))
    X, Y = r(9, 3), r(9, 4)
    torch.library.opcheck(ops.cka_accumulate, ([X, Y], [Y, X], [_z(3, 4, device=device), _z(4, 3, device=device)],
                                               [_z(3, 3, device=device), _z(4, 4, device=device)],
                                               [_z(4, 4, device=device), _z(3, 3, device=device)],
                                               [_z(3, device=device), _z(4, device=device)],
                                               [_z(4, device=device), _z(3, device=device)]))
    S = r(3, 4).double()
    torch.library.opcheck(ops.cka_centered_sqnorm, (S, r(3).double(), r(4).double(), 9.0, [0, 3], [0, 1, 4]))
    torch.library.opcheck(ops.hsic_minibatch_accumulate, ([X, Y], _z(2, 2, device=device)))
    torch.library.opcheck(ops.cka_accumulate_cross, ([X, Y], [Y], _z(7, 4, device=device),
                                                     [_z(3, 3, device=device), _z(4, 4, device=device)],
                                                     [_z(4, 4, device=device)], [_z(3, device=device), _z(4, device=device)],
                                                     [_z(4, device=device)]))
    torch.library.opcheck(ops.hsic_cross_accumulate, ([X, Y], [Y], _z(2, 1, device=device), _z(2, device=device),
                                                      _z(1, device=device), True))
    torch.library.opcheck(ops.hsic_cross_accumulate, ([X, Y], [Y, X], _z(2, device=device), _z(2, device=device),
                                                      _z(2, device=device), False))


def _cross_stats(xs, ys, device):
    Dx, Dy = sum(x.shape[1] for x in xs), sum(y.shape[1] for y in ys)
    return (_z(Dx, Dy, device=device), [_z(x.shape[1], x.shape[1], device=device) for x in xs],
            [_z(y.shape[1], y.shape[1], device=device) for y in ys], [_z(x.shape[1], device=device) for x in xs],
            [_z(y.shape[1], device=device) for y in ys])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cka_accumulate_cross_matches_reference(device, dtype):
    """Only the blocks that are read: S_xy over all widths, S_xx / S_yy per layer; float32 features are
    multiplied batch-centred in float32 with float64 shift terms - exact to float32 rounding of the
    centred products even for features whose mean dwarfs their spread."""
    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(29, d, generator=g) * 2 + 40).to(device, dtype) for d in (3, 1, 17)]
    ys = [(torch.randn(29, d, generator=g) - 25).to(device, dtype) for d in (5, 2)]
    got, want = _cross_stats(xs, ys, device), _cross_stats(xs, ys, device)
    for a, b in ((0, 11), (11, 12), (12, 29)):  # uneven batches, one of a single row
        _ops().cka_accumulate_cross([x[a:b] for x in xs], [y[a:b] for y in ys], got[0], *got[1:])
        cka_ref.cka_accumulate_cross_ref([x[a:b] for x in xs], [y[a:b] for y in ys], want[0], *want[1:])
    # the statistics themselves (raw sums, dominated by the means) ...
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0].cpu(), want[0].cpu(), rtol=tol, atol=tol * 1e3)
    # ... and the centred quantity CKA reads, relative to its own size
    got_c = M.cka_finalize_cross(got[0], *got[1:], n=29)
    want_c = M.cka_finalize_cross(want[0], *want[1:], n=29)
    torch.testing.assert_close(got_c, want_c, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    with pytest.raises(RuntimeError, match=r"sxy must be float64 \[Dx, Dy\]"):
        _ops().cka_accumulate_cross(xs, ys, _z(3, 3, device=device), *got[1:])
    with pytest.raises(RuntimeError, match="one entry per xs"):
        _ops().cka_accumulate_cross(xs, ys, got[0], got[1][:2], *got[2:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [4, 5, 37, 300])
@pytest.mark.parametrize("all_pairs", [True, False])
def test_hsic_cross_matches_reference(device, n, all_pairs):
    """The fused minibatch HSIC (lower-triangle Gram blocks of centred features, float64 sums) against
    float64 Gram matrices of the raw features; n = 300 spans several row blocks."""
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, d, generator=g).abs().to(device) + 3 for d in (5, 1, 70)]
    ys = [xs[0] @ torch.randn(5, 4, generator=g).to(device) + torch.randn(n, 4, generator=g).to(device),
          torch.randn(n, 2, generator=g).to(device), xs[2][:, :9] * 2 - 1]
    for dt, tol in ((torch.float64, 1e-8), (torch.float32, 1e-6)):  # fp64: the un-centred reference cancels
        a = [t.to(dt) for t in xs]
        b = [t.to(dt) for t in ys]
        shape = (3, 3) if all_pairs else (3,)
        got = (_z(*shape, device=device), _z(3, device=device), _z(3, device=device))
        want = (_z(*shape, device=device), _z(3, device=device), _z(3, device=device))
        _ops().hsic_cross_accumulate(a, b, *got, all_pairs)
        cka_ref.hsic_cross_accumulate_ref(a, b, *want, all_pairs)
        for u, v in zip(got, want):  # relative to the largest HSIC of the batch
            scale = max(float(v.abs().max()), 1e-30)
            assert float((u - v).abs().max()) / scale < tol, (dt, u, v)
    with pytest.raises(RuntimeError, match="n >= 4"):
        _ops().hsic_cross_accumulate([x[:3] for x in xs], [y[:3] for y in ys], *got, all_pairs)
    if not all_pairs:
        with pytest.raises(RuntimeError, match="as many xs as ys"):
            _ops().hsic_cross_accumulate(xs, ys[:2], _z(3, device=device), _z(3, device=device), _z(2, device=device),
                                         False)
