"""Shared test settings.

- One CPU thread per test process: tiny models gain nothing from more, timings stay sane on small
  shared machines, and the README's command runs one pytest-xdist worker per core.
- Without CUDA, Triton kernels run under the interpreter; ``TRITON_INTERPRET`` must be set
  before triton is first imported (transformers imports it), so it is set here.
- Tests marked ``gpu`` run only where CUDA is available (skipped with a reason elsewhere).
- Tests marked ``requires("module", ...)`` need an optional runtime (wandb, a Hydra launcher
  plugin) that the dev install provides; on a machine without it (the GPU machine before
  ``scripts/gpu_wheels.sh``) they are skipped with the module's name.
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a missing parent package, e.g. hydra_plugins
        return True


def pytest_collection_modifyitems(config, items):
    """Skip, with the reason, ``gpu`` tests without CUDA and ``requires`` tests without their module."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        for mark in item.iter_markers("requires"):
            absent = [m for m in mark.args if _missing(m)]
            if absent:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {', '.join(absent)} (pip install -e '.[dev]', or scripts/gpu_wheels.sh)"))


@pytest.fixture(scope="module")
def saved_tiny_pair(tmp_path_factory):
    """The tiny random pair saved with save_pretrained (target with its tokenizer), for ``model.source=hf`` loads."""
    from specdec.models import tiny_random_pair

    target, draft, tokenizer = tiny_random_pair()
    root = tmp_path_factory.mktemp("pair")
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
    tokenizer.save_pretrained(root / "target")
    return root
