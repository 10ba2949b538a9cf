"""Errors with messages that name the problem and the fix."""
from __future__ import annotations

import sys


class SpecDecError(ValueError):
    """Base class of the framework's input errors."""


class ConfigError(SpecDecError):
    """A configuration value is wrong."""


def positive_int(value, name: str, allow_none: bool = False) -> int | None:
    """``value`` if it is an integer >= 1 (or None with ``allow_none``), else :class:`ConfigError` naming ``name``."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: it must be an integer >= 1" + (" or null" if allow_none else ""))
    return value


class NonFiniteLogitsError(RuntimeError):
    """The target or draft model produced NaN or inf logits."""


def out_of_memory(exc: BaseException) -> BaseException | None:
    """The out-of-memory error ``exc`` is or was raised from (dynamo wraps a compiler's errors, a failed graph
    capture raises its own), or None. Such a failure is not the compiler's: another form of the step needs
    the same memory, and the fix is a smaller setting."""
    torch = sys.modules.get("torch")
    if torch is None:  # nothing has run on a device: no need to load it to answer
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.OutOfMemoryError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def raise_out_of_memory(exc: BaseException) -> None:
    """Raise the out-of-memory error behind ``exc`` (:func:`out_of_memory`) as itself, if there is one."""
    oom = out_of_memory(exc)
    if oom is not None:
        raise oom from None
