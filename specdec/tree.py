"""Token trees as data: Medusa-style path presets compiled once into index and mask buffers."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def depths_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """``[N]`` depth of each node (children of the root: 1) from ``[N]`` parent indices (root: -1)."""
    plist = parents.tolist()
    depth = [0] * len(plist)
    for i, p in enumerate(plist):
        if p >= i:
            raise ValueError(f"tree node {i} has parent {p}: parents must come before their children")
        depth[i] = 1 if p < 0 else depth[p] + 1
    return torch.tensor(depth, dtype=torch.long)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` bool mask, true where node i may see node j: j is i itself or one of its ancestors."""
    plist = parents.tolist()
    n = len(plist)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(plist):
        if p >= i:
            raise ValueError(f"tree node {i} has parent {p}: parents must come before their children")
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def children_lists(parents: torch.Tensor) -> list[list[int]]:
    """Children of the root (index 0) and of each node i (index 1 + i), in sibling order."""
    plist = parents.tolist()
    kids: list[list[int]] = [[] for _ in range(len(plist) + 1)]
    for i, p in enumerate(plist):
        kids[p + 1].append(i)
    return kids


@dataclass(frozen=True)
class CompiledTree:
    """A tree preset compiled once.

    Attributes:
        paths: the preset, sorted by (depth, path): node i is ``paths[i]``.
        parents: ``[N]`` parent node of each node (-1: the root).
        depth: ``[N]`` depth (1 for the root's children).
        rank: ``[N]`` sibling rank (the last entry of each path).
        mask: ``[N, N]`` ancestor-and-self mask.
        retrieve: ``[L, D]`` for each leaf, the node indices along its path, padded with -1.
    """

    paths: tuple[tuple[int, ...], ...]
    parents: torch.Tensor
    depth: torch.Tensor
    rank: torch.Tensor
    mask: torch.Tensor
    retrieve: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)


def compile_tree(paths: list[list[int]] | list[tuple[int, ...]]) -> CompiledTree:
    """Compile a list of sibling-rank paths (``[[0], [1], [0, 0], ...]``) into buffers.

    Raises ``ValueError`` for a preset that is not a tree: an empty or negative path, a
    duplicate, or a path whose prefix (its parent) is missing.
    """
    norm = []
    for p in paths:
        t = tuple(int(x) for x in p)
        if len(t) == 0 or min(t) < 0:
            raise ValueError(f"tree path {list(p)} must be a non-empty list of sibling ranks >= 0")
        norm.append(t)
    if len(set(norm)) != len(norm):
        raise ValueError("tree preset has duplicate paths")
    ordered = sorted(norm, key=lambda t: (len(t), t))
    index = {t: i for i, t in enumerate(ordered)}
    parents = []
    for t in ordered:
        if len(t) > 1 and t[:-1] not in index:
            raise ValueError(f"tree path {list(t)} has no parent: add the path {list(t[:-1])} to the preset")
        parents.append(index[t[:-1]] if len(t) > 1 else -1)
    parents_t = torch.tensor(parents, dtype=torch.long)  # [N]
    leaves = [i for i, t in enumerate(ordered) if not any(o[:-1] == t for o in ordered if len(o) == len(t) + 1)]
    depth_max = max((len(t) for t in ordered), default=0)
    retrieve = torch.full((len(leaves), depth_max), -1, dtype=torch.long)  # [L, D]
    for row, leaf in enumerate(leaves):
        t = ordered[leaf]
        for d in range(len(t)):
            retrieve[row, d] = index[t[: d + 1]]
    return CompiledTree(
        paths=tuple(ordered),
        parents=parents_t,
        depth=depths_from_parents(parents_t),
        rank=torch.tensor([t[-1] for t in ordered], dtype=torch.long),
        mask=ancestor_mask(parents_t),
        retrieve=retrieve,
    )


def chain_paths(length: int) -> list[list[int]]:
    """The preset of a chain of ``length`` nodes: ``[[0], [0, 0], ...]``."""
    return [[0] * d for d in range(1, length + 1)]
