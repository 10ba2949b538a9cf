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

from specdec.batch_acceptance import batch_greedy, batch_rejection, batch_typical
from specdec.batch_cache import BatchCache
from specdec.batch_drafting import keyed_rows
from specdec.batch_types import BatchTree
from specdec.drafting import DraftContext
from specdec.errors import SpecDecError
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
    """The tensorized form of a per-node :class:`~specdec.acceptance.AcceptanceRule`."""
    if rule.name == "greedy":
        return batch_greedy
    if rule.name == "rejection":
        return batch_rejection
    if rule.name == "typical":
        return lambda tree, logits, sampling, rng: batch_typical(tree, logits, sampling, rng, rule.epsilon, rule.delta)
    raise SpecDecError(f"acceptance rule {rule.name!r} has no batched form; use greedy, rejection or typical, "
                       "or decode the prompts one by one with generate()")


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
            decoder._check_inputs(ids, limit)
        except SpecDecError as err:
            raise SpecDecError(f"prompt {i}: {err}") from None
        rows.append(ids[0].tolist())
    row_seeds = list(seeds) if seeds is not None else [int(seed) + i for i in range(len(prompts))]
    return rows, limits, row_seeds


class _Timer:
    """Wall time of each phase of a step, synchronised with the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.spent = dict.fromkeys(TIME_FIELDS, 0.0)

    def __call__(self, name: str, fn, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.spent[name] += time.perf_counter() - t0
        return out


def generate_batch(decoder, prompts, max_new_tokens=64, seed: int = 0, seeds=None) -> BatchOutput:
    """Decode every prompt of ``prompts`` (a list of ``[1, T_i]``) together; see :mod:`specdec.batch_decoder`."""
    from verifier.batch import prefill_rows

    rows, limits, row_seeds = check_batch(decoder, prompts, max_new_tokens, seed, seeds)
    rule = batch_rule(decoder.rule)
    device, target = decoder.device, decoder.target
    start, timer = time.perf_counter(), _Timer(device)
    rng = keyed_rows(row_seeds, device)
    drafter = decoder.drafter.batched()
    capacity = max(len(r) + n for r, n in zip(rows, limits)) + decoder.drafter.max_nodes + 1
    cache = BatchCache.for_model(target, capacity, len(rows))
    ctx = DraftContext(target, decoder.sampling, rng, capacity)
    hidden = timer("time_prefill", prefill_rows, target, cache, [r[:-1] for r in rows])
    timer("time_prefill", lambda: (drafter.start(ctx, len(rows)), drafter.prefill(rows, hidden)))
    run = _BatchRun(rows, limits, [DecodeStats() for _ in rows])
    while run.active:
        _batch_step(decoder, rule, drafter, cache, rng, run, timer, start)
    return run.output(prompts, timer, time.perf_counter() - start)


@dataclass
class _BatchRun:
    """What the batch has produced so far; ``active`` maps current batch rows to original rows."""

    tokens: list[list[int]]
    limits: list[int]
    row_stats: list[DecodeStats]
    new: list[int] = field(default_factory=list)
    active: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.new = [0] * len(self.tokens)
        self.active = list(range(len(self.tokens)))

    def output(self, prompts, timer: _Timer, total: float) -> BatchOutput:
        device = prompts[0].device
        seqs = [torch.tensor([t], dtype=torch.long, device=device) for t in self.tokens]
        stats = DecodeStats.merge(self.row_stats)
        for name, value in timer.spent.items():
            setattr(stats, name, value)
        stats.time_total = total
        return BatchOutput(sequences=seqs, stats=stats, row_stats=self.row_stats)


def _batch_step(decoder, rule, drafter, cache: BatchCache, rng, run: _BatchRun, timer: _Timer, start: float) -> None:
    """One speculative step for every active row: propose, verify, accept, commit, retire finished rows."""
    from verifier.batch import verify_rows

    step = run.row_stats[run.active[0]].target_forwards  # every active row has taken the same steps
    rng.set_step(step)
    remaining = [run.limits[r] - run.new[r] for r in run.active]
    trees = timer("time_draft", drafter.propose, [n - 1 for n in remaining])
    tree = BatchTree.stack(trees, decoder.device)
    roots = [run.tokens[r][-1] for r in run.active]
    verify = timer("time_verify", verify_rows, decoder.target, cache, roots, tree, step)

    def accept_and_commit() -> list[int]:
        decided = rule(tree, verify.logits, decoder.sampling, rng).to_host(tree.tokens)  # the step's one host read
        results, finished = [], []
        for i, (row, (nodes, tokens)) in enumerate(zip(run.active, decided)):
            emitted, done = decoder._cut(tokens, remaining[i])
            run.tokens[row] += emitted
            run.new[row] += len(emitted)
            depth = int(trees[i].depth.max()) if trees[i].num_nodes else 0
            run.row_stats[row].record_step(trees[i].num_nodes, depth, len(nodes))
            results.append(AcceptResult(accepted_nodes=nodes, tokens=tokens))
            if done:
                finished.append(i)
                run.row_stats[row].new_tokens = run.new[row]
                run.row_stats[row].time_total = time.perf_counter() - start
        cache.keep_block([[0] + [1 + n for n in res.accepted_nodes] for res in results])
        drafter.commit(results, verify)
        return finished

    finished = timer("time_accept", accept_and_commit)
    if finished:
        keep = [i for i in range(len(run.active)) if i not in finished]
        run.active = [run.active[i] for i in keep]
        if keep:
            cache.select_rows(keep)
            drafter.select_rows(keep)
            rng.select_rows(keep)
