"""Mutation pass 11: the batched decoding path at its edges (the tensorized rules against the per-node ones on
random trees, typical's two parameters, a borderline acceptance decided in double precision, a residual with nothing
left, mixed sampling modes, a one-token prompt beside longer ones, non-finite target logits, per-row seeds, a
continuous batch's steps, tree depths in the row stats, the catch-up's span boundaries) and the resume / speedup
bookkeeping of batched runs (``whole_batches``, ``MethodResults.restricted``, ``paired_speedup``). Each test names
the planted bug it catches."""
from __future__ import annotations

import pytest
import torch

from drafters import DraftModelDrafter, NoDrafter
from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from specdec.acceptance import RejectionAcceptance, TypicalAcceptance
from specdec.batch_acceptance import batch_rejection
from specdec.batch_cache import BatchCache
from specdec.batch_decoder import batch_rule
from specdec.batch_types import BatchTree
from specdec.errors import NonFiniteLogitsError
from specdec.rng import ACCEPT, KeyedRandom
from specdec.sampling import warp_probs
from specdec.stats import DecodeStats
from specdec.types import DraftTree
from tests.tiny_models import noisy_copy, pair, prompts

VOCAB = 6

# --------------------------------------------------------------------------- tensorized rules vs per-node rules


def _random_tree(gen: torch.Generator, mode: str) -> DraftTree:
    """A random tree of 0-6 nodes (parents before children) drafted as ``mode`` draws it: deterministic distinct
    siblings, a sampled chain, siblings sampled with or without replacement from their parent's q."""
    n = int(torch.randint(0, 7, (), generator=gen))
    if mode == "chain" or n == 0:
        q = torch.softmax(torch.randn(n, VOCAB, generator=gen) * 2, -1)  # [n, V]
        tokens = torch.multinomial(q, 1, generator=gen)[:, 0] if n else torch.empty(0, dtype=torch.long)  # [n]
        return DraftTree.chain(tokens, q if mode == "chain" else None)
    parents = [-1] + [int(torch.randint(-1, i, (), generator=gen)) for i in range(1, n)]
    q_of = {p: torch.softmax(torch.randn(VOCAB, generator=gen) * 2, -1) for p in set(parents)}  # parent -> [V]
    tokens, used = [], {}
    for p in parents:
        taken = used.setdefault(p, [])
        if mode == "with_replacement":
            tok = int(torch.multinomial(q_of[p], 1, generator=gen))
        else:  # distinct siblings (deterministic top-k, or sampled without replacement)
            left = q_of[p].clone()
            left[taken] = 0.0
            tok = int(torch.multinomial(left, 1, generator=gen)) if left.sum() > 0 else 0
        taken.append(tok)
        tokens.append(tok)
    probs = None if mode == "deterministic" else torch.stack([q_of[p] for p in parents])  # [n, V]
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), probs, sampling=mode)


def _rows_equal_per_node(rule, batched, mode: str, sampling: SamplingParams, steps: int, seed: int) -> set:
    """``steps`` random batches of 4 rows of ``mode`` trees: every row's batched result equals the per-node rule's
    on its own tree and random numbers. Returns the accepted path lengths seen."""
    gen, seen = torch.Generator().manual_seed(seed), set()
    for step in range(steps):
        trees = [_random_tree(gen, mode) for _ in range(4)]
        width = 1 + max(t.num_nodes for t in trees)
        logits = torch.randn(4, width, VOCAB, generator=gen) * torch.rand(4, width, 1, generator=gen) * 6  # [B, 1 + N, V]
        rng = KeyedRandom(torch.arange(4) + 7 * seed)
        rng.set_step(step)
        batch = BatchTree.stack(trees)
        got = batched(batch, logits, sampling, rng).to_host(batch.tokens)
        for b, tree in enumerate(trees):
            single = rule(tree, logits[b, : 1 + tree.num_nodes], sampling, rng.row(b))
            assert got[b] == (single.accepted_nodes, single.tokens), f"step {step} row {b} ({mode})"
            seen.add(len(single.accepted_nodes))
    return seen


