"""A decode step with fixed shapes and no host synchronisation inside it, for capture on a GPU.

For a draft model's chain or tree preset of N nodes (or no drafter) over B rows, every tensor of
the step has a fixed shape and a fixed address: both caches span their whole capacity (slots past a
row's length are masked), each row's sequence, length, budget and "finished" flag live on the
device. A step reads:

1. catch up: the draft model takes the 1 or 2 tokens its cache lacks (a block of 2, masked);
2. draft: one draft forward per tree level over the level's fed nodes
   (:func:`specdec.static_shape.grow`; a chain is a tree of one node per level);
3. verify: the target scores ``[B, 1 + N]`` (root and nodes, positions ``length + depth``, the
   preset's ancestor mask); nodes deeper than a row's remaining budget are invalid;
4. accept: the tensorized rule, per row;
5. commit: the emitted tokens are cut at EOS and at the row's ``max_new_tokens`` and written into
   the row's sequence; the target cache keeps the root and the accepted path, the draft cache the
   path's fed prefix (gather then scatter, on the device).

The host reads one small tensor per step: per row its node count, depth, accepted and emitted
counts, and flags.

:class:`StaticStep` runs this step eagerly (CPU, or a GPU without capture) or captured in a
CUDA graph (``compile="graph"``: replayed every step; where capture fails it warns once and
runs eagerly) or through ``torch.compile`` (``compile="inductor"``, on the CPU too: it needs a C++
compiler there; on a GPU the compiled step is then captured as well, so that its fused kernels replay
without launches, as gpt-fast does; its buffers are rounded up to a multiple of
:data:`CAPACITY_BUCKET` slots so that batches of similar lengths reuse one compiled step). A decoder
keeps its captured or compiled steps (:mod:`specdec.static_kept`, per batch size and capacity
bucket): a later batch refills the same buffers in place and replays, with no second capture. Every form emits exactly the
tokens of :meth:`specdec.SpeculativeDecoder.generate_batch` (and so of ``generate``) with the same
seeds: the draws are keyed (:mod:`specdec.rng`).
"""
from __future__ import annotations

import time
import warnings

import torch

from specdec.batch_cache import BatchCache
from specdec.batch_types import BatchTree
from specdec.errors import raise_out_of_memory
from specdec.rng import KeyedRandom
from specdec.static_kept import capture_graph
from specdec.static_shape import StaticShape, check_compile, grow, static_drafter
from verifier.verifier import model_forward

CAPACITY_BUCKET = 128  # compile=inductor: buffer slots rounded up to a multiple of this
RECOMPILE_LIMIT = 64  # compile=inductor: compiled steps dynamo keeps (its default keeps 8)
_COMPILE_FAILED: list[Exception] = []  # compile=inductor failed in this process: the eager step from then on


def _forward(model, cache: BatchCache, ids: torch.Tensor, offsets: torch.Tensor, tree_mask: torch.Tensor,
             slot_offset: int = 0, bits: torch.Tensor | None = None):
    """A static block forward: ``ids [B, n]`` written at slots ``cache.lengths + slot_offset + j``, at positions
    ``cache.lengths + offsets [B, n]``, seeing the row's prefix and block slots ``lengths + i`` where
    ``tree_mask [B, n, w]`` is true. ``bits``: the same block as one packed tree ``[n]`` shared by every row
    (``slot_offset`` 0): attention then runs the tree-attention kernel on the device-side lengths
    (:mod:`specdec_kernels.rows`) instead of SDPA over a key mask of the whole capacity."""
    cache.begin_static_block(ids.shape[1], slot_offset)
    attn = {"specdec_prefix_len": 0, "specdec_tree_mask": None, "specdec_tree_plan": None, "specdec_key_mask": None}
    if bits is None:
        attn["specdec_key_mask"] = cache.block_mask(tree_mask)  # [B, 1, n, C]
    else:
        from specdec_kernels.rows import rows_plan

        attn["specdec_tree_plan"] = rows_plan(cache.lengths, bits)
    backend = "sdpa" if bits is None else "triton"
    return model_forward(model, cache, ids, cache.lengths[:, None] + offsets, attn, backend)  # positions clamped there


