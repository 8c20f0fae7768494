"""Test-session setup: run Triton kernels in the interpreter when there is no GPU (must happen
before anything imports triton), and keep torch to one thread - the tests use tiny tensors and the
CI machine has 2 cores, where intra-op threading costs more than it gives."""
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*unlearn_fast._C is not available.*")
