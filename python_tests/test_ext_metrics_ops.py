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
