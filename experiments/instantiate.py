"""The one place that calls ``hydra.utils.instantiate``.

Every object built from a ``_target_`` config node (drafters, loggers, later trees and
verifiers) goes through :func:`instantiate`, which turns Hydra's instantiation errors into
:class:`specdec.errors.ConfigError` with the config node named in the message.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Mapping
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
    hydra_log = logging.getLogger("hydra.utils")  # it logs the failure (twice) before raising it: one line is ours
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return hydra.utils.get_object(path)
    except Exception as exc:  # ImportError, AttributeError, ValueError from hydra's locate
        raise ConfigError(_import_failure(what, str(path), exc)) from exc
    finally:
        hydra_log.disabled = disabled


def _import_failure(what: str, path: str, exc: Exception) -> str:
    """Why ``path`` did not import: a module that is there but raised while importing (a mistake in it, a
    package it needs that is missing) is named with the error and where it was raised, not as "not installed"."""
    cause = exc.__cause__
    missing = cause.name if isinstance(cause, ModuleNotFoundError) else None
    absent = missing is not None and f"{path}.".startswith(f"{missing}.")  # the module (or the name in it) is not there
    if cause is None or absent or isinstance(cause, AttributeError):
        return f"{what}: cannot import _target_ {path!r}{_did_you_mean(path)} ({exc})"
    from experiments.cli import where_raised

    where = where_raised(cause)
    fix = f"install {missing} or fix the import" if missing else "fix it there"
    text = str(cause).splitlines()[0] if str(cause) else ""
    return f"{what}: importing _target_ {path!r} raised {type(cause).__name__}" + (f": {text}" if text else "") \
        + (f" at {where}" if where else "") + f": {fix}"


def _did_you_mean(path: str) -> str:
    """``; did you mean 'pkg.Name'?`` where ``path``'s module imports and has a name close to its last part."""
    module, _, name = str(path).rpartition(".")
    try:
        names = dir(importlib.import_module(module)) if module else []
    except Exception:  # noqa: BLE001 - the module itself is what is wrong: no suggestion
        names = []
    close = difflib.get_close_matches(name, [n for n in names if not n.startswith("_")], n=1)
    return f"; did you mean '{module}.{close[0]}'?" if close else ""


#: Keys of a config node that are Hydra's, not arguments.
HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_", "_args_")


def check_arguments(node: DictConfig | dict, what: str) -> None:
    """Before anything is built: ``node._target_`` imports, is not an abstract class, and every other key of
    ``node`` names one of its parameters (unless it takes ``**kwargs``); so for every nested node with a
    ``_target_`` of its own (a hybrid drafter's parts). ConfigError naming the key, its closest parameter and
    the parameters."""
    target = target_of(node, what)
    missing = sorted(getattr(target, "__abstractmethods__", ()))
    if missing:
        raise ConfigError(f"{what}: {node.get('_target_')} does not implement {', '.join(missing)} (abstract in its "
                          "base class): define it, or point _target_ at a class that does")
    params = _parameters(target)
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if params is not None and key not in params:
            hint = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f"did you mean {what}.{hint[0]}? " if hint else ""
            raise ConfigError(f"{what}.{key}: {node.get('_target_')} takes no argument {key!r}; {hint}its arguments: "
                              f"{', '.join(params) or 'none'}")
        if isinstance(value, Mapping) and value.get("_target_"):
            check_arguments(value, f"{what}.{key}")
        elif params is not None:
            _check_type(target, str(key), value, what)


#: Annotations whose values are checked before anything is built (``bool`` is no ``int`` here, an ``int`` is a
#: ``float``), each with what the error asks for. (Not ``str``: Hydra reads ``logger.group=2024`` as a number.)
_SIMPLE_TYPES = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number")}


def _check_type(target: Any, key: str, value: Any, what: str) -> None:
    """ConfigError naming ``what.key`` when ``target`` annotates parameter ``key`` as ``bool``, ``int`` or ``float``
    (or one of them or None) and ``value`` is not one (a plugin's ``sampled: bool`` given ``nope`` would otherwise
    read as true); None passes where the annotation or the default allows it; any other annotation, or none, is
    left to the class."""
    import types
    import typing

    function = target.__init__ if inspect.isclass(target) else target
    try:
        annotation = typing.get_type_hints(function).get(key)
        default = inspect.signature(function).parameters[key].default
    except (NameError, TypeError, AttributeError, SyntaxError, ValueError, KeyError):  # nothing to check against
        return
    parts = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    kinds = [a for a in parts if a is not type(None)]
    optional = len(kinds) == 1 and len(parts) == 2
    simple = _SIMPLE_TYPES.get(kinds[0] if optional else annotation) if optional or not parts else None
    if simple is None or (value is None and (optional or default is None)):
        return
    types_, wanted = simple
    if isinstance(value, bool) and bool not in types_ or not isinstance(value, types_):
        name = getattr(target, "__name__", str(target))
        raise ConfigError(f"{what}.{key}={value!r}: give {wanted}{' or null' if optional else ''} ({name}'s "
                          f"{key} is annotated {getattr(annotation, '__name__', annotation)})")


def _parameters(target: Any) -> list[str] | None:
    """The keyword parameters of ``target`` (a class: its ``__init__``'s), or None where any name is accepted
    (``**kwargs``, or no signature to read)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def accepts_argument(node: DictConfig | dict, name: str, what: str) -> bool:
    """True if the ``_target_`` of ``node`` takes a parameter called ``name`` (or **kwargs)."""
    params = _parameters(target_of(node, what))
    return params is None or name in params


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
