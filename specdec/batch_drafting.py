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

from specdec.drafting import DraftContext, Drafter
from specdec.rng import KeyedRandom
from specdec.types import AcceptResult, DraftTree, VerifyOutput


class BatchDrafter(ABC):
    """Proposes, per active row, the draft tree of that row's next step.

    Call order per ``generate_batch``: ``start``, ``prefill``, then per step ``propose`` -> (verify,
    accept) -> ``commit`` for the rows that go on, and ``select_rows`` when some rows finished.
    """

    @abstractmethod
    def start(self, ctx: DraftContext, rows: int) -> None:
        """Bind to a run of ``rows`` rows; ``ctx.rng`` holds one seed per row."""

    @abstractmethod
    def prefill(self, prompts: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        """See every row's prompt; ``target_hidden [B, n, H]``: row b's first ``len(prompt) - 1`` are the
        target's states over its prompt but the last token."""

    @abstractmethod
    def propose(self, max_depths: list[int]) -> list[DraftTree]:
        """One tree per row, row b at most ``max_depths[b]`` deep."""

    @abstractmethod
    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        """Every row's accepted result; ``verify`` holds the batch's ``logits [B, 1 + N, V]`` and
        ``hidden [B, 1 + N, H]`` (row b's nodes first, then padding)."""

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
        self._sizes: list[int] = []

    def start(self, ctx: DraftContext, rows: int) -> None:
        self.ctx = ctx
        self.rows = [copy.copy(self.template) for _ in range(rows)]
        for i, drafter in enumerate(self.rows):
            drafter.start(DraftContext(ctx.target, ctx.sampling, ctx.rng.row(i), ctx.capacity))

    def prefill(self, prompts: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        for i, (drafter, prompt) in enumerate(zip(self.rows, prompts)):
            hidden = target_hidden[i, : len(prompt) - 1] if target_hidden is not None else None
            drafter.prefill(torch.tensor([prompt], dtype=torch.long), hidden)

    def propose(self, max_depths: list[int]) -> list[DraftTree]:
        trees = []
        for i, (drafter, depth) in enumerate(zip(self.rows, max_depths)):
            drafter.ctx.rng.step = self.ctx.rng.step[i : i + 1].clone()
            trees.append(drafter.propose(max_depth=depth))
        self._sizes = [t.num_nodes for t in trees]
        return trees

    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        for i, (drafter, result) in enumerate(zip(self.rows, results)):
            drafter.commit(result, row_view(verify, i, self._sizes[i]))

    def select_rows(self, rows: list[int]) -> None:
        self.rows = [self.rows[r] for r in rows]
        self._sizes = [self._sizes[r] for r in rows] if self._sizes else []


def keyed_rows(seeds: list[int], device: torch.device | str) -> KeyedRandom:
    """The batch's random numbers: row i draws as a batch-1 run with seed ``seeds[i]``."""
    return KeyedRandom(torch.tensor(seeds, dtype=torch.long, device=device))
