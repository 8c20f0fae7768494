"""Plain-PyTorch linear CKA (DESIGN §4): direct float64 forms and the streaming statistics.

``linear_cka_ref`` is the oracle (centre, then ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)).
``cka_accumulate_ref`` / ``cka_centered_sqnorm_ref`` / ``hsic_minibatch_accumulate_ref`` are the
reference versions of the ``torch.ops.unlearn_fast`` ops of the same names (and the fallback when
the extension is missing). ``minibatch_hsic_cka_ref`` is the unbiased minibatch estimator of
Nguyen et al. (2021) written directly from its formula.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "linear_cka_ref",
    "hsic1_ref",
    "minibatch_hsic_cka_ref",
    "cka_accumulate_ref",
    "cka_centered_sqnorm_ref",
    "hsic_minibatch_accumulate_ref",
    "cka_accumulate_cross_ref",
    "hsic_cross_accumulate_ref",
]


def _check_xy(X: Tensor, Y: Tensor) -> None:
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs X [n, d1] and Y [n, d2] with the same n, got {tuple(X.shape)} and "
                         f"{tuple(Y.shape)} (pool or flatten feature maps first)")


def linear_cka_ref(X: Tensor, Y: Tensor) -> float:
    """Linear CKA of X [n, d1] and Y [n, d2] in float64; NaN when either side is constant over n."""
    _check_xy(X, Y)
    Xc = X.double() - X.double().mean(0, keepdim=True)
    Yc = Y.double() - Y.double().mean(0, keepdim=True)
    hxy = (Yc.T @ Xc).pow(2).sum()
    den = (Xc.T @ Xc).norm() * (Yc.T @ Yc).norm()
    return float(hxy / den) if den > 0 else float("nan")


def hsic1_ref(K: Tensor, L: Tensor) -> Tensor:
    """Unbiased HSIC_1 of two [n, n] Gram matrices (n >= 4), Nguyen et al. 2021 Eq. 3, float64 scalar."""
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples per minibatch, got n={n}")
    K = K.double().clone()
    L = L.double().clone()
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64, device=K.device)
    t1 = torch.trace(K @ L)
    t2 = (one.T @ K @ one) * (one.T @ L @ one) / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * (one.T @ K @ L @ one)
    return ((t1 + t2 - t3) / (n * (n - 3))).squeeze()


def minibatch_hsic_cka_ref(X_batches: Sequence[Tensor], Y_batches: Sequence[Tensor]) -> float:
    """Minibatch CKA: sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i) * sum_i HSIC_1(L_i, L_i)).

    X_batches[i] [n_i, d1], Y_batches[i] [n_i, d2] with n_i >= 4; K_i = X_i X_i^T, L_i = Y_i Y_i^T.
    """
    if len(X_batches) != len(Y_batches) or not X_batches:
        raise ValueError("minibatch CKA needs the same non-zero number of X and Y batches")
    kl = kk = ll = torch.zeros((), dtype=torch.float64)
    for X, Y in zip(X_batches, Y_batches):
        _check_xy(X, Y)
        K = X.double() @ X.double().T
        L = Y.double() @ Y.double().T
        kl = kl + hsic1_ref(K, L).cpu()
        kk = kk + hsic1_ref(K, K).cpu()
        ll = ll + hsic1_ref(L, L).cpu()
    den = (kk * ll).sqrt()
    return float(kl / den) if den > 0 else float("nan")


def cka_accumulate_ref(xs: Sequence[Tensor], ys: Sequence[Tensor], sxy: Sequence[Tensor], sxx: Sequence[Tensor],
                       syy: Sequence[Tensor], sx: Sequence[Tensor], sy: Sequence[Tensor]) -> None:
    """In place, per layer l: sxy += X^T Y, sxx += X^T X, syy += Y^T Y, sx += 1^T X, sy += 1^T Y (float64)."""
    L = len(xs)
    if not (len(ys) == len(sxy) == len(sxx) == len(syy) == len(sx) == len(sy) == L) or L == 0:
        raise ValueError(f"cka_accumulate: xs, ys, sxy, sxx, syy, sx, sy must be non-empty lists of one length, "
                         f"got {[len(a) for a in (xs, ys, sxy, sxx, syy, sx, sy)]}")
    for l in range(L):
        _check_xy(xs[l], ys[l])
        x, y = xs[l].double(), ys[l].double()
        for name, acc, shape in (("sxy", sxy[l], (x.shape[1], y.shape[1])), ("sxx", sxx[l], (x.shape[1],) * 2),
                                 ("syy", syy[l], (y.shape[1],) * 2), ("sx", sx[l], (x.shape[1],)),
                                 ("sy", sy[l], (y.shape[1],))):
            if acc.dtype != torch.float64 or tuple(acc.shape) != shape:
                raise ValueError(f"cka_accumulate: layer {l}: {name} must be float64 {shape}, got {acc.dtype} "
                                 f"{tuple(acc.shape)}")
        sxy[l].addmm_(x.T, y)
        sxx[l].addmm_(x.T, x)
        syy[l].addmm_(y.T, y)
        sx[l].add_(x.sum(0))
        sy[l].add_(y.sum(0))


def cka_centered_sqnorm_ref(s: Tensor, s1: Tensor, s2: Tensor, n: float, offsets1: Sequence[int],
                            offsets2: Sequence[int]) -> Tensor:
    """Block-wise squared Frobenius norms of C = s - s1 s2^T / n: out[a, b] = ||C[o1[a]:o1[a+1], o2[b]:o2[b+1]]||^2."""
    if n <= 0:
        raise ValueError(f"cka_centered_sqnorm: sample count n must be > 0 (no batch was accumulated), got {n}")
    for name, off, D in (("offsets1", offsets1, s.shape[0]), ("offsets2", offsets2, s.shape[1])):
        off = list(offsets1 if name == "offsets1" else offsets2)
        if len(off) < 2 or off[0] != 0 or off[-1] != D or any(b <= a for a, b in zip(off, off[1:])):
            raise ValueError(f"cka_centered_sqnorm: {name} must increase strictly from 0 to {D}, got {off}")
    C = s.double() - torch.outer(s1.double(), s2.double()) / n
    C2 = C * C
    rows = torch.stack([C2[a:b].sum(0) for a, b in zip(offsets1, offsets1[1:])])  # [L1, D2]
    return torch.stack([rows[:, a:b].sum(1) for a, b in zip(offsets2, offsets2[1:])], dim=1)  # [L1, L2]


def hsic_minibatch_accumulate_ref(feats: Sequence[Tensor], hsic_sum: Tensor) -> None:
    """In place: hsic_sum[a, b] += HSIC_1(F_a F_a^T, F_b F_b^T) for every pair of the M feature sets [n, d_m]."""
    M = len(feats)
    if M == 0 or hsic_sum.shape != (M, M) or hsic_sum.dtype != torch.float64:
        raise ValueError(f"hsic_minibatch_accumulate: hsic_sum must be float64 [M, M] with M={M}, got "
                         f"{hsic_sum.dtype} {tuple(hsic_sum.shape)}")
    n = feats[0].shape[0]
    if n < 4:
        raise ValueError(f"hsic_minibatch_accumulate: the unbiased HSIC estimator needs n >= 4, got n={n}")
    grams = []
    for m, f in enumerate(feats):
        if f.dim() != 2 or f.shape[0] != n:
            raise ValueError(f"hsic_minibatch_accumulate: feature {m} must be [n={n}, d], got {tuple(f.shape)}")
        f = f.double()
        grams.append(f @ f.T)
    for a in range(M):
        for b in range(a, M):
            h = hsic1_ref(grams[a], grams[b])
            hsic_sum[a, b] += h
            if b != a:
                hsic_sum[b, a] += h


def cka_accumulate_cross_ref(xs: Sequence[Tensor], ys: Sequence[Tensor], sxy: Tensor, sxx: Sequence[Tensor],
                             syy: Sequence[Tensor], sx: Sequence[Tensor], sy: Sequence[Tensor]) -> None:
    """In place: sxy += cat(xs)^T cat(ys) [Dx, Dy]; per layer sxx[l] += x_l^T x_l, syy[l] += y_l^T y_l,
    sx[l] += 1^T x_l, sy[l] += 1^T y_l (float64). Reference of ``torch.ops.unlearn_fast.cka_accumulate_cross``."""
    if not xs or not ys or len(sxx) != len(xs) or len(sx) != len(xs) or len(syy) != len(ys) or len(sy) != len(ys):
        raise ValueError("cka_accumulate_cross: need >= 1 layer per side and one sxx/sx per xs, one syy/sy per ys")
    n = xs[0].shape[0]
    for f in list(xs) + list(ys):
        if f.dim() != 2 or f.shape[0] != n:
            raise ValueError(f"cka_accumulate_cross: features must be [n={n}, d], got {tuple(f.shape)}")
    X = torch.cat([f.double() for f in xs], 1)
    Y = torch.cat([f.double() for f in ys], 1)
    if sxy.dtype != torch.float64 or tuple(sxy.shape) != (X.shape[1], Y.shape[1]):
        raise ValueError(f"cka_accumulate_cross: sxy must be float64 {(X.shape[1], Y.shape[1])}, got {sxy.dtype} "
                         f"{tuple(sxy.shape)}")
    sxy.addmm_(X.T, Y)
    for fs, ss, s1 in ((xs, sxx, sx), (ys, syy, sy)):
        for f, a, b in zip(fs, ss, s1):
            f = f.double()
            a.addmm_(f.T, f)
            b.add_(f.sum(0))


def hsic_cross_accumulate_ref(xs: Sequence[Tensor], ys: Sequence[Tensor], hxy: Tensor, hxx: Tensor, hyy: Tensor,
                              all_pairs: bool = True) -> None:
    """In place, float64 Grams of the raw features: hxy[a, b] += HSIC_1(K_a, L_b) for every pair
    (``all_pairs``; [Lx, Ly]) or hxy[l] += HSIC_1(K_l, L_l) ([L]); hxx[a] += HSIC_1(K_a, K_a),
    hyy[b] += HSIC_1(L_b, L_b). Reference of ``torch.ops.unlearn_fast.hsic_cross_accumulate``."""
    n = xs[0].shape[0] if xs else 0
    if not xs or not ys:
        raise ValueError("hsic_cross_accumulate: need at least one feature set on each side")
    if n < 4:
        raise ValueError(f"hsic_cross_accumulate: the unbiased HSIC estimator needs n >= 4, got n={n}")
    if not all_pairs and len(xs) != len(ys):
        raise ValueError(f"hsic_cross_accumulate: all_pairs=False needs as many xs as ys, got {len(xs)}, {len(ys)}")
    gx = [f.double() @ f.double().T for f in xs]
    gy = [f.double() @ f.double().T for f in ys]
    for a, K in enumerate(gx):
        hxx[a] += hsic1_ref(K, K)
    for b, L in enumerate(gy):
        hyy[b] += hsic1_ref(L, L)
    if all_pairs:
        for a, K in enumerate(gx):
            for b, L in enumerate(gy):
                hxy[a, b] += hsic1_ref(K, L)
    else:
        for l, (K, L) in enumerate(zip(gx, gy)):
            hxy[l] += hsic1_ref(K, L)
