"""A small Hugging Face model as the drafter, with its own rollback-capable KV cache."""
from __future__ import annotations

import torch

from specdec.cache import SpecDecCache
from specdec.drafting import DraftContext, Drafter
from specdec.errors import ConfigError
from specdec.models import check_same_vocab
from specdec.sampling import sample, warp_probs
from specdec.types import AcceptResult, DraftTree, VerifyOutput
from verifier import check_finite, tree_forward


class DraftModelDrafter(Drafter):
    """Drafts a chain of ``num_speculative_tokens`` tokens with a small causal LM.

    It samples with the same warping as the target (argmax at temperature 0) and records the
    warped draft distribution each token was drawn from (``DraftTree.draft_probs``). Its cache
    holds every committed token it has seen; after a step it rolls back what was rejected, and the
    next ``propose`` first catches up on the tokens it has not seen (the correction or bonus token,
    and the last draft when the whole chain was accepted).

    Args:
        model: the draft model; it must share the target's vocabulary.
        num_speculative_tokens: chain length k (>= 1).
        attn_backend: attention backend for the draft model's own forwards.
    """

    name = "draft_model"

    def __init__(self, model, num_speculative_tokens: int = 4, attn_backend: str = "sdpa"):
        super().__init__()
        if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ConfigError(f"num_speculative_tokens={num_speculative_tokens!r}: it must be an integer >= 1")
        self.model = model.eval()
        self.k = num_speculative_tokens
        self.attn_backend = attn_backend
        self.device = next(model.parameters()).device
        self.cache: SpecDecCache | None = None
        self._fed_drafts = 0

    @property
    def max_nodes(self) -> int:
        return self.k

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        check_same_vocab(ctx.target, self.model)
        self.cache = SpecDecCache.for_model(self.model, ctx.capacity)
        self._fed_drafts = 0

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Append ``ids`` to the draft cache causally; return the last position's logits ``[V]``."""
        n = len(ids)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, n]
        mask = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()  # [n, n]
        depth = torch.arange(n, device=self.device)  # [n]
        logits, _ = tree_forward(self.model, self.cache, x, mask, depth, self.attn_backend, logits_to_keep=1)
        return logits[-1]  # [V]

    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        super().prefill(input_ids, target_hidden)
        if len(self.tokens) > 1:
            self._forward(self.tokens[:-1])

    def propose(self, max_depth: int) -> DraftTree:
        k = min(self.k, max_depth)
        self._fed_drafts = 0
        if k <= 0:
            return DraftTree.empty()
        logits = self._forward(self.tokens[self.cache.length :])  # catch up, root included
        drafts, probs = [], []
        for i in range(k):
            check_finite(logits, f"draft model forward at draft position {i + 1}")
            q = warp_probs(logits, self.ctx.sampling)  # [V]
            tok = int(q.argmax()) if self.ctx.sampling.greedy else sample(q, self.ctx.generator)
            drafts.append(tok)
            probs.append(q)
            if i + 1 < k:
                logits = self._forward([tok])
                self._fed_drafts += 1
        return DraftTree.chain(torch.tensor(drafts, dtype=torch.long), torch.stack(probs))  # probs [k, V]

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        """Keep the accepted drafts the draft model has already seen; the rest is re-fed next step."""
        seen = len(self.tokens) + min(result.num_accepted_drafts, self._fed_drafts)
        self.cache.truncate(seen)
        super().commit(result, verify)
