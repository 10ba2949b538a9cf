"""Growing a token tree with a draft model, one draft forward per depth.

Two ways to grow it, both feeding a whole tree level to the draft model in one forward with
tree attention:

- :func:`expand_static`: a preset (sibling-rank paths, compiled by :func:`specdec.tree.compile_tree`).
  The children of a node are chosen by sibling rank: ``deterministic`` (the draft's top tokens),
  ``with_replacement`` (i.i.d. draws from the node's warped draft distribution q) or
  ``without_replacement`` (draws without replacement from q, by Gumbel-top-k).
- :func:`expand_dynamic`: EAGLE-2 style (arXiv 2406.16858): expand the top-k children of the best
  frontier nodes by the product of draft probabilities along the path, then keep the ``budget``
  best nodes overall. Children are deterministic.

The draft KV cache holds the committed prefix (root included, ``prefix_len`` slots), then the fed
tree nodes in the order they were fed (:class:`TreeFeed`). Only nodes that get children are fed;
on commit the accepted path's fed nodes (always a prefix of the path) are compacted after the
prefix, so the cache equals a plain forward over the committed tokens.
"""
from __future__ import annotations

import torch

from drafters.fast_decoder import forward_lm
from specdec.cache import SpecDecCache
from specdec.rng import CHILD, KeyedRandom
from specdec.sampling import SamplingParams, warp_probs
from specdec.tree import CompiledTree, children_lists
from specdec.types import DraftTree
from verifier import check_finite


class TreeFeed:
    """Feeds tree nodes to the draft model after the ``prefix_len`` committed slots of its cache.

    Subclasses change what one forward takes (:meth:`run`); the masks and positions stay the same.

    Fed node ``j`` sits in cache slot ``prefix_len + j`` at position ``prefix_len - 1 + depth``
    (the root is the last prefix slot). It sees the whole prefix, its fed ancestors and itself.
    """

    label = "draft model"  # names the forward in errors about non-finite logits

    def __init__(self, model, cache: SpecDecCache, device: torch.device, fast: bool = False):
        self.model, self.cache, self.device, self.fast = model, cache, device, fast
        self.prefix_len = cache.length
        self.anc = torch.zeros(0, 0, dtype=torch.bool)  # [F, F] ancestor-or-self among fed nodes

    @property
    def num_fed(self) -> int:
        return int(self.anc.shape[0])

    def feed(self, tokens: list[int], parents: list[int], depth: int) -> torch.Tensor:
        """Feed one level: ``tokens`` at ``depth`` whose parents are fed nodes ``parents`` (-1: the root).

        Returns the draft logits ``[n, V]`` (float32) after each fed token.
        """
        f, n = self.num_fed, len(tokens)
        if self.cache.length != self.prefix_len + f:
            raise RuntimeError(f"draft cache holds {self.cache.length} slots, expected {self.prefix_len + f}")
        rows = torch.zeros(n, f + n, dtype=torch.bool)  # [n, F + n]
        for i, p in enumerate(parents):
            if p >= 0:
                rows[i, :f] = self.anc[p]
            rows[i, f + i] = True
        anc = torch.zeros(f + n, f + n, dtype=torch.bool)  # [F + n, F + n]
        anc[:f, :f] = self.anc
        anc[f:] = rows
        self.anc = anc
        dense = torch.ones(n, self.prefix_len + f + n, dtype=torch.bool)  # [n, S]
        dense[:, self.prefix_len :] = rows
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, n]
        position_ids = torch.full((1, n), self.prefix_len - 1 + depth, dtype=torch.long, device=self.device)  # [1, n]
        # A dense key mask (SDPA): the kernel's "prefix + [n, n] tree" cannot hide earlier levels' siblings.
        # One token that sees every slot (a chain's next node: every fed node is its ancestor) needs no mask,
        # and takes the causal one-token forward a chain does.
        key_mask = None if n == 1 and bool(rows.all()) else dense.to(self.device)[None, None]  # [1, 1, n, S]
        logits = self.run(ids, parents, key_mask, position_ids)  # [n, V]
        check_finite(logits, f"{self.label} tree forward at depth {depth}", masked_ok=True)
        return logits

    def run(self, ids: torch.Tensor, parents: list[int], key_mask: torch.Tensor | None,
            position_ids: torch.Tensor) -> torch.Tensor:
        """One forward of the level ``ids [1, n]`` (fed parents ``parents``) on the cache; logits ``[n, V]``.

        A drafter whose forward takes more than tokens (an EAGLE head: the parent's feature) overrides this.
        """
        logits, _ = forward_lm(self.model, ids, self.cache, position_ids, key_mask, fast=self.fast,
                               output_hidden=False)  # [1, n, V]
        return logits[0]


