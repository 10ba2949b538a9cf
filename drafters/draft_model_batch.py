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

from specdec.batch_cache import BatchCache
from specdec.batch_drafting import BatchDrafter
from specdec.drafting import DraftContext
from specdec.models import check_same_vocab
from specdec.rng import DRAFT
from specdec.sampling import warp_probs
from specdec.types import AcceptResult, DraftTree, VerifyOutput
from verifier import check_finite
from verifier.batch import block_forward, causal_block, prefill_rows


class BatchDraftModelChain(BatchDrafter):
    """:class:`drafters.DraftModelDrafter`'s chain mode over a batch (``drafter.batched()`` returns it)."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.model, self.k = None, 0  # read from the drafter at start (a layer-skip drafter builds its model then)
        self.cache: BatchCache | None = None
        self.ctx: DraftContext | None = None
        self.tokens: list[list[int]] = []
        self.fed: list[int] = []

    def start(self, ctx: DraftContext) -> None:
        self.drafter.bind(ctx.target)
        self.model, self.k = self.drafter.model, self.drafter.k
        check_same_vocab(ctx.target, self.model)
        self.ctx = ctx
        self.cache = BatchCache.for_model(self.model, ctx.capacity, 0)
        self.tokens, self.fed = [], []

    def extend(self, prompts: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        """New rows: their prompts prefilled into a draft cache of their own, appended to the batch's."""
        fresh = BatchCache.for_model(self.model, self.ctx.capacity, len(prompts))
        prefill_rows(self.model, fresh, [p[:-1] for p in prompts], output_hidden=False)
        self.cache.extend(fresh)
        self.tokens += [list(p) for p in prompts]
        self.fed += [0] * len(prompts)

    def _catch_up(self) -> torch.Tensor:
        """Feed every row the tokens its draft cache lacks (root included); ``[B, V]`` logits after each row's last."""
        behind = [t[n:] for t, n in zip(self.tokens, self.cache.host_lengths)]
        ids, depth, mask = causal_block(behind, self.cache.lengths.device)
        logits, _ = block_forward(self.model, self.cache, ids, depth, mask)  # [B, n, V]
        self.cache.keep_block([list(range(len(b))) for b in behind])
        last = torch.tensor([len(b) - 1 for b in behind], device=logits.device)  # [B]
        return logits[torch.arange(len(behind), device=logits.device), last]  # [B, V]

    def _feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (``tokens [B]``) appended to each row; ``[B, V]`` logits after it."""
        b = tokens.shape[0]
        device = tokens.device
        logits, _ = block_forward(self.model, self.cache, tokens[:, None], torch.zeros(b, 1, dtype=torch.long, device=device),
                                  torch.ones(b, 1, 1, dtype=torch.bool, device=device))  # [B, 1, V]
        self.cache.keep_block([[0]] * b)
        return logits[:, 0]

    def propose(self, max_depths: list[int]) -> list[DraftTree]:
        ks = [max(0, min(self.k, d)) for d in max_depths]
        k_max = max(ks)
        self.fed = [0] * len(ks)
        if k_max == 0:
            return [DraftTree.empty() for _ in ks]
        sampling, rng = self.ctx.sampling, self.ctx.rng
        logits = self._catch_up()  # [B, V]
        drafts, probs = [], []
        for i in range(k_max):
            check_finite(logits, f"draft model forward at draft position {i + 1}", masked_ok=True)
            q = warp_probs(logits, sampling)  # [B, V]
            tok = q.argmax(-1) if sampling.greedy else rng.categorical(q, DRAFT, i)  # [B]
            drafts.append(tok)
            probs.append(q)
            if i + 1 < k_max and self.drafter.confidence_threshold:
                ks = self._stop_unsure(ks, i, self.drafter.unsure(logits, q, tok, sampling).tolist())
                if max(ks) <= i + 1:  # every row's chain has ended
                    break
            if i + 1 < k_max:
                logits = self._feed(tok)
        tokens = torch.stack(drafts, 1).tolist()  # [B, <= k_max]
        q_all = torch.stack(probs, 1)  # [B, <= k_max, V]
        self.fed = [max(0, k - 1) for k in ks]  # the drafts a batch-1 run would have fed
        return [DraftTree.chain(torch.tensor(t[:k], dtype=torch.long), q_all[b, :k]) if k else DraftTree.empty()
                for b, (t, k) in enumerate(zip(tokens, ks))]

    @staticmethod
    def _stop_unsure(ks: list[int], i: int, unsure: list[bool]) -> list[int]:
        """Each row's chain length after draft ``i``: a row whose draft ``i`` is ``unsure`` ends there, as its
        batch-1 run's chain does (rows keep drafting with the batch, but their later drafts are dropped)."""
        return [min(k, i + 1) if stop else k for k, stop in zip(ks, unsure)]

    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        """Keep each row's accepted drafts that the draft model has seen; the rest is re-fed next step."""
        seen = [len(t) + min(r.num_accepted_drafts, f) for t, r, f in zip(self.tokens, results, self.fed)]
        self.cache.set_lengths(seen)
        for tokens, result in zip(self.tokens, results):
            tokens.extend(result.tokens)

    def select_rows(self, rows: list[int]) -> None:
        self.cache.select_rows(rows)
        self.tokens = [self.tokens[r] for r in rows]
        self.fed = [self.fed[r] for r in rows]
