"""Functional metric ops with dispatch to ``unlearn_fast._C`` (DESIGN §4-§5).

Each function runs ``torch.ops.unlearn_fast.<name>`` when the extension loaded (its CPU impl for
CPU tensors, its CUDA impl for CUDA tensors when the CUDA part was compiled in) and the
pure-PyTorch reference of :mod:`unlearn_fast.reference` otherwise, or when
``UNLEARN_FAST_BACKEND=torch``. ``UNLEARN_FAST_BACKEND=cuda`` insists on the extension and raises
if it is missing. The ``register_fake`` kernels below make the ops traceable (torch.compile,
FakeTensor) and are checked by ``torch.library.opcheck`` in the tests.

Shapes: logits [B, C]; per-row results [B] (float32, float64 for float64 logits); CKA statistics
float64. These are metrics: no autograd.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch
from torch import Tensor

from unlearn_fast import _ext
from unlearn_fast.ops.backend import requested_backend
from unlearn_fast.reference import cka as cka_ref
from unlearn_fast.reference import divergence as div_ref

__all__ = [
    "js_divergence",
    "activation_distance",
    "divergence_accumulate",
    "cka_accumulate",
    "cka_centered_sqnorm",
    "cka_finalize",
    "cka_finalize_blocks",
    "hsic_minibatch_accumulate",
    "minibatch_cka_from_hsic",
    "cka_accumulate_cross",
    "cka_finalize_cross",
    "hsic_cross_accumulate",
    "minibatch_cka_cross",
    "offsets_of",
    "metrics_backend",
]

log = logging.getLogger("unlearn_fast")


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    log.warning(msg)


def metrics_backend(op: str, device: torch.device) -> str:
    """``'c'`` (the extension op) or ``'torch'`` (the reference) for ``op`` on ``device``."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    c_ok = _ext.HAS_C and (device.type == "cpu" or (device.type == "cuda" and _ext.HAS_C_CUDA))
    if name == "cuda" and not c_ok:
        why = _ext.LOAD_ERROR if not _ext.HAS_C else f"its CUDA part was not compiled in (device {device})"
        raise RuntimeError(f"UNLEARN_FAST_BACKEND=cuda but unlearn_fast._C cannot run {op}: {why}. Rebuild with "
                           "`pip install --no-build-isolation -e .` on a machine with nvcc, or use "
                           "UNLEARN_FAST_BACKEND=auto")
    if not c_ok:
        _warn_once(f"unlearn_fast: no compiled kernel for {op} on {device}; using the reference path")
        return "torch"
    return "c"


def _ops():
    return torch.ops.unlearn_fast


# ------------------------------------------------------------------------------------ divergences
def js_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-row JS divergence of softmax(p_logits), softmax(q_logits): [B, C] x2 -> [B], natural log, in [0, ln 2]."""
    div_ref.check_logits_pair(p_logits, q_logits, "js_divergence")
    if metrics_backend("js_divergence", p_logits.device) == "c":
        return _ops().js_divergence(p_logits, q_logits)
    return div_ref.js_divergence_ref(p_logits, q_logits)


def activation_distance(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-row L2 distance between softmax(p_logits) and softmax(q_logits): [B, C] x2 -> [B]."""
    div_ref.check_logits_pair(p_logits, q_logits, "activation_distance")
    if metrics_backend("activation_distance", p_logits.device) == "c":
        return _ops().activation_distance(p_logits, q_logits)
    return div_ref.activation_distance_ref(p_logits, q_logits)


