"""The one place that calls ``hydra.utils.instantiate``.

Every object built from a ``_target_`` config node (drafters, loggers, later trees and
verifiers) goes through :func:`instantiate`, which turns Hydra's instantiation errors into
:class:`specdec.errors.ConfigError` with the config node named in the message.
"""
from __future__ import annotations

import inspect
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from specdec.errors import ConfigError, SpecDecError


def target_of(node: DictConfig | dict, what: str) -> Any:
    """The class or function named by ``node._target_``; ConfigError if it is absent or unknown."""
    path = node.get("_target_") if node is not None else None
    if not path:
        raise ConfigError(f"the {what} config has no _target_; got {_describe(node)}")
    try:
        return hydra.utils.get_object(path)
    except Exception as exc:  # ImportError, AttributeError, ValueError from hydra's locate
        raise ConfigError(f"{what}: cannot import _target_ {path!r} ({exc})") from exc


def accepts_argument(node: DictConfig | dict, name: str, what: str) -> bool:
    """True if the ``_target_`` of ``node`` takes a parameter called ``name`` (or **kwargs)."""
    try:
        params = inspect.signature(target_of(node, what)).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def instantiate(node: DictConfig | dict, what: str, **kwargs: Any) -> Any:
    """Build the object that ``node`` describes, passing ``kwargs`` as extra arguments.

    Args:
        node: a config node with a ``_target_`` key.
        what: the config group's name, for error messages (``"drafter"``, ``"logger"``).
        **kwargs: runtime arguments not in the config (a model, a run directory).

    Raises:
        ConfigError: the target cannot be imported or rejects the arguments.
        SpecDecError: the constructor raised one (passed through unchanged).
    """
    target_of(node, what)
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, SpecDecError):
            raise cause from None
        raise ConfigError(f"cannot build the {what} from {_describe(node)}: {cause or exc}") from exc


def _describe(node: Any) -> str:
    if isinstance(node, DictConfig):
        return str(OmegaConf.to_container(node, resolve=False))
    return repr(node)