def capacity_for(prompts: list[list[int]], limits: list[int], nodes: int, compile: str) -> int:
    """Slots per row for these rows and a tree of ``nodes`` drafts; captured and compiled steps round up to
    :data:`CAPACITY_BUCKET` so that later batches of similar lengths reuse them (:mod:`specdec.static_kept`)."""
    capacity = max(len(p) + n for p, n in zip(prompts, limits)) + nodes + 2
    if compile in ("graph", "inductor"):
        capacity = -(-capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET
    return capacity


class StaticStep:
    """Fixed-shape buffers and the step over them (see the module docstring).

    Args:
        decoder: the :class:`~specdec.SpeculativeDecoder` (target, rule, sampling, EOS ids).
        draft: the draft model, or None for plain decoding.
        shape: the :class:`~specdec.static_shape.StaticShape` every step drafts (None for plain decoding).
        prompts: token lists, one per row; limits: each row's ``max_new_tokens``; seeds: each row's seed.
        compile: ``none``, ``graph`` or ``inductor``.
    """

    def __init__(self, decoder, draft, shape: StaticShape | None, prompts: list[list[int]], limits: list[int],
                 seeds: list[int], compile: str = "none"):
        check_compile(compile)
        self.target, self.draft, self.shape = decoder.target, draft, shape if draft is not None else None
        self.depth = self.shape.max_depth if self.shape is not None else 0  # D: the deepest draft
        from specdec.batch_decoder import batch_rule

        self.rule, self.sampling, device = batch_rule(decoder.rule), decoder.sampling, decoder.device
        b = len(prompts)
        capacity = capacity_for(prompts, limits, self.shape.num_nodes if self.shape is not None else 0, compile)
        self.seq = torch.zeros(b, capacity, dtype=torch.long, device=device)  # [B, C] every row's tokens
        self.seq_len = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        self.new = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        self.limit = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)  # [B]
        self.eos = torch.tensor(sorted(decoder.eos) or [-1], device=device)  # [E]
        self.rng = KeyedRandom(torch.zeros(b, dtype=torch.long, device=device))
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.t_cache = BatchCache.for_model(self.target, capacity, b)
        self.d_cache = BatchCache.for_model(draft, capacity, b) if draft is not None else None
        # the lengths buffers a captured step reads (prefill copies its lengths back into them)
        self._lengths = [c.lengths if c is not None else None for c in (self.t_cache, self.d_cache)]
        self.root_mask = torch.ones(b, 1, 1, dtype=torch.bool, device=device)  # [B, 1, 1] plain decoding
        self.bits = None  # [1 + N]: the verify tree packed for the kernel (attn_backend=triton); None: SDPA
        if decoder.verifier.attn_backend == "triton":
            from specdec_kernels.rows import packed_for

            self.bits = packed_for(self.shape.mask if self.shape is not None else self.root_mask[0])
        self.report = torch.zeros(b, 5, dtype=torch.long, device=device)  # [B, 5] what the host reads per step
        self.compile, self._run, self._prepared = compile, self._eager, False
        self.compile_s = 0.0  # seconds spent compiling or capturing (one undone step included)
        self.write_rows(prompts, limits, seeds)

    def write_rows(self, prompts: list[list[int]], limits: list[int], seeds: list[int]) -> None:
        """Each row's prompt, ``max_new_tokens`` and seed into the buffers, everything else back to its start:
        in place, so that a captured or compiled step serves new rows with the same addresses."""
        device = self.seq.device
        self.seq.zero_()
        for i, p in enumerate(prompts):
            self.seq[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.seq_len.copy_(torch.tensor([len(p) for p in prompts], device=device))
        self.limit.copy_(torch.tensor(limits, device=device))
        self.rng.seeds.copy_(torch.tensor(seeds, dtype=torch.long, device=device))
        for t in (self.new, self.finished, self.step_index, self.rng.step, self.report,
                  *(c.overflow for c in self._caches())):
            t.zero_()

    @classmethod
    def for_decoder(cls, decoder, prompts: list[list[int]], limits: list[int], seeds: list[int],
                    compile: str = "none") -> StaticStep:
        """The step of ``decoder``'s drafter (its draft model and shape: :func:`static_drafter`)."""
        draft, compiled, mode = static_drafter(decoder.drafter, decoder.sampling, decoder.target)
        shape = StaticShape(compiled, mode, decoder.device) if draft is not None else None
        return cls(decoder, draft, shape, prompts, limits, seeds, compile)

    # ------------------------------------------------------------------ setup (eager, once)

    def prefill(self, prompts: list[list[int]]) -> None:
        """Both caches take every prompt but its last token (ragged, one forward each)."""
        from verifier.batch import prefill_rows

        for model, cache, lengths in ((self.target, self.t_cache, self._lengths[0]),
                                      (self.draft, self.d_cache, self._lengths[1])):
            if cache is None:
                continue
            try:  # prefilling replaces the lengths tensor: the step's own buffer takes its values back
                cache.set_lengths([0] * len(prompts))
                prefill_rows(model, cache, [p[:-1] for p in prompts], output_hidden=False)
            finally:
                cache.lengths = lengths.copy_(cache.lengths)
        self.compile_s = 0.0
        if self.compile in ("graph", "inductor") and not self._prepared:
            start = time.perf_counter()
            self._run = self._compiled()  # graph: captured now; inductor: compiled on the first step
            self.compile_s += time.perf_counter() - start
            self._prepared = True

    # ------------------------------------------------------------------ the step (device only)

    def _rows_gather(self, positions: torch.Tensor) -> torch.Tensor:
        """``seq[b, positions[b, j]]`` (positions clamped into the buffer) ``[B, n]``."""
        return self.seq.gather(1, positions.clamp(0, self.seq.shape[1] - 1))

    def _catch_up(self) -> torch.Tensor:
        """Feed the draft model the 1 or 2 tokens its cache lacks (root included): ``[B, V]`` logits at the root."""
        d_len = self.d_cache.lengths  # [B] the draft cache lacks seq[d_len : seq_len] (1 or 2 tokens)
        offsets = torch.arange(2, device=d_len.device).expand(d_len.shape[0], 2)  # [B, 2]
        real = (d_len[:, None] + offsets) < self.seq_len[:, None]  # [B, 2]
        ids = self._rows_gather(d_len[:, None] + offsets)  # [B, 2]
        mask = torch.ones(2, 2, dtype=torch.bool, device=d_len.device).tril() & (real[:, None, :] | torch.eye(
            2, dtype=torch.bool, device=d_len.device))  # [B, 2, 2]
        logits, _ = _forward(self.draft, self.d_cache, ids, offsets, mask)  # [B, 2, V]
        last = real.long().sum(1) - 1  # [B]
        self.d_cache.advance(torch.where(self.finished, 0, real.long().sum(1)))  # frozen rows stay in place
        return logits[torch.arange(logits.shape[0], device=logits.device), last]  # [B, V]

    def _feed(self, ids: torch.Tensor, level) -> torch.Tensor:
        """A level's fed nodes ``ids [B, f]`` into the draft cache after the root (fed node j at slot
        ``length + j``, position ``length - 1 + depth``), each seeing the prefix and its fed ancestors."""
        shape, b = self.shape, ids.shape[0]
        offsets = torch.full_like(ids, level.depth - 1)  # [B, f]
        visible = shape.fed_mask[level.fed_lo : level.fed_lo + level.num_fed].expand(b, -1, -1)  # [B, f, F]
        logits, _ = _forward(self.draft, self.d_cache, ids, offsets, visible, slot_offset=level.fed_lo)  # [B, f, V]
        return logits

    def _tree(self, tokens: torch.Tensor, probs: torch.Tensor | None, budget: torch.Tensor) -> BatchTree:
        """This step's drafts as a :class:`BatchTree`; nodes deeper than a row's budget are invalid."""
        b, device = self.seq.shape[0], self.seq.device
        if self.shape is None:
            empty = torch.zeros(b, 0, dtype=torch.long, device=device)
            return BatchTree(empty, empty, empty, empty.bool(), torch.full((b, 1, 1), -1, device=device),
                             self.root_mask, None, "deterministic", [], 0)
        shape, mode = self.shape, "deterministic" if probs is None else self.shape.mode
        valid = shape.valid(budget)  # [B, N]
        return BatchTree(tokens, shape.parents.expand(b, -1), shape.depth.expand(b, -1), valid,
                         shape.row_children(valid), shape.mask.expand(b, -1, -1), probs, mode, [], shape.max_depth)

    def _eager(self) -> None:
        """One step for every row; finished rows compute but change nothing."""
        self.rng.step.copy_(self.step_index.expand_as(self.rng.step))  # in place: a captured step keeps its buffers
        room = self.limit - self.new  # [B] tokens a row may still emit
        budget = torch.where(self.finished, 0, (room - 1).clamp(0, self.depth))  # [B] how deep a batch-1 run drafts
        b = self.seq.shape[0]
        roots = self._rows_gather(self.seq_len[:, None] - 1)  # [B, 1]
        if self.shape is not None:
            tokens, probs = grow(self.shape, self._catch_up(), self._feed, self.sampling, self.rng)  # [B, N]
            ids = torch.cat([roots, tokens], 1)  # [B, 1 + N]
            offsets = torch.cat([torch.zeros_like(roots), self.shape.depth.expand(b, -1)], 1)  # [B, 1 + N]
            mask = self.shape.mask.expand(b, -1, -1)  # [B, 1 + N, 1 + N]
        else:
            tokens, probs, ids, offsets, mask = roots[:, :0], None, roots, torch.zeros_like(roots), self.root_mask
        tree = self._tree(tokens, probs, budget)
        logits, _ = _forward(self.target, self.t_cache, ids, offsets, mask, bits=self.bits)  # [B, 1 + N, V]
        decided = self.rule(tree, logits, self.sampling, self.rng)
        self._commit(decided, tokens, room, budget, logits)
        self.step_index += 1

    def _commit(self, decided, tokens, room, budget, logits) -> None:
        """Cut at EOS and the budget, write the emitted tokens, keep both caches' accepted slots, report."""
        depth, live = self.depth, ~self.finished
        j = torch.arange(depth + 1, device=tokens.device)  # [D + 1]
        path = decided.accepted.clamp_min(0)  # [B, D] accepted nodes (clamped past the path)
        emitted = torch.cat([tokens.gather(1, path), torch.zeros_like(self.seq_len[:, None])], 1)  # [B, D + 1]
        emitted = emitted.scatter(1, decided.counts[:, None], decided.extra[:, None])  # accepted drafts, then the extra
        count = decided.counts + 1  # [B]
        # not torch.isin: past a few EOS ids it sorts, which syncs (and cannot be captured)
        is_eos = (emitted[..., None] == self.eos).any(-1) & (j[None, :] < count[:, None])  # [B, D + 1]
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, count)  # [B]
        count = torch.where(live, torch.minimum(torch.minimum(count, first_eos), room), 0)  # [B] tokens emitted now
        dest = torch.where(j[None, :] < count[:, None], self.seq_len[:, None] + j, self.seq.shape[1] - 1)  # [B, D+1]
        self.seq.scatter_(1, dest, torch.where(j[None, :] < count[:, None], emitted, self.seq.gather(1, dest)))
        done = live & ((is_eos & (j[None, :] < count[:, None])).any(1) | (self.new + count >= self.limit))
        self._keep_target(path, decided.counts, live)
        if self.shape is not None:
            self._keep_draft(path, decided.counts, budget, live)
        self.seq_len += count
        self.new += count
        bad = ~torch.isfinite(logits).all(-1).all(-1)  # [B]
        nodes = self.shape.nodes_upto[budget] if self.shape is not None else torch.zeros_like(budget)  # [B]
        over = torch.stack([c.overflow for c in self._caches()]).any()  # a block of either cache
        flags = done.long() | (bad.long() << 1) | (over.long() << 2)  # [B]
        self.report.copy_(torch.stack([nodes, budget, decided.counts, count, flags], 1))
        self.finished |= done

    def _keep_target(self, path: torch.Tensor, counts: torch.Tensor, live: torch.Tensor) -> None:
        """The target cache keeps the root and the accepted nodes (block slots 0 and 1 + node), in order."""
        if self.shape is not None and not self.shape.is_chain:  # a chain's accepted prefix is already in place
            j = torch.arange(self.depth + 1, device=path.device)  # [D + 1]
            block = torch.cat([torch.zeros_like(self.seq_len[:, None]), 1 + path], 1)  # [B, D + 1]
            move = live[:, None] & (j[None, :] <= counts[:, None])  # [B, D + 1]
            base = self.t_cache.lengths[:, None]  # [B, 1]
            self.t_cache.move_slots(base + torch.where(move, block, j), base + j)
        self.t_cache.advance(torch.where(live, counts + 1, 0))

    def _keep_draft(self, path: torch.Tensor, counts: torch.Tensor, budget: torch.Tensor, live: torch.Tensor) -> None:
        """The draft cache keeps the accepted path's fed nodes that a batch-1 run fed (those above the
        row's budget depth: a prefix of the path), moved to follow the root; the rest is re-fed."""
        i = torch.arange(self.depth, device=path.device)  # [D]
        fed = self.shape.fed[path]  # [B, D] each accepted node's fed index (-1: a leaf)
        ok = (i[None, :] < counts[:, None]) & (fed >= 0) & (i[None, :] + 1 < budget[:, None])  # [B, D]
        kept = ok.long().cumprod(1).sum(1)  # [B] the fed prefix of the path
        base = self.seq_len[:, None]  # [B, 1] the draft cache holds the row through its root
        if not self.shape.is_chain:  # a chain's fed drafts already follow the root
            move = live[:, None] & (i[None, :] < kept[:, None])  # [B, D]
            self.d_cache.move_slots(base + torch.where(move, fed, i), base + i)
        self.d_cache.lengths.copy_(torch.where(live, self.seq_len + kept, self.d_cache.lengths))

    # ------------------------------------------------------------------ compiled forms

    def _compiled(self):
        """The step captured in a CUDA graph (``graph``, CUDA only) or compiled (``inductor``: on a CPU, then
        also captured on a GPU); eager, with one warning, where that is not possible."""
        if self.compile == "graph":
            if self.seq.device.type != "cuda":
                warnings.warn("compile=graph needs a CUDA device; running the static step eagerly", stacklevel=3)
                return self._eager
            return self._capture()
        if _COMPILE_FAILED:  # warned once already: later batches do not pay for another failing attempt
            return self._eager
        # one compiled step per (rows, capacity bucket, shape, rule): more than dynamo's default 8, past which
        # it would silently run the step eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        return self._first_call_or_eager(torch.compile(self._eager, dynamic=False))

    def _first_call_or_eager(self, compiled):
        """``compiled``, tried on the first step: if compiling fails there (no compiler, an unsupported op),
        the step's buffers are restored, one warning says so, and the eager step takes over."""
        def first():
            snapshot = self._save()
            start = time.perf_counter()
            try:
                compiled()
            except Exception as exc:  # noqa: BLE001 - compilation errors of any kind: eager, said once
                self._restore(snapshot)
                raise_out_of_memory(exc)  # not the compiler's fault: the eager step would not fit either
                warnings.warn(f"compile={self.compile} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                              "running the static step eagerly from now on", stacklevel=4)
                _COMPILE_FAILED.append(exc)
                self._run = self._eager
                self.compile_s += time.perf_counter() - start  # the failed attempt is compile time, not decoding
                self._eager()
                return
            self._restore(snapshot)  # undo the compiling call's step: it runs again, timed as any other
            # on a GPU the compiled step is captured too (the gpt-fast way): its fused kernels replay without launches
            self._run = self._capture(compiled) if self.seq.device.type == "cuda" else compiled
            if self.seq.device.type == "cuda":
                torch.cuda.synchronize(self.seq.device)
            self.compile_s += time.perf_counter() - start
            self._run()

        return first

    def _capture(self, step=None):
        """Capture one step (``step``: the eager one by default, or the compiled one) into a graph
        (:func:`capture_graph`); replays advance every buffer in place. Where capture fails: ``step``, with one
        warning."""
        step = step or self._eager
        snapshot = self._save()
        try:
            replay = capture_graph(step, self.seq.device, reset=lambda: self._restore(snapshot))
            self._restore(snapshot)  # capture ran the step once: undo it
        except Exception as exc:  # noqa: BLE001 - a forward that syncs or allocates dynamically cannot be captured
            self._restore(snapshot)
            raise_out_of_memory(exc)
            warnings.warn(f"compile={self.compile}: capture failed ({type(exc).__name__}: {exc}); running "
                          f"{'eagerly' if step == self._eager else 'the compiled step uncaptured'}", stacklevel=3)
            return step
        return replay

    def _caches(self) -> list[BatchCache]:
        """The target's cache, then the draft model's where there is one."""
        return [c for c in (self.t_cache, self.d_cache) if c is not None]

    def _state(self) -> list[torch.Tensor]:
        return [self.seq, self.seq_len, self.new, self.finished, self.step_index, self.rng.step,
                *(t for c in self._caches() for t in (c.lengths, c.overflow))]

    def _save(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._state()]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self._state(), saved):
            t.copy_(s)

    def step(self) -> list[list[int]]:
        """Run one step; the host's one read: per row ``[drafts proposed, drafts accepted, tokens
        emitted, flags]`` (flags: 1 finished, 2 non-finite logits, 4 a block passed the cache's capacity)."""
        self._run()
        return self.report.tolist()


