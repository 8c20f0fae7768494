"""Fused WF-gated conv2d (DESIGN §3): implicit-GEMM Triton kernels and their launchers.

Shapes: ``x [B, C, H, W]`` (NCHW or channels-last: any strides), ``weight [O, C, KH, KW]`` (frozen,
groups=1), ``bias [O]`` or None (frozen), ``alpha_w, alpha_b [N, O]`` fp32 raw gates, ``labels [B]``.
Any stride / padding / dilation. y keeps x's memory format. fp32 (TF32 when
torch's cuDNN-conv TF32 policy, ``kernels._tf32``) or bf16/fp16 inputs, fp32 accumulation; alpha and dalpha fp32.

* ``wf_conv2d_forward``: implicit GEMM, rows = output pixels ``(b, oh, ow)`` (M = B*Ho*Wo), columns =
  output channels, reduction over ``(kh, kw, c)``; the epilogue gathers the sample's gate row.
* ``wf_conv2d_backward``: dx by an implicit-GEMM transposed conv (rows = input pixels, reduction over
  ``(o, kh, kw)``) with the gate applied to the dy tile in the prologue (``sigmoid(alpha_w)[label]`` is
  gathered once per o-block and reused for every tap); dalpha by the deterministic label-keyed
  reduction of ``kernels._common`` (per-sample partials from one read of dy and the saved output y,
  then a per-class sum in a fixed order; no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearn_fast.kernels._common import autotune, dalpha, dot_precision, m_bucket, tile_ids

__all__ = ["wf_conv2d_forward", "wf_conv2d_backward", "conv_out_size"]

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the first is the UNLEARN_FAST_AUTOTUNE=0 default.
# fp32 shared memory: 96, 64, 64, 32 KiB; pruned by the device's limit (kernels._common.autotune).
_TABLE = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"wf_conv2d: {name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


# Forward, output pixel (b, oh, ow), channel o, c_b = labels[b]:
#   z[b,o,oh,ow] = sum_{c,kh,kw} x[b, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw] W[o, c, kh, kw]
#   y = sigmoid(alpha_w[c_b, o]) * z + sigmoid(alpha_b[c_b, o]) * b[o]          (epilogue)
# Out-of-image taps read 0 (masked loads = zero padding).
@autotune(_TABLE, key=["M_BUCKET", "O", "C", "KH", "KW", "STRIDE_H", "HAS_BIAS"], first_tensor="x_ptr")
@triton.jit
def _wf_conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, aw_ptr, ab_ptr, lab_ptr, y_ptr,
                        M, C, H, W, O, Ho, Wo, M_BUCKET,
                        s_xb, s_xc, s_xh, s_xw, s_wo, s_wc, s_wh, s_ww, s_yb, s_yo, s_yh, s_yw,
                        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                        KH: tl.constexpr, KW: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_ALPHA_B: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, O, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < O
    HWo = Ho * Wo
    b = rm // HWo
    hw = rm % HWo
    oh = hw // Wo
    ow = hw % Wo
    x_base = x_ptr + b.to(tl.int64) * s_xb
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        hmask = mmask & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            pmask = hmask & (iw >= 0) & (iw < W)
            pix = x_base + ih * s_xh + iw * s_xw
            w_tap = w_ptr + rn[None, :] * s_wo + kh * s_wh + kw * s_ww
            for c0 in range(0, C, BLOCK_K):
                cc = c0 + rk
                cmask = cc < C
                a = tl.load(pix[:, None] + cc[None, :] * s_xc, mask=pmask[:, None] & cmask[None, :], other=0.0)
                wt = tl.load(w_tap + cc[:, None] * s_wc, mask=cmask[:, None] & nmask[None, :], other=0.0)
                acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    lab = tl.load(lab_ptr + b, mask=mmask, other=0).to(tl.int64)
    m2 = mmask[:, None] & nmask[None, :]
    gidx = lab[:, None] * O + rn[None, :]
    y = acc * tl.sigmoid(tl.load(aw_ptr + gidx, mask=m2, other=0.0))
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        if HAS_ALPHA_B:
            y += tl.sigmoid(tl.load(ab_ptr + gidx, mask=m2, other=0.0)) * bias[None, :]
        else:
            y += bias[None, :]
    y_off = b.to(tl.int64)[:, None] * s_yb + rn[None, :] * s_yo + (oh * s_yh + ow * s_yw)[:, None]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=m2)


# dx (transposed conv), input pixel (b, ih, iw), input channel c, g = sigmoid(alpha_w)[c_b]:
#   dx[b,c,ih,iw] = sum_{o,kh,kw} (dy[b,o,oh,ow] * g[o]) W[o,c,kh,kw]
#   with oh = (ih + ph - kh*dh) / sh, ow = (iw + pw - kw*dw) / sw, taken only where the division is
#   exact and 0 <= oh < Ho, 0 <= ow < Wo (every other tap contributes nothing).
# The o-block loop is outermost so the gathered gate tile g[label(row), o-block] is loaded once and
# multiplied into the dy tile of every tap (the GEMM prologue).
@autotune(_TABLE, key=["M_BUCKET", "O", "C", "KH", "KW", "STRIDE_H"], first_tensor="w_ptr")
@triton.jit
def _wf_conv_dx_kernel(dy_ptr, w_ptr, aw_ptr, lab_ptr, dx_ptr,
                       M, C, H, W, O, Ho, Wo, M_BUCKET,
                       s_db, s_do, s_dh, s_dw, s_wo, s_wc, s_wh, s_ww, s_xb, s_xc, s_xh, s_xw,
                       STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                       KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    # GEMM dims: rows M = B*H*W input pixels, columns C (BLOCK_N), reduction over o (BLOCK_K) x taps.
    pid_m, pid_n = tile_ids(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    cmask = rc < C
    HW = H * W
    b = rm // HW
    hw = rm % HW
    ih = hw // W
    iw = hw % W
    lab = tl.load(lab_ptr + b, mask=mmask, other=0).to(tl.int64)
    dy_base = dy_ptr + b.to(tl.int64) * s_db
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for o0 in range(0, O, BLOCK_K):
        oo = o0 + rk
        omask = oo < O
        g = tl.sigmoid(tl.load(aw_ptr + lab[:, None] * O + oo[None, :], mask=mmask[:, None] & omask[None, :],
                               other=0.0))
        for kh in range(KH):
            th = ih + PAD_H - kh * DIL_H
            thc = tl.maximum(th, 0)
            oh = thc // STRIDE_H
            hmask = mmask & (th >= 0) & (thc - oh * STRIDE_H == 0) & (oh < Ho)
            for kw in range(KW):
                tw = iw + PAD_W - kw * DIL_W
                twc = tl.maximum(tw, 0)
                ow = twc // STRIDE_W
                pmask = hmask & (tw >= 0) & (twc - ow * STRIDE_W == 0) & (ow < Wo)
                d = tl.load(dy_base[:, None] + (oh * s_dh + ow * s_dw)[:, None] + oo[None, :] * s_do,
                            mask=pmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
                wt = tl.load(w_ptr + oo[:, None] * s_wo + rc[None, :] * s_wc + kh * s_wh + kw * s_ww,
                             mask=omask[:, None] & cmask[None, :], other=0.0)
                acc = tl.dot((d * g).to(wt.dtype), wt, acc, input_precision=PRECISION)
    dx_off = b.to(tl.int64)[:, None] * s_xb + rc[None, :] * s_xc + (ih * s_xh + iw * s_xw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=mmask[:, None] & cmask[None, :])


def _geometry(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, stride, padding, dilation):
    if x.dim() != 4:
        raise ValueError(f"wf_conv2d: x must be [B, C, H, W], got {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"wf_conv2d: weight must be [O, C, KH, KW], got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"wf_conv2d: the Triton kernel supports groups=1 only (weight has {weight.shape[1]} input channels, "
            f"x has {x.shape[1]}); use unlearn_fast.ops.wf_conv2d, which falls back to the reference for groups != 1")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"wf_conv2d: labels must be [B]={x.shape[0]}, got {tuple(labels.shape)}")
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"wf_conv2d: need stride >= 1, dilation >= 1, padding >= 0; got {s}, {d}, {p}")
    KH, KW = weight.shape[2], weight.shape[3]
    Ho = conv_out_size(x.shape[2], KH, s[0], p[0], d[0])
    Wo = conv_out_size(x.shape[3], KW, s[1], p[1], d[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"wf_conv2d: output would be empty ({Ho}x{Wo}) for input {tuple(x.shape[2:])}, "
                         f"kernel {KH}x{KW}, stride {s}, padding {p}, dilation {d}")
    return s, p, d, Ho, Wo


def _empty_like_format(x: torch.Tensor, shape) -> torch.Tensor:
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)


def wf_conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha_w: torch.Tensor,
                      alpha_b: torch.Tensor | None, labels: torch.Tensor, stride=1, padding=0,
                      dilation=1) -> torch.Tensor:
    """Gated conv2d ``y [B, O, Ho, Wo]`` (dtype and memory format of x)."""
    (sh, sw), (ph, pw), (dh, dw), Ho, Wo = _geometry(x, weight, labels, stride, padding, dilation)
    B, C, H, W = x.shape
    O, _, KH, KW = weight.shape
    w = weight.detach().to(x.dtype)
    y = _empty_like_format(x, (B, O, Ho, Wo))
    M = B * Ho * Wo
    if M == 0:
        return y
    aw = alpha_w.detach().float().contiguous()
    ab = alpha_b.detach().float().contiguous() if alpha_b is not None else aw
    has_bias = bias is not None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(O, meta["BLOCK_N"]),)  # noqa: E731
    _wf_conv_fwd_kernel[grid](
        x, w, bias.detach().contiguous() if has_bias else aw, aw, ab, labels.contiguous(), y,
        M, C, H, W, O, Ho, Wo, m_bucket(M), *x.stride(), *w.stride(), *y.stride(), sh, sw, ph, pw, dh, dw,
        KH=KH, KW=KW, HAS_BIAS=has_bias, HAS_ALPHA_B=alpha_b is not None,
        PRECISION=dot_precision(x.dtype, conv=True))
    return y


def _srs(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, row = output pixel, channel) element strides of a ``[B, O, Ho, Wo]`` tensor; the pixel
    index runs over (oh, ow) with ow fastest, one stride for both NCHW and channels-last."""
    if t.shape[2] > 1 and t.stride(2) != t.stride(3) * t.shape[3]:
        raise ValueError("wf_conv2d_backward: dy / y must be NCHW- or channels-last-contiguous per pixel; "
                         "call .contiguous() or .contiguous(memory_format=torch.channels_last) first")
    return (t.stride(0), t.stride(3), t.stride(1))


