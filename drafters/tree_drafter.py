"""What drafters that run a model once per tree level share: the draft's shape and how it is grown.

A :class:`TreeDrafter` drafts one of three shapes, chosen by its constructor arguments:

- chain (``tree=None, budget=None``): ``num_speculative_tokens`` tokens, each sampled from the
  warped draft distribution (argmax at temperature 0), recorded in ``DraftTree.draft_probs``; with
  ``confidence_threshold`` > 0 the chain stops early, after the first draft whose probability under
  the draft is below it (a dynamic draft length; the stop depends on the draft alone, so every
  acceptance rule stays lossless);
- static tree (``tree=<preset>``): the preset's sibling-rank paths, grown level by level;
  ``tree_sampling`` picks the children (:func:`drafters.tree_expansion.choose_children`). At
  temperature 0 children are always the top-ranked tokens;
- dynamic tree (``budget=B``): EAGLE-2 style, the ``B`` nodes with the highest product of draft
  probabilities along their path, ``top_k_children`` per expanded node, at most
  ``num_speculative_tokens`` deep; children are deterministic.

The subclass supplies the model forwards (a catch-up forward giving the root's logits, a
:class:`~drafters.tree_expansion.TreeFeed` for tree levels, one-token forwards for a chain) and keeps
its cache in sync on commit.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from drafters.tree_expansion import TreeFeed, expand_dynamic, expand_static
from specdec.drafting import Drafter
from specdec.errors import ConfigError, positive_int
from specdec.rng import DRAFT
from specdec.sampling import draft_confidence, warp_probs
from specdec.tree import compile_tree, load_preset
from specdec.types import SAMPLING_MODES, DraftTree
from verifier import check_finite

log = logging.getLogger(__name__)
_RANKS_CHECKED: set = set()  # (preset paths, vocabulary size) already checked for ranks past the vocabulary


def flag_of(value, name: str) -> bool:
    """``value`` if it is a bool, else :class:`ConfigError` naming ``name`` (``bool("false")`` would be True)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: it must be true or false")
    return value


#: How a tree drafter picks a tree's children: :data:`specdec.types.SAMPLING_MODES` less ``chain`` (the tag of a
#: chain sampled from the draft, which a chain drafter sets itself: as a choice it failed mid-decode on a tree).
TREE_SAMPLINGS = tuple(mode for mode in SAMPLING_MODES if mode != "chain")


def check_tree_sampling(value, key: str = "tree_sampling") -> str:
    """``value`` if it is one of :data:`TREE_SAMPLINGS`, else :class:`ConfigError` naming them."""
    if value not in TREE_SAMPLINGS:
        chain = " (a chain: leave tree= unset, tree=none on the command line)" if value == "chain" else ""
        raise ConfigError(f"{key}={value!r} is unknown; choose one of {list(TREE_SAMPLINGS)}{chain}")
    return value


