"""Fused Triton WF-gated linear vs the reference and the literal WF Alg. 1 (CPU: TRITON_INTERPRET=1).

Interpreter tiles are 128x32x32 (``kernels._common.INTERP_TILE``): with batch 5 x 29 tokens (145 rows),
37 input and 37 output features every GEMM loop runs over several tiles, the last one partial, and the
dalpha reduction over several 16-row chunks and 16-channel blocks. TF32 is off (explicit) for the
1e-5 comparisons; the GPU-only test also runs with it on."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from unlearn_fast.kernels._tf32 import tf32_policy  # noqa: E402
from unlearn_fast.ops import use_backend, wf_linear  # noqa: E402
from unlearn_fast.ops.wf_triton import wf_linear_triton  # noqa: E402
from unlearn_fast.reference import wf_gate as ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F_IN, O = 37, 37
LABEL_MIXES = {  # (labels for batch 5, N classes): absent classes exist in every mix but "distinct5"
    "same": ([2, 2, 2, 2, 2], 4),
    "distinct5": ([0, 1, 2, 3, 4], 5),
    "absent": ([0, 3, 3, 0, 5], 7),
}


@pytest.fixture(autouse=True)
def _ieee():
    with tf32_policy(False):
        yield


def _inputs(T, bias, alpha_b, labels, n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shape = (5, F_IN) if T is None else (5, T, F_IN)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    w = torch.randn(O, F_IN, generator=gen, dtype=dtype) / F_IN ** 0.5
    b = torch.randn(O, generator=gen, dtype=dtype) if bias else None
    aw = (torch.randn(n, O, generator=gen, dtype=dtype) * 2).clamp(-3, 3)  # WF clips alpha to [-3, 3]
    ab = (torch.randn(n, O, generator=gen, dtype=dtype) * 2).clamp(-3, 3) if alpha_b else None
    lab = torch.tensor(labels, dtype=torch.int64)
    return [t.to(DEV) if t is not None else None for t in (x, w, b, aw, ab, lab)]


def _run(fn, x, w, b, aw, ab, lab, dy=None, x_grad=True):
    x = x.clone().requires_grad_(x_grad)
    aw = aw.clone().requires_grad_()
    ab = ab.clone().requires_grad_() if ab is not None else None
    y = fn(x, w, b, aw, ab, lab)
    if dy is None:
        dy = torch.randn_like(y)
    y.backward(dy)
    return y.detach(), dy, x.grad, aw.grad, (ab.grad if ab is not None else None)


RTOL = 1e-5 if DEV == "cpu" else 1e-4  # IEEE fp32; cuBLAS and Triton sum in different orders


def _close(a, b, rtol=RTOL):
    if b is None:
        assert a is None
        return
    scale = max(b.abs().max().item(), 1e-3)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def _ref_linear(x, w, b, aw, ab, lab):
    # alpha_b=None means gb = 1; sigmoid(+inf) = 1 exactly (the reference's own alpha_b=None + bias path
    # mis-broadcasts the bias, see the lead's note).
    if ab is None and b is not None:
        ab = torch.full_like(aw, float("inf"))
    return ref.wf_linear(x, w, b, aw, ab, lab)


def _compare(T, bias, alpha_b, mix, x_grad=True):
    labels, n = LABEL_MIXES[mix]
    args = _inputs(T, bias, alpha_b, labels, n)
    y, dy, dx, daw, dab = _run(wf_linear_triton, *args, x_grad=x_grad)
    for oracle in (_ref_linear, ref.wf_linear_literal):
        y_r, _, dx_r, daw_r, dab_r = _run(oracle, *args, dy=dy, x_grad=x_grad)
        _close(y, y_r)
        _close(dx, dx_r)
        _close(daw, daw_r)
        _close(dab, dab_r)
    absent = sorted(set(range(n)) - set(labels))
    for c in absent:  # a class absent from the batch gets exactly zero gradient
        assert torch.equal(daw[c], torch.zeros_like(daw[c]))
        if dab is not None:
            assert torch.equal(dab[c], torch.zeros_like(dab[c]))
    for c in set(labels):
        assert daw[c].abs().sum() > 0
    return y, daw, dab


@pytest.mark.parametrize("mix", sorted(LABEL_MIXES))
@pytest.mark.parametrize("T", [None, 1, 29])
def test_matches_reference_and_literal(T, mix):
    _compare(T, bias=True, alpha_b=True, mix=mix)


@pytest.mark.parametrize("bias,alpha_b", [(False, True), (False, False), (True, False)])
def test_bias_variants(bias, alpha_b):
    _, _, dab = _compare(3, bias=bias, alpha_b=alpha_b, mix="absent")
    if not bias:  # alpha_b does not touch the output without a bias: no grad, as in the reference
        assert dab is None


@pytest.mark.parametrize("T", [None, 29])
def test_input_without_grad_runs_reduction_only(T):
    _compare(T, bias=True, alpha_b=True, mix="absent", x_grad=False)


def test_weights_frozen_get_no_grad_and_int32_labels():
    x, w, b, aw, ab, lab = _inputs(4, True, True, [1, 0, 1, 1, 0], 3)
    w.requires_grad_(True)
    b.requires_grad_(True)
    aw.requires_grad_(True)
    y = wf_linear_triton(x, w, b, aw, ab, lab.to(torch.int32))
    y.sum().backward()
    assert w.grad is None and b.grad is None and aw.grad is not None
    torch.testing.assert_close(y.detach(), ref.wf_linear(x, w, b, aw, ab, lab).detach(), rtol=1e-5, atol=1e-5)


def test_dispatch_uses_triton_when_asked():
    x, w, b, aw, ab, lab = _inputs(3, True, True, [1, 0, 2, 1, 0], 3)
    with use_backend("triton"):
        y = wf_linear(x, w, b, aw, ab, lab)
    torch.testing.assert_close(y, ref.wf_linear(x, w, b, aw, ab, lab), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        with use_backend("triton"):
            wf_linear(x, w, b, aw, ab, torch.tensor([0, 1, 2, 3, 0], device=DEV))


def test_bad_shapes_raise():
    x, w, b, aw, ab, lab = _inputs(3, True, True, [1, 0, 2, 1, 0], 3)
    with pytest.raises(ValueError, match="weight"):
        wf_linear_triton(x, w[:, :-1], b, aw, ab, lab)
    with pytest.raises(ValueError, match="labels"):
        wf_linear_triton(x, w, b, aw, ab, lab[:3])


def test_gradcheck_reference_fp64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(4, dtype=torch.float64, generator=gen)
    aw = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    ab = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    lab = torch.tensor([2, 0, 2])
    assert torch.autograd.gradcheck(ref.wf_linear, (x, w, b, aw, ab, lab))
    assert torch.autograd.gradcheck(ref.wf_linear_literal, (x, w, b, aw, ab, lab))


def test_label_out_of_range_raises_on_every_backend():
    x, w, b, aw, ab, lab = _inputs(3, True, True, [1, 0, 2, 1, 0], 3)
    for backend in ("torch", "triton"):
        for bad in ([0, 1, 2, 3, 0], [-1, 0, 0, 0, 0]):
            with use_backend(backend), pytest.raises(IndexError, match=r"\[0, 3\)"):
                wf_linear(x, w, b, aw, ab, torch.tensor(bad, device=DEV))
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        wf_linear_triton(x, w, b, aw, ab, torch.tensor([0, 1, 2, 3, 0], device=DEV))


def test_dalpha_bit_identical_across_runs():
    args = _inputs(29, True, True, [0, 3, 3, 0, 5], 7)
    first = _run(wf_linear_triton, *args)
    second = _run(wf_linear_triton, *args, dy=first[1])
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, TF32 and large shapes)")
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_gpu_large(dtype, tf32):
    gen = torch.Generator().manual_seed(3)
    B, T, F, Oo, n = 64, 197, 384, 1152, 10
    x = torch.randn(B, T, F, generator=gen).cuda().to(dtype)
    w = (torch.randn(Oo, F, generator=gen) / F ** 0.5).cuda().to(dtype)
    b = torch.randn(Oo, generator=gen).cuda().to(dtype)
    aw = (torch.randn(n, Oo, generator=gen) * 2).clamp(-3, 3).cuda()
    ab = (torch.randn(n, Oo, generator=gen) * 2).clamp(-3, 3).cuda()
    lab = torch.randint(0, n - 1, (B,), generator=gen).cuda()
    with tf32_policy(tf32):
        y, dy, dx, daw, dab = _run(wf_linear_triton, x, w, b, aw, ab, lab)
        again = _run(wf_linear_triton, x, w, b, aw, ab, lab, dy=dy)
    with tf32_policy(False):
        y_r, _, dx_r, daw_r, dab_r = _run(ref.wf_linear, x.float(), w.float(), b.float(), aw, ab, lab, dy=dy.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if tf32 else 1e-4  # bf16 / TF32 inputs, fp32 accumulation
    for a, r in ((y, y_r), (dx, dx_r), (daw, daw_r), (dab, dab_r)):
        assert (a.float() - r).norm() <= tol * r.norm()
    assert daw.dtype == torch.float32 and torch.equal(daw[n - 1], torch.zeros_like(daw[n - 1]))
    assert torch.equal(again[3], daw) and torch.equal(again[4], dab)  # deterministic dalpha on the GPU
