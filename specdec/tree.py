"""Token trees as data: Medusa-style path presets compiled once into index and mask buffers."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import ConfigError


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
    """

    paths: tuple[tuple[int, ...], ...]
    parents: torch.Tensor
    depth: torch.Tensor
    rank: torch.Tensor
    mask: torch.Tensor

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
            raise ValueError(f"tree path {list(t)} has no parent: add the path {list(t[:-1])} to the tree's paths")
        parents.append(index[t[:-1]] if len(t) > 1 else -1)
    parents_t = torch.tensor(parents, dtype=torch.long)  # [N]
    return CompiledTree(
        paths=tuple(ordered),
        parents=parents_t,
        depth=depths_from_parents(parents_t),
        rank=torch.tensor([t[-1] for t in ordered], dtype=torch.long),
        mask=ancestor_mask(parents_t),
    )


def chain_paths(length: int) -> list[list[int]]:
    """The preset of a chain of ``length`` nodes: ``[[0], [0, 0], ...]``."""
    return [[0] * d for d in range(1, length + 1)]


# --------------------------------------------------------------------------- presets as data

#: Where ``load_preset`` looks up a preset given by name: ``conf/tree/<name>.yaml`` of this checkout.
PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "tree"


#: What a tree file must look like; every shape error ends with it.
TREE_FILE_FORMAT = ("a tree file is a YAML mapping with a 'paths:' list of sibling-rank paths, each a list of "
                    "integers >= 0 whose parent path is listed too, e.g. paths: [[0], [1], [0, 0]]")


def load_preset(preset: str | os.PathLike | Mapping | Iterable, name: str | None = None) -> list[list[int]]:
    """The sibling-rank paths of a tree preset, checked to form a tree.

    Args:
        preset: a preset name (``"binary"`` reads ``conf/tree/binary.yaml``), a path to such a
            YAML file (a mapping with a ``paths:`` list), such a mapping (a composed ``tree``
            config), or the list of paths itself.
        name: how error messages name a mapping or list preset (e.g. ``"tree=mytree"``).

    Returns:
        the paths as ``list[list[int]]``, in the preset's own order.

    Raises:
        ConfigError: the preset is unknown, unreadable, of the wrong shape (the message says what a
            tree file must look like) or not a tree (for a missing parent, it names the path to add).
    """
    if isinstance(preset, (str, os.PathLike)):
        path = _preset_file(preset)
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"tree preset {str(path)!r} is not valid YAML: {err}") from err
        where = f"tree preset {str(path)!r}"
        raw = paths_entry(data, where)
    elif isinstance(preset, Mapping):  # a composed ``tree`` config node: {paths: [...]}
        where = name or "the tree config"
        raw = paths_entry(preset, where)
    else:  # the paths themselves
        where, raw = name or "tree preset", preset
    check_paths_shape(raw, where)
    paths = [[int(x) for x in p] for p in raw]
    if not paths:
        raise ConfigError(f"{where} is empty: give at least one path, e.g. [[0]]")
    try:
        compile_tree(paths)
    except ValueError as err:
        raise ConfigError(f"{where} is not a valid tree: {err}") from err
    return paths


def _preset_file(preset: str | os.PathLike) -> Path:
    """The YAML file of a preset given by name (``conf/tree/<name>.yaml``) or by path."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:  # a bare name
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
        raise ConfigError(f"tree preset {str(preset)!r} not found: give a YAML file or one of {known}")
    return path


def _kind(value: object) -> str:
    return "empty" if value is None else f"a {type(value).__name__} ({str(value)[:40]})"


def paths_entry(data: object, where: str) -> object:
    """The ``paths`` entry of a tree file's content; :class:`ConfigError` saying what a tree file must look
    like if ``data`` is not a mapping or has no ``paths``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} is {_kind(data)}, not a mapping: {TREE_FILE_FORMAT}")
    if data.get("paths") is None:
        raise ConfigError(f"{where} has no 'paths:' list: {TREE_FILE_FORMAT}")
    if unknown := sorted(str(key) for key in data if key != "paths"):  # e.g. a max_depth: that would do nothing
        raise ConfigError(f"{where} has unknown key(s) {unknown}: a tree is its 'paths:' list only (a depth or a "
                          f"node count is the paths' own): remove them. {TREE_FILE_FORMAT}")
    return data["paths"]


