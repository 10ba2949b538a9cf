"""Dynamic Medusa trees (``MedusaDrafter(dynamic=True)``): chosen per step by the heads' probabilities.

- :func:`drafters.medusa.dynamic_tree` keeps exactly the best paths by the product of the heads' probabilities
  (checked against brute force over every path).
- Greedy decoding with dynamic trees equals ``generate(do_sample=False)`` (random heads on the tiny target and
  heads trained on the micro zoo target), and ``rejection`` reproduces the target's exact distribution.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from drafters import MedusaDrafter
from drafters.medusa import dynamic_tree
from drafters.medusa_heads import MedusaHeads
from specdec import SamplingParams, SpeculativeDecoder
from specdec.errors import ConfigError
from tests.greedy import check_greedy, greedy_cases
from tests.lossless import (
    ALPHA,
    RUNS,
    VOCAB,
    chi_square_pvalue,
    exact_distribution,
    sample_counts,
)
from tests.test_medusa import micro_heads  # noqa: F401  (a fixture)
from tests.tiny_models import pair, peaky_pair, prompts


@pytest.mark.parametrize("num_nodes", [1, 5, 12])
def test_dynamic_tree_keeps_the_most_probable_paths(num_nodes):
    torch.manual_seed(3)
    logits = torch.randn(3, 6) * 2  # [D, V]: 3 heads, 6 tokens
    tree, tokens = dynamic_tree(logits, num_nodes)
    probs = logits.softmax(dim=-1)
    order = probs.argsort(dim=-1, descending=True)  # [D, V]: rank -> token

    def score(path):
        return float(torch.prod(torch.stack([probs[d, order[d, r]] for d, r in enumerate(path)])))

    every = [p for n in (1, 2, 3) for p in itertools.product(range(min(num_nodes, 6)), repeat=n)]
    best = sorted((score(p) for p in every), reverse=True)[:num_nodes]
    chosen = sorted((score(p) for p in tree.paths), reverse=True)
    assert len(tree.paths) == num_nodes and chosen == pytest.approx(best)
    for i, path in enumerate(tree.paths):  # a node's token: its head's token of its sibling rank
        assert int(tokens[i]) == int(order[len(path) - 1, path[-1]])
        parent = int(tree.parents[i])
        assert parent == -1 or tree.paths[parent] == path[:-1]


def test_dynamic_trees_change_with_the_heads_confidence():
    sure = torch.tensor([[9.0, 0, 0, 0], [9.0, 0, 0, 0]])  # [D, V]: both heads certain: a chain
    unsure = torch.zeros(2, 4)  # uniform: siblings before depth
    assert dynamic_tree(sure, 2)[0].paths == ((0,), (0, 0))
    assert dynamic_tree(unsure, 2)[0].paths == ((0,), (1,))


@pytest.fixture(scope="module")
def tiny():
    target, _, tok = pair("llama")
    heads = MedusaHeads.for_target(target, 3, init="random", seed=0)
    return target, heads, greedy_cases(target, prompts(tok, 12, seed=4), len(tok) - 1)


@pytest.mark.parametrize("nodes", [1, 6, 20])
def test_dynamic_greedy_equals_plain_decoding(tiny, nodes):
    target, heads, cases = tiny
    drafter = MedusaDrafter(heads, tree_nodes=nodes, dynamic=True)
    assert drafter.max_nodes == nodes and drafter.tree_depth == 3
    tree = drafter.step_shape(target).draft_probe()  # what the benchmarks time as the draft's cost: a whole tree
    assert tree.num_nodes == nodes
    check_greedy(target, drafter, cases)


def test_dynamic_trees_with_trained_heads_match_and_accept(micro_heads):  # noqa: F811
    from experiments.zoo import ensure_pair

    tok, target, _ = ensure_pair("micro").load()
    ids = [tok(t, return_tensors="pt").input_ids for t in ("def main():\n    ", "import os\nimport sys\n\n")]
    cases = greedy_cases(target, ids + prompts(tok, 8, seed=2)[2:], int(target.generation_config.eos_token_id))
    static = check_greedy(target, MedusaDrafter(micro_heads, tree_nodes=8), cases)
    dynamic = check_greedy(target, MedusaDrafter(micro_heads, tree_nodes=8, dynamic=True), cases)
    single = check_greedy(target, MedusaDrafter(micro_heads, tree_nodes=1, dynamic=True), cases)  # one node a step
    assert dynamic > 1.3 and static > 1.3 and single > 1.2, (dynamic, static, single)


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3)],
                         ids=["t1.0", "t0.7_topk3"])
def test_rejection_with_dynamic_trees_is_lossless(sampling):
    target, _ = peaky_pair(VOCAB)
    drafter = MedusaDrafter(MedusaHeads.for_target(target, 2, init="random", seed=1), tree_nodes=6, dynamic=True)
    counts = sample_counts(target, drafter, "rejection", sampling)
    assert chi_square_pvalue(counts, exact_distribution(target, sampling), RUNS) > ALPHA


def test_dynamic_with_a_preset_tree_or_a_non_bool_is_an_error(tiny):
    from drafters.medusa_heads import MedusaHeadsError

    heads = tiny[1]
    with pytest.raises(ConfigError, match="^drafter.dynamic=true builds its own tree .* leave tree null"):
        MedusaDrafter(heads, tree="binary", dynamic=True)
    with pytest.raises(ConfigError, match="^drafter.dynamic='yes': give true or false"):  # the key the command line takes
        MedusaDrafter(heads, dynamic="yes")
    with pytest.raises(MedusaHeadsError, match=r"^drafter.num_heads=9 but the heads have only \d+: use drafter.num_heads<="):
        MedusaDrafter(heads, num_heads=9)


def test_decoder_runs_dynamic_trees_through_the_speculative_decoder(tiny):
    target, heads, cases = tiny
    out = SpeculativeDecoder(target, MedusaDrafter(heads, tree_nodes=6, dynamic=True)).generate(cases[0][0], 10)
    assert out.stats.new_tokens == 10 and max(out.stats.proposed_per_step) <= 6


def test_a_dynamic_tree_may_hold_more_nodes_than_the_static_tree_could(tiny):
    """One head: the static fallback tree holds at most its 10 ranked depth-1 nodes, but a dynamic tree of
    ``tree_nodes=32`` takes 32 of them; the step is sized for the dynamic tree and still decodes greedily."""
    target, heads, cases = tiny
    drafter = MedusaDrafter(heads, num_heads=1, tree_nodes=32, dynamic=True)
    assert drafter.max_nodes == 32
    check_greedy(target, drafter, cases[:3])