def divergence_accumulate(p_logits: Tensor, q_logits: Tensor, groups: Tensor | None, js_sum: Tensor,
                          l2_sum: Tensor, count: Tensor) -> None:
    """In place, one fused pass: js_sum[g] += JS, l2_sum[g] += ||p - q||_2, count[g] += 1 for each row.

    groups: int64 [B] in [0, K) or None (all rows in group 0); accumulators float64 [K].
    """
    div_ref.check_logits_pair(p_logits, q_logits, "divergence_accumulate")
    if metrics_backend("divergence_accumulate", p_logits.device) == "c":
        _ops().divergence_accumulate(p_logits, q_logits, groups, js_sum, l2_sum, count)
    else:
        div_ref.divergence_accumulate_ref(p_logits, q_logits, groups, js_sum, l2_sum, count)


# ------------------------------------------------------------------------------------------- CKA
def cka_accumulate(xs: Sequence[Tensor], ys: Sequence[Tensor], sxy: Sequence[Tensor], sxx: Sequence[Tensor],
                   syy: Sequence[Tensor], sx: Sequence[Tensor], sy: Sequence[Tensor]) -> None:
    """In place for L layer pairs: sxy += X^T Y [d1, d2], sxx += X^T X, syy += Y^T Y, sx += 1^T X, sy += 1^T Y.

    xs[l] [n, d1_l], ys[l] [n, d2_l] (fp32/bf16/fp16/fp64); accumulators float64 on the same device.
    """
    if not xs:
        raise ValueError("cka_accumulate: need at least one layer")
    if metrics_backend("cka_accumulate", xs[0].device) == "c":
        _ops().cka_accumulate(list(xs), list(ys), list(sxy), list(sxx), list(syy), list(sx), list(sy))
    else:
        cka_ref.cka_accumulate_ref(xs, ys, sxy, sxx, syy, sx, sy)


def cka_centered_sqnorm(s: Tensor, s1: Tensor, s2: Tensor, n: float, offsets1: Sequence[int],
                        offsets2: Sequence[int]) -> Tensor:
    """out[a, b] = ||(s - s1 s2^T / n)[o1[a]:o1[a+1], o2[b]:o2[b+1]]||_F^2, float64 [L1, L2]."""
    if metrics_backend("cka_centered_sqnorm", s.device) == "c":
        return _ops().cka_centered_sqnorm(s, s1, s2, float(n), [int(o) for o in offsets1],
                                          [int(o) for o in offsets2])
    return cka_ref.cka_centered_sqnorm_ref(s, s1, s2, float(n), list(offsets1), list(offsets2))


def offsets_of(dims: Sequence[int]) -> list[int]:
    """Cumulative offsets [0, d0, d0+d1, ..., D] of concatenated blocks."""
    out = [0]
    for d in dims:
        out.append(out[-1] + int(d))
    return out


def _sqnorm_scalar(s: Tensor, s1: Tensor, s2: Tensor, n: float) -> Tensor:
    return cka_centered_sqnorm(s, s1, s2, n, [0, s.shape[0]], [0, s.shape[1]])[0, 0]


def cka_finalize(sxy: Sequence[Tensor], sxx: Sequence[Tensor], syy: Sequence[Tensor], sx: Sequence[Tensor],
                 sy: Sequence[Tensor], n: float | Tensor) -> Tensor:
    """Exact linear CKA of each of the L accumulated layer pairs: float64 [L] (NaN where a side is constant)."""
    n = float(n)
    out = []
    for l in range(len(sxy)):
        hxy = _sqnorm_scalar(sxy[l], sx[l], sy[l], n)
        hxx = _sqnorm_scalar(sxx[l], sx[l], sx[l], n)
        hyy = _sqnorm_scalar(syy[l], sy[l], sy[l], n)
        out.append(_ratio(hxy, hxx, hyy))
    return torch.stack(out).cpu()