def wf_conv2d_backward(dy: torch.Tensor, y: torch.Tensor, x_shape: tuple[int, int, int, int], weight: torch.Tensor,
                       bias: torch.Tensor | None, alpha_w: torch.Tensor, alpha_b: torch.Tensor | None,
                       labels: torch.Tensor, stride=1, padding=0, dilation=1, need_dx: bool = True,
                       channels_last: bool = False) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(dx, dalpha_w, dalpha_b)`` from ``dy`` and the saved output ``y`` (``[B, O, Ho, Wo]``);
    ``dx [B, C, H, W]`` in dy's dtype, channels-last iff ``channels_last`` (None if not ``need_dx``);
    dalpha fp32 ``[N, O]``, bit-identical from run to run."""
    B, C, H, W = x_shape
    O, _, KH, KW = weight.shape
    Ho, Wo = y.shape[2], y.shape[3]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    aw = alpha_w.detach().float().contiguous()
    lab = labels.contiguous()
    dx = None
    if need_dx:
        w = weight.detach().to(dy.dtype)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        dx = torch.empty((B, C, H, W), device=dy.device, dtype=dy.dtype, memory_format=fmt)
        M = B * H * W
        if M > 0 and C > 0:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)  # noqa: E731
            _wf_conv_dx_kernel[grid](
                dy, w, aw, lab, dx, M, C, H, W, O, Ho, Wo, m_bucket(M), *dy.stride(), *w.stride(), *dx.stride(),
                sh, sw, ph, pw, dh, dw, KH=KH, KW=KW, PRECISION=dot_precision(dy.dtype, conv=True))
    daw, dab = dalpha(dy, y, lab, aw, alpha_b, bias, _srs(dy), _srs(y), B, Ho * Wo, O)
    return dx, daw, dab
