"""The autoregressive baseline as a drafter: it proposes nothing, so every step is one plain decode step."""
from __future__ import annotations

from specdec.drafting import Drafter
from specdec.types import DraftTree


class NoDrafter(Drafter):
    """No drafts: the decode loop degenerates to plain autoregressive decoding (tau = 1)."""

    name = "none"

    def propose(self, max_depth: int) -> DraftTree:
        return DraftTree.empty()
