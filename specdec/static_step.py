"""A decode step with fixed shapes and no host synchronisation inside it, for capture on a GPU.

For a draft-model chain of k drafts (or no drafter) over B rows, every tensor of the step has a
fixed shape and a fixed address: both caches span their whole capacity (slots past a row's
length are masked), each row's sequence, length, budget and "finished" flag live on the device,
the draft model catches each row up with a block of 2 (one or two real tokens), drafts k tokens,
the target verifies ``[B, 1 + k]``, the tensorized rule accepts per row (drafts past a row's
budget are invalid nodes), and the emitted tokens are cut at EOS and at the row's
``max_new_tokens`` and written into the row's sequence, all on the device. The host reads one
small tensor per step: the rows' draft counts, accepted counts, emitted counts and flags.

:class:`StaticChainStep` runs this step eagerly (CPU, or a GPU without capture) or captured in a
CUDA graph (``compile="graph"``: replayed every step; where capture fails it warns once and
runs eagerly) or through ``torch.compile`` (``compile="inductor"``). Every form emits exactly the
tokens of :meth:`specdec.SpeculativeDecoder.generate_batch` (and so of ``generate``) with the same
seeds: the draws are keyed (:mod:`specdec.rng`).
"""
from __future__ import annotations

import warnings

import torch

from specdec.batch_cache import BatchCache
from specdec.batch_types import BatchTree
from specdec.rng import DRAFT, KeyedRandom
from specdec.sampling import warp_probs
from verifier.verifier import model_forward

#: ``none``: the ragged batched path; ``static``: this step, eager; ``graph``: captured; ``inductor``: compiled.
COMPILE_MODES = ("none", "static", "graph", "inductor")


def _forward(model, cache: BatchCache, ids: torch.Tensor, offsets: torch.Tensor, tree_mask: torch.Tensor,
             hidden: bool = False):
    """A static block forward: ``ids [B, n]`` at ``cache.lengths + offsets [B, n]`` with ``tree_mask [B, n, n]``."""
    cache.begin_static_block(ids.shape[1])
    attn = {"specdec_prefix_len": 0, "specdec_tree_mask": None, "specdec_tree_plan": None,
            "specdec_key_mask": cache.block_mask(tree_mask)}  # [B, 1, n, C]
    return model_forward(model, cache, ids, cache.lengths[:, None] + offsets, attn, "sdpa", output_hidden=hidden)


