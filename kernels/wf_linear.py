"""Fused WF-gated linear layer (DESIGN §3): Triton kernels and their launchers.

Shapes: ``x [B, T, F_in]`` or ``[B, F_in]`` (rows ``M = B*T``, row ``m`` belongs to sample ``m // T``),
``weight [O, F_in]`` (frozen), ``bias [O]`` or None (frozen), ``alpha_w, alpha_b [N, O]`` fp32 raw
gates, ``labels [B]`` gate row per sample. x / weight fp32 (TF32 when torch allows it) or bf16/fp16,
always fp32 accumulation; alpha and dalpha fp32.

* ``wf_linear_forward``: one GEMM over the M rows; the epilogue gathers ``sigmoid(alpha_w)[label]`` and
  ``sigmoid(alpha_b)[label] * b`` per row and scales - no per-sample weights exist anywhere.
* ``wf_linear_backward``: one GEMM ``dx = (dy * g) W`` with the gate applied to the dy tile in the
  prologue; the programs of the first F_in column block also reduce ``dy * (y - gb*b)`` and ``dy``
  per class from the very dy tiles they already hold (segmented reduction fused with the dy pass,
  see ``kernels._common`` for why the saved output y replaces the pre-gate z). Then a tiny finalize
  turns the sums into ``dalpha_w, dalpha_b``. When x needs no grad, only the reduction runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearn_fast.kernels._common import (INTERPRET, configs, dalpha_finalize, dalpha_reduce, dot_precision,
                                          gate_prep, tile_ids)

__all__ = ["wf_linear_forward", "wf_linear_backward"]

_H100 = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
    (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 64, 32, 4, 5),
]
_INTERP = (64, 64, 64)


# Forward, rows m, output channels o, c = labels[m // T]:
#   y[m, o] = sigmoid(alpha_w[c, o]) * sum_k x[m, k] W[o, k] + sigmoid(alpha_b[c, o]) * b[o]
# = (x W^T)[m, o] scaled in the epilogue: the gate is per output channel, so it commutes with the GEMM
# and equals the per-sample masked weight g ⊙ W of WF Alg. 1.
@triton.autotune(configs=configs(_H100, _INTERP), key=["M", "N", "K", "HAS_BIAS"])
@triton.jit
def _wf_linear_fwd_kernel(x_ptr, w_ptr, bias_ptr, aw_ptr, ab_ptr, lab_ptr, y_ptr,
                          M, N, K, T,
                          s_xm, s_xk, s_wn, s_wk, s_ym, s_yn,
                          HAS_BIAS: tl.constexpr, HAS_ALPHA_B: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * s_xm
    w_cols = w_ptr + rn[None, :] * s_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        a = tl.load(x_rows + kk[None, :] * s_xk, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_cols + kk[:, None] * s_wk, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # epilogue: gather the row's gate and scale
    lab = tl.load(lab_ptr + rm // T, mask=mmask, other=0).to(tl.int64)
    m2 = mmask[:, None] & nmask[None, :]
    gidx = lab[:, None] * N + rn[None, :]
    y = acc * tl.sigmoid(tl.load(aw_ptr + gidx, mask=m2, other=0.0))
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        if HAS_ALPHA_B:
            y += tl.sigmoid(tl.load(ab_ptr + gidx, mask=m2, other=0.0)) * bias[None, :]
        else:
            y += bias[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * s_ym + rn[None, :] * s_yn, y.to(y_ptr.dtype.element_ty), mask=m2)


# Backward, with g = sigmoid(alpha_w)[c], gb = sigmoid(alpha_b)[c] (1 without alpha_b):
#   dx[m, k]  = sum_o (dy[m, o] * g[c_m, o]) W[o, k]           gate on the dy tile in the prologue
#   S1[c, o] += sum_{m: c_m = c} dy[m, o] (y[m, o] - gb[c, o] b[o])      (= g * sum dy z)
#   S0[c, o] += sum_{m: c_m = c} dy[m, o]
# The (pid_k == 0) programs reduce the dy tile they hold: rows of one sample are consecutive
# (T of them), so for T >= 8 a tile spans few samples and is summed per sample in registers
# before one atomic add per sample; for small T each element is added atomically.
@triton.jit
def _seg_add(sums_ptr, lab_ptr, p1, p0, rm, rn, row0, M, N, NO, T,
             BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr):
    mmask = rm < M
    nmask = rn < N
    if PER_ROW:
        lab = tl.load(lab_ptr + rm // T, mask=mmask, other=0).to(tl.int64)
        idx = lab[:, None] * N + rn[None, :]
        m2 = mmask[:, None] & nmask[None, :]
        tl.atomic_add(sums_ptr + idx, p1, mask=m2)
        if HAS_BIAS:
            tl.atomic_add(sums_ptr + NO + idx, p0, mask=m2)
    else:
        smp = rm // T
        s_first = row0 // T
        s_last = (tl.minimum(row0 + BLOCK_M, M) - 1) // T
        for s in range(s_first, s_last + 1):
            sel = (smp == s)[:, None]
            lab = tl.load(lab_ptr + s).to(tl.int64)
            tl.atomic_add(sums_ptr + lab * N + rn, tl.sum(tl.where(sel, p1, 0.0), axis=0), mask=nmask)
            if HAS_BIAS:
                tl.atomic_add(sums_ptr + NO + lab * N + rn, tl.sum(tl.where(sel, p0, 0.0), axis=0), mask=nmask)


@triton.autotune(configs=configs(_H100, _INTERP), key=["M", "N", "K", "HAS_BIAS", "FUSE_DALPHA"],
                 reset_to_zero=["sums_ptr"])
@triton.jit
def _wf_linear_bwd_kernel(dy_ptr, y_ptr, w_ptr, bias_ptr, ab_ptr, g_ptr, lab_ptr, dx_ptr, sums_ptr,
                          M, N, K, T, NO,
                          s_dym, s_dyn, s_ym, s_yn, s_wn, s_wk, s_dxm, s_dxk,
                          HAS_BIAS: tl.constexpr, HAS_ALPHA_B: tl.constexpr, FUSE_DALPHA: tl.constexpr,
                          PER_ROW: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    # GEMM dims of this kernel: rows M, output columns K (= F_in, tiled by BLOCK_K), reduction N (= O).
    pid_m, pid_k = tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    row0 = pid_m * BLOCK_M
    rm = row0 + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mmask = rm < M
    kmask = rk < K
    lab = tl.load(lab_ptr + rm // T, mask=mmask, other=0).to(tl.int64)
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * s_dym
    y_rows = y_ptr + rm.to(tl.int64)[:, None] * s_ym
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        m2 = mmask[:, None] & nmask[None, :]
        gidx = lab[:, None] * N + rn[None, :]
        dy = tl.load(dy_rows + rn[None, :] * s_dyn, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + gidx, mask=m2, other=0.0)
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :] * s_wk, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot((dy * g).to(w.dtype), w, acc, input_precision=PRECISION)
        if FUSE_DALPHA:
            if pid_k == 0:
                yv = tl.load(y_rows + rn[None, :] * s_yn, mask=m2, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    gbb = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
                    if HAS_ALPHA_B:
                        gbb = gbb * tl.sigmoid(tl.load(ab_ptr + gidx, mask=m2, other=0.0))
                    yv = yv - gbb
                _seg_add(sums_ptr, lab_ptr, dy * yv, dy, rm, rn, row0, M, N, NO, T, BLOCK_M, HAS_BIAS, PER_ROW)
    tl.store(dx_ptr + rm.to(tl.int64)[:, None] * s_dxm + rk[None, :] * s_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=mmask[:, None] & kmask[None, :])


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _check(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"wf_linear: x must be [B, F_in] or [B, T, F_in], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"wf_linear: weight must be [O, {x.shape[-1]}], got {tuple(weight.shape)}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"wf_linear: labels must be [B]={x.shape[0]}, got {tuple(labels.shape)}")


def wf_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha_w: torch.Tensor,
                      alpha_b: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """Gated linear ``y [*x.shape[:-1], O]`` (dtype of x)."""
    _check(x, weight, labels)
    B = x.shape[0]
    T = x.shape[1] if x.dim() == 3 else 1
    x2 = _rows(x)
    M, K = x2.shape
    N = weight.shape[0]
    w = weight.detach().to(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    has_bias = bias is not None
    aw = alpha_w.detach().float().contiguous()
    ab = alpha_b.detach().float().contiguous() if alpha_b is not None else aw
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _wf_linear_fwd_kernel[grid](
        x2, w, bias.detach().contiguous() if has_bias else aw, aw, ab, labels.contiguous(), y,
        M, N, K, T, x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=has_bias, HAS_ALPHA_B=alpha_b is not None, PRECISION=dot_precision(x.dtype, conv=False))
    return y.reshape(*x.shape[:-1], N)


def wf_linear_backward(dy: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       alpha_w: torch.Tensor, alpha_b: torch.Tensor | None, labels: torch.Tensor,
                       need_dx: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(dx, dalpha_w, dalpha_b)`` from the upstream grad ``dy`` and the saved output ``y`` (both
    ``[B, T, O]`` or ``[B, O]``). dx has y's leading shape with ``F_in`` last (None if not ``need_dx``);
    dalpha fp32 ``[N, O]`` (dalpha_b None without alpha_b)."""
    B = y.shape[0]
    T = y.shape[1] if y.dim() == 3 else 1
    N_out = weight.shape[0]
    dy2, y2 = _rows(dy), _rows(y)
    M = dy2.shape[0]
    K = weight.shape[1]
    g, sums = gate_prep(alpha_w)
    has_bias = bias is not None
    ab = alpha_b.detach().float().contiguous() if alpha_b is not None else g
    bias_c = bias.detach().contiguous() if has_bias else g
    lab = labels.contiguous()
    dx = None
    if need_dx and M > 0:
        w = weight.detach().to(dy.dtype)
        dx2 = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
        _wf_linear_bwd_kernel[grid](
            dy2, y2, w, bias_c, ab, g, lab, dx2, sums, M, N_out, K, T, g.numel(),
            dy2.stride(0), dy2.stride(1), y2.stride(0), y2.stride(1), w.stride(0), w.stride(1),
            dx2.stride(0), dx2.stride(1),
            HAS_BIAS=has_bias, HAS_ALPHA_B=alpha_b is not None, FUSE_DALPHA=True, PER_ROW=T < 8,
            PRECISION=dot_precision(dy.dtype, conv=False))
        dx = dx2.reshape(*y.shape[:-1], K)
    elif need_dx:
        dx = torch.empty((*y.shape[:-1], K), device=dy.device, dtype=dy.dtype)
    if not (need_dx and M > 0) and M > 0:
        dalpha_reduce(dy2, y2, lab, alpha_b.detach().float().contiguous() if alpha_b is not None else None, bias,
                      sums, (T * dy2.stride(0), dy2.stride(0), dy2.stride(1)),
                      (T * y2.stride(0), y2.stride(0), y2.stride(1)), B, T, N_out)
    return (dx,) + dalpha_finalize(g, sums, alpha_b, bias)
