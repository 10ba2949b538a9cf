"""A small Hugging Face model as the drafter, with its own rollback-capable KV cache."""
from __future__ import annotations

import torch

from drafters.fast_decoder import forward_lm, lean_probe
from drafters.tree_drafter import TreeDrafter, flag_of
from drafters.tree_expansion import TreeFeed, accepted_fed_slots
from specdec.cache import SpecDecCache
from specdec.drafting import DraftContext, StepShape
from specdec.models import check_same_vocab, context_length
from specdec.types import AcceptResult, DraftTree, VerifyOutput


class DraftModelDrafter(TreeDrafter):
    """Drafts a chain or a token tree with a small causal LM.

    Three shapes, one per constructor form (see :mod:`drafters.tree_drafter`): a chain of
    ``num_speculative_tokens`` sampled drafts, a static tree preset (``tree=``, children per
    ``tree_sampling``) or an EAGLE-2-style dynamic tree (``budget=``), one draft forward per depth.

    The draft cache holds every committed token it has seen. After a step it keeps the accepted
    drafts it has already fed (compacting tree nodes to contiguous slots) and drops the rest; the
    next ``propose`` first catches up on the tokens it has not seen (the correction or bonus token,
    and the last accepted draft when it was never fed).

    Args:
        model: the draft model; it must share the target's vocabulary.
        num_speculative_tokens: chain length k (>= 1); the depth limit of a dynamic tree; unused
            by a static tree (its preset sets the depth).
        attn_backend: attention backend for the draft model's causal forwards (tree levels use SDPA).
        tree: a preset name (``conf/tree/<name>.yaml``), a YAML path, or a list of sibling-rank paths.
        tree_sampling: ``deterministic``, ``with_replacement`` or ``without_replacement``.
        budget: number of nodes of a dynamic tree (>= 1); None for a chain or a static tree.
        top_k_children: children per expanded node of a dynamic tree (>= 1).
        draft_vocab: ids ``[Vd]`` of a draft vocabulary, or None: the model's LM head then scores only
            those tokens (:func:`drafters.draft_vocab.with_draft_vocab`; a view, the model is unchanged).
        confidence_threshold: a chain ends after the first draft whose draft probability is below this
            (a dynamic draft length, as Hugging Face's ``assistant_confidence_threshold``); 0: always k.
        fast_forward: run the draft model through :class:`drafters.fast_decoder.FastDecoder` (Llama and
            Qwen2 models; others always take transformers' forward): the same arithmetic without
            transformers' per-forward overhead. False: the model's own forward (``attn_backend``).
    """

    name = "draft_model"
    forward_label = "draft model forward"

    def __init__(self, model, num_speculative_tokens: int = 4, attn_backend: str = "sdpa", tree=None,
                 tree_sampling: str = "deterministic", budget: int | None = None, top_k_children: int = 4,
                 draft_vocab: torch.Tensor | None = None, confidence_threshold: float = 0.0,
                 fast_forward: bool = True):
        super().__init__(num_speculative_tokens, tree, tree_sampling, budget, top_k_children, confidence_threshold)
        if draft_vocab is not None:
            from drafters.draft_vocab import with_draft_vocab

            model = with_draft_vocab(model, draft_vocab)
        self.model = model.eval()
        self.attn_backend = attn_backend
        self.fast_forward = flag_of(fast_forward, "drafter.fast_forward")
        self.device = next(model.parameters()).device
        self.cache: SpecDecCache | None = None
        self._fed_drafts = 0
        self._fed: list[int] = []  # per node of the last tree: its fed index, -1 if not fed
        self._tree_prefix: int | None = None  # draft cache length before the last tree was fed

    def step_shape(self, target) -> StepShape:
        """One draft-model forward per tree level (k for a k-chain), then a verify of ``1 + max_nodes``; a draft
        that runs through :class:`~drafters.fast_decoder.FastDecoder` is timed through it (a probe)."""
        probe = lean_probe(self.model, self.fast_forward)
        return StepShape(kind=self.step_kind, max_nodes=self.max_nodes, draft_forwards="per_level",
                         draft_model=self.model, draft_probe=probe, k=None if self.mode == "static" else self.k)

    def context_length(self) -> int | None:
        """The draft model's own context (``max_position_embeddings``): it sees every committed token."""
        return context_length(self.model)

    def bind(self, target) -> None:
        """Prepare for ``target`` before a run; a draft model needs nothing (a layer-skip view is built here)."""

    def batched(self):
        """For a batch of rows: chains batch their draft forwards (:mod:`drafters.draft_model_batch`); trees
        run one copy of this drafter per row."""
        if self.mode == "chain":
            from drafters.draft_model_batch import BatchDraftModelChain

            return BatchDraftModelChain(self)
        return super().batched()

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        check_same_vocab(ctx.target, self.model)
        extra = max(0, self.max_fed() - self.max_nodes)  # a dynamic tree feeds more nodes than it keeps
        self.cache = SpecDecCache.for_model(self.model, ctx.capacity + extra)
        self._fed_drafts = 0
        self._fed, self._tree_prefix = [], None

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Append ``ids`` to the draft cache causally; return the last position's logits ``[V]``."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, n]
        positions = self.cache.length + torch.arange(len(ids), device=self.device)[None]  # [1, n]
        logits, _ = forward_lm(self.model, x, self.cache, positions, None, 1, self.fast_forward, self.attn_backend,
                               output_hidden=False)  # [1, 1, V], causal
        return logits[0, -1]  # [V]

    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        super().prefill(input_ids, target_hidden)
        if len(self.tokens) > 1:
            self._forward(self.tokens[:-1])

    def propose(self, max_depth: int) -> DraftTree:
        if self.mode != "chain":
            return self._propose_tree(max_depth)
        k = min(self.k, max_depth)
        self._fed_drafts = 0
        if k <= 0:
            return DraftTree.empty()
        logits = self._forward(self.tokens[self.cache.length :])  # catch up, root included

        def forward_one(tok: int, i: int) -> torch.Tensor:
            self._fed_drafts += 1
            return self._forward([tok])

        return self.grow_chain(logits, k, forward_one)

    def _propose_tree(self, max_depth: int) -> DraftTree:
        """Grow a static or dynamic tree, one draft forward per depth after the catch-up forward."""
        depth_limit = self.depth_limit(max_depth)
        if self._tree_prefix is not None:  # the last tree was never committed: forget it, re-feed the root
            self.cache.truncate(self._tree_prefix - 1)
        self._fed, self._tree_prefix = [], None
        if depth_limit <= 0:
            return DraftTree.empty()
        logits = self._forward(self.tokens[self.cache.length :])  # catch up, root included
        feed = TreeFeed(self.model, self.cache, self.device, self.fast_forward)
        self._tree_prefix = feed.prefix_len
        tree, self._fed = self.grow_tree(feed, logits, depth_limit)
        return tree

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        """Keep the accepted drafts the draft model has already seen; the rest is re-fed next step."""
        if self.mode == "chain":
            seen = len(self.tokens) + min(result.accepted_on_chain, self._fed_drafts)
            self.cache.truncate(seen)
        elif self._tree_prefix is not None:
            self.cache.compact(accepted_fed_slots(result.accepted_nodes, self._fed), offset=self._tree_prefix)
            self._fed, self._tree_prefix = [], None
        super().commit(result, verify)
