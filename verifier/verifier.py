"""The target-model wrapper: one forward pass over the root and all draft nodes."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from specdec.cache import SpecDecCache
from specdec.errors import ConfigError, NonFiniteLogitsError
from specdec.types import DraftTree, VerifyOutput
from verifier.attention import BACKENDS, dense_tree_mask


@contextmanager
def attention_backend(model, backend: str):
    """Switch ``model`` to a registered tree-attention function for the duration of the block."""
    if backend not in BACKENDS:
        raise ConfigError(f"attn_backend={backend!r} is unknown; choose one of {sorted(BACKENDS)}")
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = BACKENDS[backend]
    try:
        yield
    finally:
        config._attn_implementation = previous


def tree_forward(
    model,
    cache: SpecDecCache,
    input_ids: torch.Tensor,
    tree_mask: torch.Tensor,
    depth: torch.Tensor,
    backend: str = "sdpa",
    logits_to_keep: int = 0,
    output_hidden: bool = False,
):
    """Run ``model`` on ``input_ids [1, n]`` appended to ``cache``.

    Token i sits at position ``cache.length + depth[i]`` and sees the whole cache plus the new
    tokens j with ``tree_mask[i, j]`` (``[n, n]`` bool). A chain is ``tree_mask = tril`` with
    ``depth = arange(n)``. Returns ``(logits [n', V] float32, hidden [n, H] or None)`` where n' is
    n, or ``logits_to_keep`` when that is > 0.
    """
    prefix_len = cache.length
    n = input_ids.shape[1]
    position_ids = (prefix_len + depth.to(input_ids.device)).view(1, n)  # [1, n]
    with attention_backend(model, backend), torch.inference_mode():
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=output_hidden,
            logits_to_keep=logits_to_keep,
            specdec_prefix_len=prefix_len,
            specdec_tree_mask=tree_mask,
            specdec_dense_mask=dense_tree_mask(prefix_len, tree_mask) if backend == "sdpa" else None,
        )
    logits = out.logits[0].float()  # [n', V]
    hidden = out.hidden_states[-1][0] if output_hidden else None  # [n, H]
    return logits, hidden


def check_finite(logits: torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteLogitsError` naming ``where`` if ``logits`` hold NaN or inf."""
    if not bool(torch.isfinite(logits).all()):
        bad = "NaN" if bool(torch.isnan(logits).any()) else "inf"
        raise NonFiniteLogitsError(
            f"{where}: the model produced {bad} logits. Check the checkpoint and dtype "
            "(fp16 overflow is common: try dtype=float32 or bfloat16)."
        )


class Verifier:
    """Scores a :class:`DraftTree` with the target in one forward pass.

    Args:
        model: any Hugging Face causal LM.
        attn_backend: ``"sdpa"`` (reference, any device) or ``"triton"`` (the tree-attention kernel).
    """

    def __init__(self, model, attn_backend: str = "sdpa"):
        if attn_backend not in BACKENDS:
            raise ConfigError(f"attn_backend={attn_backend!r} is unknown; choose one of {sorted(BACKENDS)}")
        self.model = model
        self.attn_backend = attn_backend
        self.device = next(model.parameters()).device

    def prefill(self, cache: SpecDecCache, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Write ``input_ids [1, T]`` into the cache (causally); returns the last hidden states ``[T, H]``."""
        t = input_ids.shape[1]
        if t == 0:
            return None
        mask = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()  # [T, T]
        depth = torch.arange(t, device=self.device)  # [T]
        _, hidden = tree_forward(
            self.model, cache, input_ids.to(self.device), mask, depth, self.attn_backend, logits_to_keep=1, output_hidden=True
        )
        return hidden

    def verify(self, cache: SpecDecCache, root: int, tree: DraftTree, step: int) -> VerifyOutput:
        """Feed the root plus every node of ``tree`` in one forward; logits/hidden for row 0 = root, 1 + i = node i."""
        n = tree.num_nodes
        ids = torch.empty(1, n + 1, dtype=torch.long)  # [1, 1 + N]
        ids[0, 0] = root
        ids[0, 1:] = tree.tokens
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)  # [1 + N, 1 + N]
        mask[:, 0] = True
        mask[1:, 1:] = tree.ancestor_mask
        depth = torch.zeros(n + 1, dtype=torch.long)  # [1 + N]
        depth[1:] = tree.depth
        logits, hidden = tree_forward(
            self.model, cache, ids.to(self.device), mask.to(self.device), depth, self.attn_backend, output_hidden=True
        )
        check_finite(logits, f"target forward at decode step {step}")
        return VerifyOutput(logits=logits, hidden=hidden)
