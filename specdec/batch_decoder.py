"""The batched decode loop: many sequences, one speculative step for all of them, ragged acceptance.

Every row keeps its own length in the shared cache (:class:`specdec.batch_cache.BatchCache`): no
left padding, no re-alignment. A step reads, top to bottom: each active row's drafter proposes a
tree, the trees are padded to one shape, the target verifies every row's root and nodes in one
forward, a tensorized rule accepts per row (:mod:`specdec.batch_acceptance`), the host reads the
per-row results once, and each row commits its accepted path. Rows that reach their own EOS or
``max_new_tokens`` leave the batch (their cache rows are dropped), the others go on.

Every random draw is keyed by row seed and step (:mod:`specdec.rng`), so row i is token-identical to
``generate(prompts[i], seed=seeds[i])`` with the same drafter and rule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specdec.acceptance import GreedyAcceptance, RejectionAcceptance, TypicalAcceptance
from specdec.batch_acceptance import batch_greedy, batch_rejection, batch_typical
from specdec.batch_cache import BatchCache
from specdec.batch_drafting import PerRowDrafters, keyed_rows
from specdec.batch_types import BatchTree
from specdec.drafting import DraftContext, checked_row_proposals
from specdec.errors import SpecDecError
from specdec.models import synchronize
from specdec.stats import TIME_FIELDS, DecodeStats
from specdec.types import AcceptResult


@dataclass
class BatchOutput:
    """``sequences``: row i is ``[1, T_i + new_i]`` (prompt included); ``stats``: the batch's aggregate
    (tokens summed over rows, times of the batch, so ``tokens_per_s`` is the aggregate throughput);
    ``row_stats``: one :class:`DecodeStats` per row (its own steps, acceptance and latency)."""

    sequences: list[torch.Tensor]
    stats: DecodeStats
    row_stats: list[DecodeStats] = field(default_factory=list)


def batch_rule(rule):
    """The tensorized form of a per-node :class:`~specdec.acceptance.AcceptanceRule`: only of the built-in rules
    themselves (chosen by class, not name: a subclass's overrides would be silently ignored)."""
    kind = type(rule)
    if kind is GreedyAcceptance:
        return batch_greedy
    if kind is RejectionAcceptance:
        return batch_rejection
    if kind is TypicalAcceptance:
        return lambda tree, logits, sampling, rng: batch_typical(tree, logits, sampling, rng, rule.epsilon, rule.delta)
    raise SpecDecError(f"acceptance rule {kind.__qualname__} ({rule.name!r}) has no batched form, which batches and "
                       "the fixed-shape step need (only the built-in greedy, rejection and typical have one); decode "
                       "with batch_size=1 and compile=none (generate()'s eager loop, one prompt at a time) or use a "
                       "built-in rule")


def check_batch(decoder, prompts, max_new_tokens, seed, seeds) -> tuple[list[list[int]], list[int], list[int]]:
    """Validate ``generate_batch``'s arguments; returns (token lists, per-row limits, per-row seeds).
    Errors name the row."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise SpecDecError("generate_batch needs a non-empty list of prompts (LongTensor [1, T] each)")
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
        raise SpecDecError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts: give one per row")
    if seeds is not None and len(seeds) != len(prompts):
        raise SpecDecError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts: give one per row or none")
    rows = []
    for i, (ids, limit) in enumerate(zip(prompts, limits)):
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1 and ids.shape[1] == 0:
            raise SpecDecError(f"prompt {i} is empty: every row needs at least one token (e.g. the BOS token)")
        try:
            decoder.check_inputs(ids, limit)
        except SpecDecError as err:
            raise SpecDecError(f"prompt {i}: {err}") from None
        rows.append(ids[0].tolist())
    row_seeds = list(seeds) if seeds is not None else [int(seed) + i for i in range(len(prompts))]
    return rows, limits, row_seeds


class _Timer:
    """Wall time of each phase of a step, synchronised with the device, and the run's clock (:meth:`now`), which
    leaves out what runs :meth:`untimed` (the caller's ``on_row``: writing a record is not decoding)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.spent = dict.fromkeys(TIME_FIELDS, 0.0)
        self.outside = 0.0  # seconds spent in untimed calls

    def now(self) -> float:
        """The run's clock: ``time.perf_counter()`` less the untimed calls so far."""
        return time.perf_counter() - self.outside

    def untimed(self, fn, *args) -> None:
        """Call ``fn(*args)`` off the run's clock: its time counts in no phase, no total and no row's latency."""
        t0 = time.perf_counter()
        try:
            fn(*args)
        finally:
            self.outside += time.perf_counter() - t0

    def __call__(self, name: str, fn, *args):
        synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        synchronize(self.device)
        self.spent[name] += time.perf_counter() - t0
        return out


def generate_batch(decoder, prompts, max_new_tokens=64, seed: int = 0, seeds=None, max_rows: int | None = None,
                   on_row=None) -> BatchOutput:
    """Decode every prompt of ``prompts`` (a list of ``[1, T_i]``); see :mod:`specdec.batch_decoder`.

    ``max_rows``: at most this many rows at once (continuous batching: when a row finishes, the next
    waiting prompt takes its place); None decodes every prompt in one batch. ``on_row(i, sequence,
    row_stats, so_far)`` is called as soon as row i finishes (``sequence [1, T_i + new_i]``; ``so_far``:
    the batch's aggregate stats until then: finished rows' tokens, wall time and phases), so callers
    can keep results as a long run goes.
    """
    rows, limits, row_seeds = check_batch(decoder, prompts, max_new_tokens, seed, seeds)
    width = len(rows) if max_rows is None else int(max_rows)
    if width < 1:
        raise SpecDecError(f"max_rows={max_rows}: decode at least one row at a time (max_rows >= 1, or None)")
    rule = batch_rule(decoder.rule)
    timer = _Timer(decoder.device)
    start = timer.now()
    capacity = max(len(r) + n for r, n in zip(rows, limits)) + decoder.drafter.max_nodes + 1
    batch = _Batch(decoder, rows, capacity, timer, row_seeds)
    run = _BatchRun(rows, limits, [DecodeStats() for _ in rows], start)
    batch.admit(run, list(range(min(width, len(rows)))))
    while run.active:
        finished = _batch_step(decoder, rule, batch, run, timer)
        run.steps += 1
        done = [run.active[i] for i in finished]
        run.finished += done
        if on_row is not None and done:
            so_far = run.aggregate(timer, timer.now() - start, run.finished)
            for row in done:
                timer.untimed(on_row, row, torch.tensor([run.tokens[row]], dtype=torch.long, device=prompts[row].device),
                              run.row_stats[row], so_far)
        batch.retire(run, finished)
        if run.waiting and len(run.active) < width:
            batch.admit(run, run.waiting[: width - len(run.active)])
    return run.output(prompts, timer, timer.now() - start)


class _Batch:
    """The batch's state on the device: the target's cache, the drafter's rows and the keyed random
    numbers, each with one row per active prompt (in ``run.active`` order)."""

    def __init__(self, decoder, rows: list[list[int]], capacity: int, timer: _Timer, seeds: list[int]):
        self.target, self.rows, self.capacity, self.timer, self.seeds = decoder.target, rows, capacity, timer, seeds
        self.rng = keyed_rows([], decoder.device)
        self.drafter = decoder.drafter.batched()
        self.drafter.start(DraftContext(decoder.target, decoder.sampling, self.rng, capacity))
        self.cache = BatchCache.for_model(decoder.target, capacity, 0, row_ids=[])
        self.max_nodes, self.vocab_size = decoder.drafter.max_nodes, decoder.vocab_size

    def propose(self, max_depths: list[int]) -> list:
        """Every active row's draft tree. One copy of a drafter per row checks each tree as batch-1 decoding does;
        a drafter that batches its own forwards has its trees checked here (:func:`checked_row_proposals`)."""
        trees = self.drafter.propose(max_depths)
        if type(self.drafter).propose is PerRowDrafters.propose:  # proposal() checked every row's tree already
            return trees
        return checked_row_proposals(self.drafter, trees, max_depths, self.max_nodes, self.vocab_size)

    def admit(self, run: _BatchRun, new: list[int]) -> None:
        """Prefill prompts ``new`` (original row indices) on their own and append them to the batch."""
        from verifier.batch import prefill_rows

        admitted = self.timer.now()  # a row's latency counts its own prefill, as generate()'s does
        self.rng.extend([self.seeds[r] for r in new])
        fresh = BatchCache.for_model(self.target, self.capacity, len(new), row_ids=new)
        hidden = self.timer("time_prefill", prefill_rows, self.target, fresh, [self.rows[r][:-1] for r in new])
        self.cache.extend(fresh)
        self.timer("time_prefill", self.drafter.extend, [self.rows[r] for r in new], hidden)
        run.admit(new, admitted)

    def retire(self, run: _BatchRun, finished: list[int]) -> None:
        """Drop the rows at positions ``finished`` of the batch."""
        if not finished:
            return
        keep = [i for i in range(len(run.active)) if i not in finished]
        run.active = [run.active[i] for i in keep]
        self.cache.select_rows(keep)
        self.drafter.select_rows(keep)
        self.rng.select_rows(keep)


@dataclass
class _BatchRun:
    """What the batch has produced so far; ``active`` maps current batch rows to original rows,
    ``waiting`` holds the rows not admitted yet (in order)."""

    tokens: list[list[int]]
    limits: list[int]
    row_stats: list[DecodeStats]
    start: float
    new: list[int] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    admitted_at: list[float] = field(default_factory=list)
    steps: int = 0  # the batch's steps so far (one batched verify forward each)

    def __post_init__(self) -> None:
        self.new = [0] * len(self.tokens)
        self.waiting = list(range(len(self.tokens)))
        self.admitted_at = [self.start] * len(self.tokens)

    def admit(self, rows: list[int], at: float) -> None:
        """Rows ``rows`` join the batch; ``at``: when their prefill began (their latency's start)."""
        for r in rows:
            self.waiting.remove(r)
            self.active.append(r)
            self.admitted_at[r] = at

    def aggregate(self, timer: _Timer, total: float, rows: list[int]) -> DecodeStats:
        """The batch's stats over ``rows``, with the batch's wall time ``total`` and phase times."""
        stats = DecodeStats.merge([self.row_stats[r] for r in rows])
        for name, value in timer.spent.items():
            setattr(stats, name, value)
        stats.time_total, stats.batch_steps = total, self.steps
        return stats

    def output(self, prompts, timer: _Timer, total: float) -> BatchOutput:
        device = prompts[0].device
        seqs = [torch.tensor([t], dtype=torch.long, device=device) for t in self.tokens]
        stats = self.aggregate(timer, total, list(range(len(self.tokens))))
        return BatchOutput(sequences=seqs, stats=stats, row_stats=self.row_stats)


def _batch_step(decoder, rule, batch: _Batch, run: _BatchRun, timer: _Timer) -> list[int]:
    """One speculative step for every active row: propose, verify, accept, commit. Returns the
    positions (in the batch) of the rows that finished."""
    from verifier.batch import verify_rows

    steps = [run.row_stats[r].target_forwards for r in run.active]  # rows admitted later are at earlier steps
    batch.rng.set_step(torch.tensor(steps, dtype=torch.long))
    remaining = [run.limits[r] - run.new[r] for r in run.active]
    trees = timer("time_draft", batch.propose, [n - 1 for n in remaining])
    tree = BatchTree.stack(trees, decoder.device)
    roots = [run.tokens[r][-1] for r in run.active]
    verify = timer("time_verify", verify_rows, decoder.target, batch.cache, roots, tree, max(steps))

    def accept_and_commit() -> list[int]:
        decided = rule(tree, verify.logits, decoder.sampling, batch.rng).to_host(tree.tokens)  # the step's one host read
        results, finished = [], []
        for i, (row, (nodes, tokens)) in enumerate(zip(run.active, decided)):
            emitted, done = decoder._cut(tokens, remaining[i])
            run.tokens[row] += emitted
            run.new[row] += len(emitted)
            depth = int(trees[i].depth.max()) if trees[i].num_nodes else 0
            run.row_stats[row].record_step(trees[i].num_nodes, depth, len(nodes), trees[i].source, len(emitted),
                                              trees[i].source_depth)
            results.append(AcceptResult(accepted_nodes=nodes, tokens=tokens))
            if done:
                finished.append(i)
                run.row_stats[row].new_tokens = run.new[row]
                run.row_stats[row].time_total = timer.now() - run.admitted_at[row]
        batch.cache.keep_block([[0] + [1 + n for n in res.accepted_nodes] for res in results])
        batch.drafter.commit(results, verify)
        return finished

    return timer("time_accept", accept_and_commit)
