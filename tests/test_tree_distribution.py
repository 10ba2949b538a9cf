"""Sampling on token trees is lossless: ``rejection`` on draft-model trees reproduces the target exactly.

Same set-up as ``tests/test_distribution.py`` (vocabulary 6, 3 new tokens, all 216 continuations
enumerated, 2000 seeded runs, chi-square at 1e-3), with a small tree: 3 children at the root,
depth 2. Each ``tree_sampling`` mode must pass; a drafter that samples children without
replacement but labels them ``with_replacement`` (so the rule divides by the wrong q, as in
transformers issue 47932) must fail.
"""
from __future__ import annotations

import pytest

from drafters import DraftModelDrafter
from specdec import SamplingParams
from tests.test_distribution import ALPHA, RUNS, VOCAB, chi_square_pvalue, exact_distribution, sample_counts
from tests.tiny_models import peaky_pair

TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0]]
SETTINGS = {
    "t1.0": SamplingParams(temperature=1.0),
    "t0.7_topk3": SamplingParams(temperature=0.7, top_k=3),
}


class MislabelledDrafter(DraftModelDrafter):
    """Broken on purpose: children drawn without replacement, tree marked ``with_replacement``."""

    def propose(self, max_depth):
        tree = super().propose(max_depth)
        if tree.sampling == "without_replacement":
            tree.sampling = "with_replacement"
        return tree


@pytest.fixture(scope="module")
def models():
    return peaky_pair(VOCAB)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("mode", ["deterministic", "with_replacement", "without_replacement"])
def test_rejection_on_a_draft_model_tree_is_lossless(models, mode, setting):
    target, draft = models
    sampling = SETTINGS[setting]
    exact = exact_distribution(target, sampling)
    drafter = DraftModelDrafter(draft, tree=TREE, tree_sampling=mode)
    counts = sample_counts(target, drafter, "rejection", sampling)
    assert chi_square_pvalue(counts, exact, RUNS) > ALPHA


def test_the_test_catches_the_wrong_q(models):
    target, draft = models
    sampling = SETTINGS["t1.0"]
    exact = exact_distribution(target, sampling)
    drafter = MislabelledDrafter(draft, tree=TREE, tree_sampling="without_replacement")
    counts = sample_counts(target, drafter, "rejection", sampling)
    assert chi_square_pvalue(counts, exact, RUNS) < ALPHA
