"""Frozen-weight packing and per-geometry index tables of the implicit-GEMM WF conv (``kernels.wf_conv``).

WF freezes every conv weight, so the GEMM operand layouts the kernels want are built once per weight
*version* and cached per weight tensor object (a table keyed by the object, entries dropped when the
weight dies; nothing is attached to the tensor, so nothing is pickled or deep-copied with it). An
in-place change of the weight - an optimizer step, ``load_state_dict``, baking a gate row - bumps
``weight._version`` and the next call re-packs. A tensor created anew on every call (e.g.
``weight * s``) cannot be cached: pass the same tensor object each step to pack once.

Layouts (``weight [O, C, KH, KW]``, taps ``t = kh*KW + kw``, ``T = KH*KW``, ``KALIGN = 64``):

* forward, ``"tap"`` K order: ``Wf [T*Cp, O]``, row ``t*Cp + c`` = ``W[:, c, kh, kw]``, ``Cp = C`` rounded up
  to ``KALIGN`` (zero rows) - every K tile lies inside one tap, so the x gather is a contiguous channel
  run (coalesced on channels-last, no index table);
* forward, ``"flat"`` K order: ``Wf [Kp, O]``, row ``k = t*C + c`` for ``k < K = T*C``, zero rows up to
  ``Kp = K`` rounded up to ``KALIGN`` - a 3-channel 7x7 stem has K = 147 -> 192, not 49 taps x 32;
  the kernel reads ``(kh*dh, kw*dw, c)`` of each k from the ``int32 [3, Kp]`` table ``flat_table``
  (padding entries carry ``dh = -2**20``, so their loads are masked off by the image bounds);
* backward (dx): ``Wd [T*Op, C]``, row ``t*Op + o`` = ``W[o, :, kh, kw]``, ``Op = O`` rounded up to ``KALIGN``.

``k_mode`` picks ``"tap"`` when it wastes at most 1/8 more K than ``"flat"`` (C a multiple of 64:
always), else ``"flat"``. Every BLOCK_K of the kernels divides ``KALIGN``. Imports torch only.
"""
from __future__ import annotations

import functools
import weakref

import torch

__all__ = ["KALIGN", "k_mode", "round_up", "packed", "flat_table", "dx_tables", "PACK_COUNT"]

KALIGN = 64
_PAD_DH = -(1 << 20)  # a tap row offset that puts every pixel outside the image (masked load)
PACK_COUNT = {"fwd": 0, "dx": 0}  # packs built so far (tests: pack once per weight version)
_PACKS: dict[int, tuple] = {}  # id(weight) -> (weakref(weight), {key: (stamp, packed)})


def _cache_of(weight: torch.Tensor) -> dict:
    hit = _PACKS.get(id(weight))
    if hit is not None and hit[0]() is weight:
        return hit[1]
    entries: dict = {}
    _PACKS[id(weight)] = (weakref.ref(weight), entries)
    weakref.finalize(weight, _PACKS.pop, id(weight), None)
    return entries


