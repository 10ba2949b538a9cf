"""A small Hugging Face model as the drafter, with its own rollback-capable KV cache."""
from __future__ import annotations

import torch

from drafters.tree_expansion import TreeFeed, accepted_fed_slots, expand_dynamic, expand_static
from specdec.cache import SpecDecCache
from specdec.drafting import DraftContext, Drafter, StepShape
from specdec.errors import ConfigError
from specdec.models import check_same_vocab
from specdec.rng import DRAFT
from specdec.sampling import warp_probs
from specdec.tree import compile_tree, load_preset
from specdec.types import SAMPLING_MODES, AcceptResult, DraftTree, VerifyOutput
from verifier import check_finite, tree_forward


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: it must be an integer >= 1")
    return value


class DraftModelDrafter(Drafter):
    """Drafts a chain or a token tree with a small causal LM.

    Three shapes, one per constructor form:

    - chain (``tree=None, budget=None``): ``num_speculative_tokens`` tokens, each sampled from the
      warped draft distribution (argmax at temperature 0), recorded in ``DraftTree.draft_probs``;
    - static tree (``tree=<preset>``): the preset's sibling-rank paths, grown level by level with
      one draft forward per depth; ``tree_sampling`` picks the children (see
      :func:`drafters.tree_expansion.choose_children`). At temperature 0 children are always the
      top-ranked tokens (sampled children would all be the argmax);
    - dynamic tree (``budget=B``): EAGLE-2 style, the ``B`` nodes with the highest product of draft
      probabilities along their path, ``top_k_children`` per expanded node, at most
      ``num_speculative_tokens`` deep; children are deterministic.

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
    """

    name = "draft_model"

    def __init__(self, model, num_speculative_tokens: int = 4, attn_backend: str = "sdpa", tree=None,
                 tree_sampling: str = "deterministic", budget: int | None = None, top_k_children: int = 4):
        super().__init__()
        self.k = _positive_int(num_speculative_tokens, "num_speculative_tokens")
        if tree_sampling not in SAMPLING_MODES:
            raise ConfigError(f"tree_sampling={tree_sampling!r} is unknown; choose one of {list(SAMPLING_MODES)}")
        if budget is not None:
            _positive_int(budget, "budget")
            if tree is not None:
                raise ConfigError("give either a tree preset (tree=...) or a dynamic-tree budget (budget=...), "
                                  "not both")
            if tree_sampling != "deterministic":
                raise ConfigError(f"a dynamic tree (budget={budget}) has deterministic children; "
                                  f"tree_sampling={tree_sampling!r} needs a tree preset")
        self.top_k_children = _positive_int(top_k_children, "top_k_children")
        self.model = model.eval()
        self.attn_backend = attn_backend
        self.device = next(model.parameters()).device
        self.tree_sampling, self.budget = tree_sampling, budget
        self.compiled = compile_tree(load_preset(tree)) if tree is not None else None
        self.cache: SpecDecCache | None = None
        self._fed_drafts = 0
        self._fed: list[int] = []  # per node of the last tree: its fed index, -1 if not fed
        self._tree_prefix: int | None = None  # draft cache length before the last tree was fed

    @property
    def mode(self) -> str:
        """``chain``, ``static`` (a tree preset) or ``dynamic`` (a budget)."""
        return "dynamic" if self.budget is not None else "static" if self.compiled is not None else "chain"

    @property
    def max_nodes(self) -> int:
        return {"chain": self.k, "static": self.compiled.num_nodes if self.compiled else 0,
                "dynamic": self.budget}[self.mode]

    def step_shape(self, target) -> StepShape:
        """One draft-model forward per tree level (k for a k-chain), then a verify of ``1 + max_nodes``."""
        kind = {"chain": "chain", "static": "tree", "dynamic": "dynamic"}[self.mode]
        return StepShape(kind=kind, max_nodes=self.max_nodes, draft_forwards="per_level", draft_model=self.model,
                         k=None if self.mode == "static" else self.k)

    def batched(self):
        """For a batch of rows: chains batch their draft forwards (:mod:`drafters.draft_model_batch`); trees
        run one copy of this drafter per row."""
        if self.mode == "chain":
            from drafters.draft_model_batch import BatchDraftModelChain

            return BatchDraftModelChain(self)
        return super().batched()

    def _max_fed(self) -> int:
        """The most tree nodes one step feeds to the draft model (on top of the committed tokens)."""
        if self.mode == "dynamic":
            return min(self.top_k_children, self.budget) * (self.k - 1)
        return self.max_nodes

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        check_same_vocab(ctx.target, self.model)
        extra = max(0, self._max_fed() - self.max_nodes)  # a dynamic tree feeds more nodes than it keeps
        self.cache = SpecDecCache.for_model(self.model, ctx.capacity + extra)
        self._fed_drafts = 0
        self._fed, self._tree_prefix = [], None

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Append ``ids`` to the draft cache causally; return the last position's logits ``[V]``."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, n]
        logits, _ = tree_forward(self.model, self.cache, x, backend=self.attn_backend, logits_to_keep=1)  # causal
        return logits[-1]  # [V]

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
        drafts, probs = [], []
        for i in range(k):
            check_finite(logits, f"draft model forward at draft position {i + 1}")
            q = warp_probs(logits, self.ctx.sampling)  # [V]
            tok = int(q.argmax()) if self.ctx.sampling.greedy else int(self.ctx.rng.categorical(q[None], DRAFT, i)[0])
            drafts.append(tok)
            probs.append(q)
            if i + 1 < k:
                logits = self._forward([tok])
                self._fed_drafts += 1
        return DraftTree.chain(torch.tensor(drafts, dtype=torch.long), torch.stack(probs))  # probs [k, V]

    def _propose_tree(self, max_depth: int) -> DraftTree:
        """Grow a static or dynamic tree, one draft forward per depth after the catch-up forward."""
        depth_limit = min(max_depth, self.compiled.max_depth if self.mode == "static" else self.k)
        if self._tree_prefix is not None:  # the last tree was never committed: forget it, re-feed the root
            self.cache.truncate(self._tree_prefix - 1)
        self._fed, self._tree_prefix = [], None
        if depth_limit <= 0:
            return DraftTree.empty()
        logits = self._forward(self.tokens[self.cache.length :])  # catch up, root included
        check_finite(logits, "draft model forward at draft position 1")
        feed = TreeFeed(self.model, self.cache, self.device)
        self._tree_prefix = feed.prefix_len
        if self.mode == "dynamic":
            tree, self._fed = expand_dynamic(feed, logits, depth_limit, self.budget, self.top_k_children)
        else:
            mode = "deterministic" if self.ctx.sampling.greedy else self.tree_sampling
            tree, self._fed = expand_static(feed, self.compiled, logits, depth_limit, mode, self.ctx.sampling,
                                            self.ctx.rng)
        return tree

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        """Keep the accepted drafts the draft model has already seen; the rest is re-fed next step."""
        if self.mode == "chain":
            seen = len(self.tokens) + min(result.num_accepted_drafts, self._fed_drafts)
            self.cache.truncate(seen)
        elif self._tree_prefix is not None:
            self.cache.compact(accepted_fed_slots(result.accepted_nodes, self._fed), offset=self._tree_prefix)
            self._fed, self._tree_prefix = [], None
        super().commit(result, verify)
