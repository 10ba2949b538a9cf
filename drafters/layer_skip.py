"""Layer-skip self-drafting: the target's first N layers, its final norm and its LM head as the draft model.

A training-free baseline (early exit, as in LayerSkip / Draft & Verify): the draft is a view of the
target that *shares* its weights (embeddings, the first ``layers`` decoder layers, final norm, LM
head: the same tensors, see :func:`truncated_view`); no weight is copied. It keeps its own KV cache of those N layers and drafts a chain exactly
like :class:`drafters.DraftModelDrafter` (greedy argmax, or samples with recorded probabilities, so
``rejection`` stays lossless).

Supported: decoder-only models laid out as ``model.model.{embed_tokens, layers, norm, rotary_emb}`` +
``model.lm_head`` (Llama, Mistral, Qwen2/3, SmolLM, ...).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from drafters.draft_model import DraftModelDrafter
from drafters.tree_drafter import confidence_threshold_of, flag_of
from specdec.drafting import DraftContext, Drafter, StepShape
from specdec.errors import ConfigError, positive_int

_SHARED = ("embed_tokens", "norm", "rotary_emb")  # besides model.layers and lm_head


def default_layers(total: int) -> int:
    """The self-draft's layers when none are given: a fifth of the target's (6 of SmolLM2's 30), at least 1."""
    return max(1, total // 5)


def truncated_view(target: nn.Module, layers: int | None) -> nn.Module:
    """A causal LM of ``target``'s class running only its first ``layers`` layers (None:
    :func:`default_layers`), on the target's tensors.

    The view has its own modules and config (``num_hidden_layers = layers``: its own cache size, cost
    fingerprint and attention switch) but every parameter *is* the target's tensor (loaded with
    ``assign=True``: shared storage, nothing copied); the rotary embedding module is shared. Raises
    :class:`ConfigError` if ``target`` is not laid out as ``model.layers`` / ``model.norm`` /
    ``lm_head``, or has too few layers.
    """
    base = getattr(target, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList) or \
            not all(hasattr(base, name) for name in _SHARED) or getattr(target, "lm_head", None) is None:
        raise ConfigError(f"drafter=layer_skip needs a target laid out as model.layers / model.norm / lm_head "
                          f"(Llama, Mistral, Qwen2, SmolLM ...); {type(target).__name__} is not")
    total = len(base.layers)
    layers = default_layers(total) if layers is None else layers
    if layers >= total:
        raise ConfigError(f"drafter.layers={layers}: the target has {total} layers; a self-draft needs fewer: set "
                          f"drafter.layers between 1 and {total - 1}, e.g. drafter.layers={default_layers(total)}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:layers]
    with torch.device("meta"):
        view = type(target)(config)  # no memory: every tensor is the target's, assigned below

    def kept(key: str) -> bool:
        return not key.startswith("model.layers.") or int(key.split(".")[2]) < layers

    view.load_state_dict({k: v for k, v in target.state_dict().items() if kept(k)}, strict=False, assign=True)
    view.model.rotary_emb = base.rotary_emb  # its buffers are not in the state dict
    left = [n for n, t in list(view.named_parameters()) + list(view.named_buffers()) if t.is_meta]
    if left:
        raise ConfigError(f"drafter=layer_skip cannot share {left[:3]} of {type(target).__name__} with its "
                          "self-draft; use another drafter for this architecture")
    view.generation_config = target.generation_config
    return view.eval()


class LayerSkipDrafter(DraftModelDrafter):
    """Drafts a chain with the target's first ``layers`` layers (shared, not copied) and its head.

    Args:
        layers: decoder layers the draft runs (1 .. the target's layers - 1; None: a fifth of them, at least 1).
        num_speculative_tokens: chain length k.
        attn_backend: attention backend of the draft's forwards.
        target: bind to this target now (else on the first ``start`` / ``step_shape``).
        confidence_threshold: the chain ends after the first draft less likely than this (0: always k).
        fast_forward: run the view through :class:`drafters.fast_decoder.FastDecoder` (as a draft model).
    """

    name = "layer_skip"

    def __init__(self, layers: int | None = None, num_speculative_tokens: int = 4, attn_backend: str = "sdpa", target=None,
                 confidence_threshold: float = 0.0, fast_forward: bool = True):
        Drafter.__init__(self)
        self.fast_forward = flag_of(fast_forward, "drafter.fast_forward")
        self.layers = positive_int(layers, "drafter.layers", allow_none=True)
        self._k, self._backend, self._target_id = num_speculative_tokens, attn_backend, None
        self.confidence_threshold = confidence_threshold_of(confidence_threshold)
        self.model = None
        if target is not None:
            self.bind(target)

    def bind(self, target: nn.Module) -> None:
        """Build the shared view of ``target`` (once per target)."""
        if self._target_id == id(target):
            return
        super().__init__(truncated_view(target, self.layers), num_speculative_tokens=self._k,
                         attn_backend=self._backend, confidence_threshold=self.confidence_threshold,
                         fast_forward=self.fast_forward)
        self._target_id = id(target)

    @property
    def max_nodes(self) -> int:
        return self._k

    @property
    def mode(self) -> str:
        """Always ``chain`` (also before the view is built)."""
        return "chain"

    def context_length(self) -> int | None:
        """None: the view runs at the target's own positions (the target's context bounds the run)."""
        return None

    def step_shape(self, target) -> StepShape:
        """``k`` forwards of the N-layer view per step (it runs the full LM head each time)."""
        self.bind(target)
        return super().step_shape(target)

    def start(self, ctx: DraftContext) -> None:
        self.bind(ctx.target)
        super().start(ctx)

    def batched(self):
        """A draft model's batched chain over the view (always a chain; the view is built at its start)."""
        from drafters.draft_model_batch import BatchDraftModelChain

        return BatchDraftModelChain(self)
