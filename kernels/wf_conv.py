"""Fused WF-gated conv2d (DESIGN §3, issue 10 item 6): implicit-GEMM Triton kernels and their launchers.

Shapes: ``x [B, C, H, W]`` (computed channels-last: an NCHW x is copied to NHWC once; y keeps x's
memory format), ``weight [O, C, KH, KW]`` (frozen, groups=1; packed once per weight version by
``kernels.conv_pack``), ``bias [O]`` or None (frozen), ``alpha_w, alpha_b [N, O]`` fp32 raw gates,
``labels [B]``. Any stride / padding / dilation. fp32 (TF32 when torch's cuDNN-conv TF32 policy allows,
``kernels._tf32``) or bf16/fp16 inputs, fp32 accumulation; alpha and dalpha fp32.

* ``wf_conv2d_forward``: one GEMM, rows = output pixels ``(b, oh, ow)``, columns = output channels, ONE
  flat K loop over ``(kh, kw, c)`` against the packed ``[K, O]`` weight; the gate in the epilogue.
* ``wf_conv2d_backward``: dx by the sub-pixel (phase) decomposition of the transposed conv - one launch,
  one dense conv per stride phase, ONE flat K loop over ``(tap, o)`` with the gate applied to the dy tile
  in the prologue - and dalpha fused into the same kernel: the programs that own each dy element write
  per-(tile, sample, channel) partials of ``dy * (y - gb*b)`` and ``dy``, summed per class in a fixed
  order by ``kernels._common.dalpha_classes`` (no atomics; two runs are bit-identical).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearn_fast.kernels import conv_pack as _cp
from unlearn_fast.kernels._common import _env_tile, autotune, dalpha, dalpha_classes, dot_precision, m_bucket, tile_ids

__all__ = ["wf_conv2d_forward", "wf_conv2d_backward", "conv_out_size", "FORCE_K_MODE"]

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the first is the UNLEARN_FAST_AUTOTUNE=0 default. Every
# BLOCK_K divides conv_pack.KALIGN (64). fp32 shared memory: 96, 64, 64, 32 KiB; pruned by the device's limit.
_TABLE = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]
# Smallest BLOCK_M any config may pick (sizes the dalpha partial buffer before autotuning chooses).
_MIN_BM = 16
# Tests: force the forward K order ("tap" or "flat"; None = conv_pack.k_mode's choice).
FORCE_K_MODE: str | None = None
# Fused dalpha needs the owner phase to hold >= this many pixels per sample (a BLOCK_M tile then spans
# at most BLOCK_M // _MIN_OWN_ROWS + 2 samples: a short unrolled segment loop); else the separate pass.
_MIN_OWN_ROWS = 16
# Tests: fill y and dx with NaN before the kernels write them (an element no program writes stays NaN).
_POISON = False


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


# ----------------------------------------------------------------------------------------------
# Forward: implicit GEMM over ONE flat K loop.
#
#   z[b,o,oh,ow] = sum_{kh,kw,c} x[b, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw, c] W[o,c,kh,kw]
#   y            = sigmoid(alpha_w[c_b, o]) * z + sigmoid(alpha_b[c_b, o]) * b[o]        (epilogue)
#
# Rows m = (b, oh, ow) (M = B*Ho*Wo), columns o, reduction index k over (tap = kh*KW + kw, c). Per row,
# decomposed once per tile (the only div/mod on rows): the NHWC element offset of its window corner
#     row(m) = b*s_xb + (oh*sh - ph)*s_xh + (ow*sw - pw)*s_xw,   ih0 = oh*sh - ph,  iw0 = ow*sw - pw,
# so the A element (m, k) sits at  row(m) + dh(k)*s_xh + dw(k)*s_xw + c(k)*s_xc  with (dh, dw) =
# (kh*dil_h, kw*dil_w), and is inside the image iff 0 <= ih0 + dh < H and 0 <= iw0 + dw < W (zero
# padding = masked load). The B tile of a K step is rows [k0, k0 + BK) of the packed [Kp, O] weight.
# Two K orders (conv_pack.k_mode), both ONE loop over K steps:
#   TAP_K: k = tap*Cp + c with Cp = C rounded up to 64, so a K tile lies inside one tap: step i is tap
#          t = i // ceil(C/BK), channels c0 = (i mod ceil(C/BK))*BK, k0 = t*Cp + c0 (scalar arithmetic); the A tile is a
#          contiguous channel run per pixel (coalesced, vectorisable on channels-last).
#   flat:  k = tap*C + c over K = KH*KW*C padded ONCE to Kp, k0 = i*BK: the per-k (dh, dw, c) come from the int32
#          [3, Kp] table (three BLOCK_K-vector loads per step instead of per-element div/mod); the loop
#          runs ceil(K/BK) steps, and the entries past K (dh = -2^20, zero weight rows) read 0. A
#          3-channel 7x7 stem runs K = 147 (5 steps of 32) instead of 49 taps x a 32-wide channel block.
# ----------------------------------------------------------------------------------------------
@autotune(_TABLE, key=["M_BUCKET", "O", "C", "KH", "KW", "STRIDE_H", "HAS_BIAS", "TAP_K"], first_tensor="x_ptr")
@triton.jit
def _wf_conv_fwd_kernel(x_ptr, wp_ptr, ktab_ptr, bias_ptr, aw_ptr, ab_ptr, lab_ptr, y_ptr,
                        M, C, H, W, O, Ho, Wo, M_BUCKET, KP, CP,
                        s_xb, s_xc, s_xh, s_xw, s_yb, s_yo, s_yh, s_yw,
                        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                        KH: tl.constexpr, KW: tl.constexpr, TAP_K: tl.constexpr,
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
    hw = rm - b * HWo
    oh = hw // Wo
    ow = hw - oh * Wo
    ih0 = tl.where(mmask, oh * STRIDE_H - PAD_H, -(1 << 20))  # rows past M never pass the bounds test
    iw0 = ow * STRIDE_W - PAD_W
    row = b.to(tl.int64) * s_xb + ih0 * s_xh + iw0 * s_xw
    w_cols = wp_ptr + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if TAP_K:
        n_cb = tl.cdiv(C, BLOCK_K)  # channel blocks per tap (only the last one partial)
        n_k = KH * KW * n_cb
    else:
        n_k = tl.cdiv(KH * KW * C, BLOCK_K)  # the real K: no step runs on padding alone
    for i in range(0, n_k):
        if TAP_K:
            t = i // n_cb
            c0 = (i - t * n_cb) * BLOCK_K
            k0 = t * CP + c0
            kh = t // KW
            dh = kh * DIL_H
            dw = (t - kh * KW) * DIL_W
            cc = c0 + rk
            ih = ih0 + dh
            iw = iw0 + dw
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + (row + (dh * s_xh + dw * s_xw))[:, None] + cc[None, :] * s_xc,
                        mask=inside[:, None] & (cc < C)[None, :], other=0.0)
        else:
            k0 = i * BLOCK_K
            kk = k0 + rk
            dh = tl.load(ktab_ptr + kk)
            dw = tl.load(ktab_ptr + KP + kk)
            cc = tl.load(ktab_ptr + 2 * KP + kk)
            ih = ih0[:, None] + dh[None, :]
            iw = iw0[:, None] + dw[None, :]
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + row[:, None] + (dh * s_xh + dw * s_xw + cc * s_xc)[None, :], mask=inside, other=0.0)
        wt = tl.load(w_cols + (k0 + rk)[:, None] * O, mask=nmask[None, :], other=0.0)
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


# ----------------------------------------------------------------------------------------------
# Backward: dx by phases, dalpha fused.
#
# dx[b,ih,iw,c] = sum_{o,kh,kw} (dy*g)[b,oh,ow,o] W[o,c,kh,kw]  over the taps with
#   oh = (ih + ph - kh*dh) / sh  and  ow = (iw + pw - kw*dw) / sw  exact integers in [0,Ho) x [0,Wo).
# Write ih = qh + sh*jh (phase qh = ih mod sh). Divisibility depends on (qh, kh) only, so phase qh
# has a fixed tap set {kh : (qh + ph - kh*dh) mod sh == 0}, and for it oh = jh + eh with the constant
# eh = (qh + ph - kh*dh) / sh. Each of the sh*sw phases is therefore a DENSE conv over its sub-grid
# (jh, jw) in [0, Hq) x [0, Wq), Hq = ceil((H - qh)/sh), with only its own taps and only image-bounds
# masks (no tap is masked for divisibility: a 3x3 stride-2 dgrad runs 9 taps over 4 phases, not 36).
# One launch: grid axis 1 = phase (conv_pack.dx_tables: ptab[p] = (qh, qw, n_taps, first tap),
# ttab[t] = (eh, ew, tap)); a phase with no taps writes zeros. Rows m = (b, jh, jw), columns c,
# ONE flat K loop over (tap of the phase, o) with o padded to Op (64 multiple, zero weight rows): step i
# is tap i // (Op/BK), channels o0 = (i mod (Op/BK))*BK (scalar arithmetic only). The B tile is rows
# tap*Op + o0 .. of the packed [T*Op, C] weight; the A tile is dy at (jh + eh, jw + ew), times the gate
# g = sigmoid(alpha_w)[label(b), o] (gathered from the precomputed [N, O] table) in the prologue.
#
# dalpha (DESIGN §3, kernels/_common.py): per sample and channel S1 = sum_pix dy*(y - gb*b), S0 =
# sum_pix dy. The owner tap (conv_pack._axis_phases) is a tap (kh*, kw*) whose input pixel
# oh*sh - ph + kh*dh is inside the image for EVERY output row (same for w), so in its phase the map
# (jh, jw) -> (oh, ow) = (jh + eh*, jw + ew*) hits every dy pixel exactly once. It is sorted first in
# its phase, so the first Op/BK K steps of that phase's programs with pid_n == 0 read each dy element
# exactly once across the grid: there they also load y at the same pixels and reduce dy*(y - gb*b)
# and dy over the tile's rows, segmented by sample (a tile spans at most NSEG samples), and store them
# to parts[sp, 0/1, sample, o] with sp = tile - first tile of that sample: every element written by
# exactly one program, no atomics; dalpha_classes sums the splits in index order (bit-identical
# runs). dy is read from HBM once for both products instead of a second pass over dy and y.
# Without an owner tap (padding larger than the kernel reach) or with < _MIN_OWN_ROWS owner rows per
# sample, the launcher uses the separate deterministic pass instead (DALPHA=False).
# ----------------------------------------------------------------------------------------------
@autotune(_TABLE, key=["M_BUCKET", "O", "C", "KH", "KW", "STRIDE_H", "DALPHA", "HAS_BIAS"], first_tensor="wd_ptr")
@triton.heuristics({"NSEG": lambda a: min(16, (a["BLOCK_M"] - 1) // max(1, a["R_OWN"]) + 2)})
@triton.jit
def _wf_conv_dx_kernel(dy_ptr, y_ptr, wd_ptr, ptab_ptr, ttab_ptr, gt_ptr, gbt_ptr, lab_ptr, dx_ptr, part_ptr,
                       B, C, H, W, O, OP, Ho, Wo, M_BUCKET, R_OWN, OWN_P, SPLIT,
                       s_db, s_do, s_dh, s_dw, s_yb, s_yo, s_yh, s_yw, s_xb, s_xc, s_xh, s_xw,
                       STRIDE_H, STRIDE_W,
                       KH: tl.constexpr, KW: tl.constexpr, DALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
                       PRECISION: tl.constexpr, NSEG: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    p = tl.program_id(1)
    qh = tl.load(ptab_ptr + 4 * p)
    qw = tl.load(ptab_ptr + 4 * p + 1)
    n_taps = tl.load(ptab_ptr + 4 * p + 2)
    tap0 = tl.load(ptab_ptr + 4 * p + 3)
    Hq = (H - qh + STRIDE_H - 1) // STRIDE_H
    Wq = (W - qw + STRIDE_W - 1) // STRIDE_W
    HWq = tl.maximum(Hq * Wq, 1)
    Mq = B * Hq * Wq
    pid = tl.program_id(0)
    valid = pid < tl.cdiv(Mq, BLOCK_M) * tl.cdiv(C, BLOCK_N)  # the grid is sized for the largest phase
    pid_m, pid_n = tile_ids(pid, tl.maximum(Mq, 1), C, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = (rm < Mq) & valid
    cmask = rc < C
    b = rm // HWq
    r = rm - b * HWq
    jh = r // tl.maximum(Wq, 1)
    jw = r - jh * tl.maximum(Wq, 1)
    lab = tl.load(lab_ptr + b, mask=mmask, other=0).to(tl.int64)
    b64 = b.to(tl.int64)
    drow = b64 * s_db + jh * s_dh + jw * s_dw
    yrow = b64 * s_yb + jh * s_yh + jw * s_yw
    n_ob = tl.cdiv(O, BLOCK_K)  # o blocks per tap (packed rows tap*OP + o; only the last block partial)
    n_it = tl.where(valid, n_taps * n_ob, 0)
    is_own = (p == OWN_P) & (pid_n == 0) & valid
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, n_it):
        t = i // n_ob
        o0 = (i - t * n_ob) * BLOCK_K
        eh = tl.load(ttab_ptr + 3 * (tap0 + t))
        ew = tl.load(ttab_ptr + 3 * (tap0 + t) + 1)
        tap = tl.load(ttab_ptr + 3 * (tap0 + t) + 2)
        oh = jh + eh
        ow = jw + ew
        rmask = mmask & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        oo = o0 + rk
        omask = oo < O
        m2 = rmask[:, None] & omask[None, :]
        d = tl.load(dy_ptr + (drow + (eh * s_dh + ew * s_dw))[:, None] + oo[None, :] * s_do, mask=m2,
                    other=0.0).to(tl.float32)
        g = tl.load(gt_ptr + lab[:, None] * O + oo[None, :], mask=m2, other=0.0)
        wt = tl.load(wd_ptr + (tap * OP + oo).to(tl.int64)[:, None] * C + rc[None, :], mask=cmask[None, :], other=0.0)
        acc = tl.dot((d * g).to(wt.dtype), wt, acc, input_precision=PRECISION)
        if DALPHA:
            if is_own & (i < n_ob):  # the owner tap's K steps: each dy element of the batch once
                yv = tl.load(y_ptr + (yrow + (eh * s_yh + ew * s_yw))[:, None] + oo[None, :] * s_yo, mask=m2,
                             other=0.0).to(tl.float32)
                if HAS_BIAS:
                    yv -= tl.load(gbt_ptr + lab[:, None] * O + oo[None, :], mask=m2, other=0.0)
                v1 = d * yv
                first = (pid_m * BLOCK_M) // HWq
                for s in tl.static_range(NSEG):
                    sample = first + s
                    sp = pid_m - (sample * HWq) // BLOCK_M
                    ok = (sample < B) & (sample * HWq < (pid_m + 1) * BLOCK_M) & (sp < SPLIT)
                    sel = (b == sample)[:, None]
                    base = part_ptr + (sp * 2 * B + sample).to(tl.int64) * O + oo
                    tl.store(base, tl.sum(tl.where(sel, v1, 0.0), axis=0), mask=omask & ok)
                    if HAS_BIAS:
                        tl.store(base + B * O, tl.sum(tl.where(sel, d, 0.0), axis=0), mask=omask & ok)
    ih = qh + jh * STRIDE_H
    iw = qw + jw * STRIDE_W
    dx_off = b64[:, None] * s_xb + rc[None, :] * s_xc + (ih * s_xh + iw * s_xw)[:, None]
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


def _empty(shape, like: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    t = torch.empty(shape, device=like.device, dtype=like.dtype, memory_format=fmt)
    return t.fill_(float("nan")) if _POISON else t


def _empty_like_format(x: torch.Tensor, shape) -> torch.Tensor:
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return _empty(shape, x, torch.channels_last if cl else torch.contiguous_format)


def _check_tile() -> None:
    """The packed weights and K tables are padded to ``KALIGN`` rows per block: a pinned tile
    (``UNLEARN_FAST_TRITON_CONFIG``) must keep BLOCK_K within it and BLOCK_M >= ``_MIN_BM``."""
    t = _env_tile()
    if t is not None and (t[2] > _cp.KALIGN or t[0] < _MIN_BM):
        raise ValueError(f"UNLEARN_FAST_TRITON_CONFIG={','.join(map(str, t))}: the conv kernels need BLOCK_K <= "
                         f"{_cp.KALIGN} and BLOCK_M >= {_MIN_BM}; pick e.g. '128,64,32,4,3'")


def _as_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def wf_conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha_w: torch.Tensor,
                      alpha_b: torch.Tensor | None, labels: torch.Tensor, stride=1, padding=0,
                      dilation=1) -> torch.Tensor:
    """Gated conv2d ``y [B, O, Ho, Wo]`` (dtype and memory format of x; computed from an NHWC x)."""
    (sh, sw), (ph, pw), (dh, dw), Ho, Wo = _geometry(x, weight, labels, stride, padding, dilation)
    B, C, H, W = x.shape
    O, _, KH, KW = weight.shape
    y = _empty_like_format(x, (B, O, Ho, Wo))
    M = B * Ho * Wo
    if M == 0 or O == 0:
        return y
    _check_tile()
    xc = _as_channels_last(x)
    mode = FORCE_K_MODE or _cp.k_mode(C, KH * KW)
    wp = _cp.packed(weight, "fwd", x.dtype, mode)
    ktab = _cp.flat_table(C, KH, KW, (dh, dw), x.device) if mode == "flat" else wp
    aw = alpha_w.detach().float().contiguous()
    ab = alpha_b.detach().float().contiguous() if alpha_b is not None else aw
    has_bias = bias is not None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(O, meta["BLOCK_N"]),)  # noqa: E731
    _wf_conv_fwd_kernel[grid](
        xc, wp, ktab, bias.detach().contiguous() if has_bias else aw, aw, ab, labels.contiguous(), y,
        M, C, H, W, O, Ho, Wo, m_bucket(M), wp.shape[0], _cp.round_up(C),
        *xc.stride(), *y.stride(), sh, sw, ph, pw, dh, dw,
        KH=KH, KW=KW, TAP_K=mode == "tap", HAS_BIAS=has_bias, HAS_ALPHA_B=alpha_b is not None,
        PRECISION=dot_precision(x.dtype, conv=True))
    return y


def _srs(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, row = output pixel, channel) element strides of a ``[B, O, Ho, Wo]`` tensor; the pixel
    index runs over (oh, ow) with ow fastest, one stride for both NCHW and channels-last."""
    if t.shape[2] > 1 and t.stride(2) != t.stride(3) * t.shape[3]:
        raise ValueError("wf_conv2d_backward: dy / y must be NCHW- or channels-last-contiguous per pixel; "
                         "call .contiguous() or .contiguous(memory_format=torch.channels_last) first")
    return (t.stride(0), t.stride(3), t.stride(1))


