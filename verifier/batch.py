"""Forwards over a batch of rows with different lengths (:class:`specdec.batch_cache.BatchCache`).

Every row's block (its prompt in the prefill; its root and draft nodes in a verify step) is written
at the row's own length, with position ids ``length_b + depth`` and a per-row key mask (the row's
committed slots plus the block tokens that are the query's ancestors or itself), so rows are never
shifted or re-aligned. The mask is dense, so these forwards use SDPA whatever the verifier's backend.
"""
from __future__ import annotations

import torch

from specdec.batch_cache import BatchCache
from specdec.batch_types import BatchTree
from specdec.types import VerifyOutput
from verifier.verifier import check_finite, model_forward


def block_forward(model, cache: BatchCache, input_ids: torch.Tensor, depth: torch.Tensor, tree_mask: torch.Tensor,
                  logits_to_keep: int = 0, output_hidden: bool = False):
    """Run ``model`` on every row's block ``input_ids [B, n]`` at that row's length.

    ``depth [B, n]``: a token's position past the row's length; ``tree_mask [B, n, n]``: block token i
    may see block token j (its diagonal must be true). Returns ``(logits [B, n', V], hidden [B, n, H])``.
    The block stays pending in the cache until :meth:`BatchCache.keep_block`.
    """
    position_ids, key_mask = begin_block(cache, depth, tree_mask)  # [B, n], [B, 1, n, S]
    attn = {"specdec_prefix_len": 0, "specdec_tree_mask": None, "specdec_tree_plan": None, "specdec_key_mask": key_mask}
    return model_forward(model, cache, input_ids, position_ids, attn, "sdpa", logits_to_keep, output_hidden)


def begin_block(cache: BatchCache, depth: torch.Tensor, tree_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Place a block of ``depth [B, n]`` tokens at every row's length (:meth:`BatchCache.begin_block`); its
    ``(position_ids [B, n], key mask [B, 1, n, S])`` for ``tree_mask [B, n, n]`` (see :func:`block_forward`).
    The mask is None for one token of a single row, which sees every slot (as at batch 1: attention
    without a mask, what plain decoding runs)."""
    cache.begin_block(depth.shape[1])
    if cache.batch == 1 and depth.shape[1] == 1:  # one row's one token sees every slot up to itself: no mask
        return cache.lengths[:, None] + depth, None
    return cache.lengths[:, None] + depth, cache.block_mask(tree_mask)


def causal_block(rows: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [B, n], depth [B, n], mask [B, n, n])`` of a causal block holding ``rows`` (ragged, right-padded;
    a padding token sees its row's real tokens and itself, no other padding: its outputs are thrown away)."""
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)  # [B, n]
    valid = torch.zeros(len(rows), n, dtype=torch.bool)  # [B, n]
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[b, : len(r)] = True
    causal = torch.ones(n, n, dtype=torch.bool).tril()  # [n, n]
    mask = (causal & valid[:, None, :]) | torch.eye(n, dtype=torch.bool)  # [B, n, n]
    depth = torch.arange(n).expand(len(rows), n)  # [B, n]
    return ids.to(device), depth.to(device), mask.to(device)


def prefill_rows(model, cache: BatchCache, rows: list[list[int]], output_hidden: bool = True) -> torch.Tensor | None:
    """Write every row's tokens (ragged) into ``cache`` in one forward; returns the hidden states ``[B, n, H]``
    (row b's first ``len(rows[b])`` are real) or None when every row is empty."""
    if not any(rows):
        return None
    device = cache.lengths.device
    ids, depth, mask = causal_block([r or [0] for r in rows], device)
    _, hidden = block_forward(model, cache, ids, depth, mask, logits_to_keep=1, output_hidden=output_hidden)
    cache.keep_block([list(range(len(r))) for r in rows])
    return hidden


def verify_rows(model, cache: BatchCache, roots: list[int], tree: BatchTree, step: int) -> VerifyOutput:
    """One target forward over every row's root and draft nodes: ``logits [B, 1 + N, V]`` and
    ``hidden [B, 1 + N, H]`` (row 0 of a row's block: its root; 1 + i: its node i, padding included), and each
    row's real node count."""
    device = cache.lengths.device
    b = len(roots)
    ids = torch.cat([torch.tensor(roots, dtype=torch.long, device=device)[:, None], tree.tokens], 1)  # [B, 1 + N]
    depth = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=device), tree.depth], 1)  # [B, 1 + N]
    logits, hidden = block_forward(model, cache, ids, depth, tree.mask, output_hidden=True)
    check_finite(logits, f"target forward at decode step {step}")
    return VerifyOutput(logits=logits, hidden=hidden, nodes=list(tree.num_nodes))
