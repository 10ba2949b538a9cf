"""Chains for a batch of rows, one model forward per draft position for all rows at once.

:class:`BatchChain` holds what every batched chain shares: each row's chain length, the draws (argmax
at temperature 0, else the row's keyed draw ``(DRAFT, i)``, exactly as a batch-1
:meth:`drafters.tree_drafter.TreeDrafter.grow_chain` draws), the recorded draft distributions, and the
confidence stop (a row's chain ends where its batch-1 run's would; the batch stops drafting once
every row's has). A subclass supplies the forwards: :meth:`BatchChain.catch_up` (every row's
logits at its root) and :meth:`BatchChain.feed` (one token per row appended, the logits after it).
"""
from __future__ import annotations

import torch

from drafters.fast_decoder import forward_lm
from specdec.batch_cache import BatchCache
from specdec.batch_drafting import BatchDrafter
from specdec.drafting import DraftContext
from specdec.rng import DRAFT
from specdec.sampling import warp_probs
from specdec.types import DraftTree
from verifier import check_finite
from verifier.batch import begin_block


def fitting_spans(cache: BatchCache, backlog: list[int]) -> list[tuple[int, int]]:
    """Split the rows' backlogs (``backlog[b]`` tokens for row b, fed from its length in ``cache``) into spans
    ``[lo, hi)`` of every row's backlog, one padded block each. A block is written as wide at every row's length,
    so it may be no wider than the capacity less the longest row's length then: one span ``(0, max(backlog))``
    when that fits (a chain's step: at most two tokens behind), more where a row fell far behind while another
    is long (a hybrid's second part catches up only on the steps it drafts). ``[(0, 0)]`` when nothing is behind."""
    lengths, total, spans, lo = list(cache.host_lengths), max(backlog, default=0), [], 0
    while True:
        hi = min(total, lo + max(1, cache.capacity - max(lengths, default=0)))  # a row past the capacity: its error
        spans.append((lo, hi))
        if hi >= total:
            return spans
        lengths = [n + max(0, min(b, hi) - lo) for n, b in zip(lengths, backlog)]
        lo = hi


