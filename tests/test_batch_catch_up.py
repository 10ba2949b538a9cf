"""A batched chain's catch-up when a row fell far behind: the padded block is split into spans that fit.

A batched chain feeds every row's backlog as one padded block written at each row's length, so its width counts
against the longest row. A plain chain is at most two tokens behind; a hybrid's second part catches up only on
the steps it drafts, so behind a long prompt's row a row the lookup covered for many steps made the block run past
the draft cache (a ``CacheOverflowError`` that batch-1 runs of the same prompts never raise; found by a review).
"""
from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch

from drafters import HybridDrafter, NGramDrafter, NoDrafter
from drafters.batch_chain import fitting_spans
from specdec import SpeculativeDecoder
from tests.test_hybrid import _batch_second
from tests.tiny_models import pair


def _cache(lengths, capacity):
    return SimpleNamespace(host_lengths=lengths, capacity=capacity)


def test_one_span_when_the_block_fits_and_more_when_it_does_not():
    assert fitting_spans(_cache([5, 9], 20), [2, 1]) == [(0, 2)]
    assert fitting_spans(_cache([5, 9], 11), [2, 1]) == [(0, 2)]  # 9 + 2 = 11 fits exactly
    assert fitting_spans(_cache([5, 9], 20), [0, 0]) == [(0, 0)]  # nothing behind: one empty block
    # row 1 (length 10) leaves 4 slots: 4 tokens of row 0's 9; then row 1 is at 11 (1 + its 1), 3 slots left
    assert fitting_spans(_cache([3, 10], 14), [9, 1]) == [(0, 4), (4, 7), (7, 9)]


def test_every_span_fits_the_cache_and_together_they_feed_every_backlog():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        capacity = int(torch.randint(4, 60, (1,), generator=gen))
        rows = int(torch.randint(1, 5, (1,), generator=gen))
        lengths = [int(torch.randint(0, capacity - 1, (1,), generator=gen)) for _ in range(rows)]
        backlog = [int(torch.randint(0, capacity - n, (1,), generator=gen)) for n in lengths]  # each row fits alone
        spans, now = fitting_spans(_cache(list(lengths), capacity), backlog), list(lengths)
        assert spans[0][0] == 0 and spans[-1][1] == max(backlog) and all(a[1] == b[0] for a, b in pairwise(spans))
        for lo, hi in spans:
            assert max(now) + (hi - lo) <= capacity, (capacity, lengths, backlog, spans)
            now = [n + max(0, min(b, hi) - lo) for n, b in zip(now, backlog)]
        assert now == [n + b for n, b in zip(lengths, backlog)]


@pytest.mark.parametrize("second, length, limits", [("draft_model", 200, [60, 40, 15]), ("eagle3", 150, [110, 90, 15])])
def test_a_row_far_behind_a_long_row_catches_up_and_equals_its_batch_one_run(second, length, limits, monkeypatch):
    """Two rows the lookup covers for many steps (0 .. length - 1 and its reverse) beside a 250-token prompt it
    never covers, two rows at a time (a catch-up then takes more than one span): each row equals its batch-1 hybrid run step for step, and our autoregressive run
    (not HF's: on the reversed prompt the random target's top two logits part by 3e-4 at token 22, where HF's
    cached decoding and a full forward disagree)."""
    from drafters import batch_chain

    split = []
    monkeypatch.setattr(batch_chain, "fitting_spans", lambda *a: split.append(fitting_spans(*a)) or split[-1])
    target = pair("llama")[0]
    rows = [torch.arange(0, length)[None], torch.arange(0, length).flip(-1)[None],
            torch.randperm(257, generator=torch.Generator().manual_seed(0))[:250][None]]

    def make():
        return HybridDrafter(NGramDrafter(8, max_ngram=3, min_ngram=1), _batch_second(second, "llama"))

    out = SpeculativeDecoder(target, make()).generate_batch(rows, max_new_tokens=limits, seed=0, max_rows=2)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make()).generate(ids, max_new_tokens=limits[i], seed=i)
        plain = SpeculativeDecoder(target, NoDrafter()).generate(ids, max_new_tokens=limits[i])
        assert out.sequences[i].tolist() == single.sequences.tolist() == plain.sequences.tolist(), f"row {i}"
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step, f"row {i}"
        assert out.row_stats[i].steps_by_source == single.stats.steps_by_source, f"row {i}"
    assert any(len(spans) > 1 for spans in split), "no catch-up needed a second span: the case tests nothing"
