"""Acceptance rules over a batch of rows at once: the per-node rules of :mod:`specdec.acceptance`
written over ``[B, ...]`` tensors, with no Python loop over rows or over a row's tokens.

A rule walks every row's tree together, depth by depth (``max_depth`` iterations) and, at each depth,
over sibling slots (``K`` iterations, the widest node's child count), with masked updates: a row
that stopped (a rejection, a leaf, or a shorter tree) keeps its state. Every random number is the
keyed draw the per-node rule makes for the same row, node and step (:mod:`specdec.rng`), and the
arithmetic is the same, so a row's result equals the per-node rule's on that row's tree -- which is
what the batch tests check. Nothing is read back to the host inside a rule; the caller reads the
per-row results once (:meth:`specdec.batch_types.BatchAccept.to_host`).
"""
from __future__ import annotations

import torch

from specdec.batch_types import BatchAccept, BatchTree
from specdec.rng import ACCEPT, EXTRA, KeyedRandom
from specdec.sampling import SamplingParams, warp_probs


def _rows(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device)


def _renorm(dist: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Row-wise ``dist / dist.sum()``, or ``fallback`` where nothing is left (as the per-node rule)."""
    total = dist.sum(-1, keepdim=True)  # [B, 1]
    return torch.where(total > 1e-12, dist / total.clamp_min(1e-30), fallback)


def _zeroed(dist: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dist [B, V]`` with entry ``x[b]`` of each row set to 0."""
    return dist.scatter(1, x[:, None], 0.0)


class _Walk:
    """Per-row walk state: the current node slot (0: the root, 1 + i: node i) and the accepted path."""

    def __init__(self, tree: BatchTree):
        b, self.tree = tree.tokens.shape[0], tree
        device = tree.tokens.device
        self.cur = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        self.alive = torch.ones(b, dtype=torch.bool, device=device)  # [B] still walking
        self.accepted = torch.full((b, tree.max_depth), -1, dtype=torch.long, device=device)  # [B, D]
        self.counts = torch.zeros(b, dtype=torch.long, device=device)  # [B]

    def kids(self) -> torch.Tensor:
        """``[B, K]`` children of each row's current node (-1: none)."""
        return self.tree.children[_rows(self.cur), self.cur]

    def token(self, node: torch.Tensor) -> torch.Tensor:
        """``[B]`` tokens of nodes ``node [B]`` (any value where node < 0)."""
        return self.tree.tokens.gather(1, node.clamp_min(0)[:, None])[:, 0]

    def advance(self, depth: int, moved: torch.Tensor, chosen: torch.Tensor) -> None:
        """Rows with ``moved`` accept node ``chosen`` at ``depth``; the others stop walking."""
        self.accepted[:, depth] = torch.where(moved, chosen, -1)
        self.counts += moved.long()
        self.cur = torch.where(moved, chosen + 1, self.cur)
        self.alive &= moved


def batch_greedy(tree: BatchTree, logits: torch.Tensor, sampling: SamplingParams, rng: KeyedRandom) -> BatchAccept:
    """Greedy over ``logits [B, 1 + N, V]``: per row, the deepest path of target argmaxes; first sibling wins."""
    best = logits.argmax(-1)  # [B, 1 + N]
    walk = _Walk(tree)
    for depth in range(tree.max_depth):
        kids = walk.kids()  # [B, K]
        want = best.gather(1, walk.cur[:, None])  # [B, 1]
        match = (kids >= 0) & (tree.tokens.gather(1, kids.clamp_min(0)) == want)  # [B, K]
        moved = match.any(-1) & walk.alive  # [B]
        chosen = kids.gather(1, match.long().argmax(-1, keepdim=True))[:, 0]  # [B] the first matching child
        walk.advance(depth, moved, chosen)
    return BatchAccept(walk.accepted, walk.counts, best.gather(1, walk.cur[:, None])[:, 0])


def batch_rejection(tree: BatchTree, logits: torch.Tensor, sampling: SamplingParams,
                    rng: KeyedRandom) -> BatchAccept:
    """Speculative sampling over every row's tree (chains, sampled and deterministic children): the
    per-node :class:`specdec.acceptance.RejectionAcceptance`, row by row, in tensors."""
    p_all = warp_probs(logits, sampling)  # [B, 1 + N, V]
    walk = _Walk(tree)
    rows = _rows(walk.cur)
    p_left = p_all[:, 0]  # [B, V] p' of the node where each row stopped
    for depth in range(tree.max_depth):
        kids = walk.kids()  # [B, K]
        p = p_all[rows, walk.cur]  # [B, V] the running p', fresh at the new node
        q = _draft(tree, kids[:, 0])  # [B, V] q' for children drawn without replacement
        moved = torch.zeros_like(walk.alive)
        chosen = torch.full_like(walk.cur, -1)
        for slot in range(kids.shape[1]):
            c = kids[:, slot]  # [B]
            trying = (c >= 0) & walk.alive & ~moved  # [B]
            x = walk.token(c)  # [B]
            u = rng.uniform_per_row(ACCEPT, c.clamp_min(0))  # [B] the per-node rule's draw for node c
            px = p.gather(1, x[:, None])[:, 0]  # [B]
            if tree.draft_probs is None:  # deterministic: q is a point mass on x
                ok = trying & (u < px)
                p = torch.where((trying & ~ok)[:, None], _renorm(_zeroed(p, x), p), p)
            else:
                q_c = q if tree.sampling == "without_replacement" else _draft(tree, c)  # [B, V]
                qx = q_c.gather(1, x[:, None])[:, 0]  # [B]
                ok = trying & (u.double() * qx.double() < px.double())  # as the per-node rule
                rejected = (trying & ~ok)[:, None]  # [B, 1]
                p = torch.where(rejected, _renorm((p - q_c).clamp_min(0.0), p), p)
                if tree.sampling == "without_replacement":
                    q = torch.where(rejected, _renorm(_zeroed(q, x), q), q)
            chosen = torch.where(ok, c, chosen)
            moved |= ok
        stopped = walk.alive & ~moved  # every child rejected, or a leaf: p' stays as it is
        p_left = torch.where(stopped[:, None], p, p_left)
        walk.advance(depth, moved, chosen)
    p_left = torch.where(walk.alive[:, None], p_all[rows, walk.cur], p_left)  # rows that reached a leaf
    return BatchAccept(walk.accepted, walk.counts, rng.categorical(p_left, EXTRA))


def batch_typical(tree: BatchTree, logits: torch.Tensor, sampling: SamplingParams, rng: KeyedRandom,
                  epsilon: float, delta: float) -> BatchAccept:
    """Medusa's typical acceptance over every row: the first sibling with ``p(x) > min(eps, delta e^-H)``."""
    p_all = warp_probs(logits, sampling)  # [B, 1 + N, V]
    entropy = -(p_all * p_all.clamp_min(1e-30).log()).sum(-1)  # [B, 1 + N]
    thresh = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))  # [B, 1 + N]
    walk = _Walk(tree)
    rows = _rows(walk.cur)
    for depth in range(tree.max_depth):
        kids = walk.kids()  # [B, K]
        p = p_all[rows, walk.cur]  # [B, V]
        px = p.gather(1, tree.tokens.gather(1, kids.clamp_min(0)))  # [B, K]
        ok = (kids >= 0) & (px > thresh.gather(1, walk.cur[:, None]))  # [B, K]
        moved = ok.any(-1) & walk.alive
        walk.advance(depth, moved, kids.gather(1, ok.long().argmax(-1, keepdim=True))[:, 0])
    return BatchAccept(walk.accepted, walk.counts, rng.categorical(p_all[rows, walk.cur], EXTRA))


def _draft(tree: BatchTree, node: torch.Tensor) -> torch.Tensor | None:
    """``[B, V]`` the draft distribution of nodes ``node [B]`` (None for deterministic trees)."""
    if tree.draft_probs is None:
        return None
    return tree.draft_probs[_rows(node), node.clamp_min(0)]
