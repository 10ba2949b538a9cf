"""An EAGLE head's chains for a batch of rows: one head forward per draft position for all rows.

The batch-1 :class:`drafters.EagleDrafter` runs one head forward per draft position; run per row
(:class:`drafters.eagle.EagleRows`), a batch of B rows costs B head forwards per position. Here the
head keeps one :class:`specdec.batch_cache.BatchCache` with a row per sequence at the row's own
length, and every forward serves all rows:

- a new row's prompt pairs ``(f_s, t_{s+1})`` but the last are written when the row joins (one
  forward for the rows that join together), the last one stays pending;
- a step first feeds every row's pending pairs (a ragged causal block: the pairs of the last step's
  root and accepted tokens, with the target's true features, as EAGLE does); each row's output at its
  last pair gives its root's logits and feature;
- then ``k - 1`` forwards of one pair per row (a draft with its parent's predicted feature);
- on commit every row's draft slots are dropped and the target's features of its root and accepted
  nodes become its pending pairs.

A row's drafts and recorded draft distributions are those of its batch-1 run with the row's seed
(same keyed draws); only floating-point rounding differs (other matrix shapes), never the tokens
that are emitted (the acceptance rules are lossless whatever the drafts are).
"""
from __future__ import annotations

import torch

from drafters.batch_chain import BatchChain
from specdec.batch_cache import BatchCache
from specdec.drafting import DraftContext
from specdec.types import AcceptResult, VerifyOutput
from verifier.batch import causal_block


class BatchEagleChain(BatchChain):
    """:class:`drafters.EagleDrafter`'s chain mode over a batch (``drafter.batched()`` returns it)."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.head = None
        self.cache: BatchCache | None = None
        self.ctx: DraftContext | None = None
        self.pending: list[tuple[torch.Tensor | None, list[int]]] = []  # per row: (features [m, H], tokens)
        self.feature: torch.Tensor | None = None  # [B, H]: each row's output feature at its newest fed pair
        self.committed: list[int] | None = None  # per row, the head cache's committed pairs while drafts follow them
        self.drafted: list[int] = []

    def start(self, ctx: DraftContext) -> None:
        self.head = self.drafter._bind(ctx.target)  # eagle3: registers the feature tap on the target
        self.ctx = ctx
        self.cache = BatchCache.for_model(self.head.model, ctx.capacity, 0)
        self.pending, self.feature, self.committed, self.drafted = [], None, None, []

    def _target_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's features ``[B, n, H]`` of the last target forward (``hidden [B, n, H]``: its final states)."""
        tap = self.drafter._tap
        raw = tap.take() if tap is not None else hidden  # [B, n, 3H] (eagle3) or [B, n, H]
        with torch.no_grad():
            return self.head.target_features(raw)  # [B, n, H]

    def extend(self, prompts: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        """New rows: their prompt pairs but the last written into a head cache of their own, appended to
        the batch's; the last pair stays pending (a one-token prompt has none: it drafts from its second step)."""
        feats = self._target_features(target_hidden) if target_hidden is not None else None  # [B', n, H]
        fresh = BatchCache.for_model(self.head.model, self.ctx.capacity, len(prompts))
        pairs = [(feats[b, : len(p) - 1] if feats is not None else None, list(p[1:])) for b, p in enumerate(prompts)]
        early = [(f[:-1], t[:-1]) if t else (None, []) for f, t in pairs]
        if any(t for _, t in early):
            self._forward(fresh, early, logits_to_keep=1)  # only the cache is wanted: no logits over the prompt
        self.cache.extend(fresh)
        self.pending += [(f[-1:], t[-1:]) if t else (None, []) for f, t in pairs]
        self.drafted += [0] * len(prompts)
        self.feature = None

    def _forward(self, cache: BatchCache, pairs: list[tuple[torch.Tensor | None, list[int]]], logits_to_keep: int = 0):
        """Append each row's ``pairs`` (features ``[m_b, H]``, tokens; ragged, causal) to ``cache``; returns the
        forward's ``(logits [B, n', V], output features [B, n, H])`` (``n'``: per ``logits_to_keep``)."""
        ids, depth, mask = causal_block([t or [0] for _, t in pairs], cache.lengths.device)  # [B, n] ...
        feats = ids.new_zeros(*ids.shape, self.head.hidden_size, dtype=next(self.head.parameters()).dtype)
        for b, (f, t) in enumerate(pairs):
            if t:
                feats[b, : len(t)] = f  # [n, H] rows of this row's block
        with self.head.inputs(feats) as model:
            logits, hidden = self.block(model, cache, ids, depth, mask, logits_to_keep)  # [B, n', V], [B, n, H]
        cache.keep_block([list(range(len(t))) for _, t in pairs])
        return logits, hidden

    def chain_lengths(self, max_depths: list[int]) -> list[int]:
        """A row with nothing pending has no root feature yet (a one-token prompt's first step): no chain."""
        ks = super().chain_lengths(max_depths)
        return [k if t else 0 for k, (_, t) in zip(ks, self.pending)]

    def catch_up(self, ks: list[int]) -> torch.Tensor:
        """Feed every row's pending pairs; ``[B, V]`` head logits at each row's root (its last pending pair;
        garbage for a row with none, which drafts nothing)."""
        pending = self.pending

        def forward(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self._forward(self.cache, [(f[lo:hi] if t[lo:hi] else None, t[lo:hi]) for f, t in pending])

        logits, self.feature = self.caught_up(self.cache, [len(t) for _, t in pending], forward)  # [B, V], [B, H]
        self.committed = list(self.cache.host_lengths)
        self.pending = [(None, []) for _ in pending]
        return logits

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One draft per row (``tokens [B]``) with its parent's output feature; ``[B, V]`` logits after it."""
        with self.head.inputs(self.feature[:, None]) as model:  # [B, 1, H]
            logits, self.feature = self.feed_one(model, self.cache, tokens)  # [B, V], [B, H]
        return logits

    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        """Drop every row's draft slots; queue the target's features of its root and accepted nodes with
        the accepted tokens (and the bonus token)."""
        if self.committed is not None:
            self.cache.set_lengths(self.committed)
            self.committed = None
        feats = self._target_features(verify.hidden)  # [B, 1 + N, H]
        for b, result in enumerate(results):
            rows = torch.tensor([0] + [1 + i for i in result.accepted_nodes], device=feats.device)
            old_f, old_t = self.pending[b]
            new_f = feats[b, rows]  # [1 + accepted, H]
            self.pending[b] = (torch.cat([old_f, new_f]) if old_t else new_f, old_t + list(result.tokens))

    def select_rows(self, rows: list[int]) -> None:
        self.cache.select_rows(rows)
        self.pending = [self.pending[r] for r in rows]
        self.drafted = [self.drafted[r] for r in rows]
        self.feature = None
