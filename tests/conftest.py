"""Session-wide test settings that must precede every import."""

import os

import torch

# Without a GPU, Triton kernels can only run in its interpreter; triton reads the switch when it is first
# imported (transformers imports it through torch._dynamo), so it must be set before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