@pytest.mark.parametrize("mode", ["deterministic", "chain", "with_replacement", "without_replacement"])
def test_batch_rejection_equals_the_per_node_rule_on_random_trees(mode):
    """Planted: q' not renormalised after a rejected sibling drawn without replacement (the first child's q for
    every sibling); p' not zeroed after a rejected deterministic child; the draw keyed by the wrong node. Random
    trees with siblings, 4 rows, 60 steps: every row equals the per-node rule, and paths of 0, 1 and 2+ drafts
    occur."""
    seen = _rows_equal_per_node(RejectionAcceptance(), batch_rejection, mode, SamplingParams(temperature=1.0), 60, 1)
    assert {0, 1, 2} <= seen, seen


def test_batch_typical_equals_the_per_node_rule_with_its_own_parameters():
    """Planted: ``batch_rule`` passing typical's ``epsilon`` and ``delta`` swapped; every node judged against the
    root's threshold. Target rows from flat to sharp (entropies that put ``delta * e^-H`` on both sides of
    ``epsilon``), epsilon 0.2 and delta 0.05: the batched rule equals ``TypicalAcceptance(0.2, 0.05)``."""
    rule = TypicalAcceptance(epsilon=0.2, delta=0.05)
    seen = _rows_equal_per_node(rule, batch_rule(rule), "deterministic", SamplingParams(temperature=0.7), 60, 0)
    assert {0, 1, 2} <= seen, seen


def _borderline(px_all: torch.Tensor) -> tuple[int, int, float]:
    """``(seed, x, q(x))``: a row seed whose draw ``u`` for node 0 at step 0, a token x and a float32 q(x) <= 1 with
    ``u * q(x)`` below ``p(x)`` exactly but not once rounded to float32."""
    for seed in range(200):
        u = KeyedRandom(torch.tensor([seed])).uniform_per_row(ACCEPT, torch.tensor([0]))[0]  # [] float32
        for x, px in enumerate(px_all):
            qx = px / u
            for _ in range(8):  # float32 neighbours of p(x) / u, upwards
                if float(u) * float(qx) < float(px) <= float(u * qx) and float(qx) <= 1.0:
                    return seed, x, float(qx)
                qx = torch.nextafter(qx, torch.tensor(2.0))
    raise AssertionError("no borderline (u, q(x), p(x)) found")


def test_a_borderline_acceptance_is_decided_in_double_precision():
    """Planted: the sampled acceptance test ``u * q(x) < p(x)`` in float32 (the per-node rule multiplies Python
    floats). A draft's q(x) is chosen so that the exact product is just below p(x) while its float32 rounding
    reaches p(x): the per-node rule accepts, and so must the batched one."""
    logits = torch.tensor([[[0.3, -1.0, 0.8, 0.1, -0.4, 0.2], [0.0] * VOCAB]])  # [1, 1 + 1, V]
    sampling = SamplingParams(temperature=1.0)
    seed, x, qx = _borderline(warp_probs(logits[0, 0], sampling))
    q = torch.full((1, VOCAB), (1.0 - qx) / (VOCAB - 1))  # [1, V]
    q[0, x] = qx
    tree, rng = DraftTree.chain(torch.tensor([x]), q), KeyedRandom(torch.tensor([seed]))
    single = RejectionAcceptance()(tree, logits[0], sampling, rng.row(0))
    assert single.accepted_nodes == [0]
    batch = BatchTree.stack([tree])
    assert batch_rejection(batch, logits, sampling, rng).to_host(batch.tokens)[0] == ([0], single.tokens)


