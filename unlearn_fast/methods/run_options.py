"""Run options: how a run uses the machine, not what it computes (issue 11 item 5).

* ``workers`` - DataLoader worker processes that decode and preprocess images off the training thread.
  ``None`` (default): 0 on the CPU; on CUDA ``min(8, CPU count)`` when the data is decoded lazily
  (``folder:`` / ``faces:`` sets too big for the in-memory cache), else 0. Results do not depend on it.
* ``channels_last`` - NHWC memory layout of images and convolution weights; CUDA only (ignored with a
  note on other devices). Numerically it is another convolution algorithm choice, like cuDNN's.
* ``bf16`` - bf16 autocast in every training stage (``LoopConfig.amp``); CUDA only (ignored with a note
  on other devices, where the loop never autocasts). Unlike the other two it changes the numbers, so an
  artefact made with it records ``bf16`` in its fingerprint (and is recomputed when asked without it).

``workers`` and ``channels_last`` never enter a fingerprint: the same run with other values reuses its
artefacts and resumes its checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RunOptions"]


@dataclass(frozen=True)
class RunOptions:
    workers: int | None = None
    channels_last: bool = False
    bf16: bool = False

    @classmethod
    def make(cls, workers: Any = None, channels_last: Any = False, bf16: Any = False) -> "RunOptions":
        """Validated options; raises ValueError with one line naming the bad value and the fix."""
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"workers must be an integer >= 0 (DataLoader worker processes; 0 = load in the "
                             f"training process), got {workers!r}")
        for name, v in (("channels_last", channels_last), ("bf16", bf16)):
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")
        return cls(workers, bool(channels_last), bool(bf16))
