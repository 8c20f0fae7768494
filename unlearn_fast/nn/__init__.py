"""WF layers and model wrapping (DESIGN §3)."""
from unlearn_fast.nn.wf_layers import GateContext, WFConv2d, WFLinear  # noqa: F401
from unlearn_fast.nn.wrap import WFModel, bake, compose, wrap  # noqa: F401
from unlearn_fast.nn.io import load_wf, save_wf  # noqa: F401,E402
