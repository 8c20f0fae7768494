"""Functional ops with backend dispatch: the only layer that touches kernels/, _C and reference/."""
from unlearn_fast.ops.backend import requested_backend, resolve, use_backend  # noqa: F401
from unlearn_fast.ops.wf_gate import wf_conv2d, wf_linear  # noqa: F401