def generate_static(decoder, prompts, max_new_tokens=64, seed: int = 0, seeds=None, compile: str = "static"):
    """:meth:`specdec.SpeculativeDecoder.generate_batch` through the static step (no drafter, or a draft
    model's chain or tree preset); same arguments, same tokens, a :class:`~specdec.batch_decoder.BatchOutput`."""
    from specdec.batch_decoder import BatchOutput, check_batch
    from specdec.errors import NonFiniteLogitsError
    from specdec.static_kept import step_for
    from specdec.stats import DecodeStats

    rows, limits, row_seeds = check_batch(decoder, prompts, max_new_tokens, seed, seeds)
    start = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():  # inference tensors break torch.compile's in-place updates
        step = step_for(decoder, rows, limits, row_seeds, compile)  # kept across batches for graph / inductor
        step.prefill(rows)
        stats, live, n = [DecodeStats() for _ in rows], [True] * len(rows), 0
        prefill_s = time.perf_counter() - start - step.compile_s  # a graph is captured in prefill()
        while any(live):
            for b, (nodes, depth, accepted, emitted, flags) in enumerate(step.step()):
                if not live[b]:
                    continue
                if flags & 4:  # capacity_for sizes every block: a bug, not the input's doing
                    raise RuntimeError(f"static step {n}: a block was written past the cache's {step.seq.shape[1]} "
                                       "slots per row (capacity_for is too small for this drafter)")
                if flags & 2:
                    raise NonFiniteLogitsError(f"target forward at decode step {n} (row {b}): non-finite logits")
                stats[b].record_step(nodes, depth, accepted, emitted=emitted)
                stats[b].new_tokens += emitted
                if flags & 1:
                    live[b] = False
                    stats[b].time_total = time.perf_counter() - start - step.compile_s
            n += 1
        lengths = step.seq_len.tolist()
        # copies (on_row keeps them too): a kept step's buffer is refilled by the next batch
        seqs = [step.seq[b : b + 1, :n_b].to(prompts[0].device, copy=True) for b, n_b in enumerate(lengths)]
    total = DecodeStats.merge(stats)
    total.time_prefill, total.time_total = prefill_s, time.perf_counter() - start - step.compile_s
    total.time_compile, total.batch_steps = step.compile_s, n
    return BatchOutput(sequences=seqs, stats=total, row_stats=stats)
