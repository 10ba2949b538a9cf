"""Sampling on token trees is lossless, and the test shows it has the power to say so.

Same machinery as ``tests/test_distribution.py`` (``tests/lossless.py``). The tree: 2 children at
the root, 2 under the first, 1 under the second (depth 2), grown by the draft model of
``peaky_noisy_pair`` (the target plus noise, so it overlaps the target after warping). For each
setting (T=1.0; T=0.7 with top-k 3; T=1.0 with top-p 0.8) and ``tree_sampling`` mode
(``deterministic`` top-k children, i.i.d. ``with_replacement`` draws, ``without_replacement`` draws),
``rejection`` passes with depth-1 acceptance inside 0.2-0.9, and in the same setting each planted
bug that changes that mode's arithmetic fails.

Expected power (delta and power as in ``tests/test_distribution.py``):

| mode | bug | runs | delta (t1.0 / topk3 / topp0.8) | power (min over settings) |
|---|---|---|---|---|
| deterministic | p_not_zeroed | 500 | 0.25 / 0.14 / 0.17 | > 0.9999 |
| deterministic | accept_always | 100 | 3.7 / 5.0 / 3.7 | > 0.9999 |
| with_replacement | correction_from_p | 500 | 0.32 / 0.49 / 0.52 | > 0.9999 |
| with_replacement | accept_always | 100 | 1.3 / inf / inf | > 0.9999 |
| without_replacement | correction_from_p | 500 | 0.24 / 0.41 / 0.50 | > 0.9999 |
| without_replacement | q_not_updated | 1000 | 0.10 / 0.19 / 0.39 | > 0.9999 |
| without_replacement | accept_always | 100 | 1.2 / inf / inf | > 0.9999 |

The real rule runs 2000 times, so its pass has at least that power against every planted bug.

Also: a drafter that samples children without replacement but labels them ``with_replacement``
(so the rule divides by the wrong q, as in transformers issue 47932) fails, on a draft far from
the target with 3 children at the root.
"""
from __future__ import annotations

import pytest

from drafters import DraftModelDrafter
from tests.lossless import (
    ALPHA,
    RUNS,
    SETTINGS,
    cells,
    check_cell,
    chi_square_pvalue,
    exact_distribution,
    sample_counts,
)
from tests.tiny_models import peaky_noisy_pair, peaky_pair

TREE = [[0], [1], [0, 0], [0, 1], [1, 0]]
MODES = {"tree_deterministic": "deterministic", "tree_with_replacement": "with_replacement",
         "tree_without_replacement": "without_replacement"}


class MislabelledDrafter(DraftModelDrafter):
    """Broken on purpose: children drawn without replacement, tree marked ``with_replacement``."""

    def propose(self, max_depth):
        tree = super().propose(max_depth)
        if tree.sampling == "without_replacement":
            tree.sampling = "with_replacement"
        return tree


@pytest.mark.parametrize("setting, shape, rule", cells(list(MODES)))
def test_tree_output_distribution(setting, shape, rule, record_property):
    target, draft = peaky_noisy_pair()
    drafter = DraftModelDrafter(draft, tree=TREE, tree_sampling=MODES[shape])
    for name, value in check_cell(target, drafter, setting, rule).items():
        record_property(name, value)


def test_the_test_catches_the_wrong_q():
    target, draft = peaky_pair()
    sampling = SETTINGS["t1.0"]
    drafter = MislabelledDrafter(draft, tree=[[0], [1], [2], [0, 0], [0, 1], [1, 0]], tree_sampling="without_replacement")
    counts = sample_counts(target, drafter, "rejection", sampling)
    assert chi_square_pvalue(counts, exact_distribution(target, sampling), RUNS) < ALPHA
