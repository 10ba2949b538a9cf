"""The drafter protocol: what the decode loop asks of every drafter.

A new drafter is one module in ``drafters/`` implementing :class:`Drafter` plus one config file;
nothing here changes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from specdec.sampling import SamplingParams
from specdec.types import AcceptResult, DraftTree, VerifyOutput


@dataclass
class DraftContext:
    """What the decode loop hands a drafter when a ``generate`` call starts."""

    target: torch.nn.Module
    sampling: SamplingParams
    generator: torch.Generator | None
    capacity: int  # the most tokens (prompt + generated + one step's nodes) the run can hold


class Drafter(ABC):
    """Proposes a :class:`DraftTree` each step and keeps its own state in sync with what was accepted.

    Call order per ``generate``: ``start`` once, ``prefill`` once, then per step ``propose`` ->
    (verify, accept) -> ``commit``. ``tokens`` lists every committed token; its last one is the
    root, which the target has not seen yet.
    """

    name: str = "drafter"

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ctx: DraftContext | None = None

    @property
    def max_nodes(self) -> int:
        """The most draft nodes one step may propose (sizes the KV caches)."""
        return 0

    def start(self, ctx: DraftContext) -> None:
        """Bind to a run: check compatibility with the target (vocabulary, device), reset state."""
        self.ctx = ctx
        self.tokens = []

    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        """See the prompt ``input_ids [1, T]``; ``target_hidden [T - 1, H]`` are the target's states."""
        self.tokens = input_ids[0].tolist()

    @abstractmethod
    def propose(self, max_depth: int) -> DraftTree:
        """Draft nodes after the root (``self.tokens[-1]``), at most ``max_depth`` deep."""

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        """Learn what was accepted: ``result.tokens`` are appended to the sequence."""
        self.tokens.extend(result.tokens)
