"""WF-gated conv2d as "cuDNN conv + fused Triton epilogue" (DESIGN §3; issue 10 item 6).

The frozen conv itself runs in cuDNN (``F.conv2d`` forward, ``conv2d_input`` data gradient); the gate
adds one pointwise Triton kernel on each side:

* forward: ``y = sigmoid(alpha_w)[c] * z + sigmoid(alpha_b)[c] * b`` written over the conv output ``z``
  in place (one read, one write; no extra buffer);
* backward: one kernel reads ``dy`` and the saved ``y`` once and writes both ``dyg = dy * g`` (the input
  of cuDNN's data-gradient conv) and the per-(sample, channel) dalpha partials, which the deterministic
  class reduction of ``kernels._common`` turns into ``dalpha_w, dalpha_b``.

Shapes and dtypes as ``kernels.wf_conv``: ``x [B, C, H, W]`` (NCHW or channels-last; y and dx keep
x's format), ``weight [O, C/groups, KH, KW]`` (groups allowed here), ``alpha_* [N, O]`` fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from unlearn_fast.kernels._common import INTERPRET, dalpha

__all__ = ["wf_conv2d_epilogue_forward", "wf_conv2d_epilogue_backward"]


@triton.jit
def _gate_fwd_kernel(z_ptr, lab_ptr, aw_ptr, ab_ptr, bias_ptr, R, O, R_PER_PROG, s_s, s_r, s_o,
                     HAS_BIAS: tl.constexpr, HAS_ALPHA_B: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_O: tl.constexpr):
    s = tl.program_id(0)
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = ro < O
    lab = tl.load(lab_ptr + s).to(tl.int64)
    g = tl.sigmoid(tl.load(aw_ptr + lab * O + ro, mask=omask, other=0.0).to(tl.float32))
    if HAS_BIAS:
        gbb = tl.load(bias_ptr + ro, mask=omask, other=0.0).to(tl.float32)
        if HAS_ALPHA_B:
            gbb = gbb * tl.sigmoid(tl.load(ab_ptr + lab * O + ro, mask=omask, other=0.0).to(tl.float32))
    r_start = tl.program_id(2) * R_PER_PROG
    r_end = tl.minimum(r_start + R_PER_PROG, R)
    base = z_ptr + s.to(tl.int64) * s_s
    for r0 in range(r_start, r_end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        m = (rr < r_end)[:, None] & omask[None, :]
        ptr = base + rr[:, None] * s_r + ro[None, :] * s_o
        y = tl.load(ptr, mask=m, other=0.0).to(tl.float32) * g[None, :]
        if HAS_BIAS:
            y += gbb[None, :]
        tl.store(ptr, y.to(z_ptr.dtype.element_ty), mask=m)


def _srs(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, pixel, channel) strides of a dense NCHW or channels-last ``[B, O, H, W]`` tensor."""
    if t.shape[2] > 1 and t.stride(2) != t.stride(3) * t.shape[3]:
        raise ValueError("wf_conv2d_epilogue: tensors must be NCHW- or channels-last-contiguous")
    return (t.stride(0), t.stride(3), t.stride(1))


def _tiles(strides: tuple[int, int, int]) -> tuple[int, int, int, int]:
    if INTERPRET:
        return 16, 16, 1, 48
    if strides[1] == 1 and strides[2] != 1:
        return 128, 16, 4, 2048
    return 32, 64, 4, 1024


def _fmt(t: torch.Tensor) -> torch.memory_format:
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def wf_conv2d_epilogue_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               alpha_w: torch.Tensor, alpha_b: torch.Tensor | None, labels: torch.Tensor,
                               stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """Gated conv2d ``y [B, O, Ho, Wo]`` in x's dtype and memory format: cuDNN conv, gate in place."""
    z = F.conv2d(x, weight.detach().to(x.dtype), None, stride, padding, dilation, groups)
    z = z.contiguous(memory_format=_fmt(x))
    B, O, Ho, Wo = z.shape
    R = Ho * Wo
    if z.numel() == 0:
        return z
    st = _srs(z)
    block_r, block_o, warps, rows = _tiles(st)
    split = triton.cdiv(R, rows)
    r_per = triton.cdiv(triton.cdiv(R, split), block_r) * block_r
    aw = alpha_w.detach().float().contiguous()
    has_bias = bias is not None
    ab = alpha_b.detach().float().contiguous() if alpha_b is not None else aw
    _gate_fwd_kernel[(B, triton.cdiv(O, block_o), triton.cdiv(R, r_per))](
        z, labels.contiguous(), aw, ab, bias.detach().contiguous() if has_bias else aw, R, O, r_per, *st,
        HAS_BIAS=has_bias, HAS_ALPHA_B=alpha_b is not None, BLOCK_R=block_r, BLOCK_O=block_o, num_warps=warps)
    return z


def wf_conv2d_epilogue_backward(dy: torch.Tensor, y: torch.Tensor, x_shape, weight: torch.Tensor,
                                bias: torch.Tensor | None, alpha_w: torch.Tensor, alpha_b: torch.Tensor | None,
                                labels: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                                need_dx: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(dx, dalpha_w, dalpha_b)``: one Triton pass over ``dy, y`` gives ``dy * g`` and the dalpha partials,
    cuDNN gives ``dx = conv2d_input(dy * g)`` (in y's memory format); dalpha deterministic fp32 ``[N, O]``."""
    B, O, Ho, Wo = y.shape
    dy = dy.contiguous(memory_format=_fmt(y))
    dyg = torch.empty_like(dy) if need_dx else None
    daw, dab = dalpha(dy, y, labels.contiguous(), alpha_w, alpha_b, bias, _srs(dy), _srs(y), B, Ho * Wo, O,
                      dyg=dyg, strides_dyg=_srs(dyg) if dyg is not None else None)
    dx = None
    if need_dx:
        dx = torch.nn.grad.conv2d_input(list(x_shape), weight.detach().to(dy.dtype), dyg, stride, padding, dilation,
                                        groups)
        dx = dx.contiguous(memory_format=_fmt(y))
    return dx, daw, dab
