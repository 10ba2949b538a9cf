"""The target-model wrapper: one forward pass over the root and all draft nodes."""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from specdec.cache import SpecDecCache
from specdec.errors import ConfigError, NonFiniteLogitsError
from specdec.models import context_length
from specdec.types import DraftTree, VerifyOutput
from verifier.attention import BACKENDS, dense_tree_mask
from verifier.availability import check_attn_backend


@contextmanager
def attention_backend(model, backend: str):
    """Switch ``model`` to a registered tree-attention function for the duration of the block (every config its
    modules read: a view's own copy, :func:`drafters.draft_vocab.with_draft_vocab`, and the shared layers')."""
    if backend not in BACKENDS:
        raise ConfigError(f"attn_backend={backend!r} is unknown; choose one of {sorted(BACKENDS)}")
    configs = _configs(model)
    previous = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = BACKENDS[backend]
    try:
        yield
    finally:
        for config, value in zip(configs, previous):
            config._attn_implementation = value


def _configs(model) -> list:
    """The distinct configs ``model`` and its modules hold (found once, kept on the model; a view gets its own)."""
    known = model.__dict__.get("_specdec_configs")
    if known is None or known[0] is not model:
        found = {id(model.config): model.config}
        for module in model.modules():
            config = module.__dict__.get("config")
            if config is not None and hasattr(config, "_attn_implementation"):
                found.setdefault(id(config), config)
        known = (model, list(found.values()))
        model.__dict__["_specdec_configs"] = known
    return known[1]


#: SDPA kernels our forwards may use. cuDNN attention is left out: it builds an execution plan per
#: new sequence length (tens of ms on an H200), and decoding changes the length on every forward.
SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_CACHE_KEYWORD: dict[type, str] = {}  # a plain dict, not functools.cache: torch.compile traces through it quietly


def cache_argument(model_class: type) -> str:
    """The forward's keyword for the KV cache: ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (earlier 5.x releases)."""
    if model_class not in _CACHE_KEYWORD:
        params = inspect.signature(model_class.forward).parameters
        _CACHE_KEYWORD[model_class] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORD[model_class]


def attention_inputs(backend: str, prefix_len: int, tree_mask: torch.Tensor | None,
                     key_mask: torch.Tensor | None) -> dict:
    """The ``specdec_*`` keyword arguments of one forward (see :mod:`verifier.attention`), built once
    for all layers: the SDPA key mask, or the kernel's plan (triton, 2..64 tree tokens)."""
    kwargs = {"specdec_prefix_len": prefix_len, "specdec_tree_mask": tree_mask, "specdec_key_mask": key_mask,
              "specdec_tree_plan": None}
    if key_mask is not None or tree_mask is None:
        return kwargs
    n = tree_mask.shape[0]
    if backend == "triton" and 1 < n:
        from specdec_kernels import MAX_TREE_TOKENS, TreeAttentionPlan

        if n <= MAX_TREE_TOKENS:
            # one output buffer for all layers: each layer's o_proj reads its attention output (transposed, so
            # HF's reshape copies it) before the next layer's kernel writes, in stream order
            kwargs["specdec_tree_plan"] = TreeAttentionPlan(prefix_len, tree_mask, validate=False, reuse_output=True)
            return kwargs
    kwargs["specdec_key_mask"] = dense_tree_mask(prefix_len, tree_mask)
    return kwargs


def tree_forward(
    model,
    cache: SpecDecCache,
    input_ids: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    depth: torch.Tensor | None = None,
    backend: str = "sdpa",
    logits_to_keep: int = 0,
    output_hidden: bool = False,
    key_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
):
    """Run ``model`` on ``input_ids [1, n]`` appended to ``cache``.

    Token i sits at position ``cache.length + depth[i]`` and sees the whole cache plus the new
    tokens j with ``tree_mask[i, j]`` (``[n, n]`` bool). ``tree_mask=None`` is a causal chunk
    (``depth`` defaults to ``arange(n)``): a prefill or a draft model's catch-up, which takes
    SDPA's causal kernels with either backend. ``key_mask [1, 1, n, cache.length + n]`` (bool)
    gives any other visibility and ``position_ids [1, n]`` any other positions (SDPA only).
    Returns ``(logits [n', V] float32, hidden [n, H] or None)`` where n' is n, or ``logits_to_keep``
    when that is > 0.
    """
    prefix_len = cache.length
    n = input_ids.shape[1]
    if position_ids is None:
        depth = torch.arange(n) if depth is None else depth
        position_ids = (prefix_len + depth.to(input_ids.device)).view(1, n)  # [1, n]
    attn = attention_inputs(backend, prefix_len, tree_mask, key_mask)
    logits, hidden = model_forward(model, cache, input_ids, position_ids, attn, backend, logits_to_keep, output_hidden)
    return logits[0], hidden[0] if hidden is not None else None  # [n', V], [n, H]


