"""Launching a Triton kernel for one fixed layout with little host time.

A Triton launch through the JIT (``kernel[grid](*args, **constexprs)``) binds every argument, computes its
specialisation (integers equal to 1 or divisible by 16, pointers aligned to 16 bytes), looks the compiled
kernel up, checks the globals it used, then calls the compiled launcher. On the H200 machine's CPU that was
about 23 us per launch, most of the tree-attention call's host time. For one input layout (every shape,
stride and integer argument fixed) only the tensors' alignment and dtypes can change the kernel it picks,
so :class:`FixedLaunch` goes through the JIT once, keeps the compiled kernel's launcher, and calls it
directly while those stay the same (a change goes through the JIT again).

The direct call passes every parameter in the kernel's order (constexprs included), as the JIT itself does
(``CompiledKernel[grid](*args)``, Triton 3.x). ``SPECDEC_TRITON_DIRECT=0`` in the environment turns it off
(every launch through the JIT). Under ``TRITON_INTERPRET=1`` there is no compiled kernel: every launch goes
through the interpreter.
"""
from __future__ import annotations

import os

import torch

ALIGN = 16  # bytes: the pointer alignment Triton specialises on


def _alignment(args: tuple, positions: list[int]) -> tuple:
    """What Triton specialises on in the tensor arguments (at ``positions``) of one layout: each one's dtype and
    16-byte alignment."""
    return tuple((args[i].dtype, args[i].data_ptr() % ALIGN == 0) for i in positions)


def direct_enabled() -> bool:
    """Whether launches may skip the JIT after the first (``SPECDEC_TRITON_DIRECT``, default on)."""
    return os.environ.get("SPECDEC_TRITON_DIRECT", "1") != "0"


class FixedLaunch:
    """``launch(*args)``: ``fn[grid](*args, **constexprs)`` for arguments of one fixed layout.

    Args:
        fn: the ``@triton.jit`` function.
        grid: the launch grid (a tuple).
        constexprs: its constexpr parameters and launch options (``num_warps``, ``num_stages``), by name.
    """

    def __init__(self, fn, grid: tuple, constexprs: dict):
        self.fn, self.grid, self.constexprs = fn, grid, constexprs
        self.runner = None  # the compiled kernel's launcher, after the first launch
        self.tail: list = []  # constexpr values in parameter order, after the positional arguments
        self.aligned: tuple = ()
        self.tensors: list[int] = []  # positions of the tensor arguments

    def __call__(self, *args) -> None:
        if self.runner is not None and _alignment(args, self.tensors) == self.aligned:
            self.runner(*args, *self.tail)
            return
        self._through_jit(args)

    def _through_jit(self, args: tuple) -> None:
        kernel = self.fn[self.grid](*args, **self.constexprs)
        if kernel is None or not hasattr(kernel, "__getitem__") or not direct_enabled():
            self.runner = None  # the interpreter (no compiled kernel), or switched off
            return
        names = self.fn.arg_names[len(args):]
        self.tail = [self.constexprs[name] for name in names]
        self.tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.runner, self.aligned = kernel[self.grid], _alignment(args, self.tensors)
