"""Drafters from the ``drafter`` config: their counts and tree checked before any model loads, then built
with what each needs (the draft model, the run's tokenizer, an embedded model's directory), a hybrid's parts
each as it would be built alone."""
from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from drafters.hybrid import part_errors
from experiments.instantiate import accepts_argument, instantiate, target_of
from experiments.models_from_config import LoadedModels, drafter_paths
from experiments.overrides import group_choice, in_multirun, task_overrides
from specdec.errors import ConfigError, positive_int


def build_drafter(drafter: DictConfig, models: LoadedModels, tree: Any = None) -> Any:
    """Instantiate the drafter; a drafter with a ``model`` argument gets the model config's draft model, one with a
    ``tokenizer`` argument the run's tokenizer, a ``draft: zoo:<size>/<role>`` the embedded model's directory.

    ``tree`` is the composed ``tree`` group (``{paths: [...]}``; None or ``{paths: null}`` for no
    tree); its paths reach the drafter as ``tree=`` (a hybrid's second part, under ``drafter=hybrid``).
    """
    kwargs = tree_argument(drafter, tree)
    part = tree_part(drafter) if kwargs else None  # a hybrid: the tree is its second part's
    parts = drafter_parts(drafter)
    if parts or part:
        drafter = copy.deepcopy(drafter)  # the caller's config is left as it was
        with open_dict(drafter):
            if part:
                drafter[part].tree = kwargs.pop("tree")
            # a hybrid: each part gets what it needs as a drafter of its own would (built attached: interpolations
            # resolve in the run's config)
            for name in parts:
                with part_errors(name):
                    kwargs[name] = build_drafter(drafter[name], models)
            for name in parts:
                del drafter[name]
    kwargs.update(drafter_paths(drafter))
    if accepts_argument(drafter, "tokenizer", "drafter") and drafter.get("tokenizer") is None:
        kwargs["tokenizer"] = models.tokenizer  # a drafter that reads text gets the run's
    if not accepts_argument(drafter, "model", "drafter"):
        return instantiate(drafter, "drafter", **kwargs)
    if models.draft is None:
        hint = models.info.get("draft_missing") or "set model.draft=<path> (model=hf)"
        raise ConfigError(
            f"drafter {drafter._target_} needs a draft model, but the model config has none; "
            f"{hint}, or pick another drafter (drafter=ngram)"
        )
    return instantiate(drafter, "drafter", model=models.draft, **kwargs)


def check_drafter_files(drafter: DictConfig) -> None:
    """Before any model loads: the checkpoint a drafter loads itself (``draft``) and the files its class checks
    (:meth:`specdec.drafting.Drafter.check_files`: Medusa and EAGLE heads, an n-gram datastore) exist, a
    hybrid's parts' too, each error naming the setting at its place in the config."""
    from specdec.drafting import Drafter

    for name, node in {"": drafter, **drafter_parts(drafter)}.items():
        with part_errors(name) if name else contextlib.nullcontext():
            drafter_paths(node, build=False)
            cls = target_of(node, "drafter") if node.get("_target_") else None
            if isinstance(cls, type) and issubclass(cls, Drafter):
                cls.check_files(node)


def drafter_parts(drafter: DictConfig) -> dict[str, DictConfig]:
    """The parts of a drafter made of drafters (``first`` and ``second`` of :class:`drafters.HybridDrafter` or a
    subclass of it, a plugin's included): the config nodes that name a ``_target_`` of their own; ``{}`` for any
    other drafter (another plugin's ``first`` may be anything: Hydra builds it as the config gives it)."""
    from drafters import HybridDrafter

    target = target_of(drafter, "drafter") if drafter.get("_target_") else None
    if not (isinstance(target, type) and issubclass(target, HybridDrafter)):
        return {}
    return {name: drafter[name] for name in ("first", "second")
            if isinstance(drafter.get(name), DictConfig) and drafter[name].get("_target_")}


#: The drafters' counts (True: null allowed), checked before any model is built or loaded (the drafters check them
#: again when they are built, after the models).
DRAFTER_COUNTS = {"num_speculative_tokens": False, "top_k_children": False, "budget": True, "layers": True,
                  "tree_nodes": False, "num_heads": True, "max_ngram": False, "min_ngram": False, "min_drafts": False,
                  "draft_tokens": True}