def model_forward(model, cache, input_ids: torch.Tensor, position_ids: torch.Tensor, attn: dict, backend: str,
                  logits_to_keep: int = 0, output_hidden: bool = False):
    """One forward of ``model`` on ``input_ids [B, n]`` at ``position_ids [B, n]`` appended to ``cache``,
    through ``backend`` with the ``specdec_*`` attention inputs ``attn`` (:func:`attention_inputs`).
    Returns ``(logits [B, n', V] float32, hidden [B, n, H] or None)``. Positions past the model's context are
    clamped into it: only tokens a step drops get there (a batch drafting on for a row whose chain ended, a
    fixed-shape step's nodes past a row's room), and a learned position table must not be indexed past."""
    limit = context_length(model)
    if limit is not None:
        position_ids = position_ids.clamp(max=limit - 1)  # [B, n]
    with attention_backend(model, backend), sdpa_kernel(SDPA_KERNELS), torch.no_grad():
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=True,
            output_hidden_states=output_hidden,
            logits_to_keep=logits_to_keep,
            **{cache_argument(type(model)): cache},
            **attn,
        )
    hidden = out.hidden_states[-1] if output_hidden else None  # [B, n, H]
    return out.logits.float(), hidden


def check_finite(logits: torch.Tensor, where: str, masked_ok: bool = False) -> None:
    """Raise :class:`NonFiniteLogitsError` naming ``where`` if ``logits`` hold NaN or inf.

    ``masked_ok``: ``-inf`` marks tokens a draft cannot propose (a draft vocabulary); it is allowed as
    long as every position keeps a finite logit."""
    if bool(torch.isfinite(logits.sum())):
        return  # a finite sum: no NaN or inf anywhere (4x faster than the elementwise test, which settles the rest)
    ok = torch.isfinite(logits)
    if masked_ok:
        ok = (ok | (logits == float("-inf"))) & ok.any(-1, keepdim=True)
    if not bool(ok.all()):
        bad = "NaN" if bool(torch.isnan(logits).any()) else "inf"
        raise NonFiniteLogitsError(
            f"{where}: the model produced {bad} logits. Check the checkpoint and dtype "
            "(fp16 overflow is common: try model.dtype=float32 or bfloat16)."
        )


class Verifier:
    """Scores a :class:`DraftTree` with the target in one forward pass.

    Args:
        model: any Hugging Face causal LM.
        attn_backend: ``"sdpa"`` (reference, any device) or ``"triton"`` (the tree-attention kernel).
    """

    def __init__(self, model, attn_backend: str = "sdpa", verify_widths=None):
        if attn_backend not in BACKENDS:
            raise ConfigError(f"attn_backend={attn_backend!r} is unknown; choose one of {sorted(BACKENDS)}")
        self.model = model
        self.attn_backend = attn_backend
        self.device = next(model.parameters()).device
        self.verify_widths = check_widths(verify_widths)
        check_attn_backend(attn_backend, self.device)  # triton without a GPU or the interpreter: fail now

    def width(self, n: int) -> int:
        """The forward's width for a block of ``n`` tokens (:func:`padded_width` of ``verify_widths``)."""
        return padded_width(self.verify_widths, n)

    def prefill(self, cache: SpecDecCache, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Write ``input_ids [1, T]`` into the cache (causally); returns the last hidden states ``[T, H]``."""
        if input_ids.shape[1] == 0:
            return None
        _, hidden = tree_forward(self.model, cache, input_ids.to(self.device), backend=self.attn_backend,
                                 logits_to_keep=1, output_hidden=True)  # causal
        return hidden

    def verify(self, cache: SpecDecCache, root: int, tree: DraftTree, step: int) -> VerifyOutput:
        """Feed the root plus every node of ``tree`` in one forward; logits/hidden for row 0 = root, 1 + i = node i.

        With ``verify_widths`` the block is padded to :meth:`width`: padding tokens see the root and
        themselves, nothing sees them, and their cache slots follow the nodes (dropped by the commit)."""
        n = tree.num_nodes
        w = self.width(n + 1)
        ids = torch.zeros(1, w, dtype=torch.long)  # [1, W]: root, nodes, padding
        ids[0, 0] = root
        ids[0, 1 : n + 1] = tree.tokens
        mask = torch.eye(w, dtype=torch.bool)  # [W, W]
        mask[:, 0] = True
        mask[1 : n + 1, 1 : n + 1] = tree.ancestor_mask
        depth = torch.ones(w, dtype=torch.long)  # [W]
        depth[0] = 0
        depth[1 : n + 1] = tree.depth
        logits, hidden = tree_forward(
            self.model, cache, ids.to(self.device), mask.to(self.device), depth, self.attn_backend, output_hidden=True
        )
        logits, hidden = logits[: n + 1], hidden[: n + 1]  # [1 + N, V], [1 + N, H]
        check_finite(logits, f"target forward at decode step {step}")
        return VerifyOutput(logits=logits, hidden=hidden)


def padded_width(widths, n: int) -> int:
    """The width a block of ``n`` tokens is verified at: the smallest of ``widths`` (sorted) that holds it (the block
    is padded to it), else ``n``."""
    return next((w for w in widths if w >= n), n)


def check_widths(widths) -> tuple[int, ...]:
    """``verify_widths`` as a sorted tuple of positive ints (None or empty: no padding); a clear error otherwise."""
    if widths is None:
        return ()
    listed = not isinstance(widths, (str, bytes)) and hasattr(widths, "__iter__")
    values = list(widths) if listed else []
    if not listed or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in values):
        raise ConfigError(f"verify_widths={widths!r}: give positive integers, e.g. [1, 4, 5, 8] (or null: no padding)")
    return tuple(sorted(set(values)))
