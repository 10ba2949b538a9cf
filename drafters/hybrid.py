"""Two drafters behind one: each step takes the first drafter's proposal when it has one, else the second's.

The classic pairing is prompt lookup first (free to run, long and right when the text repeats itself)
and a trained drafter second (EAGLE, a draft model: right more often, but every draft costs a forward):
a step where the context's suffix recurs costs no drafting at all, the others draft as usual. Both
drafters see every committed token, so the one that sat a step out catches up at its next proposal
(a draft model or EAGLE head feeds the tokens it missed in one causal forward).

Lossless at any temperature: which drafter proposes is a function of the committed tokens only, and
each proposal carries its own draft distribution (none for the deterministic n-gram chain), which the
acceptance rule uses as it would for that drafter alone.
"""
from __future__ import annotations

import copy
import dataclasses

from specdec.batch_drafting import BatchDrafter
from specdec.drafting import DraftContext, Drafter, StepShape, release
from specdec.errors import ConfigError
from specdec.types import AcceptResult, DraftTree, VerifyOutput


class HybridDrafter(Drafter):
    """``first``'s draft tree when it proposes at least ``min_drafts`` nodes this step, else ``second``'s.

    Args:
        first: tried first every step; a drafter that runs no model (its ``step_shape`` is the protocol's
            default), e.g. :class:`~drafters.NGramDrafter`, whose ``min_ngram`` sets how long a recurring suffix
            must be before its continuation is trusted. Its proposals may be dropped (``min_drafts``) or
            committed with another drafter's result, which only a drafter without model state can take.
        second: drafts the steps ``first`` leaves empty (e.g. :class:`~drafters.EagleDrafter`).
        min_drafts: the fewest nodes of ``first``'s proposal that are used (>= 1).

    Each proposed tree is labelled with its part's name (``tree.source``, e.g. ``ngram`` / ``eagle``; ``first`` /
    ``second`` when both parts have one name), so every run's ``DecodeStats.steps_by_source`` counts the steps each
    part drafted, per row in batches, and records and summaries carry it.
    """

    name = "hybrid"

    def __init__(self, first: Drafter, second: Drafter, min_drafts: int = 1):
        super().__init__()
        for label, drafter in (("first", first), ("second", second)):
            if not isinstance(drafter, Drafter):
                raise ConfigError(f"hybrid drafter: {label}= must be a drafter (got {type(drafter).__name__}); "
                                  "e.g. drafter=hybrid with drafter.first an n-gram and drafter.second an EAGLE head")
        if first is second:
            raise ConfigError("hybrid drafter: first and second must be two drafter objects")
        if type(first).step_shape is not Drafter.step_shape:  # it runs a model: its proposals carry state
            raise ConfigError(f"hybrid drafter: first= must be a drafter that runs no model, e.g. an n-gram lookup "
                              f"(got {type(first).__name__}); put a drafter with a model or heads second")
        if int(min_drafts) < 1:
            raise ConfigError(f"hybrid drafter: min_drafts={min_drafts}; it must be >= 1")
        self.first, self.second, self.min_drafts = first, second, int(min_drafts)
        self.labels = (first.name, second.name) if first.name != second.name else ("first", "second")

    @property
    def max_nodes(self) -> int:
        return max(self.first.max_nodes, self.second.max_nodes)

    def step_shape(self, target) -> StepShape:
        """The second drafter's step (the one that costs forwards; only its steps, ``draft_source``) with the
        larger of the two node budgets."""
        return dataclasses.replace(self.second.step_shape(target), max_nodes=self.max_nodes,
                                   draft_source=self.labels[1])

    def batched(self):
        """For a batch of rows: each part batched its own way (an n-gram per row, an EAGLE or draft-model chain
        with one forward per draft position for all rows); each row takes its first part's tree when it has
        one (:class:`BatchHybrid`)."""
        return BatchHybrid(self)

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        self.first.start(ctx)
        self.second.start(ctx)

    def prefill(self, input_ids, target_hidden) -> None:
        super().prefill(input_ids, target_hidden)
        self.first.prefill(input_ids, target_hidden)
        self.second.prefill(input_ids, target_hidden)

    def propose(self, max_depth: int) -> DraftTree:
        tree = self.first.propose(max_depth)
        if tree.num_nodes >= self.min_drafts:
            return self.labelled(tree, 0)
        return self.labelled(self.second.propose(max_depth), 1)

    def labelled(self, tree: DraftTree, part: int) -> DraftTree:
        """``tree`` with its ``source``: part ``part``'s label (0 first, 1 second); an empty tree stays unlabelled."""
        if tree.num_nodes:
            tree.source = self.labels[part]
        return tree

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        """Both drafters learn the step's outcome (the one that did not propose only its tokens and the
        target's states of the accepted path)."""
        self.first.commit(result, verify)
        self.second.commit(result, verify)
        super().commit(result, verify)

    def close(self) -> None:
        """Release both drafters (EAGLE-3's feature hooks on the target)."""
        release(self.first)
        release(self.second)


class BatchHybrid(BatchDrafter):
    """:class:`HybridDrafter` over a batch: per row, the first part's tree when it has at least ``min_drafts``
    nodes, else the second part's. The second part is asked for nothing (depth 0) on the rows the first covers,
    so it draws no draft there, exactly as the batch-1 hybrid does not call it; both parts learn every row's
    outcome. Each row's tree carries its part's label, as at batch 1."""

    def __init__(self, hybrid: HybridDrafter):
        self.hybrid = hybrid
        self.first, self.second = hybrid.first.batched(), hybrid.second.batched()

    def start(self, ctx: DraftContext) -> None:
        self.first.start(ctx)
        self.second.start(ctx)

    def extend(self, prompts: list[list[int]], target_hidden) -> None:
        self.first.extend(prompts, target_hidden)
        self.second.extend(prompts, target_hidden)

    def propose(self, max_depths: list[int]) -> list[DraftTree]:
        firsts = self.first.propose(max_depths)
        covered = [t.num_nodes >= self.hybrid.min_drafts for t in firsts]
        seconds = self.second.propose([0 if c else d for c, d in zip(covered, max_depths)])
        return [self.hybrid.labelled(f, 0) if c else self.hybrid.labelled(s, 1)
                for f, s, c in zip(firsts, seconds, covered)]

    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        self.first.commit(results, verify)
        self.second.commit(results, verify)

    def select_rows(self, rows: list[int]) -> None:
        self.first.select_rows(rows)
        self.second.select_rows(rows)


def behind_lookup(drafter: Drafter, ngram_tokens: int = 8, min_suffix: int = 2) -> HybridDrafter:
    """``drafter`` behind prompt lookup: a :class:`HybridDrafter` whose first part is an n-gram of ``ngram_tokens``
    drafts that proposes only where a suffix of at least ``min_suffix`` tokens recurred (as ``drafter=hybrid``'s
    defaults). The second part is a shallow copy of ``drafter`` (sharing its model or heads), so the original can
    still run on its own, e.g. side by side in a benchmark."""
    from drafters.ngram import NGramDrafter

    lookup = NGramDrafter(ngram_tokens, max_ngram=max(3, min_suffix), min_ngram=min_suffix)
    return HybridDrafter(lookup, copy.copy(drafter))
