"""The "cuDNN conv + fused Triton epilogue" WF conv path and the per-shape conv dispatch, against the
reference (CPU: TRITON_INTERPRET=1; the convs run in torch, the gate kernels in the interpreter)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from unlearn_fast.kernels import conv_dispatch  # noqa: E402
from unlearn_fast.kernels._tf32 import tf32_policy  # noqa: E402
from unlearn_fast.kernels.wf_epilogue import wf_conv2d_epilogue_backward, wf_conv2d_epilogue_forward  # noqa: E402
from unlearn_fast.ops.wf_triton import wf_conv2d_triton  # noqa: E402
from unlearn_fast.reference import wf_gate as ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-5 if DEV == "cpu" else 1e-4


@pytest.fixture(autouse=True)
def _ieee():
    with tf32_policy(False):
        yield


def _case(k, groups, bias, alpha_b, cl, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 37 if groups == 1 else 36, 7, 13, generator=gen)
    cin = x.shape[1] // groups
    o = 37 if groups == 1 else 36
    w = torch.randn(o, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    b = torch.randn(o, generator=gen) if bias else None
    aw = (torch.randn(7, o, generator=gen) * 2).clamp(-3, 3)
    ab = (torch.randn(7, o, generator=gen) * 2).clamp(-3, 3) if alpha_b else None
    lab = torch.tensor([0, 3, 3, 0, 5])
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return [t.to(DEV) if t is not None else None for t in (x, w, b, aw, ab, lab)]


def _close(a, b):
    scale = max(b.abs().max().item(), 1e-3)
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("k,geo,groups", [(3, (1, 1, 1), 1), (3, (2, 1, 2), 1), (1, (2, 0, 1), 1), (3, (1, 1, 1), 4)])
@pytest.mark.parametrize("cl", [False, True])
def test_epilogue_path_matches_reference(k, geo, groups, cl):
    x, w, b, aw, ab, lab = _case(k, groups, True, True, cl)
    y = wf_conv2d_epilogue_forward(x, w, b, aw, ab, lab, *geo, groups)
    xr, awr, abr = x.clone().requires_grad_(), aw.clone().requires_grad_(), ab.clone().requires_grad_()
    y_r = ref.wf_conv2d(xr, w, b, awr, abr, lab, *geo, groups)
    _close(y, y_r.detach())
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    y_r.backward(dy)
    dx, daw, dab = wf_conv2d_epilogue_backward(dy, y, x.shape, w, b, aw, ab, lab, *geo, groups)
    _close(dx, xr.grad)
    _close(daw, awr.grad)
    _close(dab, abr.grad)
    assert dx.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert torch.equal(daw[1], torch.zeros_like(daw[1]))  # class 1 absent: exactly zero


@pytest.mark.parametrize("bias,alpha_b", [(False, True), (True, False), (False, False)])
def test_epilogue_bias_variants(bias, alpha_b):
    x, w, b, aw, ab, lab = _case(1, 1, bias, alpha_b, False)
    y = wf_conv2d_epilogue_forward(x, w, b, aw, ab, lab, 2, 0, 1)
    ab_ref = ab if ab is not None or b is None else torch.full_like(aw, float("inf"))  # gb = 1
    awr = aw.clone().requires_grad_()
    y_r = ref.wf_conv2d(x, w, b, awr, ab_ref, lab, 2, 0, 1)
    _close(y, y_r.detach())
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    y_r.backward(dy)
    dx, daw, dab = wf_conv2d_epilogue_backward(dy, y, x.shape, w, b, aw, ab, lab, 2, 0, 1, need_dx=False)
    assert dx is None
    _close(daw, awr.grad)
    assert (dab is None) == (ab is None)
    if dab is not None and b is None:
        assert torch.equal(dab, torch.zeros_like(dab))


@pytest.mark.parametrize("path", ["fused", "epilogue"])
def test_custom_op_dispatches_by_path_and_matches(path, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_CONV_PATH", path)
    x, w, b, aw, ab, lab = _case(3, 1, True, True, True)
    calls = []
    real = conv_dispatch.choose
    monkeypatch.setattr(conv_dispatch, "choose", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    xg, awg, abg = x.clone().requires_grad_(), aw.clone().requires_grad_(), ab.clone().requires_grad_()
    y = wf_conv2d_triton(xg, w, b, awg, abg, lab, 2, 1, 1)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    y.backward(dy)
    assert calls and set(calls) == {path}
    xr, awr, abr = x.clone().requires_grad_(), aw.clone().requires_grad_(), ab.clone().requires_grad_()
    y_r = ref.wf_conv2d(xr, w, b, awr, abr, lab, 2, 1, 1)
    y_r.backward(dy)
    for a, r in ((y.detach(), y_r.detach()), (xg.grad, xr.grad), (awg.grad, awr.grad), (abg.grad, abr.grad)):
        _close(a, r)


def test_dispatch_table_and_override(monkeypatch):
    key = conv_dispatch.shape_key(37, 37, 3, 3, (1, 1), (1, 1), (1, 1), 7, 13)
    monkeypatch.delenv("UNLEARN_FAST_CONV_PATH", raising=False)
    monkeypatch.setattr(conv_dispatch, "TABLE", {key: "fused"})
    assert conv_dispatch.choose(37, 37, 3, 3, (1, 1), (1, 1), (1, 1), 7, 13) == "fused"
    assert conv_dispatch.choose(37, 37, 3, 3, (1, 1), (1, 1), (1, 1), 9, 13) == conv_dispatch.DEFAULT
    monkeypatch.setenv("UNLEARN_FAST_CONV_PATH", "epilogue")
    assert conv_dispatch.choose(37, 37, 3, 3, (1, 1), (1, 1), (1, 1), 7, 13) == "epilogue"
    monkeypatch.setenv("UNLEARN_FAST_CONV_PATH", "fast")
    with pytest.raises(ValueError, match="UNLEARN_FAST_CONV_PATH"):
        conv_dispatch.choose(37, 37, 3, 3, (1, 1), (1, 1), (1, 1), 7, 13)


def test_committed_dispatch_table_is_well_formed():
    # kernels/conv_dispatch_table.py is generated by bench/conv_table.py on a GPU: keys must be shape_key()
    # strings and values one of the paths, or a shape silently takes an unknown path
    import re

    from unlearn_fast.kernels import conv_dispatch_table

    pat = re.compile(r"^\d+,\d+,\d+x\d+,s\d+x\d+,p\d+x\d+,d\d+x\d+,\d+x\d+$")
    assert conv_dispatch.TABLE == conv_dispatch_table.TABLE
    for key, path in conv_dispatch_table.TABLE.items():
        assert pat.match(key), key
        assert path in conv_dispatch.PATHS, (key, path)
    assert conv_dispatch.DEFAULT in conv_dispatch.PATHS
