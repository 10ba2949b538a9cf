"""specdec_kernels.launch.FixedLaunch: the first launch goes through the JIT, later ones straight to the compiled
kernel's launcher with every parameter in order, and a change of pointer alignment goes through the JIT again.
A recording stand-in plays the JIT here (the CPU has no compiled kernels); ``tests/test_gpu.py`` compares the
direct launches with the JIT's on CUDA."""
from __future__ import annotations

import importlib

import pytest
import torch

from specdec_kernels.launch import FixedLaunch


class _Jit:
    """Records launches as Triton's ``fn[grid](*args, **kw)`` would receive them; ``compiled`` is what a JIT launch
    returns (a kernel whose ``[grid]`` is its launcher, or None as the interpreter)."""
    arg_names = ("x_ptr", "n", "scale", "BLOCK", "EVEN")

    def __init__(self, compiled: bool = True):
        self.jit_calls, self.direct_calls, self.compiled = [], [], compiled

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.jit_calls.append((grid, args, kw))
            return _Kernel(self) if self.compiled else None
        return run


class _Kernel:
    def __init__(self, jit: _Jit):
        self.jit = jit

    def __getitem__(self, grid):
        return lambda *args: self.jit.direct_calls.append((grid, args))


def test_first_launch_through_the_jit_then_direct_with_constexprs_in_order(monkeypatch):
    monkeypatch.delenv("SPECDEC_TRITON_DIRECT", raising=False)
    fn, x = _Jit(), torch.zeros(64)
    launch = FixedLaunch(fn, (4, 1, 1), {"BLOCK": 32, "EVEN": True, "num_warps": 4})
    launch(x, 64, 0.5)
    launch(x, 64, 0.5)
    launch(x[4:], 60, 0.5)  # 16 bytes in: still aligned
    launch(x.double(), 64, 0.5)  # another dtype: through the JIT again (not counted below)
    assert fn.jit_calls[0] == ((4, 1, 1), (x, 64, 0.5), {"BLOCK": 32, "EVEN": True, "num_warps": 4})
    assert len(fn.jit_calls) == 2 and fn.jit_calls[1][1][0].dtype == torch.float64
    assert [args[1:] for _, args in fn.direct_calls] == [(64, 0.5, 32, True), (60, 0.5, 32, True)]
    assert all(grid == (4, 1, 1) for grid, _ in fn.direct_calls)


def test_a_new_alignment_goes_through_the_jit_again():
    fn, x = _Jit(), torch.zeros(64)
    launch = FixedLaunch(fn, (1,), {"BLOCK": 32, "EVEN": False})
    launch(x, 64, 1.0)
    launch(x[1:], 63, 1.0)  # 4 bytes in: Triton would pick another specialisation
    launch(x[1:], 63, 1.0)  # now the kept launcher is that one's
    launch(x, 64, 1.0)  # and back
    assert len(fn.jit_calls) == 3 and len(fn.direct_calls) == 1
    assert fn.direct_calls[0][1][0].data_ptr() == x[1:].data_ptr()


def test_interpreter_and_switch_off_always_use_the_jit(monkeypatch):
    x = torch.zeros(8)
    interpreted = _Jit(compiled=False)
    launch = FixedLaunch(interpreted, (1,), {"BLOCK": 8, "EVEN": True})
    for _ in range(3):
        launch(x, 8, 1.0)
    assert len(interpreted.jit_calls) == 3 and not interpreted.direct_calls
    monkeypatch.setenv("SPECDEC_TRITON_DIRECT", "0")
    off = _Jit()
    launch = FixedLaunch(off, (1,), {"BLOCK": 8, "EVEN": True})
    for _ in range(3):
        launch(x, 8, 1.0)
    assert len(off.jit_calls) == 3 and not off.direct_calls


def test_split_k_workspaces_share_one_buffer_per_device_and_keep_the_replaced_ones():
    """Plans of many layouts (each step's prefix bucket, every model's heads) take views of one buffer per device,
    grown (at least doubling) to the largest request, instead of one buffer per size. A replaced buffer stays
    alive with no plan holding it: a captured CUDA graph replays with its address and holds nothing else."""
    import gc
    import weakref

    ta = importlib.import_module("specdec_kernels.tree_attention")
    device = torch.device("cpu")
    ta._WORKSPACES.pop((device, torch.float32), None)
    small = ta._workspace(device, 10)
    first = weakref.ref(ta._WORKSPACES[(device, torch.float32)])
    big = ta._workspace(device, 15)
    middle = ta._workspace(device, 12)
    assert (small.numel(), big.numel(), middle.numel()) == (10, 15, 12)
    assert middle.data_ptr() == big.data_ptr() and small.data_ptr() != big.data_ptr()
    assert ta._WORKSPACES[(device, torch.float32)].numel() == 20  # doubled: few replacements
    del small
    gc.collect()
    assert first() is not None  # no view holds it, the module does
    ta._RETIRED.clear()


def test_both_l2_flushes_run_and_a_wrong_mode_is_refused():
    """The kernel bench's flushes: ``write`` zeroes its buffer, ``read`` only reads it (clean L2 lines)."""
    from specdec_kernels.bench import make_flush

    for mode in ("write", "read"):
        make_flush(torch.device("cpu"), mode)()
    with pytest.raises(ValueError, match="sideways"):
        make_flush(torch.device("cpu"), "sideways")


def test_the_tune_grid_takes_other_axes_and_refuses_unknown_keys():
    from specdec_kernels.tune import GRID, parse_grid

    grid = parse_grid(["merge=kernel,fused", "num_stages=3"])
    assert grid["merge"] == ("kernel", "fused") and grid["num_stages"] == (3,) and grid["block_n"] == GRID["block_n"]
    with pytest.raises(ValueError, match="stages"):
        parse_grid(["stages=3"])
    with pytest.raises(ValueError, match="positive integers"):
        parse_grid(["num_stages=abc"])
    with pytest.raises(ValueError, match="one of"):
        parse_grid(["merge=fast"])
