"""The WF Triton ops as torch.library custom ops (opcheck, channels-last strides), the autotune
machinery (config switch, shared-memory pruning, M buckets) and the TF32 policy (CPU: TRITON_INTERPRET=1)."""
import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402

from unlearn_fast.kernels import _common, _tf32, wf_conv, wf_epilogue, wf_linear  # noqa: E402
from unlearn_fast.ops import wf_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _t(*shape, grad=False, gen=None):
    return torch.randn(*shape, generator=gen).to(DEV).requires_grad_(grad)


@pytest.mark.parametrize("path", ["fused", "epilogue"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_conv_ops(channels_last, path, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_CONV_PATH", path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(DEV).requires_grad_()
    w, b = _t(4, 3, 3, 3, gen=gen), _t(4, gen=gen)
    aw, ab = _t(3, 4, grad=True, gen=gen), _t(3, 4, grad=True, gen=gen)
    lab = torch.tensor([2, 0], device=DEV)
    geo = ([2, 1], [1, 1], [1, 1])
    torch.library.opcheck(wf_triton._conv_fwd, (x, w, b, aw, ab, lab, *geo))
    y = wf_triton._conv_fwd(x.detach(), w, b, aw.detach(), ab.detach(), lab, *geo)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    dy = torch.randn(y.shape, generator=gen).to(DEV).contiguous(memory_format=torch.channels_last if channels_last
                                                                  else torch.contiguous_format)
    for need_dx in (True, False):
        torch.library.opcheck(wf_triton._conv_bwd, (dy, y, list(x.shape), w, b, aw.detach(), ab.detach(), lab, *geo,
                                                    need_dx))
    dx = wf_triton._conv_bwd(dy, y, list(x.shape), w, b, aw.detach(), ab.detach(), lab, *geo, True)[0]
    assert dx.is_contiguous(memory_format=torch.channels_last) == channels_last  # fake impl says the same


@pytest.mark.parametrize("T", [None, 3])
def test_opcheck_linear_ops(T):
    gen = torch.Generator().manual_seed(1)
    x = _t(*((2, 5) if T is None else (2, T, 5)), grad=True, gen=gen)
    w, b = _t(4, 5, gen=gen), _t(4, gen=gen)
    aw, ab = _t(3, 4, grad=True, gen=gen), _t(3, 4, grad=True, gen=gen)
    lab = torch.tensor([1, 2], device=DEV)
    torch.library.opcheck(wf_triton._linear_fwd, (x, w, b, aw, ab, lab))
    torch.library.opcheck(wf_triton._linear_fwd, (x, w, None, aw, None, lab))
    y = wf_triton._linear_fwd(x.detach(), w, b, aw.detach(), ab.detach(), lab)
    for need_dx in (True, False):
        torch.library.opcheck(wf_triton._linear_bwd, (torch.randn_like(y), y, w, b, aw.detach(), ab.detach(), lab,
                                                      need_dx))


def test_no_atomics_in_the_kernels():
    # dalpha must be deterministic on the GPU: the reduction writes partials and sums them in a fixed
    # order (the interpreter runs programs one by one, so only this guard catches a return of atomics)
    for mod in (_common, wf_conv, wf_linear, wf_epilogue):
        assert "atomic_" not in inspect.getsource(mod), mod.__name__


def test_config_switch_and_interpreter_tile(monkeypatch):
    table = [(128, 128, 32, 8, 3), (64, 64, 32, 4, 4)]
    monkeypatch.setenv("UNLEARN_FAST_TRITON_CONFIG", "64,32,16,4,2")
    (cfg,) = _common.config_list(table)
    assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.num_warps, cfg.num_stages) == \
        (64, 32, 16, 4, 2)
    for bad in ("64,32,16", "64,32,15,4,2", "a,b,c,d,e"):
        monkeypatch.setenv("UNLEARN_FAST_TRITON_CONFIG", bad)
        with pytest.raises(ValueError, match="UNLEARN_FAST_TRITON_CONFIG"):
            _common.config_list(table)
    monkeypatch.delenv("UNLEARN_FAST_TRITON_CONFIG")
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setenv("UNLEARN_FAST_AUTOTUNE", "0")
    assert len(_common.config_list(table)) == 1 and _common.config_list(table)[0].kwargs["BLOCK_M"] == 128
    monkeypatch.setenv("UNLEARN_FAST_AUTOTUNE", "1")
    assert len(_common.config_list(table)) == 2
    monkeypatch.setattr(_common, "INTERPRET", True)
    (cfg,) = _common.config_list(table)
    assert cfg.kwargs["BLOCK_M"] == _common.INTERP_TILE[0]


def test_smem_pruning_by_dtype(monkeypatch):
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=4, num_stages=s)
            for bm, bn, bk, s in ((128, 256, 64, 3), (128, 128, 32, 3), (64, 64, 32, 4))]
    # fp32 stages*(BM*BK + BK*BN)*4: 288 KiB, 96 KiB, 64 KiB
    assert [_common.smem_bytes(c, 4, "K") // 1024 for c in cfgs] == [288, 96, 64]
    assert _common.smem_bytes(cfgs[1], 4, "N") == 3 * (128 * 128 + 128 * 32) * 4

    class FakeCuda:  # a tensor-like on a GPU with 100 KiB of shared memory per block
        def __init__(self, elsize):
            self._e = elsize
            self.device = torch.device("cuda", 0)

        def element_size(self):
            return self._e

    monkeypatch.setattr(_common, "_max_smem", lambda idx: 100 * 1024)
    prune = _common._pruner("x_ptr", "K")
    kept32 = prune(cfgs, {"x_ptr": FakeCuda(4)})
    kept16 = prune(cfgs, {"x_ptr": FakeCuda(2)})
    assert [c.kwargs["BLOCK_N"] for c in kept32] == [128, 64]  # fp32: the 288 KiB config goes
    assert [c.kwargs["BLOCK_N"] for c in kept16] == [128, 64]  # bf16: 144 KiB still too big
    monkeypatch.setattr(_common, "_max_smem", lambda idx: 40 * 1024)
    assert [c.kwargs["BLOCK_N"] for c in prune(cfgs, {"x_ptr": FakeCuda(4)})] == [64]  # smallest kept


def test_m_bucket_powers_of_two():
    assert [_common.m_bucket(m) for m in (1, 64, 65, 200, 256, 257, 50176)] == [64, 64, 128, 256, 256, 512, 65536]


def test_tf32_policy_through_the_current_api():
    with _tf32.tf32_policy(True):
        assert _tf32.tf32_enabled("matmul") and _tf32.tf32_enabled("conv")
        if hasattr(torch.backends, "fp32_precision"):
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
            assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        with _tf32.tf32_policy(False, ("conv",)):
            assert _tf32.tf32_enabled("matmul") and not _tf32.tf32_enabled("conv")
        assert _tf32.tf32_enabled("conv")
    with _tf32.tf32_policy(False):
        assert not _tf32.tf32_enabled("matmul") and not _tf32.tf32_enabled("conv")
        # the Triton kernels follow the policy (IEEE under the interpreter, which has no TF32)
        assert _common.dot_precision(torch.float32, conv=True) == "ieee"
    with pytest.raises(ValueError, match="kind"):
        _tf32.tf32_enabled("rnn")


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch without the fp32_precision API")
def test_tf32_inherit_chain():
    b = torch.backends
    saved = (b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision)
    try:
        b.fp32_precision = "tf32"  # (torch copies a root value into the children when it is set)
        b.cuda.matmul.fp32_precision = "none"
        b.cudnn.conv.fp32_precision = "none"
        b.cudnn.fp32_precision = "none"
        assert _tf32.tf32_enabled("matmul") and _tf32.tf32_enabled("conv")  # "none" children inherit the root
        b.fp32_precision = "none"  # all "none": torch's default, IEEE
        assert not _tf32.tf32_enabled("matmul") and not _tf32.tf32_enabled("conv")
    finally:
        b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision = saved


def test_arch_list_covers():
    from unlearn_fast.ops.backend import arch_list_covers

    default = "8.0;8.6;8.9;9.0+PTX"  # setup.py's default
    assert all(arch_list_covers(c, default) for c in [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)])
    assert not arch_list_covers((7, 5), default)
    assert not arch_list_covers((10, 0), "9.0")  # no PTX: a newer major has no kernel
    assert arch_list_covers((8, 6), "8.0") and not arch_list_covers((8, 0), "8.6")
    assert arch_list_covers((9, 0), "9.0a") and not arch_list_covers((10, 0), "9.0a")


def test_unsupported_gpu_falls_back_once_or_raises(monkeypatch, caplog):
    from unlearn_fast.ops import backend

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(backend, "_capability", lambda d: (7, 0))  # a V100: no TF32 tl.dot
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    backend.triton_supported.cache_clear()
    backend._warn_once.cache_clear()
    try:
        with backend.use_backend("auto"):
            with caplog.at_level("WARNING", logger="unlearn_fast"):
                assert backend.resolve("wf_conv2d", dev) == "torch"
                assert backend.resolve("wf_conv2d", dev) == "torch"
        assert sum("no fast kernel" in r.message for r in caplog.records) == 1  # one warning
        with backend.use_backend("triton"), pytest.raises(RuntimeError, match="capability"):
            backend.resolve("wf_conv2d", dev)
        monkeypatch.setattr(backend, "_capability", lambda d: (9, 0))
        backend.triton_supported.cache_clear()
        with backend.use_backend("auto"):
            assert backend.resolve("wf_conv2d", dev) == "triton"
    finally:
        backend.triton_supported.cache_clear()
