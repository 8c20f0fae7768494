"""Health verdicts: ``ok`` / ``warn`` / ``fail`` with reasons, for every stage and every result.

A number that looks right but is not is the worst output this library can give, so each result
carries a verdict that metrics.json, report.md and the CLI summary show, and the CLI exits non-zero
when any requested stage or method failed. The rules (thresholds in percentage points of accuracy):

* stage: no optimizer step -> fail; fewer than its floor of steps -> warn; schedule adaptations are
  listed as notes;
* original model: test accuracy within ``NEAR_CHANCE`` x chance -> fail (nothing to unlearn);
  below ``WEAK_ORIGINAL`` % -> warn;
* per forgotten class: Acc_f above ``FORGET_TOL`` -> warn (only partly forgotten); still at least
  ``NOT_MOVED`` of the original's accuracy on that class -> fail (not forgotten); no test sample -> warn;
* retained accuracy: more than ``RETAIN_DROP`` points below the original -> warn; near chance -> fail;
* any NaN / Inf in the reported numbers -> fail.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

__all__ = ["Verdict", "merge", "stage_verdict", "original_verdict", "forget_verdict", "retain_verdict",
           "finite_verdict", "STATUSES", "FORGET_TOL", "RETAIN_DROP", "WEAK_ORIGINAL", "NEAR_CHANCE", "NOT_MOVED"]

STATUSES = ("ok", "warn", "fail")
FORGET_TOL = 5.0        # Acc_f above this many % -> not (fully) forgotten
NOT_MOVED = 0.9         # Acc_f >= this fraction of the original's accuracy on the class -> not forgotten at all
RETAIN_DROP = 20.0      # mean Acc_r more than this many points below the original -> collapsed
WEAK_ORIGINAL = 60.0    # original test accuracy below this % -> weak original
NEAR_CHANCE = 2.0       # accuracy <= NEAR_CHANCE x chance -> near chance

Verdict = dict  # {"status": "ok" | "warn" | "fail", "reasons": [str], "notes": [str]}


def _v(warn: Iterable[str] = (), fail: Iterable[str] = (), notes: Iterable[str] = ()) -> Verdict:
    warn, fail = list(warn), list(fail)
    status = "fail" if fail else "warn" if warn else "ok"
    return {"status": status, "reasons": fail + warn, "notes": list(notes)}


def merge(*verdicts: Verdict | None) -> Verdict:
    """The worst status; reasons and notes concatenated in order (each once)."""
    vs = [v for v in verdicts if v]
    status = max((v["status"] for v in vs), key=STATUSES.index, default="ok")
    return {"status": status, "reasons": list(dict.fromkeys(r for v in vs for r in v.get("reasons", []))),
            "notes": list(dict.fromkeys(n for v in vs for n in v.get("notes", [])))}


def stage_verdict(name: str, steps: int, min_steps: int = 0, notes: Sequence[str] = (), max_steps: int | None = None) -> Verdict:
    """A training stage: ``steps`` optimizer steps taken, ``min_steps`` its floor."""
    fail, warn = [], []
    if steps <= 0:
        fail.append(f"{name}: made no optimizer step - its result is the unchanged starting model")
    elif steps < min_steps and not (max_steps is not None and steps >= max_steps):
        warn.append(f"{name}: only {steps} optimizer step(s), fewer than its floor of {min_steps}")
    return _v(warn, fail, [f"{name}: {n}" for n in notes])


def _chance(num_classes: int) -> float:
    return 100.0 / max(num_classes, 1)


def original_verdict(test_acc: float, num_classes: int, what: str = "original model") -> Verdict:
    """``test_acc`` in %."""
    chance = _chance(num_classes)
    if test_acc is None or not math.isfinite(test_acc):
        return _v(fail=[f"{what}: test accuracy is {test_acc}"])
    if test_acc <= NEAR_CHANCE * chance:
        return _v(fail=[f"{what}: test accuracy {test_acc:.1f}% is near chance ({chance:.1f}%) - there is nothing to "
                        "unlearn; train it longer (e.g. --original-set max_epochs=...) or check the data"])
    if test_acc < WEAK_ORIGINAL:
        return _v(warn=[f"{what}: test accuracy {test_acc:.1f}% is weak (< {WEAK_ORIGINAL:.0f}%); forgetting figures "
                        "on a weak model are hard to read"])
    return _v()


def forget_verdict(acc_f: Sequence[float], original_acc_f: Sequence[float], classes: Sequence[int],
                   names: Sequence[str], what: str = "") -> Verdict:
    """Per forgotten class ``classes[i]``: its Acc_f (%) after unlearning vs the original model's."""
    fail, warn = [], []
    pre = f"{what}: " if what else ""
    for c, a, o in zip(classes, acc_f, original_acc_f):
        name = names[c] if c < len(names) else str(c)
        if a is None or not math.isfinite(a):
            warn.append(f"{pre}class {name} has no test sample: its forgetting is not measured")
        elif a > FORGET_TOL:
            if o is not None and math.isfinite(o) and a >= NOT_MOVED * o:
                fail.append(f"{pre}class {name} not forgotten: Acc_f {a:.1f}% vs {o:.1f}% for the original model")
            else:
                warn.append(f"{pre}class {name} only partly forgotten: Acc_f {a:.1f}% (> {FORGET_TOL:.0f}%; original "
                            f"{o:.1f}%)")
    return _v(warn, fail)


def retain_verdict(acc_r: float, original_acc: float, num_classes: int, what: str = "") -> Verdict:
    """Mean retained accuracy (%) after unlearning vs the original model's accuracy on the same classes."""
    pre = f"{what}: " if what else ""
    if acc_r is None or not math.isfinite(acc_r):
        return _v(fail=[f"{pre}retained accuracy is {acc_r}"])
    if acc_r <= NEAR_CHANCE * _chance(num_classes):
        return _v(fail=[f"{pre}retained accuracy collapsed to {acc_r:.1f}% (near chance)"])
    if original_acc is not None and math.isfinite(original_acc) and original_acc - acc_r > RETAIN_DROP:
        return _v(warn=[f"{pre}retained accuracy collapsed: {acc_r:.1f}% vs {original_acc:.1f}% for the original "
                        f"(-{original_acc - acc_r:.1f} points)"])
    return _v()


def finite_verdict(values: dict[str, Any], what: str = "") -> Verdict:
    """Fail when any of the named numbers (lists allowed) is NaN / Inf."""
    bad = []
    for k, v in values.items():
        vals = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(x, float) and not math.isfinite(x) for x in vals):
            bad.append(k)
    pre = f"{what}: " if what else ""
    return _v(fail=[f"{pre}non-finite values in {', '.join(bad)}"] if bad else [])
