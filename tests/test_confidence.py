"""Dynamic draft length: a chain stops after the first draft less likely than ``confidence_threshold``.

- Greedy runs equal ``generate(do_sample=False)`` with the threshold (draft model, layer-skip, EAGLE;
  batch 1, batches and continuous batching); the threshold is taken from the draft's own confidences
  so that chains of every length occur, and the test checks they did.
- Sampled batched rows equal their batch-1 runs token for token (the batched chain ends each row's
  chain where its batch-1 run would, while the batch drafts on for the other rows).
- ``rejection`` with thresholded chains reproduces the exactly enumerated target distribution.
- Bad values, trees with a threshold and the fixed-shape step with a threshold are clear errors.
"""
from __future__ import annotations

import pytest
import torch

from drafters import DraftModelDrafter, EagleDrafter, LayerSkipDrafter
from specdec import ConfigError, SamplingParams, SpeculativeDecoder
from specdec.sampling import draft_confidence, warp_probs
from tests.lossless import (
    ALPHA,
    NEW,
    PROMPT,
    RUNS,
    SETTINGS,
    chi_square_pvalue,
    decode_runs,
    exact_distribution,
)
from tests.test_batch import _limits, setup  # noqa: F401  (fixture)
from tests.test_eagle import trained_head
from tests.tiny_models import noisy_copy, pair, peaky_noisy_pair

K = 4


def _make(arch: str, kind: str, threshold: float):
    draft = noisy_copy(arch)
    return {"chain": lambda: DraftModelDrafter(draft, K, confidence_threshold=threshold),
            "layer_skip": lambda: LayerSkipDrafter(layers=1, num_speculative_tokens=K, confidence_threshold=threshold),
            "eagle": lambda: EagleDrafter(trained_head(arch, "eagle3"), num_speculative_tokens=K,
                                          confidence_threshold=threshold)}[kind]


def test_draft_confidence_reads_the_drafts_own_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])  # [2, 3]
    tokens = torch.tensor([0, 1])
    greedy = draft_confidence(logits, warp_probs(logits, SamplingParams()), tokens, SamplingParams())
    assert torch.allclose(greedy, logits.softmax(-1)[[0, 1], [0, 1]])  # not the one-hot's 1.0
    warm = SamplingParams(temperature=0.5, top_k=2)
    q = warp_probs(logits, warm)
    assert torch.allclose(draft_confidence(logits, q, tokens, warm), q[[0, 1], [0, 1]])


@pytest.mark.parametrize("kind", ["chain", "layer_skip", "eagle"])
def test_greedy_with_a_threshold_equals_generate(setup, kind):  # noqa: F811
    arch, target, rows = setup
    threshold = _confidence_for(arch, kind, target, rows)
    make, limits = _make(arch, kind, threshold), _limits(len(rows))
    batched = SpeculativeDecoder(target, make()).generate_batch(rows, max_new_tokens=limits, seed=3)
    refill = SpeculativeDecoder(target, make()).generate_batch(rows, max_new_tokens=limits, seed=3, max_rows=3)
    lengths, proposed, full = set(), [], []
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=limits[i], pad_token_id=0)
        single = SpeculativeDecoder(target, make()).generate(ids, max_new_tokens=limits[i], seed=3 + i)
        assert single.sequences.tolist() == ref.tolist(), f"row {i} (batch 1)"
        assert batched.sequences[i].tolist() == ref.tolist(), f"row {i} (batch)"
        assert refill.sequences[i].tolist() == ref.tolist(), f"row {i} (continuous)"
        assert batched.row_stats[i].proposed_per_step == single.stats.proposed_per_step
        lengths |= set(single.stats.proposed_per_step)
        proposed.append(single.stats.mean_proposed_drafts)
        full.append(SpeculativeDecoder(target, _make(arch, kind, 0.0)()).generate(ids, limits[i]).stats.mean_proposed_drafts)
    assert K in lengths, f"the threshold must leave some chains their full length: {lengths}"
    assert sum(proposed) < sum(full) - 0.5 * len(rows), f"the threshold must end chains early: {proposed} vs {full}"