def choose_children(
    logits: torch.Tensor, ranks: list[int], mode: str, sampling: SamplingParams, rng: KeyedRandom | None = None,
    node: int = 0,
) -> tuple[list[int | None], torch.Tensor | None]:
    """Tokens for the children of one node, in sibling order; ``None`` for a child that cannot exist.

    Args:
        logits: ``[V]`` draft logits at the node.
        ranks: the children's sibling ranks (ascending).
        mode: ``deterministic``: the child of rank r is the draft's rank-r token (by raw logits, the
            order every warping keeps); ``with_replacement``: the i-th child is an i.i.d. draw from
            the warped q; ``without_replacement``: the children are draws without replacement from
            q in draw order (Gumbel-top-k); children past q's support are dropped.
        rng, node: the run's keyed random numbers, keyed by ``node`` (the node's index in the preset,
            0 for the root) and the draw: the same in a batched run.

    Returns:
        the tokens and the node's warped q ``[V]`` (None when deterministic).
    """
    vocab, m = logits.shape[-1], len(ranks)
    if mode == "deterministic":
        order = torch.topk(logits, min(max(ranks) + 1, vocab)).indices.tolist()
        return [order[r] if r < len(order) else None for r in ranks], None
    q = warp_probs(logits, sampling)  # [V]
    if mode == "with_replacement":
        draws = torch.arange(m, device=q.device)  # [m]
        return rng.categorical(q.expand(1, m, vocab), CHILD, node, draws)[0].tolist(), q
    drawn = rng.top_without_replacement(q[None], min(m, vocab), CHILD, node)[0].tolist()  # Gumbel-top-k
    drawn = drawn[: int((q > 0).sum())]  # draws past q's support do not exist
    return [drawn[i] if i < len(drawn) else None for i in range(m)], q