class StaticChainStep:
    """Fixed-shape buffers and the step over them (see the module docstring).

    Args:
        decoder: the :class:`~specdec.SpeculativeDecoder` (target, rule, sampling, EOS ids).
        draft: the draft model, or None for plain decoding (k = 0).
        k: drafts per step.
        prompts: token lists, one per row; limits: each row's ``max_new_tokens``; seeds: each row's seed.
        compile: ``none``, ``graph`` or ``inductor``.
    """

    def __init__(self, decoder, draft, k: int, prompts: list[list[int]], limits: list[int], seeds: list[int],
                 compile: str = "none"):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: choose one of {COMPILE_MODES}")
        self.target, self.draft, self.k = decoder.target, draft, k if draft is not None else 0
        from specdec.batch_decoder import batch_rule

        self.rule, self.sampling, device = batch_rule(decoder.rule), decoder.sampling, decoder.device
        b = len(prompts)
        capacity = max(len(p) + n for p, n in zip(prompts, limits)) + self.k + 2
        self.seq = torch.zeros(b, capacity, dtype=torch.long, device=device)  # [B, C] every row's tokens
        for i, p in enumerate(prompts):
            self.seq[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.seq_len = torch.tensor([len(p) for p in prompts], device=device)  # [B]
        self.new = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        self.limit = torch.tensor(limits, device=device)  # [B]
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)  # [B]
        self.eos = torch.tensor(sorted(decoder.eos) or [-1], device=device)  # [E]
        self.rng = KeyedRandom(torch.tensor(seeds, dtype=torch.long, device=device))
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.t_cache = BatchCache.for_model(self.target, capacity, b)
        self.d_cache = BatchCache.for_model(draft, capacity, b) if draft is not None else None
        self.chain = torch.ones(self.k + 1, self.k + 1, dtype=torch.bool, device=device).tril().expand(b, -1, -1)
        self.report = torch.zeros(b, 4, dtype=torch.long, device=device)  # [B, 4] what the host reads per step
        self.compile, self._run = compile, self._eager

    # ------------------------------------------------------------------ setup (eager, once)

    def prefill(self, prompts: list[list[int]]) -> None:
        """Both caches take every prompt but its last token (ragged, one forward each)."""
        from verifier.batch import prefill_rows

        prefill_rows(self.target, self.t_cache, [p[:-1] for p in prompts], output_hidden=False)
        if self.draft is not None:
            prefill_rows(self.draft, self.d_cache, [p[:-1] for p in prompts], output_hidden=False)
        self._run = self._compiled() if self.compile in ("graph", "inductor") else self._eager

    # ------------------------------------------------------------------ the step (device only)

    def _rows_gather(self, positions: torch.Tensor) -> torch.Tensor:
        """``seq[b, positions[b, j]]`` (positions clamped into the buffer) ``[B, n]``."""
        return self.seq.gather(1, positions.clamp(0, self.seq.shape[1] - 1))

    def _draft_chain(self, budget: torch.Tensor):
        """Catch up (a block of 2) and draft k tokens: ``(drafts [B, k], q [B, k, V])``."""
        d_len = self.d_cache.lengths  # [B] the draft cache lacks seq[d_len : seq_len] (1 or 2 tokens)
        offsets = torch.arange(2, device=d_len.device).expand(d_len.shape[0], 2)  # [B, 2]
        real = (d_len[:, None] + offsets) < self.seq_len[:, None]  # [B, 2]
        ids = self._rows_gather(d_len[:, None] + offsets)  # [B, 2]
        mask = torch.ones(2, 2, dtype=torch.bool, device=d_len.device).tril() & (real[:, None, :] | torch.eye(
            2, dtype=torch.bool, device=d_len.device))  # [B, 2, 2]
        logits, _ = _forward(self.draft, self.d_cache, ids, offsets, mask)  # [B, 2, V]
        last = real.long().sum(1) - 1  # [B]
        self.d_cache.advance(torch.where(self.finished, 0, real.long().sum(1)))  # frozen rows stay in place
        logits = logits[torch.arange(logits.shape[0], device=logits.device), last]  # [B, V]
        drafts, probs = [], []
        one = torch.zeros_like(offsets[:, :1])  # [B, 1]
        for i in range(self.k):
            q = warp_probs(logits, self.sampling)  # [B, V]
            tok = q.argmax(-1) if self.sampling.greedy else self.rng.categorical(q, DRAFT, i)  # [B]
            drafts.append(tok)
            probs.append(q)
            if i + 1 < self.k:
                logits, _ = _forward(self.draft, self.d_cache, tok[:, None], one, self.chain[:, :1, :1])
                logits = logits[:, 0]
                self.d_cache.advance((budget > i + 1).long())  # fed only where a batch-1 run feeds it (0 if frozen)
        return torch.stack(drafts, 1), torch.stack(probs, 1)  # [B, k], [B, k, V]

    def _tree(self, drafts: torch.Tensor | None, probs: torch.Tensor | None, budget: torch.Tensor) -> BatchTree:
        """The static chain as a :class:`BatchTree`; nodes past a row's budget are invalid."""
        b, k, device = self.seq.shape[0], self.k, self.seq.device
        if k == 0:
            empty = torch.zeros(b, 0, dtype=torch.long, device=device)
            return BatchTree(empty, empty, empty, empty.bool(), torch.full((b, 1, 1), -1, device=device),
                             self.chain, None, "deterministic", [], 0)
        node = torch.arange(k, device=device)  # [k]
        valid = node[None, :] < budget[:, None]  # [B, k]
        children = torch.where(valid, node[None, :], -1)[:, :, None]  # [B, k, 1] node i's child is i
        children = torch.cat([children, torch.full((b, 1, 1), -1, device=device)], 1)  # [B, k + 1, 1]
        mode = "deterministic" if self.sampling.greedy else "chain"
        return BatchTree(drafts, (node - 1).expand(b, k), (node + 1).expand(b, k), valid, children, self.chain,
                         None if self.sampling.greedy else probs, mode, [], k)

    def _eager(self) -> None:
        """One step for every row; finished rows compute but change nothing."""
        self.rng.step.copy_(self.step_index.expand_as(self.rng.step))  # in place: a captured step keeps its buffers
        room = self.limit - self.new  # [B] tokens a row may still emit
        budget = torch.where(self.finished, 0, (room - 1).clamp(0, self.k))  # [B] drafts a batch-1 run proposes
        drafts, probs = self._draft_chain(budget) if self.k else (None, None)
        tree = self._tree(drafts, probs, budget)
        roots = self._rows_gather(self.seq_len[:, None] - 1)  # [B, 1]
        ids = torch.cat([roots, drafts], 1) if self.k else roots  # [B, 1 + k]
        offsets = torch.arange(self.k + 1, device=ids.device).expand_as(ids)  # [B, 1 + k]
        logits, _ = _forward(self.target, self.t_cache, ids, offsets, self.chain)  # [B, 1 + k, V]
        decided = self.rule(tree, logits, self.sampling, self.rng)
        self._commit(decided, ids, room, budget, logits)
        self.step_index += 1

    def _commit(self, decided, ids, room, budget, logits) -> None:
        """Cut at EOS and the budget, write the emitted tokens, advance both caches, report."""
        k = self.k
        j = torch.arange(k + 1, device=ids.device)  # [k + 1]
        emitted = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)  # [B, k + 1] the drafts (a chain)
        emitted = emitted.scatter(1, decided.counts[:, None], decided.extra[:, None])  # accepted drafts, then the extra
        count = decided.counts + 1  # [B]
        is_eos = torch.isin(emitted, self.eos) & (j[None, :] < count[:, None])  # [B, k + 1]
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, count)  # [B]
        count = torch.minimum(torch.minimum(count, first_eos), room)
        count = torch.where(self.finished, 0, count)  # [B] tokens each row emits now
        dest = torch.where(j[None, :] < count[:, None], self.seq_len[:, None] + j, self.seq.shape[1] - 1)  # [B, k+1]
        self.seq.scatter_(1, dest, torch.where(j[None, :] < count[:, None], emitted, self.seq.gather(1, dest)))
        done = ~self.finished & ((is_eos & (j[None, :] < count[:, None])).any(1) | (self.new + count >= self.limit))
        self.t_cache.advance(torch.where(self.finished, 0, decided.counts + 1))  # root + accepted, in place (a chain)
        if k:
            fed = torch.minimum(decided.counts, (budget - 1).clamp_min(0))  # [B] accepted drafts the draft model saw
            self.d_cache.lengths.copy_(torch.where(self.finished, self.d_cache.lengths, self.seq_len + fed))
        self.seq_len += count
        self.new += count
        bad = ~torch.isfinite(logits).all(-1).all(-1)  # [B]
        self.report.copy_(torch.stack([budget, decided.counts, count, done.long() | (bad.long() << 1)], 1))
        self.finished |= done

    # ------------------------------------------------------------------ compiled forms

    def _compiled(self):
        """The step captured in a CUDA graph (``graph``) or compiled (``inductor``); eager, with one
        warning, where that is not possible."""
        if self.seq.device.type != "cuda":  # CPU: no graphs; inductor on this step is not supported here
            warnings.warn(f"compile={self.compile} needs a CUDA device; running the static step eagerly", stacklevel=3)
            return self._eager
        if self.compile == "graph":
            return self._capture()
        return self._first_call_or_eager(torch.compile(self._eager, dynamic=False))

    def _first_call_or_eager(self, compiled):
        """``compiled``, tried on the first step: if compiling fails there (no compiler, an unsupported op),
        the step's buffers are restored, one warning says so, and the eager step takes over."""
        def first():
            snapshot = self._save()
            try:
                compiled()
                self._run = compiled
            except Exception as exc:  # noqa: BLE001 - compilation errors of any kind: eager, said once
                self._restore(snapshot)
                warnings.warn(f"compile={self.compile} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                              "running the static step eagerly", stacklevel=4)
                self._run = self._eager
                self._eager()

        return first

    def _capture(self):
        """Warm up on a side stream, capture one step into a graph; replays advance every buffer in place."""
        snapshot = self._save()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._eager()
            torch.cuda.current_stream().wait_stream(stream)
            self._restore(snapshot)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._eager()
            self._restore(snapshot)  # capture ran the step once: undo it
        except Exception as exc:  # noqa: BLE001 - a forward that syncs or allocates dynamically cannot be captured
            self._restore(snapshot)
            warnings.warn(f"compile=graph: capture failed ({type(exc).__name__}: {exc}); running eagerly", stacklevel=3)
            return self._eager
        return graph.replay

    def _state(self) -> list[torch.Tensor]:
        caches = [self.t_cache] + ([self.d_cache] if self.d_cache is not None else [])
        return [self.seq, self.seq_len, self.new, self.finished, self.step_index, self.rng.step,
                *(c.lengths for c in caches)]

    def _save(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._state()]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self._state(), saved):
            t.copy_(s)

    def step(self) -> list[list[int]]:
        """Run one step; the host's one read: per row ``[drafts proposed, drafts accepted, tokens
        emitted, flags]`` (flags: 1 finished, 2 non-finite logits)."""
        self._run()
        return self.report.tolist()


