"""Shared test settings.

- One CPU thread per test process: tiny models gain nothing from more, and timings stay sane
  on small shared machines.
- Without CUDA, Triton kernels run under the interpreter; ``TRITON_INTERPRET`` must be set
  before triton is first imported (transformers imports it), so it is set here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
