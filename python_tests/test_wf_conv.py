"""Fused Triton WF-gated conv2d (kernels/wf_conv.py: packed weights, one flat K loop, phase-split dgrad,
dalpha fused into the dgrad kernel) vs the reference and the literal WF Alg. 1 (CPU: TRITON_INTERPRET=1).

Under the interpreter the kernels run one 128x32x32 tile (``kernels._common.INTERP_TILE``), so on these
shapes (batch 5, 37 channels, 7x13 images: 455 pixel rows) every loop runs several tiles - M, output
channels, the flat K loop (partial last K tile), phases, dalpha sample segments - and ends on a partial
one. Outputs are poisoned with NaN before the kernels write them (every element must be written).
Comparisons run with TF32 off (IEEE fp32); the GPU-only tests also run with TF32 on, at TF32 tolerances."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from unlearn_fast.kernels import conv_pack, wf_conv  # noqa: E402
from unlearn_fast.kernels._tf32 import tf32_policy  # noqa: E402
from unlearn_fast.ops import use_backend, wf_conv2d  # noqa: E402
from unlearn_fast.ops.wf_triton import wf_conv2d_triton  # noqa: E402
from unlearn_fast.reference import wf_gate as ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, C, H, W = 5, 37, 7, 13
LABEL_MIXES = {
    "same": ([2, 2, 2, 2, 2], 4),
    "distinct5": ([0, 1, 2, 3, 4], 5),
    "absent": ([0, 3, 3, 0, 5], 7),
}
# (kernel, stride, padding, dilation): ResNet's 1x1 stride-2 downsample (3 of 4 dgrad phases have no
# tap: zeros), its 3x3 stride-2 conv, a dilated stride-2 3x3 (phase 0 tapless, phase 1 all taps), the
# 3-channel 7x7 stride-2 stem (flat K: 147 -> 192), a plain 3x3, and an asymmetric one whose 1-wide
# axis has padding beyond the kernel (no owner tap: dalpha by the separate pass).
GEOMS = [(1, 2, 0, 1), (3, 2, 1, 1), (3, 2, 1, 2), (7, 2, 3, 1), (3, 1, 1, 1), ((3, 1), (2, 1), (0, 1), (1, 2))]
C_IN = {7: 3}


@pytest.fixture(autouse=True)
def _ieee_and_fused_path(monkeypatch):
    # this file tests the implicit-GEMM kernels (kernels/wf_conv.py); test_wf_epilogue.py the other path
    monkeypatch.setenv("UNLEARN_FAST_CONV_PATH", "fused")
    monkeypatch.setattr(wf_conv, "_POISON", True)  # outputs start as NaN: every element must be written
    with tf32_policy(False):  # explicit: the 1e-5 comparisons below need IEEE fp32 on a GPU too
        yield


def _inputs(k, labels, n, bias, alpha_b, o=37, seed=0):
    kh, kw = (k, k) if isinstance(k, int) else k
    c = C_IN.get(kh, C)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, c, H, W, generator=gen)
    w = torch.randn(o, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5
    b = torch.randn(o, generator=gen) if bias else None
    aw = (torch.randn(n, o, generator=gen) * 2).clamp(-3, 3)
    ab = (torch.randn(n, o, generator=gen) * 2).clamp(-3, 3) if alpha_b else None
    lab = torch.tensor(labels, dtype=torch.int64)
    return [t.to(DEV) if t is not None else None for t in (x, w, b, aw, ab, lab)]


def _run(fn, x, w, b, aw, ab, lab, conv, dy=None, x_grad=True):
    x = x.clone().requires_grad_(x_grad)
    aw = aw.clone().requires_grad_()
    ab = ab.clone().requires_grad_() if ab is not None else None
    y = fn(x, w, b, aw, ab, lab, *conv)
    if dy is None:
        dy = torch.randn_like(y)
    y.backward(dy)
    return y.detach(), dy, x.grad, aw.grad, (ab.grad if ab is not None else None)


def _ref_conv(x, w, b, aw, ab, lab, *conv):
    if ab is None and b is not None:  # gb = 1 exactly (the reference's alpha_b=None + bias path mis-broadcasts)
        ab = torch.full_like(aw, float("inf"))
    return ref.wf_conv2d(x, w, b, aw, ab, lab, *conv)


RTOL = 1e-5 if DEV == "cpu" else 1e-4  # IEEE fp32; on a GPU cuDNN and Triton sum in different orders


def _close(a, b, rtol=RTOL):
    if b is None:
        assert a is None
        return
    scale = max(b.abs().max().item(), 1e-3)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def _compare(geom, mix, bias=True, alpha_b=True, x_grad=True, oracles=(_ref_conv, ref.wf_conv2d_literal),
             channels_last=False):
    k, s, p, d = geom
    labels, n = LABEL_MIXES[mix]
    x, w, b, aw, ab, lab = _inputs(k, labels, n, bias, alpha_b)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, dy, dx, daw, dab = _run(wf_conv2d_triton, x, w, b, aw, ab, lab, (s, p, d), x_grad=x_grad)
    for oracle in oracles:
        y_r, _, dx_r, daw_r, dab_r = _run(oracle, x, w, b, aw, ab, lab, (s, p, d), dy=dy, x_grad=x_grad)
        _close(y, y_r)
        _close(dx, dx_r)
        _close(daw, daw_r)
        _close(dab, dab_r)
    for c in sorted(set(range(n)) - set(labels)):  # absent class: exactly zero
        assert torch.equal(daw[c], torch.zeros_like(daw[c]))
        if dab is not None:
            assert torch.equal(dab[c], torch.zeros_like(dab[c]))
    return y, dx


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "k{}s{}p{}d{}".format(*g))
def test_geometries_match_reference_and_literal(geom):
    k, s, p, d = geom
    kh, kw = (k, k) if isinstance(k, int) else k
    # every geometry but the last computes dalpha inside the dgrad kernel (the last: separate pass)
    assert wf_conv.fuses_dalpha((B, C_IN.get(kh, C), H, W), (37, C_IN.get(kh, C), kh, kw), s, p, d) == \
        (geom != GEOMS[-1])
    _compare(geom, "absent")


def test_k_order_choice():
    # "flat" when per-tap channel padding would waste K (stems, odd C), "tap" when C fills 64-wide blocks
    assert [conv_pack.k_mode(c, t) for c, t in ((3, 49), (37, 9), (64, 9), (512, 9), (37, 1), (128, 9))] == \
        ["flat", "flat", "tap", "tap", "tap", "tap"]


@pytest.mark.parametrize("mode,geom", [("tap", (3, 2, 1, 1)), ("flat", (1, 2, 0, 1))])
def test_forward_in_the_other_k_order(mode, geom, monkeypatch):
    # the geometries above run the automatic K order (3x3 / 7x7: flat, 1x1: tap); here the other one
    monkeypatch.setattr(wf_conv, "FORCE_K_MODE", mode)
    k, s, p, d = geom
    x, w, b, aw, ab, lab = _inputs(k, [0, 3, 3, 0, 5], 7, True, True)
    _close(wf_conv.wf_conv2d_forward(x, w, b, aw, ab, lab, s, p, d), _ref_conv(x, w, b, aw, ab, lab, s, p, d))


@pytest.mark.parametrize("mode", ["tap", "flat"])
def test_packed_weight_is_the_im2col_gemm(mode):
    # float64 torch emulation of the forward kernel's K loop: A[m, k] gathered through the K order's
    # index rule (flat: the int32 table; tap: k = tap*Cp + c), times the packed weight, equals conv2d
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 5, 3, 2, generator=gen, dtype=torch.float64)
    (sh, sw), (ph, pw), (dh, dw) = (2, 1), (1, 0), (1, 2)
    Ho, Wo = wf_conv.conv_out_size(6, 3, sh, ph, dh), wf_conv.conv_out_size(7, 2, sw, pw, dw)
    wp = conv_pack.packed(w, "fwd", torch.float64, mode)
    tab = conv_pack.flat_table(5, 3, 2, (dh, dw), torch.device("cpu"))
    cp = conv_pack.round_up(5)
    oh, ow = torch.meshgrid(torch.arange(Ho), torch.arange(Wo), indexing="ij")
    a = torch.zeros(2, Ho, Wo, wp.shape[0], dtype=torch.float64)
    for k in range(wp.shape[0]):
        if mode == "flat":
            kdh, kdw, c = tab[:, k].tolist()
        else:
            t, c = divmod(k, cp)
            kdh, kdw = (t // 2) * dh, (t % 2) * dw
            if c >= 5:
                continue
        ih, iw = oh * sh - ph + kdh, ow * sw - pw + kdw
        ok = (ih >= 0) & (ih < 6) & (iw >= 0) & (iw < 7)
        a[:, :, :, k] = torch.where(ok, x[:, c, ih.clamp(0, 5), iw.clamp(0, 6)], torch.zeros((), dtype=torch.float64))
    ref_z = torch.nn.functional.conv2d(x, w, None, (sh, sw), (ph, pw), (dh, dw)).permute(0, 2, 3, 1)
    torch.testing.assert_close(a @ wp, ref_z, rtol=1e-12, atol=1e-12)


# (H, W, KH, KW, stride, padding, dilation, has an owner tap); no owner: padding past the kernel's reach
PHASE_GEOS = [(7, 13, 3, 3, (2, 2), (1, 1), (1, 1), True), (7, 13, 1, 1, (2, 2), (0, 0), (1, 1), True),
              (8, 8, 3, 3, (2, 2), (1, 1), (1, 1), True), (7, 7, 7, 7, (2, 2), (3, 3), (1, 1), True),
              (10, 11, 5, 4, (3, 2), (2, 0), (1, 3), True), (9, 8, 3, 3, (2, 3), (1, 2), (2, 1), False),
              (7, 13, 3, 1, (2, 1), (0, 1), (1, 2), False)]


@pytest.mark.parametrize("geo", PHASE_GEOS, ids=str)
def test_phase_split_dgrad_schedule(geo):
    # float64 emulation of the dgrad kernel's schedule (phases, their taps, the packed [T*Op, C] weight)
    # equals torch's conv2d_input, each (input pixel, tap, output pixel) term is used exactly once, and
    # the owner tap's rows hit every output pixel exactly once (what makes the fused dalpha exact)
    H, W, KH, KW, s, p, d, has_owner = geo
    gen = torch.Generator().manual_seed(5)
    Ho, Wo = wf_conv.conv_out_size(H, KH, s[0], p[0], d[0]), wf_conv.conv_out_size(W, KW, s[1], p[1], d[1])
    O, Cn = 6, 5
    w = torch.randn(O, Cn, KH, KW, generator=gen, dtype=torch.float64)
    dy = torch.randn(2, O, Ho, Wo, generator=gen, dtype=torch.float64)
    ptab, ttab, own, r_own = conv_pack.dx_tables(H, W, Ho, Wo, KH, KW, s, p, d, torch.device("cpu"))
    wd = conv_pack.packed(w, "dx", torch.float64)
    op = conv_pack.round_up(O)
    dx = torch.full((2, Cn, H, W), float("nan"), dtype=torch.float64)
    terms = []
    for ph_i, (qh, qw, n, t0) in enumerate(ptab.tolist()):
        hq, wq = -(-(H - qh) // s[0]), -(-(W - qw) // s[1])
        acc = torch.zeros(2, Cn, hq, wq, dtype=torch.float64)
        for ti, (eh, ew, tap) in enumerate(ttab[t0:t0 + n].tolist()):
            hits = []
            for jh in range(hq):
                for jw in range(wq):
                    oh, ow = jh + eh, jw + ew
                    if 0 <= oh < Ho and 0 <= ow < Wo:
                        acc[:, :, jh, jw] += dy[:, :, oh, ow] @ wd[tap * op:tap * op + O]
                        terms.append((qh + s[0] * jh, qw + s[1] * jw, tap, oh, ow))
                        hits.append((oh, ow))
            if ph_i == own and ti == 0:
                assert sorted(hits) == [(a, b) for a in range(Ho) for b in range(Wo)] and r_own == hq * wq
        dx[:, :, qh::s[0], qw::s[1]] = acc
    want = [(oh * s[0] - p[0] + kh * d[0], ow * s[1] - p[1] + kw * d[1], kh * KW + kw, oh, ow)
            for oh in range(Ho) for ow in range(Wo) for kh in range(KH) for kw in range(KW)
            if 0 <= oh * s[0] - p[0] + kh * d[0] < H and 0 <= ow * s[1] - p[1] + kw * d[1] < W]
    assert sorted(terms) == sorted(want)
    torch.testing.assert_close(dx, torch.nn.grad.conv2d_input([2, Cn, H, W], w, dy, s, p, d), rtol=1e-12, atol=1e-12)
    assert (own >= 0) == has_owner


def test_weights_packed_once_per_version():
    x, w, b, aw, ab, lab = _inputs(1, [1, 0, 2, 1, 0], 3, True, True, o=8)
    n0 = dict(conv_pack.PACK_COUNT)
    y1 = wf_conv.wf_conv2d_forward(x, w, b, aw, ab, lab, 2, 0, 1)
    y2 = wf_conv.wf_conv2d_forward(x, w, b, aw, ab, lab, 2, 0, 1)
    assert conv_pack.PACK_COUNT["fwd"] == n0["fwd"] + 1 and torch.equal(y1, y2)
    with torch.no_grad():
        w.mul_(-2.0)  # in place (an optimizer step, a baked gate): a new version, packed again
    y3 = wf_conv.wf_conv2d_forward(x, w, b, aw, ab, lab, 2, 0, 1)
    assert conv_pack.PACK_COUNT["fwd"] == n0["fwd"] + 2
    _close(y3, _ref_conv(x, w, b, aw, ab, lab, 2, 0, 1))
    dy = torch.randn(y3.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
    for _ in range(2):
        wf_conv.wf_conv2d_backward(dy, y3, tuple(x.shape), w, b, aw, ab, lab, 2, 0, 1)
    assert conv_pack.PACK_COUNT["dx"] == n0["dx"] + 1


@pytest.mark.parametrize("mix,bias,alpha_b", [("same", True, True), ("distinct5", False, True),
                                              ("distinct5", True, False)])
def test_label_mixes_and_bias(mix, bias, alpha_b):
    _compare((1, 2, 0, 2), mix, bias=bias, alpha_b=alpha_b)


def test_input_without_grad_and_channels_last():
    _compare((1, 2, 0, 1), "absent", x_grad=False, oracles=(_ref_conv,))  # dalpha by the separate pass
    y, dx = _compare((3, 2, 1, 1), "same", channels_last=True, oracles=(_ref_conv,))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)


def test_weights_frozen_get_no_grad():
    x, w, b, aw, ab, lab = _inputs(1, [1, 0, 1, 1, 0], 3, True, True, o=8)
    w.requires_grad_(True)
    b.requires_grad_(True)
    aw.requires_grad_(True)
    wf_conv2d_triton(x, w, b, aw, ab, lab, 2, 0, 1).sum().backward()
    assert w.grad is None and b.grad is None and aw.grad is not None


def test_groups_error_and_dispatch_fallback():
    x, w, b, aw, ab, lab = _inputs(1, [1, 0, 2, 1, 0], 3, True, True, o=8)
    wg = w[:, :1].clone()  # [8, 1, 1, 1]: a depthwise (groups=8) weight for 8 input channels
    x8 = x[:, :8].contiguous()
    with pytest.raises(ValueError, match="groups=1"):
        wf_conv2d_triton(x8, wg, b, aw, ab, lab)
    with use_backend("triton"):  # the dispatcher falls back to the reference for groups != 1
        y = wf_conv2d(x8, wg, b, aw, ab, lab, 1, 0, 1, groups=8)
        y1 = wf_conv2d(x, w, b, aw, ab, lab, (2, 1), 0, 1)
    torch.testing.assert_close(y, ref.wf_conv2d(x8, wg, b, aw, ab, lab, 1, 0, 1, 8))
    torch.testing.assert_close(y1, ref.wf_conv2d(x, w, b, aw, ab, lab, (2, 1), 0, 1), rtol=1e-5, atol=1e-5)


def test_bad_geometry_raises():
    x, w, b, aw, ab, lab = _inputs(7, [1, 0, 2, 1, 0], 3, True, True, o=8)
    with pytest.raises(ValueError, match="empty"):
        wf_conv2d_triton(x, w, b, aw, ab, lab, 1, 0, 3)
    with pytest.raises(ValueError, match="string padding"):
        wf_conv2d_triton(x, w, b, aw, ab, lab, 1, "same", 1)


def test_gradcheck_reference_fp64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(4, dtype=torch.float64, generator=gen)
    aw = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    ab = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    lab = torch.tensor([2, 0, 2])
    args = (x, w, b, aw, ab, lab, 2, 1, 2)
    assert torch.autograd.gradcheck(ref.wf_conv2d, args)
    assert torch.autograd.gradcheck(ref.wf_conv2d_literal, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_label_out_of_range_raises_on_every_backend(backend):
    x, w, b, aw, ab, lab = _inputs(1, [1, 0, 2, 1, 0], 3, True, True, o=8)
    for bad in ([0, 1, 3, 0, 0], [0, -1, 2, 0, 0]):
        with use_backend(backend), pytest.raises(IndexError, match=r"\[0, 3\)"):
            wf_conv2d(x, w, b, aw, ab, torch.tensor(bad, device=DEV), 2, 0, 1)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        wf_conv2d_triton(x, w, b, aw, ab, torch.tensor([0, 1, 3, 0, 0], device=DEV), 2, 0, 1)


def test_label_check_is_cached_and_rechecked_after_inplace_change():
    from unlearn_fast.ops.wf_gate import check_labels

    lab = torch.tensor([0, 1, 2], device=DEV)
    check_labels(lab, 3, 3)
    check_labels(lab, 3, 5)  # valid for more classes too
    with pytest.raises(IndexError):
        check_labels(lab, 3, 2)
    lab[0] = 7  # bumps the version counter: checked again
    with pytest.raises(IndexError, match="got range"):
        check_labels(lab, 3, 3)


def test_dalpha_bit_identical_across_runs_channels_last_strided():
    # dalpha comes out of the dgrad kernel as per-(tile, sample, channel) partials summed in a fixed order
    # (no atomics): two runs agree to the bit (on a GPU as well)
    x, w, b, aw, ab, lab = _inputs(1, [0, 3, 3, 0, 5], 7, True, True)
    x = x.contiguous(memory_format=torch.channels_last)
    assert wf_conv.fuses_dalpha(x.shape, w.shape, 2, 0, 1)
    first = _run(wf_conv2d_triton, x, w, b, aw, ab, lab, (2, 0, 1))
    dy = first[1]
    runs = [first, _run(wf_conv2d_triton, x, w, b, aw, ab, lab, (2, 0, 1), dy=dy)]
    for a, b_ in zip(runs[0], runs[1]):
        assert torch.equal(a, b_)
    y_r, _, dx_r, daw_r, dab_r = _run(_ref_conv, x, w, b, aw, ab, lab, (2, 0, 1), dy=dy)
    for a, r in zip((runs[0][0], runs[0][2], runs[0][3], runs[0][4]), (y_r, dx_r, daw_r, dab_r)):
        _close(a, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, TF32 and large shapes)")
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("geom", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (7, 2, 3, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_large(dtype, tf32, geom, channels_last):
    k, s, p, d = geom
    gen = torch.Generator().manual_seed(3)
    n, o, c = 10, 128, 64
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(32, c, 28, 28, generator=gen).cuda().to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(o, c, k, k, generator=gen) / (c * k * k) ** 0.5).cuda().to(dtype)
    b = torch.randn(o, generator=gen).cuda().to(dtype)
    aw = (torch.randn(n, o, generator=gen) * 2).clamp(-3, 3).cuda()
    ab = (torch.randn(n, o, generator=gen) * 2).clamp(-3, 3).cuda()
    lab = torch.randint(0, n - 1, (32,), generator=gen).cuda()
    with tf32_policy(tf32):
        y, dy, dx, daw, dab = _run(wf_conv2d_triton, x, w, b, aw, ab, lab, (s, p, d))
    with tf32_policy(False):  # the oracle in IEEE fp32 from the same (rounded) inputs
        y_r, _, dx_r, daw_r, dab_r = _run(ref.wf_conv2d, x.float(), w.float(), b.float(), aw, ab, lab, (s, p, d),
                                          dy=dy.float())
    # bf16 inputs: 8-bit mantissa; TF32: 10-bit mantissa products, fp32 accumulation; IEEE: fp32 sums
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if tf32 else 1e-4
    for a, r in ((y, y_r), (dx, dx_r), (daw, daw_r), (dab, dab_r)):
        assert (a.float() - r).norm() <= tol * r.norm()
    assert torch.equal(daw[n - 1], torch.zeros_like(daw[n - 1]))
    assert dx.is_contiguous(memory_format=fmt) and y.is_contiguous(memory_format=fmt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (many programs write dalpha partials at once)")
@pytest.mark.parametrize("stride", [1, 2])
def test_gpu_fused_dalpha_bit_identical(stride):
    # on a GPU the programs run concurrently: the fused dalpha must still be bit-identical run to run
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 64, 28, 28, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(96, 64, 3, 3, generator=gen) / 24).cuda()
    aw = (torch.randn(10, 96, generator=gen) * 2).clamp(-3, 3).cuda()
    lab = torch.randint(0, 10, (64,), generator=gen).cuda()
    assert wf_conv.fuses_dalpha(x.shape, w.shape, stride, 1, 1)
    with tf32_policy(True):
        first = _run(wf_conv2d_triton, x, w, None, aw, None, lab, (stride, 1, 1))
        again = _run(wf_conv2d_triton, x, w, None, aw, None, lab, (stride, 1, 1), dy=first[1])
    for a, b_ in zip(first, again):
        assert (a is None and b_ is None) or torch.equal(a, b_)


def test_pinned_tile_outside_the_packing_raises(monkeypatch):
    x, w, b, aw, ab, lab = _inputs(1, [1, 0, 2, 1, 0], 3, True, True, o=8)
    monkeypatch.setenv("UNLEARN_FAST_TRITON_CONFIG", "128,64,128,4,3")  # BLOCK_K 128 > the 64-row packing
    with pytest.raises(ValueError, match="BLOCK_K <= 64"):
        wf_conv.wf_conv2d_forward(x, w, b, aw, ab, lab, 2, 0, 1)
