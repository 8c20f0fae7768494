"""Per-layer-shape choice between the two WF conv paths (issue 10 item 6):

* ``"fused"``: the implicit-GEMM Triton kernels of ``kernels.wf_conv`` (channels-last, weights packed once
  per version, one flat K loop, the gate in the GEMM epilogue / prologue, the strided dgrad split by
  phase, dalpha fused into the dgrad kernel);
* ``"epilogue"``: cuDNN conv + one pointwise Triton kernel each way (``kernels.wf_epilogue``).

``TABLE`` maps :func:`shape_key` to the path measured faster for that shape on a GPU. It lives in
``kernels/conv_dispatch_table.py``, which ``bench/conv_table.py`` writes on a GPU (``bench/gpu_check.sh``
runs it); commit that file. **Default:** a shape not in the table gets ``DEFAULT = "epilogue"`` - cuDNN's
conv is the stronger GEMM until a measurement on the GPU at hand says otherwise (the table starts empty,
so before the first GPU run every shape takes the epilogue path). ``UNLEARN_FAST_CONV_PATH=fused|epilogue``
forces one path for every shape (``table`` or unset: the table). CPU tensors never get here: they take
the reference path (``ops.wf_gate``). Imports nothing but the generated table.
"""
from __future__ import annotations

import os

from unlearn_fast.kernels.conv_dispatch_table import TABLE as _GENERATED

__all__ = ["TABLE", "DEFAULT", "PATHS", "shape_key", "choose"]

PATHS = ("fused", "epilogue")
DEFAULT = "epilogue"

# Written by bench/conv_table.py on a GPU (empty until the first GPU run: see DEFAULT).
TABLE: dict[str, str] = dict(_GENERATED)


def shape_key(C: int, O: int, KH: int, KW: int, stride, padding, dilation, H: int, W: int) -> str:
    """``"C,O,KHxKW,s,p,d,HxW"``: the layer's geometry (batch size and dtype are not part of the key)."""
    s, p, d = (tuple(int(v) for v in t) for t in (stride, padding, dilation))
    return f"{C},{O},{KH}x{KW},s{s[0]}x{s[1]},p{p[0]}x{p[1]},d{d[0]}x{d[1]},{H}x{W}"


def choose(C: int, O: int, KH: int, KW: int, stride, padding, dilation, H: int, W: int) -> str:
    """The conv path for this geometry: the env override, else the table, else ``DEFAULT``."""
    forced = os.environ.get("UNLEARN_FAST_CONV_PATH", "").strip().lower()
    if forced and forced != "table":
        if forced not in PATHS:
            raise ValueError(f"UNLEARN_FAST_CONV_PATH={forced!r}: expected one of {PATHS} or 'table'")
        return forced
    return TABLE.get(shape_key(C, O, KH, KW, stride, padding, dilation, H, W), DEFAULT)
