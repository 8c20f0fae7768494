"""Per-layer-shape choice between the two WF conv paths (issue 10 item 6):

* ``"fused"``: the implicit-GEMM Triton kernels of ``kernels.wf_conv`` (gate in the GEMM epilogue /
  prologue, dalpha from a separate deterministic pass);
* ``"epilogue"``: cuDNN conv + one pointwise Triton kernel each way (``kernels.wf_epilogue``).

``TABLE`` maps :func:`shape_key` to the path measured faster for that shape on a GPU (fill it from a
GPU run: ``bench/test_bench_wf_layers.py`` times both paths per layer; commit the result). Shapes not in the table
get ``DEFAULT`` - the epilogue path, since cuDNN's conv is the stronger GEMM until a measurement says
otherwise. ``UNLEARN_FAST_CONV_PATH=fused|epilogue`` forces one path for every shape. Imports nothing.
"""
from __future__ import annotations

import os

__all__ = ["TABLE", "DEFAULT", "PATHS", "shape_key", "choose"]

PATHS = ("fused", "epilogue")
DEFAULT = "epilogue"

# Empty until the first GPU run (see DEFAULT): no GPU has measured the two paths yet.
TABLE: dict[str, str] = {}


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
