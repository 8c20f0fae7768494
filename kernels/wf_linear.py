"""Fused WF-gated linear layer (DESIGN §3): Triton kernels and their launchers.

Shapes: ``x [B, T, F_in]`` or ``[B, F_in]`` (rows ``M = B*T``, row ``m`` belongs to sample ``m // T``),
``weight [O, F_in]`` (frozen), ``bias [O]`` or None (frozen), ``alpha_w, alpha_b [N, O]`` fp32 raw
gates, ``labels [B]`` gate row per sample. x / weight fp32 (TF32 when torch allows it) or bf16/fp16,
always fp32 accumulation; alpha and dalpha fp32.

* ``wf_linear_forward``: one GEMM over the M rows; the epilogue gathers ``sigmoid(alpha_w)[label]`` and
  ``sigmoid(alpha_b)[label] * b`` per row and scales - no per-sample weights exist anywhere.
* ``wf_linear_backward``: one GEMM ``dx = (dy * g) W`` with the gate applied to the dy tile in the
  prologue, then the deterministic two-pass dalpha reduction of ``kernels._common`` (per-sample
  partials of ``dy * (y - gb*b)`` and ``dy``, then a per-class sum in a fixed order; the saved output y
  replaces the pre-gate z). When x needs no grad, only the reduction runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearn_fast.kernels._common import autotune, dalpha, dot_precision, m_bucket, tile_ids

__all__ = ["wf_linear_forward", "wf_linear_backward"]

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the first is the UNLEARN_FAST_AUTOTUNE=0 default. Shared
# memory per config (fp32): 96, 96, 64, 64 KiB - all fit an A100 / H100 (164 / 227 KiB); pruned by
# the device's limit otherwise (e.g. 99 KiB on an RTX 4090 drops none, 48 KiB drops the first two).
_TABLE = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]


# Forward, rows m, output channels o, c = labels[m // T]:
#   y[m, o] = sigmoid(alpha_w[c, o]) * sum_k x[m, k] W[o, k] + sigmoid(alpha_b[c, o]) * b[o]
# = (x W^T)[m, o] scaled in the epilogue: the gate is per output channel, so it commutes with the GEMM
# and equals the per-sample masked weight g ⊙ W of WF Alg. 1.
@autotune(_TABLE, key=["M_BUCKET", "N", "K", "HAS_BIAS"], first_tensor="x_ptr")
@triton.jit
def _wf_linear_fwd_kernel(x_ptr, w_ptr, bias_ptr, aw_ptr, ab_ptr, lab_ptr, y_ptr,
                          M, N, K, T, M_BUCKET,
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


# Backward dx, with g = sigmoid(alpha_w)[c] gathered per (row, o) and applied to the dy tile in the
# prologue:  dx[m, k] = sum_o (dy[m, o] * g[c_m, o]) W[o, k]. The alpha gradients come from the
# deterministic two-pass reduction of kernels._common (one extra read of dy and y, no atomics).
@autotune(_TABLE, key=["M_BUCKET", "N", "K"], first_tensor="w_ptr", reduce="N")
@triton.jit
def _wf_linear_dx_kernel(dy_ptr, w_ptr, aw_ptr, lab_ptr, dx_ptr,
                         M, N, K, T, M_BUCKET,
                         s_dym, s_dyn, s_wn, s_wk, s_dxm, s_dxk,
                         PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    # GEMM dims of this kernel: rows M, output columns K (= F_in, tiled by BLOCK_K), reduction N (= O).
    pid_m, pid_k = tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mmask = rm < M
    kmask = rk < K
    lab = tl.load(lab_ptr + rm // T, mask=mmask, other=0).to(tl.int64)
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * s_dym
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        m2 = mmask[:, None] & nmask[None, :]
        dy = tl.load(dy_rows + rn[None, :] * s_dyn, mask=m2, other=0.0).to(tl.float32)
        g = tl.sigmoid(tl.load(aw_ptr + lab[:, None] * N + rn[None, :], mask=m2, other=0.0))
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :] * s_wk, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot((dy * g).to(w.dtype), w, acc, input_precision=PRECISION)
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
        M, N, K, T, m_bucket(M), x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=has_bias, HAS_ALPHA_B=alpha_b is not None, PRECISION=dot_precision(x.dtype, conv=False))
    return y.reshape(*x.shape[:-1], N)


def wf_linear_backward(dy: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       alpha_w: torch.Tensor, alpha_b: torch.Tensor | None, labels: torch.Tensor,
                       need_dx: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(dx, dalpha_w, dalpha_b)`` from the upstream grad ``dy`` and the saved output ``y`` (both
    ``[B, T, O]`` or ``[B, O]``). dx has y's leading shape with ``F_in`` last (None if not ``need_dx``);
    dalpha fp32 ``[N, O]`` (dalpha_b None without alpha_b), bit-identical from run to run."""
    B = y.shape[0]
    T = y.shape[1] if y.dim() == 3 else 1
    N_out = weight.shape[0]
    dy2, y2 = _rows(dy), _rows(y)
    M = dy2.shape[0]
    K = weight.shape[1]
    aw = alpha_w.detach().float().contiguous()
    lab = labels.contiguous()
    dx = None
    if need_dx:
        w = weight.detach().to(dy.dtype)
        dx2 = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
        if M > 0 and K > 0:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
            _wf_linear_dx_kernel[grid](
                dy2, w, aw, lab, dx2, M, N_out, K, T, m_bucket(M),
                dy2.stride(0), dy2.stride(1), w.stride(0), w.stride(1), dx2.stride(0), dx2.stride(1),
                PRECISION=dot_precision(dy.dtype, conv=False))
        dx = dx2.reshape(*y.shape[:-1], K)
    daw, dab = dalpha(dy2, y2, lab, aw, alpha_b, bias, (T * dy2.stride(0), dy2.stride(0), dy2.stride(1)),
                      (T * y2.stride(0), y2.stride(0), y2.stride(1)), B, T, N_out)
    return dx, daw, dab
