"""Continuous batching: ``generate_batch(..., max_rows=m)`` decodes at most m rows at once and admits
the next waiting prompt when a row finishes. Rows admitted late start at their own step 0, so every
row still equals its batch-1 run (greedy: HF ``generate``; sampled: ``generate`` with the row's seed)."""
from __future__ import annotations

import pytest
import torch

from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from tests.test_batch import _limits, drafters, setup  # noqa: F401  (fixture)


@pytest.mark.parametrize("max_rows", [1, 3])
@pytest.mark.parametrize("shape", ["ar", "chain3", "tree", "ngram", "medusa"])
def test_greedy_rows_equal_generate_with_refill(setup, shape, max_rows):  # noqa: F811
    arch, target, rows = setup
    limits = _limits(len(rows))
    out = SpeculativeDecoder(target, drafters(arch)[shape]()).generate_batch(rows, limits, seed=3, max_rows=max_rows)
    eos = target.generation_config.eos_token_id
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=limits[i], pad_token_id=eos)
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"
    assert out.stats.new_tokens == sum(s.new_tokens for s in out.row_stats)
    assert len(out.row_stats) == len(rows)


@pytest.mark.parametrize("shape,sampling", [("chain3", SamplingParams(temperature=1.0)),
                                            ("ngram", SamplingParams(temperature=0.8, top_k=20))])
def test_sampled_rows_equal_their_batch_one_runs_with_refill(setup, shape, sampling):  # noqa: F811
    arch, target, rows = setup
    make, limits = drafters(arch)[shape], _limits(len(rows))
    out = SpeculativeDecoder(target, make(), "rejection", sampling).generate_batch(rows, limits, seed=5, max_rows=3)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make(), "rejection", sampling).generate(ids, limits[i], seed=5 + i)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"row {i}"
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step


def test_refill_keeps_at_most_max_rows_and_admits_in_order(setup):  # noqa: F811
    arch, target, rows = setup
    decoder = SpeculativeDecoder(target, drafters(arch)["chain3"]())
    widths = []
    verify = __import__("verifier.batch", fromlist=["verify_rows"])
    original = verify.verify_rows

    def spy(model, cache, roots, tree, step):
        widths.append((len(roots), list(cache.rows)))
        return original(model, cache, roots, tree, step)

    verify.verify_rows = spy
    try:
        decoder.generate_batch(rows, _limits(len(rows)), max_rows=3)
    finally:
        verify.verify_rows = original
    assert max(w for w, _ in widths) == 3 and widths[0] == (3, [0, 1, 2])
    seen = []
    for _, ids in widths:
        seen += [r for r in ids if r not in seen]
    assert seen == list(range(len(rows))), "waiting prompts are admitted in their order"


def test_bad_max_rows():
    from tests.tiny_models import pair

    dec = SpeculativeDecoder(pair("llama")[0], drafters("llama")["ar"]())
    with pytest.raises(SpecDecError, match="max_rows=0"):
        dec.generate_batch([torch.tensor([[1, 2]])], 4, max_rows=0)
