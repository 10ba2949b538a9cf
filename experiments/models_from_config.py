"""Resolve a ``model`` config to loaded models and a tokenizer.

A model config names a target and its default draft model, so ``drafter=draft_model``
needs no further argument. Sources:

- ``tiny_random``: a small random pair built in memory (``specdec.models.tiny_random_pair``).
- ``hf``: any Hugging Face causal LM directory or hub id (``target``, optional ``draft``).
- ``zoo``: the embedded standard-library pair, built and cached by ``experiments.zoo``.
- ``pretrained``: a real model fetched through the package index and converted once
  (``experiments.pretrained``, e.g. ``model=smollm2``), with its distilled draft if that was built
  (``experiments.build_draft``).

The tokenizer comes from the target (the pair's for ``tiny_random`` and ``zoo``), or from
``model.tokenizer`` for ``hf`` when the target directory holds none.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from specdec.errors import ConfigError

SOURCES = ("tiny_random", "hf", "zoo", "pretrained")


@dataclass
class LoadedModels:
    """A target model, its default draft model (or None) and the target's tokenizer."""

    target: Any
    draft: Any | None
    tokenizer: Any
    info: dict = field(default_factory=dict)  # what was loaded, for the summary


def load_models(cfg: DictConfig | dict) -> LoadedModels:
    """Load the target, the draft model and the tokenizer that the ``model`` config names.

    ``narrow_linears`` (``auto``: float32 on the CPU; ``on``; ``off``; or a product, ``packed`` / ``transposed``)
    switches the models' linears to :class:`verifier.narrow_linear.NarrowLinear`, which makes multi-row verify
    forwards cheaper on the CPU; ``info["narrow_linears"]`` records the product used (``packed``,
    ``transposed``) or ``off``. ``fuse_projections`` (default false) fuses the models' q/k/v and gate/up
    projections into one product each (:mod:`verifier.fused_projections`; for GPUs).

    Raises:
        ConfigError: unknown ``source``, a missing required key, a wrong ``narrow_linears`` or
            ``fuse_projections``, or a target without projections to fuse.
        SpecDecError: a model path does not exist or cannot be loaded (from ``specdec.models``).
    """
    from verifier.narrow_linear import narrow_mode, narrow_models

    narrow = narrow_mode(cfg.get("narrow_linears", "auto"))  # checked before any load
    fuse = cfg.get("fuse_projections", False)
    if not isinstance(fuse, bool):
        raise ConfigError(f"model.fuse_projections={fuse!r}: use true or false")
    loaded = _load(cfg)
    loaded.info["narrow_linears"] = narrow_models([loaded.target, loaded.draft], narrow)
    if fuse:
        _fuse(loaded)
    return loaded


def _fuse(loaded: LoadedModels) -> None:
    """``model.fuse_projections=true``: the target's (and the draft model's) projections fused in place."""
    from verifier.fused_projections import fuse_projections

    if not fuse_projections(loaded.target):
        raise ConfigError(f"model.fuse_projections=true: the target ({type(loaded.target).__name__}) has no layers with "
                          "q/k/v or gate/up linears to fuse: set model.fuse_projections=false")
    if loaded.draft is not None:
        fuse_projections(loaded.draft)
    loaded.info["fuse_projections"] = True


def _load(cfg: DictConfig | dict) -> LoadedModels:
    source = cfg.get("source")
    if source == "tiny_random":
        return _tiny_random(cfg)
    if source == "hf":
        return _from_dirs(cfg, target=_required(cfg, "target"), draft=cfg.get("draft"), tokenizer=cfg.get("tokenizer"))
    if source == "zoo":
        return _from_zoo(cfg)
    if source == "pretrained":
        return _from_pretrained(cfg)
    raise ConfigError(f"model.source={source!r} is unknown; use one of {SOURCES}")


def _tiny_random(cfg: DictConfig | dict) -> LoadedModels:
    from specdec.models import check_device, tiny_random_pair

    arch, device = cfg.get("arch", "llama"), check_device(cfg.get("device", "cpu"))
    target, draft, tokenizer = tiny_random_pair(arch=arch, seed=int(cfg.get("seed", 0)))
    return LoadedModels(target.to(device), draft.to(device), tokenizer,
                        info={"source": "tiny_random", "arch": arch, "device": str(device)})


def _from_zoo(cfg: DictConfig | dict) -> LoadedModels:
    from experiments.zoo import ensure_pair  # written separately; imported only when used

    pair = ensure_pair(size=cfg.get("size", "default"), cache_dir=cfg.get("cache_dir"))
    return _from_dirs(cfg, target=str(pair.target_dir), draft=str(pair.draft_dir), tokenizer=str(pair.tokenizer_dir))


def _from_pretrained(cfg: DictConfig | dict) -> LoadedModels:
    """A converted real model (fetched on first use unless ``fetch=false``) and, with ``draft=distilled``,
    its distilled draft if it was built (else no draft, and a drafter that needs one names the build command)."""
    from experiments.pretrained import ensure_model

    name = _required(cfg, "name")
    target = str(ensure_model(name, cache_dir=cfg.get("cache_dir"), fetch=bool(cfg.get("fetch", True))))
    draft, hint = cfg.get("draft"), None
    if draft == "distilled":
        from experiments.draft_training import find_draft

        draft, hint = find_draft(name, cfg.get("cache_dir"))
    loaded = _from_dirs(cfg, target=target, draft=draft, tokenizer=None)
    loaded.info["name"] = name
    if hint:
        loaded.info["draft_missing"] = hint
    return loaded