def confidence_threshold_of(value, chain: bool = True, key: str = "drafter.confidence_threshold") -> float:
    """``value`` as a chain's confidence threshold (a number in [0, 1)), else :class:`ConfigError` naming ``key``; a
    threshold > 0 needs a chain (``chain=False``: the drafter grows a tree)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{key}={value!r}: it must be a number in [0, 1) (0 drafts every chain to its full length)")
    if value > 0 and not chain:
        raise ConfigError(f"{key}={value} stops a chain early; this drafter grows a tree "
                          f"(tree=... or budget=...): set it to 0 or draft a chain")
    return float(value)


class TreeDrafter(Drafter):
    """Base of the drafters that grow a chain, a preset tree or a dynamic tree with one forward per level.

    Args:
        num_speculative_tokens: chain length k (>= 1); the depth limit of a dynamic tree; unused
            by a static tree (its preset sets the depth).
        tree: a preset name (``conf/tree/<name>.yaml``), a YAML path, or a list of sibling-rank paths.
        tree_sampling: ``deterministic``, ``with_replacement`` or ``without_replacement``.
        budget: number of nodes of a dynamic tree (>= 1); None for a chain or a static tree.
        top_k_children: children per expanded node of a dynamic tree (>= 1).
        confidence_threshold: a chain stops after the first draft whose draft probability is below
            this (0: always ``num_speculative_tokens``); chains only.
    """

    forward_label = "draft forward"  # names the forward in errors about non-finite logits

    def __init__(self, num_speculative_tokens: int = 4, tree=None, tree_sampling: str = "deterministic",
                 budget: int | None = None, top_k_children: int = 4, confidence_threshold: float = 0.0):
        super().__init__()
        self.k = positive_int(num_speculative_tokens, "num_speculative_tokens")
        check_tree_sampling(tree_sampling)
        if budget is not None:
            positive_int(budget, "budget")
            if tree is not None:
                raise ConfigError("give either a tree preset (tree=...) or a dynamic-tree budget (budget=...), "
                                  "not both")
            if tree_sampling != "deterministic":
                raise ConfigError(f"a dynamic tree (budget={budget}) has deterministic children; "
                                  f"tree_sampling={tree_sampling!r} needs a tree preset")
        self.top_k_children = positive_int(top_k_children, "top_k_children")
        self.tree_sampling, self.budget = tree_sampling, budget
        self.compiled = compile_tree(load_preset(tree)) if tree is not None else None
        self.confidence_threshold = confidence_threshold_of(confidence_threshold, self.mode == "chain")

    @property
    def mode(self) -> str:
        """``chain``, ``static`` (a tree preset) or ``dynamic`` (a budget)."""
        return "dynamic" if self.budget is not None else "static" if self.compiled is not None else "chain"

    @property
    def max_nodes(self) -> int:
        return {"chain": self.k, "static": self.compiled.num_nodes if self.compiled else 0,
                "dynamic": self.budget}[self.mode]

    @property
    def step_kind(self) -> str:
        """The :class:`specdec.drafting.StepShape` kind of this shape."""
        return {"chain": "chain", "static": "tree", "dynamic": "dynamic"}[self.mode]

    def samples_drafts(self, sampling) -> bool:
        """Whether its proposals under ``sampling`` are sampled (carry draft distributions that are not point
        masses): a chain's or a ``tree_sampling`` tree's above temperature 0 (unless ``top_k=1`` leaves one token); a
        dynamic tree's or a deterministic tree's never."""
        sampled_shape = self.mode == "chain" or (self.mode == "static" and self.tree_sampling != "deterministic")
        return sampled_shape and not sampling.greedy and sampling.top_k != 1

    def max_fed(self) -> int:
        """The most tree nodes one step feeds to the model (on top of the committed tokens)."""
        if self.mode == "dynamic":
            return min(self.top_k_children, self.budget) * (self.k - 1)
        return self.max_nodes

    def depth_limit(self, max_depth: int) -> int:
        """How deep this step's draft may go when the decode loop allows ``max_depth``."""
        return min(max_depth, self.compiled.max_depth if self.mode == "static" else self.k)

    def grow_chain(self, logits: torch.Tensor, k: int, forward_one: Callable[[int, int], torch.Tensor]) -> DraftTree:
        """A chain of at most ``k`` drafts from the root's draft ``logits [V]``; ``forward_one(token, i)``
        feeds draft ``i`` and returns the logits after it. Draft ``i`` is keyed ``(DRAFT, i)``. The chain
        ends early after a draft less likely than ``confidence_threshold`` (:meth:`unsure`)."""
        drafts, probs = [], []
        for i in range(k):
            check_finite(logits, f"{self.forward_label} at draft position {i + 1}", masked_ok=True)
            q = warp_probs(logits, self.ctx.sampling)  # [V]
            tok = int(q.argmax()) if self.ctx.sampling.greedy else int(self.ctx.rng.categorical(q[None], DRAFT, i)[0])
            drafts.append(tok)
            probs.append(q)
            if i + 1 < k and self.confidence_threshold and bool(
                    self.unsure(logits, q, torch.tensor(tok, device=q.device), self.ctx.sampling)):
                break
            if i + 1 < k:
                logits = forward_one(tok, i)
        return DraftTree.chain(torch.tensor(drafts, dtype=torch.long), torch.stack(probs))  # probs [<= k, V]

    def unsure(self, logits: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, sampling) -> torch.Tensor:
        """Whether a chain stops after ``tokens [...]`` drawn from ``q [..., V]`` (draft ``logits [..., V]``,
        warped by ``sampling``): bool ``[...]``, true where their draft probability is below
        ``confidence_threshold``."""
        return draft_confidence(logits, q, tokens, sampling) < self.confidence_threshold  # [...]

    def grow_tree(self, feed: TreeFeed, root_logits: torch.Tensor, depth_limit: int) -> tuple[DraftTree, list[int]]:
        """A static or dynamic tree grown through ``feed``; per node, its fed index (-1: not fed)."""
        check_finite(root_logits, f"{self.forward_label} at draft position 1", masked_ok=True)
        if self.mode == "dynamic":
            return expand_dynamic(feed, root_logits, depth_limit, self.budget, self.top_k_children)
        self._warn_ranks_past(root_logits.shape[-1])
        mode = "deterministic" if self.ctx.sampling.greedy else self.tree_sampling
        return expand_static(feed, self.compiled, root_logits, depth_limit, mode, self.ctx.sampling, self.ctx.rng)

    def _warn_ranks_past(self, vocab: int) -> None:
        """Warn once per preset and vocabulary size (a batch's per-row copies of a drafter too) where the preset has
        nodes ranked past the draft's ``vocab`` tokens (a tiny vocabulary): they, and the nodes under them, are never
        drafted (as Medusa warns when it drops them)."""
        if getattr(self, "_ranks_checked", None) == vocab:  # every later step: one attribute read, no hashing
            return
        self._ranks_checked = vocab
        if (self.compiled.paths, vocab) in _RANKS_CHECKED:
            return
        _RANKS_CHECKED.add((self.compiled.paths, vocab))
        past = sum(max(path) >= vocab for path in self.compiled.paths)  # a path holds its ancestors' ranks
        if past:
            log.warning("tree preset: %d of %d nodes are ranked past the draft's %d tokens (or lie under such a "
                        "node) and are never drafted", past, self.compiled.num_nodes, vocab)
