"""Shared pieces of the WF-gate Triton kernels (DESIGN §3): interpreter switch, autotune config
helper, the gate-table prep kernel, the label-keyed dalpha reduction and its finalize step.

Gate tables are ``[N_classes, O]`` fp32, raw (pre-sigmoid) alpha; ``labels [B]`` int32/int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "configs", "dot_precision", "gate_prep", "dalpha_reduce", "dalpha_finalize"]

# Autotuning in the interpreter is slow and pointless: one small config there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(h100: list[tuple[int, int, int, int, int]], interp: tuple[int, int, int]) -> list[triton.Config]:
    """``triton.Config`` list from ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` tuples; under
    ``TRITON_INTERPRET=1`` a single ``interp = (BLOCK_M, BLOCK_N, BLOCK_K)`` config."""
    if INTERPRET:
        bm, bn, bk = interp
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in h100
    ]


def dot_precision(dtype: torch.dtype, conv: bool) -> str:
    """``input_precision`` for ``tl.dot``: TF32 for fp32 inputs when torch allows it for this op kind
    (``torch.backends.cudnn.allow_tf32`` for conv, ``torch.backends.cuda.matmul.allow_tf32`` for linear)."""
    if dtype != torch.float32 or INTERPRET:
        return "ieee"
    allow = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allow else "ieee"


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) program order: program ``pid`` -> tile ``(pid_m, pid_n)``."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# Backward prep: zero the [2, N, O] fp32 sums and write g = sigmoid(alpha_w) [N, O] in one launch.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gate_prep_kernel(alpha_w_ptr, g_ptr, sums_ptr, NO, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NO
    a = tl.load(alpha_w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(g_ptr + offs, tl.sigmoid(a), mask=m)
    tl.store(sums_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=m)
    tl.store(sums_ptr + NO + offs, tl.zeros([BLOCK], tl.float32), mask=m)


def gate_prep(alpha_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, sums)``: ``g = sigmoid(alpha_w)`` ``[N, O]`` fp32 and zeroed ``sums [2, N, O]`` fp32
    (``sums[0] = S1 = sum dy*(y - gb*b)``, ``sums[1] = S0 = sum dy`` per class and channel)."""
    aw = alpha_w.detach().contiguous()
    g = torch.empty(aw.shape, device=aw.device, dtype=torch.float32)
    sums = torch.empty((2,) + tuple(aw.shape), device=aw.device, dtype=torch.float32)
    no = aw.numel()
    block = 1024
    _gate_prep_kernel[(triton.cdiv(no, block),)](aw, g, sums, no, BLOCK=block)
    return g, sums


# ---------------------------------------------------------------------------------------------
# Label-keyed dalpha reduction.
#
# With z the pre-gate output, g = sigmoid(alpha_w)[c], gb = sigmoid(alpha_b)[c] (1 without alpha_b),
# y = g*z + gb*b. Because sigmoid' = g(1-g), the alpha gradients need only
#     S1[c,o] = sum_{rows of class c} dy * (y - gb*b)   (= g * sum dy*z)
#     S0[c,o] = sum_{rows of class c} dy
#     dalpha_w = (1 - g) * S1            dalpha_b = gb * (1 - gb) * b * S0
# so z is never stored nor recomputed: the saved output y (which the next layer saves anyway)
# and the bias give it back, and there is no division by g. A class absent from the batch keeps
# S = 0, so its dalpha is exactly 0.
#
# Layout: element (sample s, row r, channel o) at base + s*stride_s + r*stride_r + o*stride_o;
# linear [B, T, O] and conv NCHW / channels-last [B, O, H*W] are all this. One program reduces a
# chunk of one sample's rows for a block of channels in registers, then makes one atomic add of a
# [BLOCK_O] vector into the class row: the segmented reduction costs a single read of dy and y.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dalpha_reduce_kernel(dy_ptr, y_ptr, lab_ptr, alpha_b_ptr, bias_ptr, sums_ptr,
                          R, O, NO, R_PER_PROG,
                          s_ds, s_dr, s_do, s_ys, s_yr, s_yo,
                          HAS_BIAS: tl.constexpr, HAS_ALPHA_B: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    s = tl.program_id(0)
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = ro < O
    lab = tl.load(lab_ptr + s).to(tl.int64)
    if HAS_BIAS:
        gbb = tl.load(bias_ptr + ro, mask=omask, other=0.0).to(tl.float32)
        if HAS_ALPHA_B:
            gbb = gbb * tl.sigmoid(tl.load(alpha_b_ptr + lab * O + ro, mask=omask, other=0.0).to(tl.float32))
    r_start = tl.program_id(2) * R_PER_PROG
    r_end = tl.minimum(r_start + R_PER_PROG, R)
    acc1 = tl.zeros([BLOCK_R, BLOCK_O], tl.float32)
    acc0 = tl.zeros([BLOCK_R, BLOCK_O], tl.float32)
    dy_base = dy_ptr + s.to(tl.int64) * s_ds
    y_base = y_ptr + s.to(tl.int64) * s_ys
    for r0 in range(r_start, r_end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        m = (rr < r_end)[:, None] & omask[None, :]
        dy = tl.load(dy_base + rr[:, None] * s_dr + ro[None, :] * s_do, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_base + rr[:, None] * s_yr + ro[None, :] * s_yo, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y - gbb[None, :]
            acc0 += dy
        acc1 += dy * y
    tl.atomic_add(sums_ptr + lab * O + ro, tl.sum(acc1, axis=0), mask=omask)
    if HAS_BIAS:
        tl.atomic_add(sums_ptr + NO + lab * O + ro, tl.sum(acc0, axis=0), mask=omask)


def dalpha_reduce(dy: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, alpha_b: torch.Tensor | None,
                  bias: torch.Tensor | None, sums: torch.Tensor, strides_dy: tuple[int, int, int],
                  strides_y: tuple[int, int, int], B: int, R: int, O: int) -> None:
    """Accumulate ``S1, S0`` into ``sums [2, N, O]`` from ``dy, y`` viewed as ``(sample, row, channel)``
    with the given ``(stride_s, stride_r, stride_o)`` element strides (``R`` rows per sample)."""
    if INTERPRET:
        block_r, block_o, warps = 16, 32, 4
    else:
        block_r, block_o, warps = (64, 32, 4) if strides_dy[1] == 1 else (32, 64, 4)
    n_o = triton.cdiv(O, block_o)
    target = 1 if INTERPRET else 4 * _sm_count(dy.device)
    split = max(1, min(triton.cdiv(R, block_r * 4), triton.cdiv(target, max(1, B * n_o))))
    r_per = triton.cdiv(triton.cdiv(R, split), block_r) * block_r
    split = triton.cdiv(R, r_per)
    has_bias = bias is not None
    has_ab = alpha_b is not None and has_bias
    dummy = sums
    _dalpha_reduce_kernel[(B, n_o, split)](
        dy, y, labels, alpha_b.detach() if has_ab else dummy, bias.detach() if has_bias else dummy, sums,
        R, O, sums.shape[1] * O, r_per, *strides_dy, *strides_y,
        HAS_BIAS=has_bias, HAS_ALPHA_B=has_ab, BLOCK_R=block_r, BLOCK_O=block_o, num_warps=warps)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------
# Finalize: dalpha_w = (1 - g) * S1, dalpha_b = gb (1 - gb) b S0, both fp32 [N, O].
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dalpha_finalize_kernel(g_ptr, sums_ptr, alpha_b_ptr, bias_ptr, daw_ptr, dab_ptr, NO, O,
                            HAS_BIAS: tl.constexpr, HAS_ALPHA_B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NO
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    s1 = tl.load(sums_ptr + offs, mask=m, other=0.0)
    tl.store(daw_ptr + offs, (1.0 - g) * s1, mask=m)
    if HAS_ALPHA_B:
        if HAS_BIAS:
            gb = tl.sigmoid(tl.load(alpha_b_ptr + offs, mask=m, other=0.0).to(tl.float32))
            b = tl.load(bias_ptr + offs % O, mask=m, other=0.0).to(tl.float32)
            s0 = tl.load(sums_ptr + NO + offs, mask=m, other=0.0)
            tl.store(dab_ptr + offs, gb * (1.0 - gb) * b * s0, mask=m)
        else:
            tl.store(dab_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=m)


def dalpha_finalize(g: torch.Tensor, sums: torch.Tensor, alpha_b: torch.Tensor | None,
                    bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dalpha_w, dalpha_b)`` fp32 ``[N, O]`` from the gate table and the sums (``dalpha_b`` is None
    without ``alpha_b``, zeros when there is no bias: alpha_b then does not touch the output)."""
    no, o = g.numel(), g.shape[1]
    daw = torch.empty_like(g)
    dab = torch.empty_like(g) if alpha_b is not None else None
    block = 1024
    _dalpha_finalize_kernel[(triton.cdiv(no, block),)](
        g, sums, alpha_b.detach().contiguous() if alpha_b is not None else g, bias.detach() if bias is not None else g,
        daw, dab if dab is not None else daw, no, o,
        HAS_BIAS=bias is not None, HAS_ALPHA_B=alpha_b is not None, BLOCK=block)
    return daw, dab
