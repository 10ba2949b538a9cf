"""Shared test settings.

- One CPU thread per test process: tiny models gain nothing from more, timings stay sane on small
  shared machines, and the README's command runs one pytest-xdist worker per core.
- Without CUDA, Triton kernels run under the interpreter; ``TRITON_INTERPRET`` must be set
  before triton is first imported (transformers imports it), so it is set here.
- Tests marked ``gpu`` run only where CUDA is available (skipped with a reason elsewhere).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, on a machine without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
