"""Decode statistics. Each name means one thing (the README's Metrics table)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

TIME_FIELDS = ("time_prefill", "time_draft", "time_verify", "time_accept", "time_total")


@dataclass
class DecodeStats:
    """Counters and timings of one or more ``generate`` calls.

    ``target_forwards`` counts verify forwards (one per step; the prefill is not counted); in a batch's
    aggregate it is the rows' steps summed, and ``batch_steps`` counts the batch's own steps (each one
    batched verify forward over all its rows; 0 in per-row and batch-1 stats, except batch-1 through the
    fixed-shape step, whose aggregate counts its steps: equal to ``target_forwards`` there). ``steps`` is whichever of
    the two is the run's forwards, the divisor of a time per step.
    ``depth_proposed[d - 1]`` / ``depth_accepted[d - 1]``: steps that proposed / accepted a node at
    depth d. ``steps_by_source``: steps per proposing drafter, for drafters that combine several
    (``drafter=hybrid``: e.g. ``{"ngram": 40, "eagle": 21}``; steps that proposed nothing are not counted);
    ``depth_by_source``: the levels each drafted, summed per drafter (a model-running part's draft forwards; of a
    merged hybrid tree, its model-drafted part's levels).
    Times are seconds; ``time_accept`` is accept + commit. ``time_compile``: compiling or
    capturing the fixed-shape step (``compile=inductor|graph``), kept out of ``time_total``.
    """

    new_tokens: int = 0
    target_forwards: int = 0
    batch_steps: int = 0
    accepted_per_step: list[int] = field(default_factory=list)
    proposed_per_step: list[int] = field(default_factory=list)
    depth_proposed: list[int] = field(default_factory=list)
    depth_accepted: list[int] = field(default_factory=list)
    steps_by_source: dict[str, int] = field(default_factory=dict)
    depth_by_source: dict[str, int] = field(default_factory=dict)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_accept: float = 0.0
    time_total: float = 0.0
    time_compile: float = 0.0

    def record_step(self, proposed_nodes: int, max_depth: int, accepted_depth: int, source: str | None = None,
                    emitted: int | None = None, source_depth: int | None = None) -> None:
        """Count one step: nodes proposed, tree depth, depth of the accepted path, and who proposed it.

        ``emitted``: the tokens the step emitted. Drafts accepted past an EOS (or the token budget) are not
        in the output, and are not counted as accepted. ``source_depth``: the levels ``source`` drafted, where
        the tree holds more (``DraftTree.source_depth``; None: ``max_depth``)."""
        if emitted is not None:
            accepted_depth = min(accepted_depth, emitted)
        self.target_forwards += 1
        if source is not None:
            self.steps_by_source[source] = self.steps_by_source.get(source, 0) + 1
            drafted = max_depth if source_depth is None else source_depth
            self.depth_by_source[source] = self.depth_by_source.get(source, 0) + drafted
        self.proposed_per_step.append(proposed_nodes)
        self.accepted_per_step.append(accepted_depth)
        _grow(self.depth_proposed, max_depth)
        _grow(self.depth_accepted, max_depth)
        for d in range(max_depth):
            self.depth_proposed[d] += 1
        for d in range(accepted_depth):
            self.depth_accepted[d] += 1

    @property
    def tau(self) -> float:
        """Mean tokens emitted per target forward, bonus/correction included (autoregressive: 1.0)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def steps(self) -> int:
        """Verify forwards the run made: its batches' steps in a batched aggregate, else ``target_forwards``."""
        return self.batch_steps or self.target_forwards

    @property
    def mean_accepted_drafts(self) -> float:
        """tau - 1: tokens emitted per step beyond the one every step emits (gpt-fast's "mean accepted"). Equal
        to the drafts accepted per step except at a step that accepted a draft EOS: it emits no bonus token
        after it, so ``accepted_per_step`` counts one more there than this does."""
        return self.tau - 1.0 if self.target_forwards else 0.0

    @property
    def mean_proposed_drafts(self) -> float:
        """Draft nodes proposed per step (a chain's k, less where a confidence threshold or the token
        budget ended it early; a tree's node count)."""
        return sum(self.proposed_per_step) / len(self.proposed_per_step) if self.proposed_per_step else 0.0

    @property
    def draft_acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens (0 when nothing was proposed)."""
        proposed = sum(self.proposed_per_step)
        return sum(self.accepted_per_step) / proposed if proposed else 0.0

    @property
    def acceptance_rate_by_depth(self) -> list[float]:
        """Of the steps that proposed a node at depth d, the share that accepted one."""
        return [a / p if p else 0.0 for a, p in zip(self.depth_accepted, self.depth_proposed)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    @property
    def time_other(self) -> float:
        spent = self.time_prefill + self.time_draft + self.time_verify + self.time_accept
        return max(0.0, self.time_total - spent)

    def to_dict(self) -> dict:
        """JSON-ready counters, timings and the derived metrics."""
        out = asdict(self)
        for name in ("steps", "tau", "mean_accepted_drafts", "mean_proposed_drafts", "draft_acceptance_rate",
                     "acceptance_rate_by_depth", "tokens_per_s", "time_other"):
            out[name] = getattr(self, name)
        return out

    @classmethod
    def merge(cls, items: list[DecodeStats]) -> DecodeStats:
        """Sum several runs' stats (per-step lists are concatenated, per-depth counts added)."""
        total = cls()
        for s in items:
            total.new_tokens += s.new_tokens
            total.target_forwards += s.target_forwards
            total.batch_steps += s.batch_steps
            total.accepted_per_step += s.accepted_per_step
            total.proposed_per_step += s.proposed_per_step
            add_counts(total.depth_proposed, s.depth_proposed)
            add_counts(total.depth_accepted, s.depth_accepted)
            for counts, more in ((total.steps_by_source, s.steps_by_source), (total.depth_by_source, s.depth_by_source)):
                for source, n in more.items():
                    counts[source] = counts.get(source, 0) + n
            for name in (*TIME_FIELDS, "time_compile"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
        return total


def _grow(counts: list[int], length: int) -> None:
    counts.extend([0] * (length - len(counts)))


def add_counts(total: list[int], more: list[int]) -> None:
    """``total[d] += more[d]`` for every depth ``d`` (``total`` grows to ``more``'s length)."""
    _grow(total, len(more))
    for d, v in enumerate(more):
        total[d] += v