def check_choices(node: Mapping, path: str, grows_tree: bool) -> None:
    """A drafter's settings with a fixed set of values, each by the check its drafter runs when it is built
    (:class:`~specdec.errors.SpecDecError` naming ``path.key``); ``grows_tree``: the drafter is given a tree."""
    from drafters.eagle_heads import check_version
    from drafters.ngram import check_ngram_sizes
    from drafters.tree_drafter import check_tree_sampling, confidence_threshold_of
    from specdec.models import check_dtype_choice

    if "tree_sampling" in node:
        check_tree_sampling(node.tree_sampling, f"{path}.tree_sampling")
    if "confidence_threshold" in node:
        chain = not grows_tree and node.get("budget") is None
        confidence_threshold_of(node.confidence_threshold, chain, f"{path}.confidence_threshold")
    if "dtype" in node:
        check_dtype_choice(node.dtype, f"{path}.dtype")
    if str(node.get("_target_")).endswith("EagleDrafter") and node.get("version") is not None:
        check_version(node.version, f"{path}.version")
    if "min_ngram" in node and "max_ngram" in node:
        check_ngram_sizes(node.min_ngram, node.max_ngram, where=f"{path}.")


def check_before_loading(cfg: DictConfig) -> None:
    """``max_new_tokens`` and the drafter's counts (:data:`DRAFTER_COUNTS`, its parts' too: a hybrid's ``first`` and
    ``second``) are integers >= 1 and its choices known (:func:`check_choices`), else an error naming the key. Only
    this package's drafters (``_target_: drafters....``) are checked: a plugin's keys of the same names may mean
    something else."""
    positive_int(cfg.max_new_tokens, "max_new_tokens")
    grower = None  # the path of the drafter given a tree, if any
    if tree_given(cfg.get("tree")):
        part = tree_part(cfg.drafter)
        grower = "drafter" if part is None else f"drafter.{part}"
    nodes = [("drafter", cfg.drafter)]
    while nodes:
        path, node = nodes.pop()
        ours = str(node.get("_target_") or "").startswith("drafters.")
        for key, value in node.items():
            if isinstance(value, Mapping):
                nodes.append((f"{path}.{key}", value))
            elif ours and key in DRAFTER_COUNTS:
                positive_int(value, f"{path}.{key}", allow_none=DRAFTER_COUNTS[key])
        if ours:
            check_choices(node, path, grows_tree=path == grower)


def tree_given(tree: Any) -> bool:
    """Whether the composed ``tree`` group gives a tree (not ``tree=null`` nor ``tree=none``)."""
    return tree is not None and not (isinstance(tree, Mapping) and "paths" in tree and tree["paths"] is None)


def tree_part(drafter: Mapping) -> str | None:
    """Which part of ``drafter`` a tree goes to: None for the drafter itself (it takes a ``tree``), else
    ``"second"`` (a hybrid's part that grows trees)."""
    return None if accepts_argument(drafter, "tree", "drafter") else "second"


def tree_argument(drafter: DictConfig, tree: Any) -> dict:
    """``{"tree": paths}`` from the ``tree`` config group (checked to be a tree), ``{}`` for none."""
    from specdec.tree import load_preset, paths_entry

    if not tree_given(tree):
        return {}  # tree=null, or tree=none (for sweeps)
    part = tree_part(drafter)
    grower = drafter if part is None else drafter.get(part)
    if not isinstance(grower, Mapping) or not accepts_argument(grower, "tree", "drafter"):
        raise ConfigError(f"tree=... needs a drafter that grows token trees, one with a tree argument (drafter="
                          f"draft_model, eagle, medusa, or hybrid with such a second part); {drafter._target_} takes no "
                          "tree: drop the tree override")
    edits = [o for o in task_overrides() if o.lstrip("+~").startswith("tree.")]  # tree=none 'tree.paths=[...]'
    choice = f"tree={group_choice('tree') or '...'}"
    where = f"{choice} with {' '.join(edits)}" if edits else f"the file of {choice}"
    if not isinstance(tree, Mapping):  # a bare list or a scalar: raises, saying what a tree file looks like
        paths_entry(OmegaConf.to_container(tree) if isinstance(tree, ListConfig) else tree, where)
    paths = load_preset(tree, name=where)
    _check_no_chain_length(f"drafter.{part}" if part else "drafter", choice, max(map(len, paths)))
    return {"tree": paths}


def _check_no_chain_length(path: str, choice: str, depth: int) -> None:
    """A chain length given on the command line where a tree preset shapes the draft: an error in a single run (it
    was ignored silently), a warning in a sweep's job (a grid over trees and k holds such jobs: they run the tree)."""
    key = f"{path}.num_speculative_tokens"
    if not (given := [o for o in task_overrides() if o.lstrip("+~").split("=", 1)[0] == key]):
        return
    said = f"{given[0]} has no effect with {choice}: the tree's paths shape the draft ({depth} deep)"
    if in_multirun():
        print(f"warning: {said}; this job decodes the tree, as do its siblings that differ only in {key}",
              file=sys.stderr)
        return
    raise ConfigError(f"{said}; drop it, or give tree=none for a chain of that length (with {path}.budget=<nodes>: a "
                      "dynamic tree that deep)")
