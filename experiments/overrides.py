"""Rejecting ``+key=value`` overrides that name no key of their config group.

Hydra's ``+`` adds a key wherever it is told, and nothing reads a key the code does not know:
``+model.foo=1`` was accepted and silently ignored, ``+sampling.foo=1`` broke later with a
``TypeError``. :func:`check_added_keys` runs first in a Hydra task and compares every added key
with what its node holds without the added keys: the schema's fields at the top level and for
typed groups (``sampling``), the keys of the chosen option for the others (``model=tiny_random``),
and for a ``_target_`` node also its constructor's arguments (an argument the option's YAML leaves
out is fine). Group selections (``+experiment=smoke``), ``hydra.*`` and ``++key`` (force-add) are
Hydra's business and are not checked.

:func:`check_value_types` does the same for values: a key whose default in the config file is a number or a
boolean takes only that (``lr=abc`` is one error line naming ``lr``, not a ``float()`` failure or a comparison of
a string with a number deep in a task). Configs with a schema (``experiments.schema``) get that at compose time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from specdec.errors import ConfigError


def hydra_choices() -> dict:
    """The config-group choices of the running Hydra app (``{"model": "tiny_random", ...}``); {} outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items()}


def group_choice(group: str) -> str | None:
    """The option chosen for config group ``group`` in the running Hydra app, or None."""
    return hydra_choices().get(group)


