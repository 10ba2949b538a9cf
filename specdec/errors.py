"""Errors with messages that name the problem and the fix."""
from __future__ import annotations


class SpecDecError(ValueError):
    """Base class of the framework's input errors."""


class ConfigError(SpecDecError):
    """A configuration value is wrong."""


class NonFiniteLogitsError(RuntimeError):
    """The target or draft model produced NaN or inf logits."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, an out-of-memory error (dynamo wraps a compiler's own errors):
    no reason to fall back to another form of the step, which needs the same memory."""
    import torch

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
