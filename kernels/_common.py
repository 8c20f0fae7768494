"""Shared pieces of the WF-gate Triton kernels (DESIGN §3): interpreter switch, autotuning (configs
pruned by shared memory and dtype, M bucketed in the key, a one-config switch, results cached on
disk), the TF32 choice for ``tl.dot``, and the deterministic label-keyed dalpha reduction.

Gate tables are ``[N_classes, O]`` fp32, raw (pre-sigmoid) alpha; ``labels [B]`` int32/int64.

Environment:

* ``UNLEARN_FAST_TRITON_CONFIG=BM,BN,BK,warps,stages`` - run every GEMM kernel with this one config
  (no autotuning; also under the interpreter, to test another tile shape).
* ``UNLEARN_FAST_AUTOTUNE=0`` - no autotuning: the first (default) config of each kernel's table.
* Autotune results are cached on disk by Triton (``cache_results=True``) next to its compiled kernels,
  in ``$TRITON_CACHE_DIR`` (default ``~/.triton/cache``): a second process with the same kernel source,
  GPU, Triton version and key reads the chosen config instead of re-benchmarking.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from unlearn_fast.kernels._tf32 import tf32_enabled

__all__ = ["INTERPRET", "autotune", "m_bucket", "dot_precision", "dalpha", "dalpha_classes", "tile_ids", "INTERP_TILE"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the interpreter one small config: tiles smaller than the test shapes (B*H*W = 455 rows, 37
# blocks) run on the small odd test shapes. Override with UNLEARN_FAST_TRITON_CONFIG.
INTERP_TILE = (128, 32, 32, 1, 1)

Tile = tuple[int, int, int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)


def _env_tile() -> Tile | None:
    raw = os.environ.get("UNLEARN_FAST_TRITON_CONFIG", "").strip()
    if not raw:
        return None
    try:
        t = tuple(int(v) for v in raw.split(","))
    except ValueError:
        t = ()
    if len(t) != 5 or min(t) < 1 or any(v & (v - 1) for v in t[:4]):
        raise ValueError(f"UNLEARN_FAST_TRITON_CONFIG={raw!r}: expected 'BM,BN,BK,warps,stages' with powers of two "
                         "for the first four (e.g. '128,64,32,4,3'); unset it to autotune")
    return t  # type: ignore[return-value]


def _config(t: Tile) -> triton.Config:
    bm, bn, bk, w, s = t
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)


def config_list(table: list[Tile]) -> list[triton.Config]:
    """The configs a kernel autotunes over: the env override, the interpreter tile, the first entry
    (``UNLEARN_FAST_AUTOTUNE=0``) or the whole table."""
    env = _env_tile()
    if env is not None:
        return [_config(env)]
    if INTERPRET:
        return [_config(INTERP_TILE)]
    if os.environ.get("UNLEARN_FAST_AUTOTUNE", "1") == "0":
        return [_config(table[0])]
    return [_config(t) for t in table]


@functools.lru_cache(maxsize=None)
def _max_smem(device_index: int) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:
        return int(getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 101376))


def smem_bytes(cfg: triton.Config, elsize: int, reduce: str) -> int:
    """Shared memory of one pipelined GEMM tile pair: ``stages * (A tile + B tile) * elsize``; the
    reduction runs over ``BLOCK_K`` (``reduce="K"``) or ``BLOCK_N`` (``reduce="N"``)."""
    k = cfg.kwargs
    bm, bn, bk = k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"]
    a, b = (bm * bk, bk * bn) if reduce == "K" else (bm * bn, bn * bk)
    return max(1, cfg.num_stages) * (a + b) * elsize


def _pruner(first_tensor: str, reduce: str):
    def prune(configs, named_args, **kwargs):
        t = named_args.get(first_tensor)
        if len(configs) <= 1 or t is None or not hasattr(t, "element_size") or t.device.type != "cuda":
            return configs
        limit = _max_smem(t.device.index if t.device.index is not None else torch.cuda.current_device())
        kept = [c for c in configs if smem_bytes(c, t.element_size(), reduce) <= limit]
        return kept or [min(configs, key=lambda c: smem_bytes(c, t.element_size(), reduce))]
    return prune


_CACHE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def autotune(table: list[Tile], key: list[str], first_tensor: str, reduce: str = "K"):
    """``triton.autotune`` over ``config_list(table)``, pruned by shared memory for the dtype of
    ``first_tensor``, keyed on ``key`` (put ``M_BUCKET``, not ``M``, in it: see :func:`m_bucket`;
    Triton adds every tensor argument's dtype to the key), results cached on disk."""
    return triton.autotune(configs=config_list(table), key=key,
                           prune_configs_by={"early_config_prune": _pruner(first_tensor, reduce)}, **_CACHE_KW)


def m_bucket(m: int) -> int:
    """Autotune key for the row count: the next power of two (>= 64), so batch sizes 200..256 share
    one tuning run."""
    return max(64, triton.next_power_of_2(max(1, int(m))))


def dot_precision(dtype: torch.dtype, conv: bool) -> str:
    """``input_precision`` for ``tl.dot``: TF32 for fp32 inputs when torch's policy allows it for this op
    kind (``kernels._tf32.tf32_enabled``: cuDNN conv for conv, cuBLAS matmul for linear)."""
    if dtype != torch.float32 or INTERPRET:
        return "ieee"
    return "tf32" if tf32_enabled("conv" if conv else "matmul") else "ieee"


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
# Deterministic label-keyed dalpha reduction.
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
# No atomics: pass 1 writes per-(row-chunk, sample, channel) partials P[SPLIT, 2, B, O] (each element
# written by exactly one program, its rows summed in a fixed order); pass 2 (one program per class and
# channel block) walks the samples in index order, adds the partials of the samples with that label
# in a fixed order and applies the finalize. SPLIT depends only on the row count, never on the GPU:
# two runs - on any GPU with the same tiles - give bit-identical dalpha.
#
# Layout: element (sample s, row r, channel o) at base + s*stride_s + r*stride_r + o*stride_o;
# linear [B, T, O] and conv NCHW / channels-last [B, O, H*W] are all this. Pass 1 can also write
# dyg = dy * g (the gated upstream gradient) in the same read: the "cuDNN conv + Triton epilogue"
# backward needs exactly that and the partials, in one kernel.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dalpha_partials_kernel(dy_ptr, y_ptr, lab_ptr, aw_ptr, ab_ptr, bias_ptr, p_ptr, dyg_ptr,
                            B, R, O, R_PER_PROG,
                            s_ds, s_dr, s_do, s_ys, s_yr, s_yo, s_gs, s_gr, s_go,
                            HAS_BIAS: tl.constexpr, HAS_ALPHA_B: tl.constexpr, WRITE_DYG: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    s = tl.program_id(0)
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    sp = tl.program_id(2)
    omask = ro < O
    lab = tl.load(lab_ptr + s).to(tl.int64)
    if HAS_BIAS:
        gbb = tl.load(bias_ptr + ro, mask=omask, other=0.0).to(tl.float32)
        if HAS_ALPHA_B:
            gbb = gbb * tl.sigmoid(tl.load(ab_ptr + lab * O + ro, mask=omask, other=0.0).to(tl.float32))
    if WRITE_DYG:
        g = tl.sigmoid(tl.load(aw_ptr + lab * O + ro, mask=omask, other=0.0).to(tl.float32))
    r_start = sp * R_PER_PROG
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
        if WRITE_DYG:
            out = dyg_ptr + s.to(tl.int64) * s_gs + rr[:, None] * s_gr + ro[None, :] * s_go
            tl.store(out, (dy * g[None, :]).to(dyg_ptr.dtype.element_ty), mask=m)
    BO = B * O
    base = p_ptr + sp * 2 * BO + s * O + ro
    tl.store(base, tl.sum(acc1, axis=0), mask=omask)
    if HAS_BIAS:
        tl.store(base + BO, tl.sum(acc0, axis=0), mask=omask)


@triton.jit
def _dalpha_classes_kernel(p_ptr, lab_ptr, aw_ptr, ab_ptr, bias_ptr, daw_ptr, dab_ptr,
                           B, O, SPLIT,
                           HAS_BIAS: tl.constexpr, HAS_ALPHA_B: tl.constexpr, BLOCK_O: tl.constexpr):
    c = tl.program_id(0)
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = ro < O
    BO = B * O
    acc1 = tl.zeros([BLOCK_O], tl.float32)
    acc0 = tl.zeros([BLOCK_O], tl.float32)
    for s in range(0, B):
        lab = tl.load(lab_ptr + s).to(tl.int64)
        if lab == c:
            for sp in range(0, SPLIT):
                base = p_ptr + sp * 2 * BO + s * O + ro
                acc1 += tl.load(base, mask=omask, other=0.0)
                if HAS_BIAS:
                    acc0 += tl.load(base + BO, mask=omask, other=0.0)
    gidx = c * O + ro
    g = tl.sigmoid(tl.load(aw_ptr + gidx, mask=omask, other=0.0).to(tl.float32))
    tl.store(daw_ptr + gidx, (1.0 - g) * acc1, mask=omask)
    if HAS_ALPHA_B:
        if HAS_BIAS:
            gb = tl.sigmoid(tl.load(ab_ptr + gidx, mask=omask, other=0.0).to(tl.float32))
            b = tl.load(bias_ptr + ro, mask=omask, other=0.0).to(tl.float32)
            tl.store(dab_ptr + gidx, gb * (1.0 - gb) * b * acc0, mask=omask)
        else:
            tl.store(dab_ptr + gidx, tl.zeros([BLOCK_O], tl.float32), mask=omask)


def _reduce_tiles(strides_dy: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_O, warps, rows per program)`` of pass 1 (depends on the layout only)."""
    if INTERPRET:
        return 16, 16, 1, 48  # several row chunks, row loops and channel blocks on the test shapes
    if strides_dy[1] == 1 and strides_dy[2] != 1:  # NCHW: rows contiguous
        return 128, 16, 4, 2048
    return 32, 64, 4, 1024  # channels-last / linear: channels contiguous


def dalpha(dy: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, alpha_w: torch.Tensor,
           alpha_b: torch.Tensor | None, bias: torch.Tensor | None, strides_dy: tuple[int, int, int],
           strides_y: tuple[int, int, int], B: int, R: int, O: int, dyg: torch.Tensor | None = None,
           strides_dyg: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dalpha_w, dalpha_b)`` fp32 ``[N, O]`` from ``dy, y`` viewed as ``(sample, row, channel)`` with the
    given element strides (``R`` rows per sample), deterministically (no atomics). ``dalpha_b`` is None
    without ``alpha_b`` and zeros without a bias. With ``dyg`` also writes ``dyg = dy * sigmoid(alpha_w)[label]``."""
    aw = alpha_w.detach().float().contiguous()
    has_bias = bias is not None
    has_ab = alpha_b is not None
    ab = alpha_b.detach().float().contiguous() if has_ab else aw
    bias_c = bias.detach().contiguous() if has_bias else aw
    block_r, block_o, warps, rows = _reduce_tiles(strides_dy)
    split = max(1, triton.cdiv(R, rows))
    r_per = triton.cdiv(triton.cdiv(R, split), block_r) * block_r
    split = max(1, triton.cdiv(R, r_per))
    parts = torch.empty((split, 2, B, O), device=aw.device, dtype=torch.float32)
    if parts.numel() >= 2 ** 31:
        raise ValueError(f"dalpha: {split}x2x{B}x{O} partials exceed int32 indexing; use a smaller batch")
    if B > 0 and O > 0:
        if R > 0:
            write = dyg is not None
            _dalpha_partials_kernel[(B, triton.cdiv(O, block_o), split)](
                dy, y, labels, aw, ab if has_ab and has_bias else aw, bias_c, parts, dyg if write else parts,
                B, R, O, r_per, *strides_dy, *strides_y, *(strides_dyg if write else (0, 0, 0)),
                HAS_BIAS=has_bias, HAS_ALPHA_B=has_ab and has_bias, WRITE_DYG=write,
                BLOCK_R=block_r, BLOCK_O=block_o, num_warps=warps)
        else:
            parts.zero_()
    return dalpha_classes(parts, labels, aw, alpha_b, bias, B, O)


def dalpha_classes(parts: torch.Tensor, labels: torch.Tensor, alpha_w: torch.Tensor, alpha_b: torch.Tensor | None,
                   bias: torch.Tensor | None, B: int, O: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pass 2 alone: ``(dalpha_w, dalpha_b)`` fp32 ``[N, O]`` from per-sample partials ``parts [SPLIT, 2, B, O]``
    (``[:, 0]`` = sums of ``dy * (y - gb*b)``, ``[:, 1]`` = sums of ``dy``), split by split in index order.
    Used by :func:`dalpha` and by kernels that write the partials themselves (``kernels.wf_conv``)."""
    aw = alpha_w.detach().float().contiguous()
    N = aw.shape[0]
    daw = torch.empty((N, O), device=aw.device, dtype=torch.float32)
    dab = torch.empty_like(daw) if alpha_b is not None else None
    has_bias, has_ab = bias is not None, alpha_b is not None
    ab = alpha_b.detach().float().contiguous() if has_ab else aw
    bias_c = bias.detach().contiguous() if has_bias else aw
    if N > 0 and O > 0:
        bo = 16 if INTERPRET else 128
        _dalpha_classes_kernel[(N, triton.cdiv(O, bo))](
            parts, labels, aw, ab, bias_c, daw, dab if dab is not None else daw, B, O, parts.shape[0],
            HAS_BIAS=has_bias, HAS_ALPHA_B=has_ab, BLOCK_O=bo, num_warps=4 if not INTERPRET else 1)
    return daw, dab
