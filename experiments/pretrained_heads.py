"""``drafter.heads=null`` with a pretrained target (``model=smollm2``): the Medusa or EAGLE heads that
``train_medusa`` / ``train_eagle target=<name>`` cached for it, in place of the embedded pair's. Before any model
loads, from the cache's directory names (``<cache>/medusa/<model>-<fingerprint>``,
``<cache>/eagle/<version>-<model>-<fingerprint>``); the drafter checks the heads' recorded target when it binds
them, so a directory for another conversion of the model is still refused there."""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, open_dict

from specdec.errors import ConfigError


def pretrained_heads(cfg: DictConfig) -> list[str]:
    """Set ``heads`` of every Medusa or EAGLE drafter in ``cfg.drafter`` (a hybrid's parts too) left null to the
    heads cached for ``cfg.model``'s pretrained target; the lines saying which (nothing for a zoo or ``hf``
    model, or heads given). :class:`ConfigError` naming the command that trains them when none are cached."""
    from experiments.drafter_config import drafter_parts
    from experiments.instantiate import target_of

    if cfg.model.get("source") != "pretrained":
        return []
    said = []
    for part, node in {"": cfg.drafter, **drafter_parts(cfg.drafter)}.items():
        cls = target_of(node, "drafter") if node.get("_target_") else None
        kind = _kind(cls)
        if kind is None or node.get("heads"):
            continue
        key = f"drafter.{part + '.' if part else ''}heads"
        found = _cached(kind, node, str(cfg.model.name), cfg.model.get("cache_dir"), key)
        with open_dict(node):
            node.heads = str(found)
        said.append(f"{key}=null: the heads cached for model={cfg.model.name}, {found}")
    return said


def _kind(cls) -> str | None:
    """``medusa`` or ``eagle`` for those drafters' classes (subclasses too), else None."""
    from drafters import EagleDrafter, MedusaDrafter

    if isinstance(cls, type) and issubclass(cls, MedusaDrafter):
        return "medusa"
    if isinstance(cls, type) and issubclass(cls, EagleDrafter):
        return "eagle"
    return None


def _cached(kind: str, node: DictConfig, name: str, cache_dir, key: str) -> Path:
    """The newest cached heads directory of ``kind`` for pretrained model ``name`` (EAGLE: of ``node.version``, or
    eagle2's before eagle3's when it is null)."""
    from experiments.pretrained import model_dir

    entry = model_dir(name, cache_dir).name
    if kind == "medusa":
        from drafters.medusa_heads import CONFIG_FILE, default_heads_dir

        parent, prefixes, config_file = default_heads_dir("x", cache_dir).parent, [entry], CONFIG_FILE
    else:
        from drafters.eagle_heads import FILES, default_heads_dir

        versions = [node.version] if node.get("version") else ["eagle2", "eagle3"]
        parent, config_file = default_heads_dir("eagle2", "x", cache_dir).parent, FILES.config_file
        prefixes = [f"{v}-{entry}" for v in versions]
    unfinished = []
    for prefix in prefixes:
        found = [p for p in _named(parent, prefix) if (p / config_file).is_file()]
        if found:
            return max(found, key=lambda p: (p / config_file).stat().st_mtime)
        unfinished += [p for p in _named(parent, prefix) if (p / "checkpoint.pt").is_file()]
    version = f" version={node.version}" if kind == "eagle" and node.get("version") else ""
    train = f"python -m experiments.train_{kind} target={name}{version}" + (f" cache_dir={cache_dir}" if cache_dir else "")
    label = {"medusa": "Medusa heads", "eagle": "EAGLE heads"}[kind]
    cut = f"; the training at {unfinished[0]} has not finished (its checkpoint.pt is there): rerun it" if unfinished else ""
    raise ConfigError(f"{key}=null with model={name}: no {label} are cached for it ({parent}/"
                      f"{' or '.join(p + '-<fingerprint>' for p in prefixes)}{cut}); train them with `{train}` (README: 'A real target'), "
                      f"or set {key}=<heads dir>")


def _named(parent: Path, prefix: str) -> list[Path]:
    """The directories ``<prefix>-<fingerprint>`` in ``parent`` (ten hex digits: ``head_training.target_dir_name``;
    not ``<prefix>-Instruct-<fingerprint>``, another model's whose name starts alike)."""
    pattern = re.compile(re.escape(prefix) + r"-[0-9a-f]{10}")
    return [p for p in parent.iterdir() if pattern.fullmatch(p.name)] if parent.is_dir() else []
