"""Data types passed between the phases of one speculative step.

propose -> :class:`DraftTree` -> verify -> :class:`VerifyOutput` -> accept -> :class:`AcceptResult` -> commit.
A chain of k drafts is a tree whose parents are ``[-1, 0, 1, ..., k-2]``; there is one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.errors import SpecDecError

#: How the children of a node were chosen; it decides which acceptance arithmetic is lossless.
#: ``chain``: a chain of sampled drafts, node i drawn from ``draft_probs[i]`` (one child per node, so
#: with and without replacement coincide); the tree modes name how siblings were drawn.
SAMPLING_MODES = ("deterministic", "chain", "with_replacement", "without_replacement")


def integer_ids(tokens: torch.Tensor) -> bool:
    """Whether ``tokens`` can hold token ids: an integer dtype (not float, complex or bool, which a cast to long
    would turn into other ids)."""
    return not (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool)


@dataclass
class DraftTree:
    """Draft nodes proposed for one step (the root, the newest committed token, is not a node).

    Attributes:
        tokens: ``[N]`` token id of each node.
        parents: ``[N]`` index of each node's parent node, ``-1`` for a child of the root.
            Parents come before children (topological order).
        draft_probs: ``[N, V]`` the (warped) draft distribution node ``i`` was sampled from, or
            ``None`` when the proposals are deterministic (top-k, n-gram, Medusa).
        sampling: one of :data:`SAMPLING_MODES`; ``deterministic`` when ``draft_probs`` is None.
        source: which drafter proposed it, where one drafter combines several (the hybrid's parts); the
            decoders count steps by it (``DecodeStats.steps_by_source``). None: not counted.
        source_depth: the levels its source drafted where the tree holds more (a merged hybrid tree: the
            model-drafted part's depth, the grafted lookup chain's nodes cost no forward); None: the tree's depth.
    """

    tokens: torch.Tensor  # [N] long
    parents: torch.Tensor  # [N] long
    draft_probs: torch.Tensor | None = None  # [N, V]
    sampling: str = "deterministic"
    _depth: torch.Tensor | None = field(default=None, repr=False)
    _mask: torch.Tensor | None = field(default=None, repr=False)
    source: str | None = None
    source_depth: int | None = None

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"DraftTree.sampling={self.sampling!r}; expected one of {SAMPLING_MODES}")
        if self.draft_probs is None and self.sampling != "deterministic":
            raise ValueError("a sampled DraftTree needs draft_probs [N, V]; pass sampling='deterministic' otherwise")
        if self.sampling == "chain" and not self.is_chain:
            raise ValueError("sampling='chain' needs a chain (parents [-1, 0, 1, ...]); name how a tree's siblings "
                             "were drawn: with_replacement or without_replacement")

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_chain(self) -> bool:
        """Every node's parent is the node before it (parents ``[-1, 0, 1, ...]``); true for no nodes."""
        return torch.equal(self.parents.cpu(), torch.arange(-1, self.num_nodes - 1, dtype=self.parents.dtype))

    @classmethod
    def chain(cls, tokens: torch.Tensor | list[int], draft_probs: torch.Tensor | None = None) -> DraftTree:
        """A chain of ``len(tokens)`` drafts (a tensor ``[N]`` or a list of ids); sampled when ``draft_probs``
        ``[N, V]`` is given."""
        given = torch.as_tensor(tokens)  # [N]
        if given.numel() and not integer_ids(given):  # an empty list reads as float
            raise SpecDecError(f"DraftTree.chain: tokens of dtype {given.dtype}; token ids must be integers (a float "
                               "id would be truncated to another token)")
        tokens = given.to(torch.long).cpu()  # [N]
        n = int(tokens.shape[0])
        parents = torch.arange(-1, n - 1, dtype=torch.long)  # [N]
        mode = "deterministic" if draft_probs is None else "chain"
        return cls(tokens=tokens, parents=parents, draft_probs=draft_probs, sampling=mode)

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(tokens=torch.empty(0, dtype=torch.long), parents=torch.empty(0, dtype=torch.long))

    @property
    def depth(self) -> torch.Tensor:
        """``[N]`` depth of each node; children of the root have depth 1."""
        if self._depth is None:
            from specdec.tree import depths_from_parents

            self._depth = depths_from_parents(self.parents)
        return self._depth

    @property
    def ancestor_mask(self) -> torch.Tensor:
        """``[N, N]`` bool, true where node i may attend to node j (j is i or an ancestor of i)."""
        if self._mask is None:
            from specdec.tree import ancestor_mask

            self._mask = ancestor_mask(self.parents)
        return self._mask


@dataclass
class VerifyOutput:
    """The target's scores for the root (row 0) and every draft node (row 1 + i).

    A batched step's output has a leading batch dimension (``[B, 1 + N, ...]``, each row's nodes first,
    then padding) and ``nodes``, each row's real node count.
    """

    logits: torch.Tensor  # [1 + N, V] float32
    hidden: torch.Tensor  # [1 + N, H] last hidden state
    nodes: list[int] | None = None  # batched: row b's real node count (host); None at batch 1


@dataclass
class AcceptResult:
    """What one acceptance rule decided for one step.

    Attributes:
        accepted_nodes: indices into the tree of the accepted path, root's child first.
        tokens: the emitted tokens: the accepted nodes' tokens followed by one extra token
            (the correction sampled after a rejection, or the bonus token after a leaf).
    """

    accepted_nodes: list[int]
    tokens: list[int]

    @property
    def num_accepted_drafts(self) -> int:
        return len(self.accepted_nodes)

    @property
    def accepted_on_chain(self) -> int:
        """Accepted drafts along the chain of nodes ``0, 1, 2, ...``: all of them for a chain's step; fewer
        where the path leaves that chain (a merged hybrid tree's branch hanging off a drafter's chain)."""
        return next((i for i, node in enumerate(self.accepted_nodes) if node != i), len(self.accepted_nodes))