def test_a_residual_with_nothing_left_falls_back_to_p_as_the_per_node_rule():
    """Planted: ``_renorm`` without its fallback (an all-zero residual divided by its clamped sum stays zero, and
    the race over zeros returns token 0). A draft distribution may sum a little over 1 (the proposal check allows
    it: a bf16 draft), so ``(p - q)+`` can vanish: p is one-hot on token 3 (top-k 1), q gives 3 all its mass and
    the draft token 1 another 0.01. Token 1 is rejected and the recovered token comes from p: 3."""
    sampling = SamplingParams(temperature=1.0, top_k=1)
    logits = torch.tensor([[[0.1, 0.2, 0.0, 2.0, 0.3, -0.5], [0.0] * VOCAB]])  # [1, 1 + 1, V]
    q = torch.tensor([[0.0, 0.01, 0.0, 1.0, 0.0, 0.0]])  # [1, V], sums to 1.01
    tree = DraftTree.chain(torch.tensor([1]), q)
    rng = KeyedRandom(torch.tensor([0]))
    single = RejectionAcceptance()(tree, logits[0], sampling, rng.row(0))
    assert (single.accepted_nodes, single.tokens) == ([], [3])
    batch = BatchTree.stack([tree])
    assert batch_rejection(batch, logits, sampling, rng).to_host(batch.tokens)[0] == ([], [3])


def test_trees_sampled_in_two_ways_cannot_share_a_batch():
    """Planted: the check that a batch's sampled trees share one mode loosened (``len(modes) > 2``): a chain
    beside a tree sampled with replacement would be walked with one row's rule for both."""
    q = torch.full((2, 4), 0.25)  # [N, V]
    chain = DraftTree.chain(torch.tensor([1, 2]), q)
    siblings = DraftTree(torch.tensor([1, 2]), torch.tensor([-1, -1]), q, sampling="with_replacement")
    with pytest.raises(ValueError, match="share one sampling mode"):
        BatchTree.stack([chain, siblings])
    without = DraftTree(torch.tensor([1, 2]), torch.tensor([-1, -1]), q, sampling="without_replacement")
    with pytest.raises(ValueError, match="share one sampling mode"):
        BatchTree.stack([siblings, DraftTree.empty(), without])


# --------------------------------------------------------------------------- the batched loop


def test_a_one_token_prompt_beside_longer_ones_equals_generate():
    """Planted: a prompt of one token (nothing to prefill) keeping the padding token its row got in the batch's
    prefill block (``keep_block`` of ``len(r or [0])`` slots, or ``max(len(k), 1)``). Row 1 has one token, the
    others several: every row equals ``model.generate``."""
    target, _, tok = pair("llama")
    rows = [prompts(tok, 1, seed=4)[0], torch.tensor([[17]]), prompts(tok, 3, seed=4)[2]]  # [1, T_i]
    out = SpeculativeDecoder(target, DraftModelDrafter(noisy_copy("llama"), 3)).generate_batch(rows, 6)
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)  # [1, T_i + 6]
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"


def test_non_finite_target_logits_in_a_batch_step_are_an_error():
    """Planted: the batched verify without its finite check (greedy takes the argmax of NaN logits and goes on).
    A target whose LM head returns NaN: ``generate_batch`` raises the error that names the step."""
    target = pair("llama")[0]
    handle = target.get_output_embeddings().register_forward_hook(lambda mod, args, out: torch.full_like(out, float("nan")))
    try:
        with pytest.raises(NonFiniteLogitsError, match="target forward at decode step 0"):
            SpeculativeDecoder(target, NoDrafter()).generate_batch([torch.tensor([[3, 4]]), torch.tensor([[5]])], 3)
    finally:
        handle.remove()


