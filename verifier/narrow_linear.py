"""Narrow linears: cheaper verify forwards of a few rows on CPUs whose BLAS is MKL.

A verify forward runs the target's linears on ``1 + nodes`` rows. On the CPU, ``F.linear`` computes
``X @ W^T``; with one row MKL takes a matrix-vector path bound by the bytes of ``W``, but with two to
a few dozen rows the transposed-``W`` matrix-matrix path is 2-4x slower than that (SmolLM2's LM head,
576 -> 49152, on a 2-core AVX2 VM: 15 ms at 1 row, 38-43 ms at 2-8 rows). Computing ``(W @ X^T)^T``
instead keeps those rows near the one-row cost (11-16 ms), so a speculative step's verify costs what its
bytes cost rather than what the GEMM dispatch makes of it (``BENCHMARKS.md``, "Narrow linears").

:func:`use_narrow_linears` switches a model's ``nn.Linear`` modules to :class:`NarrowLinear` in place
(weights, names and state dicts unchanged). One row and more than ``max_rows`` rows go through
``F.linear`` as before, so plain one-token decoding (ours and Hugging Face's ``generate`` on the same
model) and prefills are untouched. The product is the same up to float rounding (another summation
order); greedy outputs are checked against plain decoding as everywhere else.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from specdec.errors import ConfigError

log = logging.getLogger(__name__)

#: Rows above which ``F.linear`` is used again: past about 32 rows the product is bound by arithmetic and the
#: two layouts cost the same on the CPUs measured.
MAX_ROWS = 32
MODES = ("auto", "on", "off")


class NarrowLinear(nn.Linear):
    """``nn.Linear`` computing ``(W @ X^T)^T`` for 2..``max_rows`` rows (see the module docstring)."""

    max_rows: int = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 1 < rows <= self.max_rows:
            return F.linear(x, self.weight, self.bias)
        out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()  # [rows, out]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])  # [..., out]


def use_narrow_linears(model: nn.Module, max_rows: int = MAX_ROWS) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to :class:`NarrowLinear` (in place); returns how many.

    Subclasses of ``nn.Linear`` (quantized or adapter layers) are left as they are.
    """
    count = 0
    for module in model.modules():
        if type(module) in (nn.Linear, NarrowLinear):
            module.__class__ = NarrowLinear
            module.max_rows = max_rows
            count += 1
    return count


def has_narrow_linears(model: nn.Module) -> bool:
    """Whether any of ``model``'s linears is a :class:`NarrowLinear`."""
    return any(type(m) is NarrowLinear for m in model.modules())


def plain_linears(model: nn.Module) -> int:
    """Switch :class:`NarrowLinear` modules of ``model`` back to ``nn.Linear`` (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is NarrowLinear:
            module.__class__ = nn.Linear
            count += 1
    return count


def narrow_mode(mode, key: str = "model.narrow_linears") -> str:
    """``mode`` as one of :data:`MODES` (true/false read as on/off); a ConfigError naming ``key`` otherwise."""
    if mode is True or mode is False or mode is None:
        mode = "on" if mode else "off"
    if mode not in MODES:
        raise ConfigError(f"{key}={mode!r}: choose auto, on or off")
    return mode


def narrow_wanted(mode, model: nn.Module, key: str = "model.narrow_linears") -> bool:
    """Whether ``mode`` (``auto``, ``on``, ``off``) asks for narrow linears on ``model``: ``auto`` means a float32
    model on the CPU (where the MKL dispatch it avoids was measured)."""
    mode = narrow_mode(mode, key)
    if mode != "auto":
        return mode == "on"
    weight = next(model.parameters(), None)
    return weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32


def apply_narrow_linears(model: nn.Module | None, mode="auto", key: str = "model.narrow_linears") -> int:
    """:func:`use_narrow_linears` on ``model`` when :func:`narrow_wanted` says so; returns how many switched."""
    if model is None or not narrow_wanted(mode, model, key):
        return 0
    count = use_narrow_linears(model)
    log.debug("narrow linears: %d modules switched", count)
    return count


def narrow_models(models, mode="auto", key: str = "model.narrow_linears") -> str:
    """:func:`apply_narrow_linears` on each of ``models`` (None skipped); ``on`` if any switched, else ``off``:
    what the run used, for its summary or header."""
    switched = [apply_narrow_linears(model, mode, key) for model in models]
    return "on" if any(switched) else "off"
