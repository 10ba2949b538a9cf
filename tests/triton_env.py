"""Running Triton kernels in tests: on a GPU, or on the CPU under the interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton's first import (conftest sets
it). When something imported triton earlier in the pytest process, kernel tests cannot run there;
:func:`rerun_in_fresh_process` runs a test file again in a process where the variable comes first.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

#: Where kernel tests put their tensors and models.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernels_cannot_run_here() -> bool:
    """True on a CPU-only process whose triton was imported before ``TRITON_INTERPRET=1`` was set."""
    from specdec_kernels.tree_attention import _is_interpreted

    return not torch.cuda.is_available() and not _is_interpreted()


def rerun_in_fresh_process(path: str) -> None:
    """Run the test file ``path`` in a fresh process with the interpreter on; fail with its output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(path)]
    res = subprocess.run(cmd, cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def interpreter_guard():
    """An autouse fixture for a kernel test file: where the kernels cannot run in this process, skip
    every test but the file's ``test_file_in_fresh_process`` (:func:`fresh_process_test`)."""
    cannot = kernels_cannot_run_here()
    from specdec_kernels.tree_attention import interpreter_problem

    broken = None if torch.cuda.is_available() else interpreter_problem()

    @pytest.fixture(autouse=True)
    def _needs_interpreter(request):
        if broken:
            pytest.skip(broken)
        if cannot and request.node.originalname != "test_file_in_fresh_process":
            pytest.skip("triton was imported before TRITON_INTERPRET=1: run by test_file_in_fresh_process")

    return _needs_interpreter


def fresh_process_test(path: str):
    """The test that reruns the file at ``path`` in a fresh process when the kernels cannot run in this one."""
    cannot = kernels_cannot_run_here()

    def test_file_in_fresh_process():
        if not cannot:
            pytest.skip("the kernels run in this process")
        rerun_in_fresh_process(path)

    return test_file_in_fresh_process
