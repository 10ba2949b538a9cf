"""EAGLE draft heads (Li et al., arXiv 2401.15077, 2406.16858, 2503.01840): one decoder layer on the target's features.

The head's slot ``s`` reads the pair (feature ``f_s``, token ``t_{s+1}``): the target's feature
at position ``s`` goes with the *next* token. It computes ``fc(cat(embed(t_{s+1}), f_s))`` (2h -> h;
the embedding is the target's, frozen), runs one decoder layer of the target's own architecture
and the final norm. Its output is the head's prediction of
the next feature ``f_{s+1}``, and its LM head gives the distribution of ``t_{s+2}``. Drafting deeper
feeds each output back in as the next feature.

- ``eagle2`` (EAGLE-1/2): ``f_s`` is the target's last hidden state after its final norm; the LM
  head is the target's (frozen). Trained by feature regression plus cross-entropy.
- ``eagle3`` (EAGLE-3): ``f_s`` is ``fuse(cat(l_s, m_s, h_s))`` (3h -> h) over the outputs of three
  target decoder layers (low, middle, high: :func:`default_feature_layers`), read with forward hooks
  (:class:`FeatureTap`); embedding and feature are each RMS-normalised before ``fc``; the head has
  its own LM head (initialised from the target's). Trained with a training-time test.

Two departures from EAGLE: the decoder layer keeps its input norm, and (EAGLE-3) its attention does
not take the 2h concatenation directly: ``fc`` projects it to h first. So the layer is the target's
unmodified decoder layer class, and a new head can start as a copy of the target's first layer on
the token alone (``init="target"``, how the embedded draft model starts too).

On disk: ``eagle_head.safetensors`` (the head's own tensors; the target's embedding and, for
eagle2, its LM head are not copied), ``eagle_config.json`` (version, feature layers, the one-layer
model config, the target's fingerprint) and ``eval.json`` (held-out acceptance by depth).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from drafters.draft_vocab import DraftVocabHead, check_ids
from drafters.head_files import (
    HEADS_OPTION,
    HeadFormat,
    cache_root,
    load_into,
    read_config,
    save_files,
    target_fingerprint,
    target_options,
)
from drafters.head_files import check_target as check_heads_target
from specdec.errors import SpecDecError
from specdec.models import cast_module, text_config

VERSIONS = ("eagle2", "eagle3")
TRAIN_COMMAND = "python -m experiments.train_eagle"


class EagleHeadError(SpecDecError):
    """An EAGLE head is missing, incomplete, of the wrong version, or does not belong to the target."""


FILES = HeadFormat(label="EAGLE heads", weights_file="eagle_head.safetensors", config_file="eagle_config.json",
                   format=1, train_command=TRAIN_COMMAND, error=EagleHeadError,
                   required=("version", "hidden_size", "vocab_size", "feature_layers", "layer_config"))


def check_version(version, what: str = "version") -> str:
    if version not in VERSIONS:
        raise EagleHeadError(f"{what}={version!r} is unknown; choose one of {list(VERSIONS)}")
    return version


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers (outputs of decoder layers, 0-based): 1, the middle, L - 2; clamped
    and sorted for shallow targets. The reference code taps the hidden states entering layers 2, L/2 and L-3 (the
    outputs of 1, L/2 - 1 and L - 4): the high layer here is two nearer the top. A head records the layers it was
    trained on (``feature_layers``), so this default only picks them for a new head."""
    low = min(1, num_layers - 1)
    high = max(low, num_layers - 2)
    return [low, (low + high) // 2, high]


def decoder_layers(target) -> nn.ModuleList:
    """The target's list of decoder layers (``get_decoder().layers``); EagleHeadError if it has none."""
    layers = getattr(target.get_decoder(), "layers", None) if hasattr(target, "get_decoder") else None
    if not isinstance(layers, nn.ModuleList):
        raise EagleHeadError(f"{type(target).__name__} has no get_decoder().layers: EAGLE-3 reads features from the "
                             "target's decoder layers; use version=eagle2 (last hidden state) with this model")
    return layers


class FeatureTap:
    """Forward hooks on some of a target's decoder layers that keep each one's latest output.

    EAGLE-3 reads its features with it (during decoding and training alike): after a target forward,
    :meth:`take` returns the captured outputs concatenated in ``layers`` order, ``[B, n, len(layers) * H]``.
    """

    def __init__(self, target, layers: list[int]):
        modules = decoder_layers(target)
        bad = [i for i in layers if not 0 <= i < len(modules)]
        if bad:
            raise EagleHeadError(f"feature layers {bad} are outside the target's {len(modules)} decoder layers; the "
                                 f"head was made for a deeper target: {FILES.retrain()}")
        self.target, self.layers = target, list(layers)
        self.captured: dict[int, torch.Tensor] = {}
        self.handles = [modules[i].register_forward_hook(self._hook(i)) for i in sorted(set(layers))]

    def _hook(self, index: int):
        def hook(module, args, output):
            self.captured[index] = output[0] if isinstance(output, tuple) else output  # [B, n, H]
        return hook

    def take(self) -> torch.Tensor:
        """The last forward's features ``[B, n, len(layers) * H]``; forgets them (a stale read is an error)."""
        if any(i not in self.captured for i in self.layers):
            raise RuntimeError("FeatureTap.take(): no target forward since the last read")
        out = torch.cat([self.captured[i] for i in self.layers], dim=-1)
        self.captured.clear()
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.captured = [], {}


class TargetModule(nn.Module):
    """Calls a module of the target without owning it: not a parameter of the head, not saved, not trained."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        object.__setattr__(self, "ref", None)

    def bind(self, module: nn.Module) -> None:
        object.__setattr__(self, "ref", module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ref is None:
            raise RuntimeError(f"EAGLE head used before bind(target): it has no {self.what}")
        weight = getattr(self.ref, "weight", None)
        if x.is_floating_point() and weight is not None and x.dtype != weight.dtype:  # a head in another dtype
            x = x.to(weight.dtype)
        return self.ref(x)


class FeatureInput(nn.Module):
    """The head's input layer: ``fc(cat(embed(token), feature))``, the features set per forward by
    :meth:`EagleHead.inputs` (it stands where the one-layer model's token embedding was)."""

    def __init__(self, hidden_size: int, version: str, eps: float):
        super().__init__()
        self.embed = TargetModule("input embedding")
        self.fc = nn.Linear(2 * hidden_size, hidden_size)
        self.norms = version == "eagle3"
        if self.norms:
            self.embed_norm = nn.RMSNorm(hidden_size, eps=eps)
            self.feature_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.features: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        feats = self.features
        if feats is None or feats.shape[:-1] != input_ids.shape:
            got = None if feats is None else tuple(feats.shape)
            raise RuntimeError(f"EAGLE head forward needs one feature per token: ids {tuple(input_ids.shape)}, "
                               f"features {got}; run it inside `with head.inputs(features):`")
        return self.combine(input_ids, feats)

    def combine(self, input_ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``fc(cat(embed(input_ids), feats))`` ``[B, n, H]`` for ``input_ids [B, n]`` and ``feats [B, n, H]``."""
        emb = self.embed(input_ids).to(self.fc.weight.dtype)  # [B, n, H] (the target's embedding, in the head's dtype)
        feats = feats.to(emb.dtype)
        if self.norms:
            emb, feats = self.embed_norm(emb), self.feature_norm(feats)
        return self.fc(torch.cat([emb, feats], dim=-1))  # [B, n, H]


def layer_config(target) -> dict:
    """The one-layer model config of a head for ``target``: its text config with one layer, untied."""
    config = text_config(target).to_dict()
    config.pop("layer_types", None)  # per-layer lists are rebuilt for one layer
    for key in ("architectures", "_name_or_path", "auto_map", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    return {**config, "num_hidden_layers": 1, "tie_word_embeddings": False, "use_cache": True}


class EagleHead(nn.Module):
    """An EAGLE head: feature fusion, one decoder layer of the target's architecture, an LM head.

    Args:
        layer_config: the one-layer model's config (:func:`layer_config`; ``model_type`` included).
        version: ``eagle2`` or ``eagle3``.
        feature_layers: eagle3: the target decoder layers whose outputs are fused; eagle2: None.
        target: the target's fingerprint (:func:`drafters.head_files.target_fingerprint`), if known.
        source: where the head was loaded from (for messages).
        draft_vocab: 0, or the size of a draft vocabulary (:mod:`drafters.draft_vocab`): the LM head
            scores only those tokens (eagle2: rows of the target's LM head; eagle3: its own rows).
    """

    def __init__(self, layer_config: dict, version: str, feature_layers: list[int] | None = None,
                 target: dict | None = None, source: str | None = None, draft_vocab: int = 0):
        from transformers import AutoConfig, AutoModelForCausalLM

        super().__init__()
        self.version = check_version(version)
        settings = dict(layer_config)
        model_type = settings.pop("model_type", None)
        try:
            config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, KeyError, TypeError) as exc:
            raise EagleHeadError(f"EAGLE head config names model_type={model_type!r}, which transformers cannot "
                                 f"build ({exc}); {FILES.retrain()}") from exc
        self.layer_config = {"model_type": model_type, **settings}
        self.hidden_size, self.vocab_size = int(config.hidden_size), int(config.vocab_size)
        self.feature_layers = list(feature_layers or []) if version == "eagle3" else []
        if version == "eagle3" and len(self.feature_layers) != 3:
            raise EagleHeadError(f"an eagle3 head fuses three target layers, got feature_layers={feature_layers}")
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.model.set_input_embeddings(FeatureInput(self.hidden_size, version, eps))
        if version == "eagle3":
            self.fuse = nn.Linear(3 * self.hidden_size, self.hidden_size, bias=False)
        if draft_vocab:
            self.model.lm_head = DraftVocabHead(self.vocab_size, int(draft_vocab), self.hidden_size,
                                                trainable=version == "eagle3")
        elif version == "eagle2":
            self.model.lm_head = TargetModule("LM head")  # the target's own, frozen
        self.target_info = dict(target or {})
        self.source = source

    @property
    def input(self) -> FeatureInput:
        """The input layer (registered once, as the one-layer model's input embedding)."""
        return self.model.get_input_embeddings()

    # ----------------------------------------------------------------- building and binding

    @property
    def draft_vocab(self) -> int:
        """The draft vocabulary's size (0: the whole vocabulary)."""
        head = self.model.lm_head
        return head.size if isinstance(head, DraftVocabHead) else 0

    @classmethod
    def for_target(cls, target, version: str = "eagle2", feature_layers: list[int] | None = None,
                   seed: int = 0, init: str = "target", draft_vocab: torch.Tensor | None = None) -> EagleHead:
        """A new (untrained) head for ``target``, bound to it; an eagle3 LM head starts as the target's copy.
        ``draft_vocab``: ids ``[Vd]`` of a draft vocabulary (:func:`drafters.draft_vocab.frequent_tokens`), or None.

        ``init="target"``: the decoder layer and final norm start as copies of the target's first layer
        and final norm, and ``fc`` passes the token embedding only, so the untrained head is the target
        cut to one layer (the embedded draft model's start); ``init="random"``: transformers' init.
        """
        if init not in ("target", "random"):
            raise EagleHeadError(f"init={init!r}: use 'target' or 'random'")
        torch.manual_seed(seed)
        layers = text_config(target).num_hidden_layers
        if version == "eagle3" and feature_layers is None:
            feature_layers = default_feature_layers(layers)
        head = cls(layer_config(target), version, feature_layers, target=target_fingerprint(target))
        with torch.no_grad():
            if version == "eagle3":
                head.model.lm_head.weight.copy_(target.get_output_embeddings().weight.detach().float().cpu())
            if init == "target":
                head._copy_first_layer(target)
        head.bind(target)
        return head.use_draft_vocab(draft_vocab) if draft_vocab is not None else head

    def use_draft_vocab(self, ids: torch.Tensor) -> EagleHead:
        """From now on score only the tokens ``ids [Vd]`` (:mod:`drafters.draft_vocab`; also training-free,
        on a trained head): eagle3 keeps its own LM head's rows, eagle2 the target's (bound)."""
        old = self.model.lm_head
        if isinstance(old, DraftVocabHead):
            raise EagleHeadError("this head already drafts over a draft vocabulary")
        own = isinstance(old, nn.Linear)  # eagle3's own rows; eagle2 reads the target's (None until bound)
        weight = old.weight if own else (old.ref.weight if old.ref is not None else None)  # [V, H]
        try:
            self.model.lm_head = DraftVocabHead.over(ids, self.vocab_size, self.hidden_size, weight, trainable=own)
        except ValueError as exc:
            raise EagleHeadError(str(exc)) from exc
        return self

    def _copy_first_layer(self, target) -> None:
        """Decoder layer 0 and the final norm from ``target``; ``fc`` = [I | 0] (token embedding only)."""
        mine, theirs = self.model.get_decoder(), target.get_decoder()
        state = {k: v.detach().float().cpu() for k, v in theirs.layers[0].state_dict().items()}
        mine.layers[0].load_state_dict(state)
        mine.norm.load_state_dict({k: v.detach().float().cpu() for k, v in theirs.norm.state_dict().items()})
        h = self.hidden_size
        self.input.fc.weight.zero_()
        self.input.fc.weight[:, :h] = torch.eye(h)
        self.input.fc.bias.zero_()

    def bind(self, target, dtype: torch.dtype | None = None) -> EagleHead:
        """Use ``target``'s embedding (and, for eagle2, its LM head); move to its device and to ``dtype``
        (None: the target's). The target's modules keep their dtype: their inputs and outputs are cast."""
        self.input.embed.bind(target.get_input_embeddings())
        lm_head, weight = self.model.lm_head, target.get_output_embeddings().weight
        dtype = dtype or weight.dtype
        if isinstance(lm_head, TargetModule):
            lm_head.bind(target.get_output_embeddings())
        elif isinstance(lm_head, DraftVocabHead) and lm_head.weight is None:
            lm_head.bind_rows(weight)  # eagle2: the target's rows for the draft vocabulary (a buffer, cast below)
        return self._move(weight.device, dtype)

    def _move(self, device: torch.device, dtype: torch.dtype) -> EagleHead:
        """``self.to(device, dtype)``, the rotary frequencies kept float32 (:func:`specdec.models.cast_module`)."""
        return cast_module(self, dtype, device)

    def check_target(self, target) -> None:
        """Raise :class:`EagleHeadError` unless this head was trained for ``target``."""
        check_heads_target(FILES, self.hidden_size, self.vocab_size, self.target_info, self.source, target)

    def config(self) -> dict:
        """The ``eagle_config.json`` content (without training details)."""
        return {"version": self.version, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "feature_layers": self.feature_layers, "layer_config": self.layer_config, "target": self.target_info,
                "draft_vocab": self.draft_vocab}

    # ----------------------------------------------------------------- running

    def tap(self, target) -> FeatureTap | None:
        """eagle3: hooks on ``target``'s feature layers; eagle2: None (the verifier returns its features)."""
        return FeatureTap(target, self.feature_layers) if self.version == "eagle3" else None

    def target_features(self, raw: torch.Tensor) -> torch.Tensor:
        """The head's feature ``[..., H]`` from the target's: eagle2 as is, eagle3 fused from ``[..., 3H]``."""
        dtype = next(self.parameters()).dtype
        return self.fuse(raw.to(dtype)) if self.version == "eagle3" else raw.to(dtype)

    @contextmanager
    def inputs(self, features: torch.Tensor):
        """Within the block, the one-layer model reads ``features [B, n, H]`` with its ``input_ids [B, n]``."""
        self.input.features = features
        try:
            yield self.model
        finally:
            self.input.features = None

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, n, V], output features [B, n, H])`` for pairs ``(features [B, n, H], input_ids [B, n])``;
        ``kwargs`` go to the one-layer model (position ids, cache, attention arguments)."""
        with self.inputs(features) as model:
            out = model(input_ids=input_ids, output_hidden_states=True, **kwargs)
        return out.logits, out.hidden_states[-1]


# --------------------------------------------------------------------------- files


def default_heads_dir(version: str = "eagle2", zoo_size: str = "default",
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``experiments.train_eagle`` puts the embedded pair's heads: ``<cache>/eagle/<version>-zoo-<size>``."""
    return cache_root(cache_dir) / "eagle" / f"{version}-zoo-{zoo_size}"


def how_to_train(version: str = "eagle2") -> str:
    return (f"`{TRAIN_COMMAND} version={version}` (the embedded default target, about 15 minutes on 2 CPU cores; "
            f"`zoo_size=micro` or `target=<dir>` for others)")


def save_head(head: EagleHead, directory: str | os.PathLike, training: dict | None = None,
              evaluation: dict | None = None) -> Path:
    """Write ``head`` (its own tensors, float32) and its config to ``directory``, atomically file by file."""
    return save_files(FILES, head, {**head.config(), "training": training or {}}, directory, evaluation)


def read_config_of(directory: str | os.PathLike) -> dict:
    """The parsed ``eagle_config.json`` of a head directory (:class:`EagleHeadError` if absent or bad)."""
    return read_config(FILES, Path(directory).expanduser(), how_to_train())


def load_head(directory: str | os.PathLike, version: str | None = None) -> EagleHead:
    """Load the head saved in ``directory`` (unbound: :meth:`EagleHead.bind` it to its target).

    Raises:
        EagleHeadError: the directory, config or tensor file is missing or unreadable, a tensor is
            missing or of the wrong shape, or ``version`` is given and differs from the head's.
    """
    directory = Path(directory).expanduser()
    config = read_config(FILES, directory, how_to_train(version or "eagle2"))
    trained = config["version"]
    if trained not in VERSIONS:
        raise EagleHeadError(f"{directory / FILES.config_file} says version={trained!r}; {FILES.retrain()}")
    if version is not None and check_version(version, "drafter.version") != trained:
        raise EagleHeadError(
            f"drafter.version={version} but the head at {str(directory)!r} is an {trained} head: set "
            f"drafter.version={trained}, or train an {version} head with `{TRAIN_COMMAND} version={version}"
            f"{target_options(config.get('training') or {})}` and pass its directory as {HEADS_OPTION}")
    head = EagleHead(config["layer_config"], trained, config.get("feature_layers"), target=config.get("target"),
                     source=str(directory), draft_vocab=int(config.get("draft_vocab") or 0))
    note = f"an {trained} head of hidden size {config['hidden_size']}"
    load_into(FILES, head, directory, note + (f", a {head.draft_vocab}-token draft vocabulary" if head.draft_vocab
                                              else ""), how_to_train(trained))
    if head.draft_vocab and (problem := check_ids(head.model.lm_head.ids, head.vocab_size)):
        raise EagleHeadError(f"{directory / FILES.weights_file}: {problem}; {FILES.retrain()}")
    return head