def cka_finalize_blocks(sxy: Tensor, sxx: Tensor, syy: Tensor, sx: Tensor, sy: Tensor, n: float | Tensor,
                        dims_x: Sequence[int], dims_y: Sequence[int]) -> Tensor:
    """Exact CKA of every (block a of X, block b of Y) pair of concatenated features: float64 [Lx, Ly].

    sxy [Dx, Dy], sxx [Dx, Dx], syy [Dy, Dy], sx [Dx], sy [Dy] accumulated from the column-wise
    concatenation of the layers (widths dims_x, dims_y).
    """
    n = float(n)
    ox, oy = offsets_of(dims_x), offsets_of(dims_y)
    hxy = cka_centered_sqnorm(sxy, sx, sy, n, ox, oy)
    hxx = cka_centered_sqnorm(sxx, sx, sx, n, ox, ox).diagonal()
    hyy = cka_centered_sqnorm(syy, sy, sy, n, oy, oy).diagonal()
    return _ratio(hxy, hxx[:, None], hyy[None, :]).cpu()


def _ratio(hxy: Tensor, hxx: Tensor, hyy: Tensor) -> Tensor:
    den = hxx.sqrt() * hyy.sqrt()
    return torch.where(den > 0, hxy / den, torch.full_like(hxy * den, float("nan")))


def hsic_minibatch_accumulate(feats: Sequence[Tensor], hsic_sum: Tensor) -> None:
    """In place: hsic_sum[a, b] += unbiased HSIC_1 of the Gram matrices of feats[a], feats[b] [n >= 4, d_m].

    All M x M pairs from one GEMM over the stacked Gram matrices (Nguyen et al. 2021).
    """
    if metrics_backend("hsic_minibatch_accumulate", hsic_sum.device) == "c":
        _ops().hsic_minibatch_accumulate(list(feats), hsic_sum)
    else:
        cka_ref.hsic_minibatch_accumulate_ref(feats, hsic_sum)


def minibatch_cka_from_hsic(hsic_sum: Tensor) -> Tensor:
    """CKA[a, b] = H[a, b] / sqrt(H[a, a] H[b, b]) from summed unbiased HSIC values: [M, M] float64."""
    d = hsic_sum.diagonal().clamp_min(0)
    return _ratio(hsic_sum, d[:, None], d[None, :]).cpu()


def cka_accumulate_cross(xs: Sequence[Tensor], ys: Sequence[Tensor], sxy: Tensor, sxx: Sequence[Tensor],
                         syy: Sequence[Tensor], sx: Sequence[Tensor], sy: Sequence[Tensor]) -> None:
    """In place, every (layer a of X, layer b of Y) pair at once: sxy += cat(xs)^T cat(ys) [Dx, Dy]
    (all of it is read), but sxx[l] += x_l^T x_l [d_l, d_l] and syy[l] += y_l^T y_l per layer only,
    sx[l] += 1^T x_l, sy[l] += 1^T y_l. Float64 accumulators on the features' device."""
    if not xs or not ys:
        raise ValueError("cka_accumulate_cross: need at least one layer per side")
    if metrics_backend("cka_accumulate_cross", xs[0].device) == "c":
        _ops().cka_accumulate_cross(list(xs), list(ys), sxy, list(sxx), list(syy), list(sx), list(sy))
    else:
        cka_ref.cka_accumulate_cross_ref(xs, ys, sxy, sxx, syy, sx, sy)


def cka_finalize_cross(sxy: Tensor, sxx: Sequence[Tensor], syy: Sequence[Tensor], sx: Sequence[Tensor],
                       sy: Sequence[Tensor], n: float | Tensor) -> Tensor:
    """Exact CKA [Lx, Ly] (float64, CPU) from :func:`cka_accumulate_cross` statistics."""
    n = float(n)
    s1, s2 = torch.cat(list(sx)), torch.cat(list(sy))
    hxy = cka_centered_sqnorm(sxy, s1, s2, n, offsets_of([t.shape[0] for t in sx]),
                              offsets_of([t.shape[0] for t in sy]))
    hxx = torch.stack([_sqnorm_scalar(a, b, b, n) for a, b in zip(sxx, sx)])
    hyy = torch.stack([_sqnorm_scalar(a, b, b, n) for a, b in zip(syy, sy)])
    return _ratio(hxy, hxx[:, None], hyy[None, :]).cpu()


