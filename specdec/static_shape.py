"""A draft shape (a chain or a tree preset) as fixed index buffers, and its growth over a batch of rows.

The static step (:mod:`specdec.static_step`) drafts the same shape for every row and every step, so
everything about the shape is computed once here: per node its parent, depth and sibling rank, the
children lists as a ``[1 + N, K]`` table, the ancestor mask over root and nodes, and which nodes the
draft model is fed (the nodes that have children: "fed" nodes, numbered in node order, which is
depth order). :func:`grow` then drafts one tree per row, one draft forward per level, with no host
reads: node ``i`` of a row is node ``i`` of the batch-1 drafter's tree for that row (same tokens,
same keyed draws), because the batch-1 drafter adds nodes level by level in this same order.

Children are chosen as :func:`drafters.tree_expansion.choose_children` (``deterministic``,
``with_replacement``) or, for a chain, as :meth:`drafters.tree_drafter.TreeDrafter.grow_chain`.
``without_replacement`` can drop children (draws past the draft's support), which would renumber
the nodes, so the static step does not take it. :func:`static_drafter` says which drafters the step runs
and the shape it compiles for each.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specdec.errors import ConfigError
from specdec.models import check_same_vocab, text_config
from specdec.rng import CHILD, DRAFT, KeyedRandom
from specdec.sampling import SamplingParams, warp_probs
from specdec.tree import CompiledTree, children_lists

#: The children modes the static step can grow (a chain's sampled drafts are ``chain``).
STATIC_MODES = ("chain", "deterministic", "with_replacement")


@dataclass(frozen=True)
class Level:
    """The nodes at depth ``depth``: node indices ``lo .. hi - 1``, their parents ``0 .. P - 1`` (in order).

    Attributes:
        parent_slot: ``[P]`` each parent's frontier slot (0: the root, 1 + j: fed node j).
        parent_of: ``[n]`` per node, its parent's index among the level's ``P`` parents.
        rank: ``[n]`` per node, its sibling rank (deterministic children: the parent's rank-r token).
        groups: per parent ``(key, m)``: its key for sampled children (its node index + 1; the root 0)
            and its ``m`` children (contiguous, in node order), which get draws ``0 .. m - 1``.
        fed: ``[f]`` the level's fed nodes (node indices); ``num_fed``: f; ``fed_lo``: the first one's fed index.

    Index tensors live on the device, so a captured step copies nothing from the host.
    """

    depth: int
    lo: int
    hi: int
    parent_slot: torch.Tensor
    parent_of: torch.Tensor
    rank: torch.Tensor
    groups: tuple[tuple[int, int], ...]
    fed: torch.Tensor
    num_fed: int
    fed_lo: int


class StaticShape:
    """A compiled tree (a chain is the preset ``[[0], [0, 0], ...]``) as fixed device buffers.

    Args:
        compiled: the preset.
        mode: how children are chosen: ``chain`` (one sampled or argmax draft per level),
            ``deterministic`` (the draft's top tokens by sibling rank) or ``with_replacement``.
        device: where the buffers live.
    """

    def __init__(self, compiled: CompiledTree, mode: str, device: torch.device | str):
        if mode not in STATIC_MODES:
            raise ValueError(f"the static step grows {STATIC_MODES} children, not {mode!r}")
        self.mode = mode
        self.num_nodes, self.max_depth = compiled.num_nodes, compiled.max_depth
        parents = compiled.parents.tolist()
        self.is_chain = parents == list(range(-1, self.num_nodes - 1))
        kids = children_lists(compiled.parents)  # [root] + per node
        fed_index, f = [], 0
        for i in range(self.num_nodes):
            fed_index.append(f if kids[i + 1] else -1)
            f += bool(kids[i + 1])
        self.num_fed = f
        self.levels = self._levels(compiled, parents, kids, fed_index, device)
        self.max_rank = int(compiled.rank.max()) if self.num_nodes else 0
        to = {"device": device}
        self.parents = compiled.parents.to(**to)  # [N]
        self.depth = compiled.depth.to(**to)  # [N]
        self.fed = torch.tensor(fed_index, dtype=torch.long, **to)  # [N] fed index, -1 for a leaf
        width = max((len(c) for c in kids), default=1) or 1
        table = torch.full((self.num_nodes + 1, width), -1, dtype=torch.long)  # [1 + N, K]
        for slot, c in enumerate(kids):
            table[slot, : len(c)] = torch.tensor(c, dtype=torch.long)
        self.children = table.to(**to)
        mask = torch.eye(self.num_nodes + 1, dtype=torch.bool)  # [1 + N, 1 + N] root and ancestors
        mask[:, 0] = True
        mask[1:, 1:] = compiled.mask
        self.mask = mask.to(**to)
        fed_nodes = [i for i in range(self.num_nodes) if fed_index[i] >= 0]
        self.fed_mask = compiled.mask[fed_nodes][:, fed_nodes].to(**to)  # [F, F] ancestors among fed nodes
        depths = compiled.depth.tolist()
        self.nodes_upto = torch.tensor([sum(d <= n for d in depths) for n in range(self.max_depth + 1)], **to)  # [D + 1]

    @staticmethod
    def _levels(compiled: CompiledTree, parents: list[int], kids: list[list[int]], fed_index: list[int],
                device: torch.device | str) -> list[Level]:
        levels = []
        depths, ranks = compiled.depth.tolist(), compiled.rank.tolist()

        def on_device(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)

        for d in range(1, compiled.max_depth + 1):
            nodes = [i for i, x in enumerate(depths) if x == d]  # contiguous: nodes are sorted by depth
            fed = [i for i in nodes if fed_index[i] >= 0]
            owners = list(dict.fromkeys(parents[i] for i in nodes))  # the level's parents, in node order
            groups = tuple((p + 1, len(kids[p + 1])) for p in owners)
            levels.append(Level(
                depth=d, lo=nodes[0], hi=nodes[-1] + 1,
                parent_slot=on_device(0 if p < 0 else 1 + fed_index[p] for p in owners),
                parent_of=on_device(owners.index(parents[i]) for i in nodes),
                rank=on_device(ranks[i] for i in nodes), groups=groups,
                fed=on_device(fed), num_fed=len(fed), fed_lo=fed_index[fed[0]] if fed else 0))
        return levels

    def valid(self, budget: torch.Tensor) -> torch.Tensor:
        """``[B, N]``: the nodes a row drafts when it may go ``budget [B]`` deep."""
        return self.depth[None, :] <= budget[:, None]

    def row_children(self, valid: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, K]`` children tables with every invalid child -1 (``valid [B, N]``)."""
        kids = self.children.expand(valid.shape[0], -1, -1)  # [B, 1 + N, K]
        ok = valid.gather(1, kids.clamp_min(0).flatten(1)).view_as(kids) & (kids >= 0)  # [B, 1 + N, K]
        return torch.where(ok, kids, -1)


def grow(shape: StaticShape, root_logits: torch.Tensor, feed: Callable[[torch.Tensor, Level], torch.Tensor],
         sampling: SamplingParams, rng: KeyedRandom) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft ``shape`` for every row from the draft's ``root_logits [B, V]``.

    ``feed(ids [B, f], level)`` runs the draft model on a level's fed nodes and returns their logits
    ``[B, f, V]``. Returns ``(tokens [B, N], q [B, N, V] or None)``: each node's token and the warped
    draft distribution it was drawn from (None when greedy or deterministic).
    """
    b, vocab = root_logits.shape
    frontier = root_logits.new_zeros(b, 1 + shape.num_fed, vocab)  # [B, 1 + F, V] draft logits at root and fed nodes
    frontier[:, 0] = root_logits
    tokens = torch.zeros(b, shape.num_nodes, dtype=torch.long, device=root_logits.device)  # [B, N]
    sampled = not sampling.greedy and shape.mode != "deterministic"
    probs = root_logits.new_zeros(b, shape.num_nodes, vocab, dtype=torch.float32) if sampled else None  # [B, N, V]
    for level in shape.levels:
        tok, q = _children(shape, level, frontier, sampling, rng)
        tokens[:, level.lo : level.hi] = tok
        if probs is not None:
            probs[:, level.lo : level.hi] = q
        if level.num_fed:
            logits = feed(tokens.index_select(1, level.fed), level)  # [B, f, V]
            frontier[:, 1 + level.fed_lo : 1 + level.fed_lo + level.num_fed] = logits.to(frontier.dtype)
    return tokens, probs


def _children(shape: StaticShape, level: Level, frontier: torch.Tensor, sampling: SamplingParams,
              rng: KeyedRandom) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One level's tokens ``[B, n]`` and, when sampled, each node's parent distribution ``[B, n, V]``
    (the parents' logits are ranked or warped once per parent, not once per child)."""
    logits = frontier.index_select(1, level.parent_slot)  # [B, P, V] the level's parents' draft logits
    if shape.mode == "chain":  # grow_chain: draft i is the argmax or a draw keyed (DRAFT, i)
        q = warp_probs(logits[:, 0], sampling)  # [B, V]
        tok = q.argmax(-1) if sampling.greedy else rng.categorical(q, DRAFT, level.depth - 1)  # [B]
        return tok[:, None], q[:, None]
    if sampling.greedy or shape.mode == "deterministic":  # the parent's rank-r token by raw logits
        top = torch.topk(logits, shape.max_rank + 1, dim=-1).indices  # [B, P, R]
        return top[:, level.parent_of, level.rank], None  # [B, n]
    q = warp_probs(logits, sampling)  # [B, P, V]
    draws = [rng.categorical(q[:, p : p + 1].expand(-1, m, -1), CHILD, key, torch.arange(m, device=q.device))
             for p, (key, m) in enumerate(level.groups)]  # [B, m] per parent: i.i.d. draws (CHILD, parent, i)
    return torch.cat(draws, 1), q.index_select(1, level.parent_of)  # [B, n], [B, n, V]


#: ``none``: the ragged batched path; ``static``: the fixed-shape step, eager; ``graph``: captured; ``inductor``: compiled.
COMPILE_MODES = ("none", "static", "graph", "inductor")


def check_compile(compile: str, key: str = "compile") -> None:
    """:class:`ConfigError` naming the choices unless ``compile`` is one of :data:`COMPILE_MODES`."""
    if compile not in COMPILE_MODES:
        raise ConfigError(f"{key}={compile!r} is unknown; choose one of {list(COMPILE_MODES)}")


def static_drafter(drafter, sampling, target=None) -> tuple:
    """``(draft model, compiled shape, children mode)`` of a drafter the static step supports, or
    ``(None, None, None)`` for plain decoding: a draft model (or the layer-skip self-draft) drafting a
    chain or a tree preset with deterministic or with-replacement children. ``target``: bind the
    drafter to it (a layer-skip drafter builds its model then); None only checks."""
    from drafters.draft_model import DraftModelDrafter
    from drafters.none import NoDrafter
    from specdec.errors import ConfigError
    from specdec.tree import chain_paths, compile_tree

    if isinstance(drafter, NoDrafter):
        return None, None, None
    shape = f"{type(drafter).__name__}{' (' + drafter.mode + ')' if hasattr(drafter, 'mode') else ''}"
    if not isinstance(drafter, DraftModelDrafter) or drafter.mode == "dynamic":
        raise ConfigError(f"the static step (compile=static|graph|inductor) supports drafter=none and draft-model "
                          f"chains and tree presets only, not {shape}: use compile=none")
    if drafter.confidence_threshold:
        raise ConfigError(f"the static step drafts fixed shapes; drafter.confidence_threshold="
                          f"{drafter.confidence_threshold} (a dynamic draft length) needs compile=none, or set it to 0")
    if drafter.mode == "chain":
        compiled, mode = compile_tree(chain_paths(drafter.max_nodes)), "chain"
    else:
        compiled, mode = drafter.compiled, "deterministic" if sampling.greedy else drafter.tree_sampling
    if mode == "without_replacement":
        raise ConfigError("the static step grows tree presets with tree_sampling=deterministic or with_replacement, "
                          "not without_replacement (its trees lose nodes past the draft's support): use compile=none "
                          "or another tree_sampling")
    if target is None:
        return None, compiled, mode
    drafter.bind(target)
    check_same_vocab(target, drafter.model)
    vocab = text_config(drafter.model).vocab_size
    if compiled.num_nodes and int(compiled.rank.max()) >= vocab:
        raise ConfigError(f"tree preset has sibling rank {int(compiled.rank.max())}, past the draft's {vocab} tokens")
    return drafter.model, compiled, mode