def check_paths_shape(raw: object, where: str) -> None:
    """:class:`ConfigError` unless ``raw`` is a list of lists of integers (saying what a tree file must look like)."""
    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ConfigError(f"{where}: paths is {_kind(raw)}, not a list of paths: {TREE_FILE_FORMAT}")
    for i, p in enumerate(raw):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or not all(is_int(x) for x in p):
            raise ConfigError(f"{where}: path {i} ({p}) is not a list of integers: {TREE_FILE_FORMAT}")


def path_acceptance_by_depth(path: Sequence[int], rank_acc: Sequence[Sequence[float]]) -> float:
    """Probability that the path to a node is accepted when, at depth ``d`` (0-based), the rank-r
    child of an accepted node is the accepted one with probability ``rank_acc[d][r]``, independently
    per depth (a depth or rank past the table's: 0)."""
    prob = 1.0
    for depth, rank in enumerate(path):
        row = rank_acc[depth] if depth < len(rank_acc) else ()
        prob *= row[rank] if rank < len(row) else 0.0
    return prob


def expected_tokens_by_depth(paths: Sequence[Sequence[int]], rank_acc: Sequence[Sequence[float]]) -> float:
    """Expected tokens per step (tau) of a tree under the ``rank_acc`` model: 1 + sum of path acceptances."""
    return 1.0 + sum(path_acceptance_by_depth(p, rank_acc) for p in paths)


def best_tree_by_depth(rank_acc: Sequence[Sequence[float]], num_nodes: int) -> list[list[int]]:
    """The ``num_nodes``-node tree, at most ``len(rank_acc)`` deep, with the largest expected tau under
    ``rank_acc`` (greedy best-first, as in Sequoia's positional-acceptance model and Medusa's sparse
    trees); paths ordered by expected acceptance, best first.

    Greedy is optimal here: a child's acceptance never exceeds its parent's, so the best nodes
    always form a tree, and the next best node is always a child of one already chosen (or the next
    sibling of one, considered only once its better-ranked sibling is in).
    """
    chosen: list[tuple[int, ...]] = []
    frontier = {(0,): path_acceptance_by_depth((0,), rank_acc)} if rank_acc else {}
    while len(chosen) < num_nodes and frontier:
        path = max(frontier, key=lambda t: (frontier[t], -len(t), [-x for x in t]))
        del frontier[path]
        chosen.append(path)
        if path[-1] + 1 < len(rank_acc[len(path) - 1]):  # next sibling
            sib = path[:-1] + (path[-1] + 1,)
            frontier[sib] = path_acceptance_by_depth(sib, rank_acc)
        if len(path) < len(rank_acc):  # first child
            child = path + (0,)
            frontier[child] = path_acceptance_by_depth(child, rank_acc)
    return [list(p) for p in chosen]


def path_acceptance(path: Sequence[int], rank_probs: Sequence[float]) -> float:
    """:func:`path_acceptance_by_depth` with the same ``rank_probs`` at every depth."""
    return path_acceptance_by_depth(path, [rank_probs] * len(path))


def expected_tokens(paths: Sequence[Sequence[int]], rank_probs: Sequence[float]) -> float:
    """Expected tokens per step (tau) with the same ``rank_probs`` at every depth."""
    return 1.0 + sum(path_acceptance(p, rank_probs) for p in paths)


def best_tree(rank_probs: Sequence[float], num_nodes: int, max_depth: int | None = None) -> list[list[int]]:
    """:func:`best_tree_by_depth` with the same ``rank_probs`` at every depth, at most ``max_depth`` deep."""
    return best_tree_by_depth([rank_probs] * (max_depth or num_nodes), num_nodes)