def hsic_cross_accumulate(xs: Sequence[Tensor], ys: Sequence[Tensor], hxy: Tensor, hxx: Tensor, hyy: Tensor,
                          all_pairs: bool = True) -> None:
    """In place, one minibatch (n >= 4) of the unbiased HSIC (Nguyen et al. 2021), fused over layers:
    hxy[a, b] += HSIC_1(K_a, L_b) for every (a, b) ([Lx, Ly], ``all_pairs``) or hxy[l] += HSIC_1(K_l, L_l)
    ([L]); hxx [Lx], hyy [Ly] += the self terms. K_a = x_a x_a^T, L_b = y_b y_b^T; no X-X / Y-Y cross pair
    is formed. The extension builds only the strictly lower triangle of each Gram, in row blocks, from
    batch-centred features (float32 Grams for float32/16 features, float64 sums)."""
    if not xs or not ys:
        raise ValueError("hsic_cross_accumulate: need at least one feature set on each side")
    if metrics_backend("hsic_cross_accumulate", hxy.device) == "c":
        _ops().hsic_cross_accumulate(list(xs), list(ys), hxy, hxx, hyy, bool(all_pairs))
    else:
        cka_ref.hsic_cross_accumulate_ref(xs, ys, hxy, hxx, hyy, bool(all_pairs))


def minibatch_cka_cross(hxy: Tensor, hxx: Tensor, hyy: Tensor) -> Tensor:
    """CKA = hxy / sqrt(hxx hyy) from summed HSIC_1 values: [Lx, Ly] (or [L] for paired layers), float64 CPU."""
    dx, dy = hxx.clamp_min(0), hyy.clamp_min(0)
    if hxy.dim() == 2:
        return _ratio(hxy, dx[:, None], dy[None, :]).cpu()
    return _ratio(hxy, dx, dy).cpu()


# ---------------------------------------------------------------------------- fake (meta) kernels
if _ext.HAS_C:

    def _fake_rows(p_logits: Tensor, q_logits: Tensor) -> Tensor:
        torch._check(p_logits.dim() == 2 and p_logits.shape == q_logits.shape,
                     lambda: "p_logits and q_logits must be [B, C] of one shape")
        dtype = torch.float64 if p_logits.dtype == torch.float64 else torch.float32
        return p_logits.new_empty((p_logits.shape[0],), dtype=dtype)

    torch.library.register_fake("unlearn_fast::js_divergence")(_fake_rows)
    torch.library.register_fake("unlearn_fast::activation_distance")(_fake_rows)

    @torch.library.register_fake("unlearn_fast::divergence_accumulate")
    def _fake_div_acc(p_logits, q_logits, groups, js_sum, l2_sum, count) -> None:
        return None

    @torch.library.register_fake("unlearn_fast::cka_accumulate")
    def _fake_cka_acc(xs, ys, sxy, sxx, syy, sx, sy) -> None:
        return None

    @torch.library.register_fake("unlearn_fast::cka_centered_sqnorm")
    def _fake_sqnorm(s, s1, s2, n, offsets1, offsets2) -> Tensor:
        return s.new_empty((len(offsets1) - 1, len(offsets2) - 1), dtype=torch.float64)

    @torch.library.register_fake("unlearn_fast::hsic_minibatch_accumulate")
    def _fake_hsic_acc(feats, hsic_sum) -> None:
        return None

    @torch.library.register_fake("unlearn_fast::cka_accumulate_cross")
    def _fake_cka_cross(xs, ys, sxy, sxx, syy, sx, sy) -> None:
        return None

    @torch.library.register_fake("unlearn_fast::hsic_cross_accumulate")
    def _fake_hsic_cross(xs, ys, hxy, hxx, hyy, all_pairs) -> None:
        return None