def fuses_dalpha(x_shape, weight_shape, stride=1, padding=0, dilation=1) -> bool:
    """Whether :func:`wf_conv2d_backward` computes dalpha inside the dx kernel for this geometry (an owner
    tap exists and its phase has >= ``_MIN_OWN_ROWS`` pixels per sample) rather than in a separate pass."""
    _, _, H, W = x_shape
    _, _, KH, KW = weight_shape
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    Ho, Wo = conv_out_size(H, KH, s[0], p[0], d[0]), conv_out_size(W, KW, s[1], p[1], d[1])
    _, _, own_p, r_own = _cp.dx_tables(H, W, Ho, Wo, KH, KW, s, p, d, torch.device("cpu"))
    return own_p >= 0 and r_own >= _MIN_OWN_ROWS


def wf_conv2d_backward(dy: torch.Tensor, y: torch.Tensor, x_shape: tuple[int, int, int, int], weight: torch.Tensor,
                       bias: torch.Tensor | None, alpha_w: torch.Tensor, alpha_b: torch.Tensor | None,
                       labels: torch.Tensor, stride=1, padding=0, dilation=1, need_dx: bool = True,
                       channels_last: bool = False) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(dx, dalpha_w, dalpha_b)`` from ``dy`` and the saved output ``y`` (``[B, O, Ho, Wo]``, NCHW or
    channels-last); ``dx [B, C, H, W]`` in dy's dtype, channels-last iff ``channels_last`` (None if not
    ``need_dx``); dalpha fp32 ``[N, O]``, bit-identical from run to run. With ``need_dx`` dalpha comes out
    of the dx kernel (see the comment above it); without, from the separate deterministic pass."""
    B, C, H, W = x_shape
    O, _, KH, KW = weight.shape
    Ho, Wo = y.shape[2], y.shape[3]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    aw = alpha_w.detach().float().contiguous()
    lab = labels.contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = _empty((B, C, H, W), dy, fmt) if need_dx else None
    fused = False
    if need_dx and B * H * W > 0 and C > 0:
        _check_tile()
        ptab, ttab, own_p, r_own = _cp.dx_tables(H, W, Ho, Wo, KH, KW, (sh, sw), (ph, pw), (dh, dw), dy.device)
        fused = own_p >= 0 and r_own >= _MIN_OWN_ROWS and Ho * Wo > 0 and O > 0
        wd = _cp.packed(weight, "dx", dy.dtype)
        gt = torch.sigmoid(aw)
        has_bias = bias is not None
        gbt = gt
        if fused and has_bias:
            gbt = bias.detach().float().reshape(1, O).expand(aw.shape[0], O)
            if alpha_b is not None:
                gbt = gbt * torch.sigmoid(alpha_b.detach().float())
            gbt = gbt.contiguous()
        split = (r_own - 1) // _MIN_BM + 2 if fused else 1
        parts = torch.zeros((split, 2, B, O) if fused else (1,), device=dy.device, dtype=torch.float32)
        if parts.numel() >= 2 ** 31:
            raise ValueError(f"wf_conv2d_backward: {split}x2x{B}x{O} partials exceed int32 indexing; "
                             "use a smaller batch")
        m_max = B * triton.cdiv(H, sh) * triton.cdiv(W, sw)  # phase (0, 0) is the largest
        grid = lambda meta: (triton.cdiv(m_max, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]), sh * sw)  # noqa: E731
        _wf_conv_dx_kernel[grid](
            dy, y, wd, ptab, ttab, gt, gbt, lab, dx, parts,
            B, C, H, W, O, _cp.round_up(O), Ho, Wo, m_bucket(B * H * W), r_own, own_p, split,
            *dy.stride(), *y.stride(), *dx.stride(), sh, sw,
            KH=KH, KW=KW, DALPHA=fused, HAS_BIAS=has_bias, PRECISION=dot_precision(dy.dtype, conv=True))
        if fused:
            daw, dab = dalpha_classes(parts, lab, aw, alpha_b, bias, B, O)
    if not fused:
        daw, dab = dalpha(dy, y, lab, aw, alpha_b, bias, _srs(dy), _srs(y), B, Ho * Wo, O)
    return dx, daw, dab
