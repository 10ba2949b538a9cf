"""The Medusa drafter: token trees from Medusa heads on the verifier's hidden state (arXiv 2401.10774).

No extra target forward: the hidden state of the last accepted token comes from the previous
verify forward (``VerifyOutput.hidden``; at the start, the prompt's prefill). The target's LM head
on that state gives the next token, which the decode loop already emits as the new root; head
``d - 1`` gives the candidates at tree depth ``d``. As in Medusa, a node's token depends only on
its depth and sibling rank: the node at path ``(r_1, ..., r_d)`` gets head ``d - 1``'s rank-``r_d``
token. Children are deterministic (``draft_probs`` None), so ``greedy``, ``rejection`` (lossless)
and ``typical`` all apply.

The default tree is built the way Medusa builds its sparse trees: from the held-out accuracy of
each head at each rank (``eval.json`` next to trained heads; preferably measured on text the target
itself wrote, which is what decoding sees), keep the ``tree_nodes`` paths with the largest product
of accuracies along the path (:func:`medusa_tree`). ``dynamic=True`` builds that tree again at every
step from the heads' own probabilities there instead of the held-out averages (EAGLE-2's dynamic tree
on Medusa's independent heads): deep where the heads are sure, wide where they are not.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from drafters.head_files import HeadsPlace, heads_place
from drafters.medusa_heads import (
    FILES,
    HOW_TO_TRAIN,
    MedusaHeads,
    MedusaHeadsError,
    check_target,
    default_heads_dir,
    load_heads,
    read_eval,
)
from specdec.drafting import DraftContext, Drafter, StepShape
from specdec.errors import ConfigError, positive_int
from specdec.tree import (
    CompiledTree,
    best_tree,
    best_tree_by_depth,
    compile_tree,
    expected_tokens_by_depth,
    load_preset,
)
from specdec.types import AcceptResult, DraftTree, VerifyOutput

log = logging.getLogger(__name__)

#: Rank accuracies assumed at every depth when the heads come without an ``eval.json`` (those of
#: ``conf/tree/sparse60.yaml``); measured accuracies give a better tree (``experiments.medusa_tree``).
FALLBACK_RANK_PROBS = [0.55, 0.17, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015, 0.01, 0.008]


def medusa_expected_tokens(paths: Sequence[Sequence[int]], rank_acc: Sequence[Sequence[float]]) -> float:
    """Expected tokens per step (tau) of a tree when head ``d``'s rank-``r`` token is the target's with
    probability ``rank_acc[d][r]``, independently per depth: 1 + sum over nodes of P(path accepted)."""
    return expected_tokens_by_depth(paths, rank_acc)


def medusa_tree(rank_acc: Sequence[Sequence[float]], num_nodes: int, max_depth: int | None = None) -> list[list[int]]:
    """The ``num_nodes``-node tree with the largest :func:`medusa_expected_tokens` (Medusa's sparse trees).

    ``rank_acc[d][r]``: held-out probability that head ``d``'s rank-``r`` token is the target's next
    token at depth ``d + 1``; depth is limited to ``len(rank_acc)`` (and ``max_depth``). Paths are
    returned best first (:func:`specdec.tree.best_tree_by_depth`).
    """
    positive_int(max_depth, "max_depth", allow_none=True)  # a slice [:-1] or [:0] would drop or empty the heads
    return best_tree_by_depth(rank_acc if max_depth is None else rank_acc[:max_depth], num_nodes)


def report_rank_accuracy(report: dict | None, source: str = "auto") -> list[list[float]] | None:
    """``rank_accuracy[d][r]`` from a training ``eval.json``: ``generated`` (held-out prompts continued
    greedily by the target), ``corpus`` (held-out text), or ``auto`` (generated if measured, else corpus)."""
    if not isinstance(report, dict):
        return None
    generated, corpus = (report.get("generated") or {}).get("rank_accuracy"), report.get("rank_accuracy")
    acc = {"generated": generated, "corpus": corpus}.get(source, generated or corpus)
    return [list(map(float, row)) for row in acc] if acc else None


class MedusaDrafter(Drafter):
    """Drafts a token tree from Medusa heads; deterministic children.

    Args:
        heads: a trained heads directory (``experiments.train_medusa`` writes one), a loaded
            :class:`~drafters.medusa_heads.MedusaHeads`, or None for the default directory of the
            embedded pair's target (``<cache>/medusa/zoo-<zoo_size>``). A directory that does not exist
            is reported (with how to train heads) when the drafter is first used.
        tree: a preset name (``conf/tree/<name>.yaml``), a YAML path or a list of sibling-rank paths;
            None derives the tree from the heads' held-out rank accuracies (``eval.json``), or from
            :data:`FALLBACK_RANK_PROBS` without one. Nodes deeper than the heads are dropped.
        num_heads: use the first ``num_heads`` heads (None: all trained heads).
        tree_nodes: size of the derived tree (when ``tree`` is None), and of the dynamic tree.
        zoo_size: which embedded pair's heads ``heads=None`` means.
        cache_dir: the cache holding that pair's heads (None: ``$SPECDEC_CACHE`` or ``~/.cache/specdec``).
        dynamic: choose the ``tree_nodes`` paths at every step by the product of the heads' probabilities
            at that step (:func:`dynamic_tree`) instead of one tree for all steps; ``tree`` must be None.
    """

    name = "medusa"

    def __init__(self, heads: str | os.PathLike | MedusaHeads | None = None, tree=None, num_heads: int | None = None,
                 tree_nodes: int = 32, zoo_size: str = "default", dynamic: bool = False,
                 cache_dir: str | os.PathLike | None = None):
        super().__init__()
        self.num_heads_arg = positive_int(num_heads, "drafter.num_heads", allow_none=True)
        self.tree_nodes = positive_int(tree_nodes, "drafter.tree_nodes")
        if dynamic not in (True, False):
            raise ConfigError(f"drafter.dynamic={dynamic!r}: give true or false")
        if dynamic and tree is not None:
            raise ConfigError("drafter.dynamic=true builds its own tree at every step: leave tree null (tree=none)")
        self.dynamic = bool(dynamic)
        self.tree_arg = load_preset(tree) if tree is not None else None  # checked now, pruned once heads are known
        self._heads: MedusaHeads | None = None
        self.heads_dir: Path | None = None
        self._place: HeadsPlace | None = None
        if isinstance(heads, MedusaHeads):
            if self.num_heads_arg is not None and self.num_heads_arg > heads.num_heads:
                raise MedusaHeadsError(f"drafter.num_heads={self.num_heads_arg} but the heads have only "
                                       f"{heads.num_heads}: use drafter.num_heads<={heads.num_heads}")
            self._heads = heads.eval()
        elif heads is None or isinstance(heads, (str, os.PathLike)):
            self._place = heads_place(heads, default_heads_dir, zoo_size, cache_dir)
            self.heads_dir = self._place.directory
            if self.heads_dir.exists():
                self._heads = load_heads(self.heads_dir, self.num_heads_arg)
        else:
            raise ConfigError(f"drafter.heads={type(heads).__name__}: give a heads directory or a MedusaHeads module")
        self._compiled = None
        self._checked_target = None
        self._hidden: torch.Tensor | None = None  # [H] the target's state at the last accepted token

    # ----------------------------------------------------------------- heads and tree

    @classmethod
    def check_files(cls, config) -> None:
        """The heads directory ``config`` names (``heads``; null: the ``zoo_size`` pair's default) holds Medusa
        heads: the missing-heads error, with the command that trains them, otherwise."""
        heads = config.get("heads")
        if heads is None or isinstance(heads, (str, os.PathLike)):
            place = heads_place(heads, default_heads_dir, config.get("zoo_size", "default"), config.get("cache_dir"))
            place.check(FILES, HOW_TO_TRAIN)

    @property
    def heads(self) -> MedusaHeads:
        """The loaded heads (loads a directory that appeared since construction; else raises)."""
        if self._heads is None:
            if self._place.zoo is not None:
                self._place.check(FILES, HOW_TO_TRAIN)
            self._heads = load_heads(self.heads_dir, self.num_heads_arg)
        return self._heads

    @property
    def num_heads(self) -> int:
        return self.num_heads_arg or self.heads.num_heads

    @property
    def rank_accuracy(self) -> list[list[float]] | None:
        """Held-out accuracy per head and rank from the heads' ``eval.json`` (None without one): measured
        on held-out prompts continued greedily by the target (the decode regime) when the report has it,
        else on held-out text (see :func:`report_rank_accuracy`)."""
        source = self.heads_dir or (Path(self.heads.source) if self.heads.source else None)
        return report_rank_accuracy(read_eval(source)) if source is not None else None

    def tree_paths(self) -> list[list[int]]:
        """The tree's sibling-rank paths before pruning to the heads (preset, or derived)."""
        if self.tree_arg is not None:
            return self.tree_arg
        acc = self.rank_accuracy
        if acc is not None and len(acc) >= self.num_heads:
            return medusa_tree(acc[: self.num_heads], self.tree_nodes)
        return best_tree(FALLBACK_RANK_PROBS, self.tree_nodes, max_depth=self.num_heads)

    @property
    def compiled(self):
        """The compiled tree, limited to ``num_heads`` deep and to ranks inside the vocabulary."""
        if self._compiled is None:
            k, vocab = self.num_heads, self.heads.vocab_size
            paths = self.tree_paths()
            keep = [p for p in paths if len(p) <= k and max(p) < vocab]
            if len(keep) < len(paths):
                log.warning("Medusa tree: dropped %d of %d nodes deeper than the %d heads or ranked past the "
                            "vocabulary", len(paths) - len(keep), len(paths), k)
            if not keep:
                raise ConfigError(f"the tree preset keeps no node with {k} Medusa heads: give a tree of depth <= {k}")
            compiled = compile_tree(keep)
            head = compiled.depth - 1  # [N] which head drafts each node
            width = int(compiled.rank.max()) + 1
            upto = [int((compiled.depth <= d).sum()) for d in range(compiled.max_depth + 1)]  # nodes of depth <= d
            self._compiled, self._head, self._width, self._upto = compiled, head, width, upto
        return self._compiled

    @property
    def max_nodes(self) -> int:
        return self.tree_nodes if self.dynamic else self.compiled.num_nodes

    @property
    def tree_depth(self) -> int:
        """The deepest a tree of this drafter goes: every head for a dynamic tree, else the static tree's depth."""
        return self.num_heads if self.dynamic else self.compiled.max_depth

    # ----------------------------------------------------------------- the protocol

    def _bind(self, target) -> MedusaHeads:
        """The heads, checked against ``target`` (once) and on its device and dtype."""
        heads = self.heads
        if self._checked_target is not target:
            check_target(heads, target)
            self._checked_target = target
        weight = target.get_output_embeddings().weight
        return heads.to(device=weight.device, dtype=weight.dtype)

    def step_shape(self, target) -> StepShape:
        """One forward of the heads per step (all depths at once), then a verify of ``1 + nodes``."""
        heads = self._bind(target)
        hidden = torch.zeros(heads.hidden_size, device=target.get_output_embeddings().weight.device,
                             dtype=target.get_output_embeddings().weight.dtype)  # [H]
        depth = self.tree_depth  # a static tree is built here (its width is the probe's top-k)
        probe = (lambda: self._dynamic_tree(hidden, depth)) if self.dynamic else (lambda: self._top_tokens(hidden, depth))
        return StepShape(kind="tree", max_nodes=self.max_nodes, draft_forwards="per_step",
                         draft_probe=probe, draft_dtype=next(heads.parameters()).dtype)

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        self._bind(ctx.target)
        self.compiled  # noqa: B018  (build the tree before timing starts)
        self._hidden = None

    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        super().prefill(input_ids, target_hidden)
        # target_hidden [T - 1, H]: its last row is the state at x_{T-2}, whose LM head gives the root x_{T-1}.
        self._hidden = target_hidden[-1] if target_hidden is not None and target_hidden.shape[0] else None

    def propose(self, max_depth: int) -> DraftTree:
        compiled = self.compiled
        depth = min(max_depth, self.tree_depth)
        if self._hidden is None or depth <= 0:  # a one-token prompt has no state yet
            return DraftTree.empty()
        if self.dynamic:
            return self._dynamic_tree(self._hidden, depth)
        n = self._upto[depth]  # nodes are sorted by depth: the first n are those of depth <= depth
        top = self._top_tokens(self._hidden, depth)  # [D, R]
        tokens = top[self._head[:n], compiled.rank[:n]]  # [n]
        return DraftTree(tokens=tokens, parents=compiled.parents[:n], _depth=compiled.depth[:n],
                         _mask=compiled.mask[:n, :n])

    def _top_tokens(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        """``[depth, R]`` (on the CPU): the top ``R`` tokens of heads ``0 .. depth - 1`` at ``hidden [H]``."""
        with torch.no_grad():
            logits = self.heads(hidden, num_heads=depth)  # [D, V]
            return torch.topk(logits, self._width, dim=-1).indices.cpu()  # [D, R]

    def _dynamic_tree(self, hidden: torch.Tensor, depth: int) -> DraftTree:
        """The tree of ``tree_nodes`` nodes, at most ``depth`` deep, at ``hidden [H]`` (:func:`dynamic_tree`)."""
        with torch.no_grad():
            logits = self.heads(hidden, num_heads=depth)  # [D, V]
        tree, tokens = dynamic_tree(logits, self.tree_nodes)
        return DraftTree(tokens=tokens, parents=tree.parents, _depth=tree.depth, _mask=tree.mask)

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        super().commit(result, verify)
        # The last accepted node's state (the root's if none): its LM head gave the new root.
        row = 1 + result.accepted_nodes[-1] if result.accepted_nodes else 0
        self._hidden = verify.hidden[row]  # [H]


def dynamic_tree(logits: torch.Tensor, num_nodes: int) -> tuple[CompiledTree, torch.Tensor]:
    """The ``num_nodes`` paths with the largest product of the heads' probabilities, compiled, and their tokens.

    ``logits [D, V]``: head ``d``'s logits for tree depth ``d + 1`` at one position. A node's score is the product
    of its path's probabilities (the heads' estimate that the whole path is the target's), so the chosen nodes
    always form a tree (:func:`specdec.tree.best_tree_by_depth`). Returns the compiled tree and its tokens ``[N]``
    (on the CPU).
    """
    width = min(num_nodes, logits.shape[-1])
    top = torch.topk(logits.float().softmax(dim=-1), width, dim=-1)  # values, indices: [D, R], best first
    tree = compile_tree(best_tree_by_depth(top.values.tolist(), num_nodes))
    tokens = top.indices.cpu()[tree.depth - 1, tree.rank]  # [N]
    return tree, tokens
