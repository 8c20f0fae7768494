"""Pure-PyTorch reference implementations of every op: test oracle and CPU fallback."""
from unlearn_fast.reference.wf_gate import (  # noqa: F401
    gate_rows,
    wf_conv2d,
    wf_conv2d_literal,
    wf_linear,
    wf_linear_literal,
)
