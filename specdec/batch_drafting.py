"""Drafters for a batch of rows: the protocol the batched step asks of them, and the adapter that runs
any batch-1 drafter once per row.

A :class:`BatchDrafter` proposes one :class:`~specdec.types.DraftTree` per active row, learns what each
row accepted, and drops finished rows. :class:`PerRowDrafters` gives every drafter that: one copy
per row (n-gram lookup, Medusa, a dynamic tree), each with its own state and the row's own random
numbers. Drafters that batch their model forwards (a draft model's chains and preset trees) provide
their own :class:`BatchDrafter` through :meth:`specdec.drafting.Drafter.batched`.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch

from specdec.drafting import DraftContext, Drafter, proposal
from specdec.models import vocab_size
from specdec.rng import KeyedRandom
from specdec.types import AcceptResult, DraftTree, VerifyOutput


class BatchDrafter(ABC):
    """Proposes, per active row, the draft tree of that row's next step.

    Call order per ``generate_batch``: ``start``, ``extend`` with the first rows, then per step
    ``propose`` -> (verify, accept) -> ``commit``, ``select_rows`` when some rows finished and
    ``extend`` when waiting prompts take their places (continuous batching).
    """

    @abstractmethod
    def start(self, ctx: DraftContext) -> None:
        """Bind to a run with no rows yet; ``ctx.rng`` gets one seed per row as rows are added."""

    @abstractmethod
    def extend(self, prompts: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        """Append rows for ``prompts`` after the current ones (``ctx.rng`` already holds their seeds at
        its end); ``target_hidden [B', n, H]``: row b's first ``len(prompts[b]) - 1`` are the target's
        states over its prompt but the last token."""

    @abstractmethod
    def propose(self, max_depths: list[int]) -> list[DraftTree]:
        """One tree per row, row b at most ``max_depths[b]`` deep."""

    @abstractmethod
    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        """Every row's accepted result; ``verify`` holds the batch's ``logits [B, 1 + N, V]`` and
        ``hidden [B, 1 + N, H]`` (row b's ``verify.nodes[b]`` nodes first, then padding): the trees verified,
        which need not be this drafter's own (a hybrid drafter takes another's on some rows)."""

    @abstractmethod
    def select_rows(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order."""


def row_view(verify: VerifyOutput, row: int, nodes: int) -> VerifyOutput:
    """Row ``row``'s part of a batched verify output: its root and its ``nodes`` real nodes."""
    hidden = verify.hidden[row, : 1 + nodes] if verify.hidden is not None else None
    return VerifyOutput(logits=verify.logits[row, : 1 + nodes], hidden=hidden)


class PerRowDrafters(BatchDrafter):
    """Any drafter, batched by running one copy of it per row (a Python loop over rows in drafting
    only): each copy has the row's own state and the row's own keyed random numbers, so row i drafts
    exactly what the drafter drafts in a batch-1 run with seed ``seed + i``."""

    def __init__(self, drafter: Drafter):
        self.template = drafter
        self.rows: list[Drafter] = []
        self.ctx: DraftContext | None = None

    def start(self, ctx: DraftContext) -> None:
        self.ctx, self.rows, self.vocab_size = ctx, [], vocab_size(ctx.target)

    def extend(self, prompts: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        """One fresh copy of the drafter per prompt, on the rng's matching row, prefilled with it."""
        ctx, first = self.ctx, len(self.rows)
        for i, prompt in enumerate(prompts):
            drafter = copy.copy(self.template)
            drafter.start(DraftContext(ctx.target, ctx.sampling, ctx.rng.row(first + i), ctx.capacity))
            hidden = target_hidden[i, : len(prompt) - 1] if target_hidden is not None else None
            self.before_row(i, drafter, len(prompt) - 1)
            drafter.prefill(torch.tensor([prompt], dtype=torch.long), hidden)
            self.rows.append(drafter)

    def before_row(self, row: int, drafter: Drafter, positions: int) -> None:
        """Called before batch row ``row``'s drafter sees a target forward's outputs (its first
        ``positions`` positions); a subclass hands it per-row state of that forward (EAGLE-3's tapped
        features). Nothing by default."""

    def propose(self, max_depths: list[int]) -> list[DraftTree]:
        trees = []
        for i, (drafter, depth) in enumerate(zip(self.rows, max_depths)):
            drafter.ctx.rng.step = self.ctx.rng.step[i : i + 1].clone()
            trees.append(proposal(drafter, depth, self.vocab_size))
        return trees

    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        for i, (drafter, result) in enumerate(zip(self.rows, results)):
            self.before_row(i, drafter, 1 + verify.nodes[i])
            drafter.commit(result, row_view(verify, i, verify.nodes[i]))

    def select_rows(self, rows: list[int]) -> None:
        self.rows = [self.rows[r] for r in rows]


def keyed_rows(seeds: list[int], device: torch.device | str) -> KeyedRandom:
    """The batch's random numbers: row i draws as a batch-1 run with seed ``seeds[i]``."""
    return KeyedRandom(torch.tensor(seeds, dtype=torch.long, device=device))