class BatchChain(BatchDrafter):
    """Base of the batched chains of a :class:`~drafters.tree_drafter.TreeDrafter` in chain mode.

    After :meth:`propose`, ``drafted[b]`` is the length of row b's chain (0 where it drafted nothing).
    """

    drafter = None  # the batch-1 drafter whose chains these are (k, confidence_threshold, unsure)
    ctx: DraftContext | None = None
    drafted: list[int]

    def catch_up(self, ks: list[int]) -> torch.Tensor:
        """Bring every row's state up to its root; ``[B, V]`` draft logits at the roots (``ks``: this
        step's chain length per row)."""
        raise NotImplementedError

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one draft per row (``tokens [B]``); ``[B, V]`` draft logits after it."""
        raise NotImplementedError

    @staticmethod
    def caught_up(cache: BatchCache, backlog: list[int], forward) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed every row's backlog (``backlog[b]`` tokens) into ``cache`` in :func:`fitting_spans`:
        ``forward(lo, hi)`` writes and keeps each row's ``[lo, hi)`` as one block and returns its ``(logits [B, n,
        V], hidden [B, n, H] or None)``. Returns both at each row's last backlog token (``[B, V]``, ``[B, H]``; a
        row with no backlog gets the first block's position 0)."""
        logits_at = hidden_at = None
        for lo, hi in fitting_spans(cache, backlog):
            logits, hidden = forward(lo, hi)
            rows = torch.arange(len(backlog), device=logits.device)  # [B]
            last = torch.tensor([max(0, min(n, hi) - 1 - lo) for n in backlog], device=logits.device)  # [B]
            here = torch.tensor([n > lo or lo == 0 for n in backlog], device=logits.device)  # [B] a token in this span
            logits_at = _newer(logits[rows, last], logits_at, here)  # [B, V]
            hidden_at = None if hidden is None else _newer(hidden[rows, last], hidden_at, here)  # [B, H]
        return logits_at, hidden_at

    def block(self, model, cache: BatchCache, ids: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor,
              logits_to_keep: int = 0, output_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward of ``model`` over the block ``ids [B, n]`` at every row's length (``depth [B, n]``, ``mask
        [B, n, n]``), through :func:`drafters.fast_decoder.forward_lm` per the drafter's ``fast_forward``; the block
        stays pending in ``cache``. ``(logits [B, n', V], hidden [B, n, H])``."""
        position_ids, key_mask = begin_block(cache, depth, mask)  # [B, n], [B, 1, n, S]
        return forward_lm(model, ids, cache, position_ids, key_mask, logits_to_keep, self.drafter.fast_forward,
                          output_hidden=output_hidden)

    def feed_one(self, model, cache: BatchCache, tokens: torch.Tensor,
                 output_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row (``tokens [B]``) appended to ``cache`` and kept: ``(logits [B, V], hidden [B, H])``."""
        b, device = tokens.shape[0], tokens.device
        depth = torch.zeros(b, 1, dtype=torch.long, device=device)  # [B, 1]
        mask = torch.ones(b, 1, 1, dtype=torch.bool, device=device)  # [B, 1, 1]
        logits, hidden = self.block(model, cache, tokens[:, None], depth, mask, 0, output_hidden)  # [B, 1, V], [B, 1, H]
        cache.keep_block([[0]] * b)
        return logits[:, 0], hidden[:, 0] if hidden is not None else None

    def chain_lengths(self, max_depths: list[int]) -> list[int]:
        """Each row's chain length this step (at most the drafter's k and the row's depth limit)."""
        return [max(0, min(self.drafter.k, d)) for d in max_depths]

    def propose(self, max_depths: list[int]) -> list[DraftTree]:
        ks = self.chain_lengths(max_depths)
        k_max = max(ks, default=0)
        self.drafted = [0] * len(ks)
        if k_max == 0:
            return [DraftTree.empty() for _ in ks]
        sampling, rng = self.ctx.sampling, self.ctx.rng
        logits = self.catch_up(ks)  # [B, V]
        drafts, probs = [], []
        for i in range(k_max):
            check_finite(logits, f"{self.drafter.forward_label} at draft position {i + 1}", masked_ok=True)
            q = warp_probs(logits, sampling)  # [B, V]
            tok = q.argmax(-1) if sampling.greedy else rng.categorical(q, DRAFT, i)  # [B]
            drafts.append(tok)
            probs.append(q)
            if i + 1 < k_max and self.drafter.confidence_threshold:
                ks = self._stop_unsure(ks, i, self.drafter.unsure(logits, q, tok, sampling).tolist())
                if max(ks) <= i + 1:  # every row's chain has ended
                    break
            if i + 1 < k_max:
                logits = self.feed(tok)
        tokens = torch.stack(drafts, 1).tolist()  # [B, <= k_max]
        q_all = torch.stack(probs, 1)  # [B, <= k_max, V]
        self.drafted = ks
        return [DraftTree.chain(torch.tensor(t[:k], dtype=torch.long), q_all[b, :k]) if k else DraftTree.empty()
                for b, (t, k) in enumerate(zip(tokens, ks))]

    @staticmethod
    def _stop_unsure(ks: list[int], i: int, unsure: list[bool]) -> list[int]:
        """Each row's chain length after draft ``i``: a row whose draft ``i`` is ``unsure`` ends there, as its
        batch-1 run's chain does (rows keep drafting with the batch, but their later drafts are dropped)."""
        return [min(k, i + 1) if stop else k for k, stop in zip(ks, unsure)]


def _newer(new: torch.Tensor, old: torch.Tensor | None, here: torch.Tensor) -> torch.Tensor:
    """``new [B, X]`` where ``here [B]``, else ``old`` (None: ``new`` everywhere)."""
    return new if old is None else torch.where(here[:, None], new, old)
