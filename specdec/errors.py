"""Errors with messages that name the problem and the fix."""


class SpecDecError(ValueError):
    """Base class of the framework's input errors."""


class ConfigError(SpecDecError):
    """A configuration value is wrong."""


class NonFiniteLogitsError(RuntimeError):
    """The target or draft model produced NaN or inf logits."""
