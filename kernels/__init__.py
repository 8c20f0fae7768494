"""Triton kernels of unlearn_fast (installed as ``unlearn_fast.kernels``; one file per op).

* ``wf_linear``: fused WF-gated linear, forward and backward (DESIGN §3).
* ``wf_conv``: fused WF-gated implicit-GEMM conv2d, forward and backward (DESIGN §3).

Import the op modules directly (``from unlearn_fast.kernels import wf_linear``); importing this package
does not import triton.
"""
