"""Data health checks run before any training: what makes a run meaningless (an error) and what makes
some of its figures unmeasurable (a warning)."""
from __future__ import annotations

from unlearn_fast.data.bundle import DataBundle

__all__ = ["check_bundle"]


def _ranges(cs: list[int]) -> str:
    out, start = [], None
    for i, c in enumerate(cs):
        if start is None:
            start = c
        if i + 1 == len(cs) or cs[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}..{c}")
            start = None
    return ", ".join(out)


def check_bundle(data: DataBundle) -> list[str]:
    """Raise ValueError (one line) when the data cannot give a meaningful run; return warnings otherwise.

    Errors: fewer than two classes; classes without a training sample (labels must be 0..K-1 with no
    gap: a stray label 200 in a 10-class file makes a 201-class problem). Warnings: classes without
    validation or test samples, classes with a single training sample."""
    k = data.num_classes
    counts = {s: data.class_counts(s).tolist() for s in ("train", "val", "test")}
    present = [c for c in range(k) if counts["train"][c] > 0]
    if len(present) < 2:
        raise ValueError(f"{data.name}: the training data has {len(present)} class(es) "
                         f"({[data.class_names[c] for c in present]}); unlearning needs at least 2 classes")
    empty = [c for c in range(k) if counts["train"][c] == 0]
    if empty:
        hi = max(present)
        raise ValueError(f"{data.name}: classes {_ranges(empty)} of 0..{k - 1} have no training sample (the largest "
                         f"label is {hi}, seen {counts['train'][hi] + counts['val'][hi] + counts['test'][hi]} time(s)); "
                         "labels must be 0..K-1 without gaps - fix the label file or drop those samples")
    warnings = []
    for split in ("val", "test"):
        miss = [c for c in range(k) if counts[split][c] == 0]
        if miss:
            warnings.append(f"{len(miss)} class(es) have no {split} sample ({_ranges(miss)}): "
                            + ("early stopping and model selection ignore them" if split == "val"
                               else "their forget/retain accuracy cannot be measured on the test split"))
    single = [c for c in range(k) if counts["train"][c] == 1]
    if single:
        warnings.append(f"{len(single)} class(es) have a single training sample ({_ranges(single)})")
    return warnings