def task_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job ([] outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_multirun() -> bool:
    """Whether the running Hydra job is one of a sweep's (``-m``); False outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


MULTIRUN_FLAGS = ("-m", "--multirun")
#: Hydra's flags that take a value (the next argument unless written ``--flag=value``); ``--info``, whose value is
#: optional and one of :data:`INFO_CHOICES`; and those that take none.
VALUE_FLAGS = ("-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
               "--config-dir", "--experimental-rerun")
INFO_FLAGS = ("-i", "--info")
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
BARE_FLAGS = (*MULTIRUN_FLAGS, "-h", "--help", "--hydra-help", "--version", "--resolve", "-r", "--run", "-sc",
              "--shell-completion")


def hydra_flags_last(args: list[str]) -> list[str]:
    """``args`` with the overrides first and Hydra's flags (with their values) after them: Hydra's argparse takes
    the overrides as one run of positional arguments, so ``key=a -m key2=b,c`` or ``key=a --cfg job key2=b``
    stopped at a usage dump ("unrecognized arguments"). A repeated ``-m`` is kept once. ``args`` are left as they
    are where a flag is not one of Hydra's spelled out (an abbreviation such as ``--cf``, ``-cjob``): argparse
    reads those, and which argument is its value is its business."""
    flags: list[str] = []
    overrides: list[str] = []
    at = 0
    while at < len(args):
        arg, after = args[at], args[at + 1:at + 2]
        if arg.startswith("-") and arg.split("=", 1)[0] not in (*BARE_FLAGS, *VALUE_FLAGS, *INFO_FLAGS):
            return list(args)
        taken = 2 if after and "=" not in arg and _takes_value(arg, after[0]) else 1
        if not arg.startswith("-"):
            overrides.append(arg)
        elif arg not in MULTIRUN_FLAGS or not set(flags) & set(MULTIRUN_FLAGS):
            flags.extend(args[at:at + taken])
        at += taken
    return [*overrides, *flags]


def _takes_value(flag: str, following: str) -> bool:
    """Whether the argument after ``flag`` is its value."""
    return flag in VALUE_FLAGS or (flag in INFO_FLAGS and following in INFO_CHOICES)


#: Groups whose options are diffs of the whole config: several of them compose (``experiment=[a,b]``).
MERGEABLE_GROUPS = {"experiment", "sweep"}


def check_group_choices(overrides: list[str] | None = None, groups: set[str] | None = None) -> None:
    """Raise :class:`ConfigError` for a config group given a list of options (``tree=[binary,sparse60]``): Hydra
    merges them into one config, the last one's values winning, where a sweep over them was likely meant.
    ``groups``: the config groups (default: the folders of the running job's file config sources)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = task_overrides() if overrides is None else overrides
    groups = config_groups() if groups is None else groups
    for override in OverridesParser.create().parse_overrides(overrides):
        value = override.value()
        if (override.key_or_group in groups - MERGEABLE_GROUPS and isinstance(value, list)
                and all(isinstance(v, str) for v in value)):
            group, names = override.key_or_group, ",".join(value)
            if not value:
                raise ConfigError(f"{group}=[] names no option: a config group takes one option name, e.g. "
                                  f"{group}=<name> (the files of conf/{group})")
            if len(value) == 1:
                raise ConfigError(f"{group}=[{names}]: a config group takes an option name, without brackets: "
                                  f"{group}={names}")
            raise ConfigError(f"{group}=[{names}] merges these options into one config (the last one's values win); "
                              f"choose one ({group}={value[0]}), or sweep them: -m {group}={names}")


def config_groups() -> set[str]:
    """The config groups of the running Hydra job: the folders of its file config sources ({} outside a job)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    sources = [Path(s.path) for s in HydraConfig.get().runtime.config_sources if s.schema == "file"]
    return {d.name for source in sources if source.is_dir() for d in source.iterdir() if d.is_dir()}


def check_added_keys(cfg: DictConfig, overrides: list[str] | None = None, choices: dict | None = None) -> None:
    """Raise :class:`ConfigError` for the first ``+key=value`` that names no key of its node.

    Args:
        cfg: the composed config of the task.
        overrides: the job's overrides (default: the running Hydra job's).
        choices: the config-group choices (default: the running Hydra job's).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = task_overrides() if overrides is None else overrides
    choices = hydra_choices() if choices is None else choices
    added = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if not override.is_add() or override.package is not None or key in choices or key.split(".")[0] == "hydra":
            continue
        added[tuple(key.split("."))] = override.input_line
    for path, line in added.items():
        _check_one(cfg, path, line, set(added), choices)


def _node(cfg: Any, path: tuple) -> Any:
    for key in path:
        cfg = cfg[key]
    return cfg


def _created(cfg: DictConfig, path: tuple, added: set) -> bool:
    """Whether the node at ``path`` exists only because of added keys (it or all its keys were added)."""
    if path in added:
        return True
    node = _node(cfg, path)
    return isinstance(node, DictConfig) and len(node) > 0 and all(_created(cfg, path + (k,), added) for k in node)


def _check_one(cfg: DictConfig, path: tuple, line: str, added: set, choices: dict) -> None:
    depth = next(i for i in range(1, len(path) + 1) if _created(cfg, path[:i], added))
    parent, name = path[: depth - 1], path[depth - 1]
    node = _node(cfg, parent)
    if "_target_" in node and target_takes(node, name, ".".join(parent)):
        return
    valid = sorted(str(k) for k in node if not _created(cfg, parent + (k,), added))
    if not parent:
        where = "the config's top level"
    elif len(parent) == 1 and choices.get(parent[0]):
        where = f"{parent[0]}={choices[parent[0]]}"
    else:
        where = ".".join(parent)
    dotted = ".".join(path[:depth])
    raise ConfigError(f"unknown key {dotted!r} (from {line}): {where} has the keys {valid}; "
                      f"fix the name (without '+' to change an existing key) or drop the override")


def target_takes(node: DictConfig, name: str, what: str) -> bool:
    """Whether the ``_target_`` of ``node`` takes an argument ``name`` (not through ``**kwargs``)."""
    import inspect

    from experiments.instantiate import target_of

    try:
        params = inspect.signature(target_of(node, what)).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD


def _kind(default: Any) -> tuple[str, tuple[type, ...]] | None:
    """What a key whose file default is ``default`` takes: ``(description, accepted types)``, or None (any)."""
    if isinstance(default, bool):
        return "true or false", (bool,)
    if isinstance(default, int):
        return "an integer", (int,)
    if isinstance(default, float):
        return "a number", (int, float)
    return None


def check_value_types(cfg: Any, defaults: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first value of ``cfg`` whose default in ``defaults`` (the task's config
    file, loaded unresolved) is a number or a boolean and whose value is not one (null is left to the task)."""
    for key, default in defaults.items():
        if key in ("defaults", "hydra") or key not in cfg:
            continue
        value = cfg[key]
        if isinstance(default, dict) and hasattr(value, "keys"):
            check_value_types(value, default, f"{prefix}{key}.")
            continue
        kind = _kind(default)
        if kind is None or value is None:
            continue
        ok = isinstance(value, kind[1]) and (kind[1] == (bool,) or not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{prefix}{key}={value!r}: it must be {kind[0]} (the default is {default!r})")


def primary_config_defaults() -> dict:
    """The values of the running Hydra job's primary config file as written (interpolations unresolved): the
    first file config source holding ``<config_name>.yaml`` (``--config-path``/``--config-dir`` included); {}
    outside a Hydra job or where there is none."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    name = f"{hc.job.config_name}.yaml"
    files = [Path(s.path) / name for s in hc.runtime.config_sources if s.schema == "file"]
    ours = Path(__file__).resolve().parent.parent / "conf" / name  # a pkg:// source (main() called from Python)
    for path in [*files, ours]:
        if path.is_file():
            try:
                return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except (OSError, ValueError):
                return {}
    return {}