def check_dtypes(cfg: DictConfig | dict) -> None:
    """``model.dtype`` and ``model.draft_dtype`` are known choices, else one error naming the key: checked before
    anything is built or loaded (on a fresh machine the default pair's build would come first: minutes)."""
    from specdec.models import DTYPES, check_dtype_choice

    if cfg.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.get('dtype')!r} is unknown; choose one of {sorted(DTYPES)}")
    check_dtype_choice(cfg.get("draft_dtype"), "model.draft_dtype")


def _from_dirs(cfg: DictConfig | dict, target: str, draft: str | None, tokenizer: str | None) -> LoadedModels:
    """Load a target (and a draft model) with ``from_pretrained``; the tokenizer defaults to the target's."""
    from drafters.vocab_padding import matched_draft
    from specdec.checkpoints import RemoteCodeError
    from specdec.models import (
        auto_dtype,
        cast_module,
        check_checkpoint_dir,
        load_causal_lm,
        load_tokenizer,
        resolve_draft_dtype,
        vocab_size,
    )

    trust = bool(cfg.get("trust_remote_code", False))
    opts = {"dtype": cfg.get("dtype", "float32"), "device": cfg.get("device", "cpu"), "trust_remote_code": trust}
    device_map = cfg.get("device_map")  # e.g. "auto": the target spread over the visible devices (needs accelerate)
    draft_dtype = resolve_draft_dtype(cfg.get("draft_dtype"), opts["dtype"], opts["device"])  # checked before any load
    for path, key in ((target, "model.target"), (draft, "model.draft")):  # named by their keys, before any load
        if path:
            check_checkpoint_dir(str(path), key)
    try:
        tok = load_tokenizer(tokenizer or target, trust_remote_code=trust, elsewhere="model.tokenizer")  # small: first
        target_model = load_causal_lm(target, **opts, device_map=device_map, role="target")
        draft_model = load_causal_lm(draft, **{**opts, "dtype": draft_dtype}, role="draft") if draft else None
        if draft_model is not None and cfg.get("draft_dtype") == "auto":  # a CPU: bf16 only if measured faster
            draft_model = cast_module(draft_model, auto_dtype(draft_model, opts["device"], draft_model.dtype))
            draft_dtype = str(draft_model.dtype).removeprefix("torch.")  # before padding: its LM head is timed too
        sizes = {"draft": vocab_size(draft_model), "target": vocab_size(target_model)} if draft_model is not None else {}
        draft_model, note = matched_draft(target_model, draft_model, tok, draft, trust) if sizes else (None, None)
    except RemoteCodeError as err:  # name our config key, not the Python argument
        raise ConfigError(err.message("model.trust_remote_code=true")) from err
    info = {"source": cfg.get("source"), "target": target, "draft": draft, "dtype": opts["dtype"],
            "draft_dtype": draft_dtype if draft else None, "device": opts["device"], "device_map": device_map}
    if note:
        print(note, file=sys.stderr)
        info["draft_vocab_padded"] = sizes  # the LM heads' rows
    return LoadedModels(target_model, draft_model, tok, info=info)


def target_device(cfg: DictConfig | dict) -> str:
    """The device type the target will run on, from the model config alone (before anything loads)."""
    import torch

    if cfg.get("device_map") is not None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(cfg.get("device") or "cpu")


def _required(cfg: DictConfig | dict, key: str) -> Any:
    value = cfg.get(key)
    if value in (None, "", "???"):
        raise ConfigError(f"model.{key} is required for model.source={cfg.get('source')!r}; pass model.{key}=<path or hub id>")
    return value


def drafter_paths(drafter: DictConfig | dict, build: bool = True) -> dict:
    """A drafter's ``draft: zoo:<size>/<target|draft>`` (an embedded model, built on first use) as its directory, with
    ``draft_tokenizer`` the pair's tokenizer unless set; ``{}`` for any other value (or a plugin's drafter).
    ``build=False`` only checks the values (a directory given as ``draft`` holds a saved model, a local
    ``draft_tokenizer`` exists), before any model loads."""
    from specdec.models import TOKENIZER_HOLDS, check_checkpoint_dir, check_path

    spec = drafter.get("draft")
    if not isinstance(spec, str) or not str(drafter.get("_target_") or "").startswith("drafters."):
        return {}  # a plugin's key of that name may mean something else
    if isinstance(drafter.get("draft_tokenizer"), str):
        check_path(drafter.draft_tokenizer, "drafter.draft_tokenizer", holds=TOKENIZER_HOLDS)
    if not spec.startswith("zoo:"):
        check_checkpoint_dir(spec, "drafter.draft")
        return {}
    from experiments.zoo import ensure_pair
    from experiments.zoo.sizes import SIZES

    size, _, role = spec.removeprefix("zoo:").partition("/")
    if size not in SIZES or role not in ("target", "draft"):
        raise ConfigError(f"drafter.draft={spec!r}: write zoo:<size>/target or zoo:<size>/draft with a size of "
                          f"{sorted(SIZES)} (e.g. zoo:default/draft), or a checkpoint directory")
    if not build:
        return {}
    pair = ensure_pair(size=size)
    return {"draft": pair.target_dir if role == "target" else pair.draft_dir,
            "draft_tokenizer": drafter.get("draft_tokenizer") or pair.tokenizer_dir}