def round_up(v: int, m: int = KALIGN) -> int:
    return -(-int(v) // m) * m


def k_mode(C: int, T: int) -> str:
    """``"tap"`` (per-tap channel blocks) or ``"flat"`` (one K = T*C padded once) for the forward."""
    tap_k, flat_k = T * round_up(C), round_up(T * C)
    return "tap" if 8 * tap_k <= 9 * flat_k else "flat"


def _pack_fwd(w: torch.Tensor, mode: str) -> torch.Tensor:
    O, C, KH, KW = w.shape
    T = KH * KW
    wt = w.permute(2, 3, 1, 0).reshape(T, C, O)  # [tap, c, o]
    if mode == "tap":
        out = w.new_zeros((T, round_up(C), O))
        out[:, :C] = wt
        return out.reshape(-1, O).contiguous()
    out = w.new_zeros((round_up(T * C), O))
    out[: T * C] = wt.reshape(T * C, O)
    return out


def _pack_dx(w: torch.Tensor) -> torch.Tensor:
    O, C, KH, KW = w.shape
    T = KH * KW
    out = w.new_zeros((T, round_up(O), C))
    out[:, :O] = w.permute(2, 3, 0, 1).reshape(T, O, C)  # [tap, o, c]
    return out.reshape(-1, C).contiguous()


def packed(weight: torch.Tensor, kind: str, dtype: torch.dtype, mode: str = "tap") -> torch.Tensor:
    """The packed operand ``kind`` (``"fwd"`` with ``mode``, or ``"dx"``) of ``weight`` in ``dtype``, built once
    per weight version and cached for this weight object (inference tensors, which have no version
    counter, are packed on every call)."""
    if kind not in PACK_COUNT:
        raise ValueError(f"packed: kind must be one of {tuple(PACK_COUNT)}, got {kind!r}")
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor: no version counter, no cache
        version = None
    key = (kind, dtype, mode if kind == "fwd" else "")
    stamp = (version, weight.data_ptr(), weight.device, tuple(weight.shape), tuple(weight.stride()))
    cache = _cache_of(weight) if version is not None else None
    if cache is not None and key in cache and cache[key][0] == stamp:
        return cache[key][1]
    w = weight.detach().to(dtype)
    out = _pack_fwd(w, mode) if kind == "fwd" else _pack_dx(w)
    PACK_COUNT[kind] += 1
    if cache is not None:
        cache[key] = (stamp, out)
    return out


@functools.lru_cache(maxsize=256)
def _flat_table_cpu(C: int, KH: int, KW: int, dil_h: int, dil_w: int) -> torch.Tensor:
    K = KH * KW * C
    kp = round_up(K)
    k = torch.arange(kp)
    t, c = k // C, k % C
    dh = (t // KW) * dil_h
    dw = (t % KW) * dil_w
    pad = k >= K
    dh[pad] = _PAD_DH
    dw[pad] = 0
    c[pad] = 0
    return torch.stack([dh, dw, c]).to(torch.int32).contiguous()


_DEV_CACHE: dict = {}


def _on(device: torch.device, key: tuple, make) -> tuple:
    k = (str(device),) + key
    hit = _DEV_CACHE.get(k)
    if hit is None:
        hit = tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in make())
        if len(_DEV_CACHE) > 512:
            _DEV_CACHE.clear()
        _DEV_CACHE[k] = hit
    return hit


def flat_table(C: int, KH: int, KW: int, dil: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``int32 [3, Kp]``: ``(kh*dil_h, kw*dil_w, c)`` of each flat K index ``k = (kh*KW + kw)*C + c``."""
    return _on(device, ("flat", C, KH, KW, *dil), lambda: (_flat_table_cpu(C, KH, KW, *dil),))[0]


def _axis_phases(size: int, out: int, k: int, s: int, p: int, d: int):
    """Per phase q of one spatial axis: the taps ``[(kh, e)]`` with ``oh = j + e`` for input ``q + s*j``, and
    the owner tap: one whose input ``oh*s - p + kh*d`` is inside ``[0, size)`` for every output ``oh``."""
    taps = [[] for _ in range(s)]
    for kh in range(k):
        for q in range(s):
            if (q + p - kh * d) % s == 0:
                taps[q].append((kh, (q + p - kh * d) // s))
    owner = next((kh for kh in range(k) if kh * d - p >= 0 and (out - 1) * s - p + kh * d <= size - 1), None)
    return taps, owner


def _dx_tables_cpu(H: int, W: int, Ho: int, Wo: int, KH: int, KW: int, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    th, own_h = _axis_phases(H, Ho, KH, sh, ph, dh)
    tw, own_w = _axis_phases(W, Wo, KW, sw, pw, dw)
    owner_phase = -1
    if own_h is not None and own_w is not None:
        owner_phase = ((own_h * dh - ph) % sh) * sw + (own_w * dw - pw) % sw
    phases, taps = [], []
    for qh in range(sh):
        for qw in range(sw):
            lst = [(kh, eh, kw, ew) for kh, eh in th[qh] for kw, ew in tw[qw]]
            if qh * sw + qw == owner_phase:  # the owner tap first: it runs the first O/BLOCK_K K tiles
                lst.sort(key=lambda r: (r[0], r[2]) != (own_h, own_w))
            phases.append((qh, qw, len(lst), len(taps)))
            taps += [(eh, ew, kh * KW + kw) for kh, eh, kw, ew in lst]
    qh0, qw0 = (owner_phase // sw, owner_phase % sw) if owner_phase >= 0 else (0, 0)
    r_own = (-(-(H - qh0) // sh)) * (-(-(W - qw0) // sw))
    ptab = torch.tensor(phases, dtype=torch.int32).reshape(-1, 4).contiguous()
    ttab = torch.tensor(taps if taps else [(0, 0, 0)], dtype=torch.int32).reshape(-1, 3).contiguous()
    return ptab, ttab, owner_phase, r_own


def dx_tables(H: int, W: int, Ho: int, Wo: int, KH: int, KW: int, stride, padding, dilation,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Sub-pixel (phase) decomposition of the strided transposed conv: ``(ptab int32 [sh*sw, 4] = (qh, qw,
    n_taps, first tap row), ttab int32 [n, 3] = (eh, ew, tap), owner phase (-1: none), owner-phase rows
    per sample)``. Phase ``(qh, qw)`` holds the input pixels ``(qh + sh*jh, qw + sw*jw)``; its taps are
    exactly those whose ``(ih + ph - kh*dh) / sh`` is an integer, so no tap is masked for divisibility."""
    key = ("dx", H, W, Ho, Wo, KH, KW, tuple(stride), tuple(padding), tuple(dilation))
    return _on(device, key, lambda: _dx_tables_cpu(H, W, Ho, Wo, KH, KW, stride, padding, dilation))