def _confidence_for(arch, kind, target, rows) -> float:
    """A threshold near the median confidence of the drafter's first drafts on these rows."""
    make = _make(arch, kind, 0.0)
    seen = []

    def record(logits, q, tokens, sampling):
        seen.append(float(draft_confidence(logits, q, tokens, sampling)))
        return torch.tensor(False)

    for ids in rows[:3]:
        drafter = make()
        drafter.confidence_threshold, drafter.unsure = 1e-12, record  # consulted, never stops
        SpeculativeDecoder(target, drafter).generate(ids, max_new_tokens=12)
    ordered = sorted(seen)  # halfway between the median and the next larger confidence: never on one seen
    mid = (len(ordered) - 1) // 2  # (a draft exactly at the threshold would end batch and single chains by rounding)
    above = next((c for c in ordered[mid + 1:] if c > ordered[mid]), 2 * ordered[mid])
    return (ordered[mid] + above) / 2


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20)])
def test_sampled_rows_with_a_threshold_equal_their_batch_one_runs(setup, sampling):  # noqa: F811
    arch, target, rows = setup
    make, limits = _make(arch, "chain", _confidence_for(arch, "chain", target, rows)), _limits(len(rows))
    out = SpeculativeDecoder(target, make(), "rejection", sampling).generate_batch(rows, limits, seed=11)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make(), "rejection", sampling).generate(ids, limits[i], seed=11 + i)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"row {i}"
        assert out.row_stats[i].proposed_per_step == single.stats.proposed_per_step


@pytest.mark.parametrize("setting", ["t1.0", "t0.7_topk3"])
def test_rejection_with_a_threshold_is_lossless(setting):
    """Chains of 2 that stop after an unsure first draft: the output is still the target's distribution."""
    target, draft = peaky_noisy_pair()
    sampling = SETTINGS[setting]
    # 0.5: a chain stops after its first draft unless that draft is the draft's top token
    drafter = DraftModelDrafter(draft, num_speculative_tokens=2, confidence_threshold=0.5)
    counts, _ = decode_runs(target, drafter, "rejection", sampling, RUNS)
    assert chi_square_pvalue(counts, exact_distribution(target, sampling), RUNS) > ALPHA
    decoder = SpeculativeDecoder(target, drafter, "rejection", sampling)
    first = [decoder.generate(PROMPT, NEW, seed=s).stats.proposed_per_step[0] for s in range(300)]  # room for 2
    assert 0.1 < first.count(1) / len(first) < 0.9, "the threshold must stop some first chains, not all"


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.5", True])
def test_bad_thresholds(value):
    draft = noisy_copy("llama")
    with pytest.raises(ConfigError, match=r"drafter.confidence_threshold=.*number in \[0, 1\)"):
        DraftModelDrafter(draft, confidence_threshold=value)
    with pytest.raises(ConfigError, match=r"drafter.confidence_threshold=.*number in \[0, 1\)"):
        LayerSkipDrafter(layers=1, confidence_threshold=value)


def test_a_threshold_needs_a_chain_and_the_readable_step():
    draft, target = noisy_copy("llama"), pair("llama")[0]
    for shape in ({"tree": "binary"}, {"budget": 8}):
        with pytest.raises(ConfigError, match="stops a chain early; this drafter grows a tree"):
            DraftModelDrafter(draft, confidence_threshold=0.3, **shape)
    with pytest.raises(ConfigError, match="needs compile=none"):  # when the decoder is built, before any decoding
        SpeculativeDecoder(target, DraftModelDrafter(draft, confidence_threshold=0.3), compile="static")


def test_a_batch_stops_drafting_once_every_rows_chain_has_ended(setup, monkeypatch):  # noqa: F811
    """Each batched step runs one draft forward fewer than the longest chain a row kept: once every row's chain
    has ended, the batch drafts no further (what it would draft is dropped)."""
    from drafters.draft_model_batch import BatchDraftModelChain

    arch, target, rows = setup
    feeds, steps = [0], []
    feed, propose = BatchDraftModelChain.feed, BatchDraftModelChain.propose

    def counting_feed(self, tokens):
        feeds[0] += 1
        return feed(self, tokens)

    def checking_propose(self, max_depths):
        feeds[0] = 0
        trees = propose(self, max_depths)
        steps.append((feeds[0], max(0, max(self.drafted, default=0) - 1)))
        return trees

    monkeypatch.setattr(BatchDraftModelChain, "feed", counting_feed)
    monkeypatch.setattr(BatchDraftModelChain, "propose", checking_propose)
    make = _make(arch, "chain", _confidence_for(arch, "chain", target, rows))
    SpeculativeDecoder(target, make()).generate_batch(rows[:2], _limits(2), seed=3)
    assert all(fed == wanted for fed, wanted in steps), steps
    assert any(wanted < K - 1 for _, wanted in steps)  # some steps ended every chain early
