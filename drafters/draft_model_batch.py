"""A draft model's chains for a batch of rows: one draft forward per draft position for all rows.

The draft model keeps a :class:`specdec.batch_cache.BatchCache` of its own, one row per sequence at
the row's own length. A step first catches every row up on the tokens its draft cache has not seen
(the root, and the last accepted draft or the bonus token: a ragged causal block), then drafts k
tokens with ``k - 1`` one-token forwards over all rows (with a confidence threshold, a row's chain
ends where its batch-1 run's would, and the batch stops drafting once every row's has). Each row's
tokens and its recorded draft distributions are exactly those of :class:`drafters.DraftModelDrafter`
in a batch-1 run with the row's seed (same keyed draws), so the batched run reproduces the batch-1
run row by row.
"""
from __future__ import annotations

import torch

from drafters.batch_chain import BatchChain
from specdec.batch_cache import BatchCache
from specdec.drafting import DraftContext
from specdec.models import check_same_vocab
from specdec.types import AcceptResult, VerifyOutput
from verifier.batch import causal_block, prefill_rows


class BatchDraftModelChain(BatchChain):
    """:class:`drafters.DraftModelDrafter`'s chain mode over a batch (``drafter.batched()`` returns it)."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.model, self.k = None, 0  # read from the drafter at start (a layer-skip drafter builds its model then)
        self.cache: BatchCache | None = None
        self.ctx: DraftContext | None = None
        self.tokens: list[list[int]] = []
        self.drafted: list[int] = []

    def start(self, ctx: DraftContext) -> None:
        self.drafter.bind(ctx.target)
        self.model, self.k = self.drafter.model, self.drafter.k
        check_same_vocab(ctx.target, self.model)
        self.ctx = ctx
        self.cache = BatchCache.for_model(self.model, ctx.capacity, 0)
        self.tokens, self.drafted = [], []

    def extend(self, prompts: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        """New rows: their prompts prefilled into a draft cache of their own, appended to the batch's."""
        fresh = BatchCache.for_model(self.model, self.ctx.capacity, len(prompts))
        prefill_rows(self.model, fresh, [p[:-1] for p in prompts], output_hidden=False)
        self.cache.extend(fresh)
        self.tokens += [list(p) for p in prompts]
        self.drafted += [0] * len(prompts)

    def catch_up(self, ks: list[int]) -> torch.Tensor:
        """Feed every row the tokens its draft cache lacks (root included); ``[B, V]`` logits after each row's last."""
        behind = [t[n:] for t, n in zip(self.tokens, self.cache.host_lengths)]

        def forward(lo: int, hi: int) -> tuple[torch.Tensor, None]:
            part = [b[lo:hi] for b in behind]
            ids, depth, mask = causal_block(part, self.cache.lengths.device)  # [B, n], [B, n], [B, n, n]
            logits, _ = self.block(self.model, self.cache, ids, depth, mask, output_hidden=False)  # [B, n, V]
            self.cache.keep_block([list(range(len(p))) for p in part])
            return logits, None

        return self.caught_up(self.cache, [len(b) for b in behind], forward)[0]  # [B, V]

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (``tokens [B]``) appended to each row; ``[B, V]`` logits after it."""
        return self.feed_one(self.model, self.cache, tokens, output_hidden=False)[0]

    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        """Keep each row's accepted drafts that the draft model has seen; the rest is re-fed next step."""
        fed = [max(0, k - 1) for k in self.drafted]  # the drafts a batch-1 run would have fed
        seen = [len(t) + min(r.accepted_on_chain, f) for t, r, f in zip(self.tokens, results, fed)]
        self.cache.set_lengths([min(s, n) for s, n in zip(seen, self.cache.host_lengths)])  # no catch-up: behind
        for tokens, result in zip(self.tokens, results):
            tokens.extend(result.tokens)

    def select_rows(self, rows: list[int]) -> None:
        self.cache.select_rows(rows)
        self.tokens = [self.tokens[r] for r in rows]
        self.drafted = [self.drafted[r] for r in rows]