class _Nodes:
    """The draft nodes of one step as they are built (topological order)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.probs: list[torch.Tensor] = []
        self.fed: list[int] = []  # fed index of each node, -1 if it was not fed

    def add(self, token: int, parent: int, q: torch.Tensor | None) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        if q is not None:
            self.probs.append(q)
        self.fed.append(-1)
        return len(self.tokens) - 1

    def fed_parents(self, nodes: list[int]) -> list[int]:
        return [self.fed[self.parents[i]] if self.parents[i] >= 0 else -1 for i in nodes]

    def tree(self, mode: str) -> DraftTree:
        if not self.tokens:
            return DraftTree.empty()
        probs = torch.stack(self.probs) if mode != "deterministic" else None  # [N, V]
        return DraftTree(tokens=torch.tensor(self.tokens, dtype=torch.long),
                         parents=torch.tensor(self.parents, dtype=torch.long), draft_probs=probs, sampling=mode)


def expand_static(
    feed: TreeFeed, compiled: CompiledTree, root_logits: torch.Tensor, depth_limit: int, mode: str,
    sampling: SamplingParams, rng: KeyedRandom | None,
) -> tuple[DraftTree, list[int]]:
    """Grow the preset ``compiled`` (pruned to ``depth_limit``) level by level.

    Returns the tree and, per node, its fed index in ``feed`` (-1: not fed).
    """
    kids = children_lists(compiled.parents)  # [root] + per compiled node, siblings in rank order
    ranks = compiled.rank.tolist()
    nodes = _Nodes()
    frontier = [(-1, -1, root_logits)]  # (compiled index, node index, draft logits at it)
    for depth in range(1, depth_limit + 1):
        level = []  # (compiled index, node index)
        for c_parent, parent, logits in frontier:
            children = kids[c_parent + 1]
            if not children:
                continue
            tokens, q = choose_children(logits, [ranks[c] for c in children], mode, sampling, rng, c_parent + 1)
            for c, tok in zip(children, tokens):
                if tok is not None:
                    level.append((c, nodes.add(tok, parent, q)))
        to_feed = [(c, i) for c, i in level if kids[c + 1]] if depth < depth_limit else []
        if not to_feed:
            break
        first = feed.num_fed
        idx = [i for _, i in to_feed]
        logits = feed.feed([nodes.tokens[i] for i in idx], nodes.fed_parents(idx), depth)  # [n, V]
        for j, i in enumerate(idx):
            nodes.fed[i] = first + j
        frontier = [(c, i, logits[j]) for j, (c, i) in enumerate(to_feed)]
    return nodes.tree(mode), nodes.fed


def expand_dynamic(
    feed: TreeFeed, root_logits: torch.Tensor, depth_limit: int, budget: int, top_k: int
) -> tuple[DraftTree, list[int]]:
    """EAGLE-2-style dynamic tree with deterministic children.

    Each depth: the ``min(top_k, budget)`` best nodes of the newest level (score: sum of draft
    log-probabilities along the path) are fed in one forward and get their ``top_k`` most likely
    children as candidates. At the end the ``budget`` best candidates are kept; a child never
    scores above its parent (ties go to the shallower node), so they form a tree.
    """
    cand = _Nodes()
    score: list[float] = []
    depth_of: list[int] = []

    def add_children(parent: int, logits: torch.Tensor, base: float, depth: int) -> None:
        logp = torch.log_softmax(logits.float(), -1)  # [V]
        top = torch.topk(logp, min(top_k, logp.shape[-1]))
        for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
            cand.add(tok, parent, None)
            score.append(base + lp)
            depth_of.append(depth)

    add_children(-1, root_logits, 0.0, 1)
    width = min(top_k, budget)
    for depth in range(1, depth_limit):
        level = [i for i in range(len(score)) if depth_of[i] == depth]
        beam = sorted(level, key=lambda i: (-score[i], i))[:width]
        first = feed.num_fed
        logits = feed.feed([cand.tokens[i] for i in beam], cand.fed_parents(beam), depth)  # [n, V]
        for j, i in enumerate(beam):
            cand.fed[i] = first + j
            add_children(i, logits[j], score[i], depth + 1)
    keep: set[int] = set()
    for i in sorted(range(len(score)), key=lambda i: (-score[i], depth_of[i], i)):
        if len(keep) >= budget:
            break
        if cand.parents[i] < 0 or cand.parents[i] in keep:
            keep.add(i)
    nodes = _Nodes()
    new_index: dict[int, int] = {}
    for i in sorted(keep):  # candidate order is topological
        p = cand.parents[i]
        new_index[i] = nodes.add(cand.tokens[i], new_index[p] if p >= 0 else -1, None)
        nodes.fed[new_index[i]] = cand.fed[i]
    return nodes.tree("deterministic"), nodes.fed


def accepted_fed_slots(accepted_nodes: list[int], fed: list[int]) -> list[int]:
    """Fed indices of the accepted path's fed nodes: the path up to its first unfed node (or its first node
    past ``fed``: one another drafter added, a merged hybrid tree's)."""
    keep = []
    for node in accepted_nodes:
        if node >= len(fed) or fed[node] < 0:
            break
        keep.append(fed[node])
    return keep