def generate_static(decoder, prompts, max_new_tokens=64, seed: int = 0, seeds=None, compile: str = "static"):
    """:meth:`specdec.SpeculativeDecoder.generate_batch` through the static step (a draft-model chain or
    no drafter); same arguments, same tokens, a :class:`~specdec.batch_decoder.BatchOutput`."""
    import time

    from specdec.batch_decoder import BatchOutput, check_batch
    from specdec.errors import NonFiniteLogitsError
    from specdec.stats import DecodeStats

    rows, limits, row_seeds = check_batch(decoder, prompts, max_new_tokens, seed, seeds)
    draft, k = static_drafter(decoder.drafter)
    start = time.perf_counter()
    with torch.inference_mode():
        step = StaticChainStep(decoder, draft, k, rows, limits, row_seeds, compile)
        step.prefill(rows)
        stats, live, n = [DecodeStats() for _ in rows], [True] * len(rows), 0
        prefill_s = time.perf_counter() - start
        while any(live):
            for b, (proposed, accepted, emitted, flags) in enumerate(step.step()):
                if not live[b]:
                    continue
                if flags & 2:
                    raise NonFiniteLogitsError(f"target forward at decode step {n} (row {b}): non-finite logits")
                stats[b].record_step(proposed, proposed, accepted)
                stats[b].new_tokens += emitted
                if flags & 1:
                    live[b] = False
                    stats[b].time_total = time.perf_counter() - start
            n += 1
        lengths = step.seq_len.tolist()
        seqs = [step.seq[b : b + 1, :n_b].to(prompts[0].device) for b, n_b in enumerate(lengths)]
    total = DecodeStats.merge(stats)
    total.time_prefill, total.time_total = prefill_s, time.perf_counter() - start
    return BatchOutput(sequences=seqs, stats=total, row_stats=stats)


def static_drafter(drafter) -> tuple:
    """``(draft model or None, k)`` of a drafter the static step supports: none, or a draft-model chain."""
    from drafters.draft_model import DraftModelDrafter
    from drafters.none import NoDrafter
    from specdec.errors import ConfigError

    if isinstance(drafter, NoDrafter):
        return None, 0
    if isinstance(drafter, DraftModelDrafter) and drafter.mode == "chain":
        return drafter.model, drafter.k
    raise ConfigError(f"the static step (compile=static|graph|inductor) supports no drafter and draft-model chains, "
                      f"not {type(drafter).__name__}{' (' + drafter.mode + ')' if hasattr(drafter, 'mode') else ''}: "
                      "use compile=none")
