"""Session-wide test settings that must precede every import."""

import os

import torch

# Without a GPU, Triton kernels can only run in its interpreter; triton reads the switch when it is first
# imported (transformers imports it through torch._dynamo), so it must be set before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """The slow tests (minutes each) first, in their usual order: with two workers the run then ends on short
    tests spread over both, not on one worker's rehearsal while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