def test_a_seed_list_of_the_wrong_length_names_the_counts():
    """Planted: ``seeds`` of another length than ``prompts`` accepted (zip cuts it short, then an IndexError, or
    extra seeds silently ignored)."""
    dec = SpeculativeDecoder(pair("llama")[0], NoDrafter())
    rows = [torch.tensor([[1, 2]]), torch.tensor([[3]])]
    with pytest.raises(SpecDecError, match="seeds has 1 entries for 2 prompts"):
        dec.generate_batch(rows, 2, seeds=[5])
    with pytest.raises(SpecDecError, match="seeds has 3 entries for 2 prompts"):
        dec.generate_batch(rows, 2, seeds=[5, 6, 7])


def test_a_continuous_batch_counts_every_step_it_ran():
    """Planted: ``batch_steps`` taken as the longest row's steps (what it is in a static batch). One row at a time
    (``max_rows=1``), limits 3 and 2, no drafts: the batch ran 5 steps, one verify forward each."""
    target, _, tok = pair("llama")
    out = SpeculativeDecoder(target, NoDrafter()).generate_batch(prompts(tok, 2, seed=4), [3, 2], max_rows=1)
    assert [s.target_forwards for s in out.row_stats] == [3, 2]
    assert out.stats.batch_steps == out.stats.steps == 5


def test_tree_rows_record_their_depths_as_their_batch_one_runs():
    """Planted: a row's step recorded with its tree's node count as its depth (equal on a chain, not on a tree).
    Binary trees (up to 30 nodes over 4 levels): every row's per-depth counts equal its batch-1 run's."""
    target, _, tok = pair("llama")

    def make():
        return DraftModelDrafter(noisy_copy("llama"), tree="binary")

    rows, limits = prompts(tok, 3, seed=4), [6, 9, 4]
    out = SpeculativeDecoder(target, make()).generate_batch(rows, limits)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make()).generate(ids, limits[i]).stats
        got = out.row_stats[i]
        assert (got.depth_proposed, got.depth_accepted) == (single.depth_proposed, single.depth_accepted), i
        assert len(got.depth_proposed) < max(got.proposed_per_step), "a tree has more nodes than levels"


# --------------------------------------------------------------------------- the catch-up's spans


def test_a_row_whose_backlog_ends_at_a_span_boundary_keeps_its_last_position():
    """Planted: a row counted in a later span when its backlog ends exactly where that span begins (``n >= lo``):
    it took that span's position 0, a padding token. Capacity 12, lengths 8/0/0, backlogs 0/4/10: spans
    (0, 4), (4, 8), (8, 10); row 1's last token is position 3, row 2's 9, row 0 (no backlog) the first block's 0."""
    from drafters.batch_chain import BatchChain, fitting_spans

    cache = BatchCache(1, 12, 3)
    cache.set_lengths([8, 0, 0])
    backlog = [0, 4, 10]
    assert fitting_spans(cache, backlog) == [(0, 4), (4, 8), (8, 10)]

    def forward(lo: int, hi: int):
        width = max(max(0, min(b, hi) - lo) for b in backlog)
        pos = torch.arange(lo, lo + width, dtype=torch.float32)  # [n] each block token's backlog position
        logits = torch.stack([pos.expand(3, -1), torch.arange(3.0)[:, None].expand(3, width)], -1)  # [B, n, 2]
        return logits, None

    logits_at, hidden_at = BatchChain.caught_up(cache, backlog, forward)  # [B, 2], None
    assert hidden_at is None
    assert logits_at.tolist() == [[0.0, 0.0], [3.0, 1.0], [9.0, 2.0]]


# --------------------------------------------------------------------------- resume and speedup of batched runs


def _record(qid, method, batch_id, size):
    return {"question_id": qid, "method": method, "stats": {"new_tokens": 4},
            "batch": {"id": batch_id, "size": size, "time_total": 1.0}}


def test_whole_batches_drops_until_nothing_changes():
    """Planted: one pass over the batches. Prompt 2 was decoded only by the baseline, so the baseline's batch
    (1, 2) is split; that drops 1, which splits the speculative batch (0, 1) listed before it: nothing is whole."""
    from experiments.resume import whole_batches

    records = [_record(0, "speculative", 0, 2), _record(1, "speculative", 0, 2),
               _record(1, "baseline", 1, 2), _record(2, "baseline", 1, 2)]
    assert whole_batches(records, {0, 1}) == set()
    assert whole_batches(records[:2], {0, 1}) == {0, 1}


