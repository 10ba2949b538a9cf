"""The data of one batched speculative step: every row's draft tree padded to one shape.

propose (one :class:`~specdec.types.DraftTree` per row) -> :class:`BatchTree` -> one verify forward
over ``[B, 1 + N]`` -> tensorized acceptance -> :class:`BatchAccept` (read by the host once per step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.tree import children_lists
from specdec.types import DraftTree


@dataclass
class BatchTree:
    """Per-row draft trees padded to ``N`` nodes (a row's missing nodes are invalid).

    Attributes:
        tokens: ``[B, N]`` node tokens (0 where invalid).
        parents: ``[B, N]`` parent node (-1: the root, also for invalid nodes).
        depth: ``[B, N]`` node depth (1 for the root's children; 1 for invalid nodes).
        valid: ``[B, N]`` bool, the row's real nodes.
        children: ``[B, 1 + N, K]`` for the root (slot 0) and every node (slot 1 + i), its children's
            node indices in sibling order, -1 past the last.
        mask: ``[B, 1 + N, 1 + N]`` bool ancestor-or-self mask over root and nodes (an invalid node
            sees only itself and the root).
        draft_probs: ``[B, N, V]`` the warped draft distribution each node was sampled from, or None.
        sampling: the rows' common :data:`specdec.types.SAMPLING_MODES` entry.
        num_nodes: per row, its real node count (host).
        max_depth: the deepest real node of any row (host).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    children: torch.Tensor
    mask: torch.Tensor
    draft_probs: torch.Tensor | None
    sampling: str
    num_nodes: list[int]
    max_depth: int

    @property
    def width(self) -> int:
        """``N``: the padded node count."""
        return int(self.tokens.shape[1])

    @classmethod
    def stack(cls, trees: list[DraftTree], device: torch.device | str = "cpu") -> BatchTree:
        """Pad ``trees`` (one per row, possibly empty) to the widest. Sampled trees must share one sampling mode
        and a vocabulary; deterministic trees may join them (a hybrid drafter's lookup rows): their drafts get
        point-mass distributions, on which the sampled rules compute exactly the deterministic rule (accept x
        with probability p(x); after a rejection, p with x zeroed, renormalised)."""
        b, n = len(trees), max((t.num_nodes for t in trees), default=0)
        modes = {t.sampling for t in trees if t.num_nodes} - {"deterministic"}
        if len(modes) > 1:
            raise ValueError(f"a batch's sampled draft trees must share one sampling mode, got {sorted(modes)}")
        sampling = modes.pop() if modes else "deterministic"
        if sampling == "without_replacement" and any(t.sampling == "deterministic" and not t.is_chain for t in trees):
            # q' of the first child is renormalised after a rejection: one child per node only
            raise ValueError("a deterministic tree with siblings cannot share a batch with trees sampled without "
                             "replacement; only deterministic chains can")
        if n == 0:
            return cls._no_drafts(b, device)
        tokens = torch.zeros(b, n, dtype=torch.long)  # [B, N]
        parents = torch.full((b, n), -1, dtype=torch.long)  # [B, N]
        depth = torch.ones(b, n, dtype=torch.long)  # [B, N]
        valid = torch.zeros(b, n, dtype=torch.bool)  # [B, N]
        mask = torch.zeros(b, n + 1, n + 1, dtype=torch.bool)  # [B, 1 + N, 1 + N]
        mask[:, :, 0] = True
        mask[:, range(n + 1), range(n + 1)] = True
        kids: list[list[list[int]]] = []
        for row, tree in enumerate(trees):
            m = tree.num_nodes
            kids.append(children_lists(tree.parents) + [[] for _ in range(n - m)])
            if m:  # an empty row keeps the defaults: no nodes, the root sees itself
                tokens[row, :m], parents[row, :m], depth[row, :m] = tree.tokens, tree.parents, tree.depth
                valid[row, :m] = True
                mask[row, 1 : m + 1, 1 : m + 1] = tree.ancestor_mask
        k = max((len(c) for row in kids for c in row), default=0)
        children = torch.full((b, n + 1, max(k, 1)), -1, dtype=torch.long)  # [B, 1 + N, K]
        for row, lists in enumerate(kids):
            for slot, c in enumerate(lists):
                if c:
                    children[row, slot, : len(c)] = torch.tensor(c, dtype=torch.long)
        probs = None
        if sampling != "deterministic":
            vocab = next(t.draft_probs.shape[-1] for t in trees if t.draft_probs is not None)
            probs = torch.zeros(b, n, vocab, dtype=torch.float32, device=device)  # [B, N, V]
            for row, tree in enumerate(trees):
                if tree.draft_probs is not None:
                    probs[row, : tree.num_nodes] = tree.draft_probs.to(device).float()
                elif tree.num_nodes:  # a deterministic tree among sampled ones: each draft a point mass
                    probs[row, range(tree.num_nodes), tree.tokens.to(device)] = 1.0
        max_depth = max((int(t.depth.max()) for t in trees if t.num_nodes), default=0)
        return cls(tokens.to(device), parents.to(device), depth.to(device), valid.to(device), children.to(device),
                   mask.to(device), probs, sampling, [t.num_nodes for t in trees], max_depth)

    @classmethod
    def _no_drafts(cls, b: int, device: torch.device | str) -> BatchTree:
        """``b`` rows without a draft (an autoregressive step): every row verifies its root alone."""
        none = torch.zeros(b, 0, dtype=torch.long, device=device)  # [B, 0]
        return cls(none, none, none, none.bool(), torch.full((b, 1, 1), -1, dtype=torch.long, device=device),
                   torch.ones(b, 1, 1, dtype=torch.bool, device=device), None, "deterministic", [0] * b, 0)


@dataclass
class BatchAccept:
    """What a tensorized rule decided for every row of one step.

    Attributes:
        accepted: ``[B, D]`` node indices of each row's accepted path, root's child first, -1 after it.
        counts: ``[B]`` accepted drafts per row.
        extra: ``[B]`` the recovered (after a rejection) or bonus (after a leaf) token of each row.
    """

    accepted: torch.Tensor
    counts: torch.Tensor
    extra: torch.Tensor

    def to_host(self, tokens: torch.Tensor) -> list[tuple[list[int], list[int]]]:
        """Per row ``(accepted nodes, emitted tokens)`` in one device-to-host copy (``tokens [B, N]``)."""
        b, d = self.accepted.shape
        picked = tokens.gather(1, self.accepted.clamp_min(0)) if d else tokens[:, :0]  # [B, D]
        packed = torch.cat([self.counts[:, None], self.accepted, picked, self.extra[:, None]], 1).tolist()
        out = []
        for row in packed:
            n = row[0]
            out.append((row[1 : 1 + n], row[1 + d : 1 + d + n] + [row[-1]]))
        return out