def test_a_batch_entry_without_an_id_is_a_lone_record():
    """Planted: a ``batch`` entry without an ``id`` (a hand-edited or older record) read as a batch (a KeyError
    that stops the resume); it is whole on its own, as a batch-1 record."""
    from experiments.resume import whole_batches

    records = [{"question_id": q, "method": "speculative", "stats": {}, "batch": {"size": 2}} for q in range(3)]
    assert whole_batches(records, {0, 2}) == {0, 2}


def _method(batches: dict, tokens: int = 8, seconds: float = 1.0):
    """MethodResults of ``batches`` (batch id -> its question ids), each batch taking ``seconds`` per row."""
    from experiments.results import MethodResults

    results = MethodResults()
    for batch_id, ids in batches.items():
        entry = {"id": batch_id, "size": len(ids), "time_total": seconds * len(ids)}
        for qid in ids:  # a row's own latency (its record's time_total) is not the batch's time
            results.add(qid, DecodeStats(new_tokens=tokens, target_forwards=4, time_total=100.0), [qid], entry)
    return results


def test_results_restricted_to_whole_batches_keep_their_batches_time():
    """Planted: ``restricted`` dropping the batch entries (the throughput then came from the rows' own latencies,
    100 s each, not the batch's 2 s). Over batch 0's prompts: 16 tokens in batch 0's 2 s."""
    results = _method({0: [0, 1], 1: [2, 3]})
    kept = results.restricted({0, 1})
    assert kept.ids == [0, 1] and list(kept.batches) == [0]
    assert kept.metrics()["tokens_per_s"] == pytest.approx(16 / 2.0)
    assert results.restricted({0, 2}) is None  # both batches split


def test_speedup_when_the_speculative_run_decoded_fewer_prompts():
    """Planted: the speculative prompts being a subset of the baseline's read as "the same prompts" (``<=`` for
    ``==``): the speedup divided throughputs over different prompts, with no warning."""
    from experiments.results import paired_speedup

    ours, base = _method({0: [0, 1]}, seconds=0.5), _method({0: [0, 1], 1: [2, 3]}, seconds=1.0)
    speed, warning = paired_speedup(ours, base)
    assert speed == pytest.approx((16 / 1.0) / (16 / 2.0))
    assert warning == (
        "speedup over the 2 prompt(s) both decoded in whole batches (speculative decoded 2 prompt(s), the baseline 4)")


def test_a_straddling_baseline_batch_is_taken_out_as_a_speculative_one():
    """Planted: only the speculative method's batches consulted for the whole-batch prompts (the baseline's batch
    (2, 3) straddles the common prompts 0-2, so ``restricted`` returned None and the summary failed). Prompt 2 is
    taken out with the baseline's batch: the speedup is over batch 0."""
    from experiments.results import paired_speedup

    ours, base = _method({0: [0, 1], 1: [2]}, seconds=0.5), _method({0: [0, 1], 1: [2, 3]}, seconds=1.0)
    speed, warning = paired_speedup(ours, base)
    assert speed == pytest.approx((16 / 1.0) / (16 / 2.0))
    assert "over the 2 prompt(s) both decoded in whole batches" in warning


def test_no_speedup_over_no_common_prompt():
    """Planted: methods with no prompt in common compared over the empty set (a speedup "over the 0 prompt(s)
    both decoded"); it is not given, and the warning says so."""
    from experiments.results import paired_speedup

    speed, warning = paired_speedup(_method({0: [0, 1]}), _method({1: [2, 3]}))
    assert speed is None
    assert warning.startswith("speedup not given: speculative decoded 2 prompt(s), the baseline 2")
