"""Token trees drafted by a draft model: presets, greedy equivalence, draft-cache sync, tau, tree scoring.

Trees from the Hydra config: tests/test_tree_config.py.
"""
from __future__ import annotations

import pytest
import torch

from drafters import DraftModelDrafter
from specdec import SamplingParams, SpeculativeDecoder
from specdec.cache import SpecDecCache
from specdec.errors import ConfigError
from specdec.tree import (
    PRESET_DIR,
    best_tree,
    chain_paths,
    compile_tree,
    expected_tokens,
    load_preset,
    path_acceptance,
)
from tests.greedy import cases_for, check_greedy
from tests.tiny_models import noisy_copy, pair, prompts
from verifier import tree_forward

ARCHS = ["llama", "qwen2"]
PRESETS = ["chain4", "chain8", "binary", "sparse60", "chain4_alts"]
SHAPES = {name: {"tree": name} for name in PRESETS} | {"dynamic": {"budget": 12, "num_speculative_tokens": 5}}


# --------------------------------------------------------------------------- presets


def test_presets_load_and_compile():
    names = [p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem != "none"]  # none.yaml: no tree (paths: null)
    assert set(PRESETS) <= set(names)
    for name in names:
        assert compile_tree(load_preset(name)).num_nodes >= 1
    assert load_preset("chain4") == chain_paths(4) and load_preset("chain8") == chain_paths(8)
    binary = compile_tree(load_preset("binary"))
    assert binary.num_nodes == 30 and binary.max_depth == 4 and set(binary.rank.tolist()) == {0, 1}
    sparse = compile_tree(load_preset("sparse60"))
    widths = [int((sparse.depth == d).sum()) for d in range(1, sparse.max_depth + 1)]
    assert sparse.num_nodes == 60 and widths[0] >= 8 and widths[-1] <= 2  # wide near the root, narrow deep
    assert load_preset(PRESET_DIR / "binary.yaml") == load_preset("binary")  # a file path works too


def test_sparse60_is_ordered_by_expected_acceptance():
    rank_probs = [0.55, 0.17, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015, 0.01, 0.008]
    paths = load_preset("sparse60")
    assert paths == best_tree(rank_probs, 60, max_depth=6)
    accept = [path_acceptance(p, rank_probs) for p in paths]
    assert accept == sorted(accept, reverse=True)
    assert expected_tokens(paths, rank_probs) > expected_tokens(load_preset("binary"), rank_probs)


def test_best_tree_is_optimal_on_a_small_case():
    """Exhaustive check: no other 5-node tree (ranks < 3, depth <= 3) has a larger expected tau."""
    import itertools

    rank_probs = [0.5, 0.3, 0.1]
    universe = [p for d in range(1, 4) for p in itertools.product(range(3), repeat=d)]
    best = max(
        expected_tokens([list(p) for p in subset], rank_probs)
        for subset in itertools.combinations(universe, 5)
        if all(len(p) == 1 or p[:-1] in subset for p in subset)
    )
    assert expected_tokens(best_tree(rank_probs, 5, max_depth=3), rank_probs) == pytest.approx(best)


@pytest.mark.parametrize("bad, message", [
    ([[0, 1]], r"add the path \[0\]"),
    ([[0], [0]], "duplicate"),
    ([], "empty"),
    ("no_such_preset", "not found"),
    ({"width": 3}, "no 'paths:'"),
])
def test_bad_presets_are_clear_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_preset(bad)
    with pytest.raises(ConfigError, match=message):
        DraftModelDrafter(pair("llama")[1], tree=bad)


def test_bad_yaml_preset_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("paths: [[0], [1, 1]]\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.*add the path \[1\]"):
        load_preset(str(path))


@pytest.mark.parametrize("kwargs, message", [
    ({"tree": "binary", "tree_sampling": "beam"}, "tree_sampling='beam' is unknown"),
    ({"budget": 0}, "budget=0: it must be an integer >= 1"),
    ({"budget": -2}, "budget=-2"),
    ({"budget": 2.5}, "budget=2.5"),
    ({"budget": 8, "tree": "binary"}, "not both"),
    ({"budget": 8, "tree_sampling": "with_replacement"}, "deterministic children"),
    ({"budget": 8, "top_k_children": 0}, "top_k_children=0"),
])
def test_bad_drafter_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DraftModelDrafter(pair("llama")[1], **kwargs)


# --------------------------------------------------------------------------- greedy equivalence


@pytest.fixture(scope="module", params=ARCHS)
def arch_cases(request):
    return request.param, cases_for(request.param)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_tree_equals_plain_greedy(arch_cases, shape):
    """20 prompts per architecture; EOS and max_new_tokens fall mid-tree."""
    arch, cases = arch_cases
    target, random_draft, _ = pair(arch)
    check_greedy(target, DraftModelDrafter(noisy_copy(arch), **SHAPES[shape]), cases)
    if shape in ("binary", "dynamic"):
        check_greedy(target, DraftModelDrafter(target, **SHAPES[shape]), cases)  # deepest path always accepted
        check_greedy(target, DraftModelDrafter(random_draft, **SHAPES[shape]), cases)  # almost nothing accepted


def test_rejection_on_trees_reduces_to_greedy_at_temperature_zero(arch_cases):
    arch, cases = arch_cases
    target = pair(arch)[0]
    for sampling_mode in ("with_replacement", "without_replacement"):
        check_greedy(target, DraftModelDrafter(noisy_copy(arch), tree="sparse60", tree_sampling=sampling_mode),
                   cases[:8], "rejection")


# --------------------------------------------------------------------------- tree shape and forwards


GREEDY = SamplingParams()  # frozen: one shared default


def _bound(drafter, target, ids, sampling=GREEDY, seed=0):
    """Start ``drafter`` on ``ids`` as the decode loop does; returns its keyed random numbers."""
    from specdec.drafting import DraftContext
    from specdec.rng import KeyedRandom

    rng = KeyedRandom.for_seed(seed)
    drafter.start(DraftContext(target, sampling, rng, capacity=ids.shape[1] + 64 + drafter.max_nodes + 1))
    drafter.prefill(ids, None)
    return rng


def _propose_counting_forwards(drafter, draft, max_depth: int = 64):
    """``(tree, number of draft-model forwards the proposal ran)``."""
    calls = []
    handle = draft.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))  # once a forward
    try:
        tree = drafter.propose(max_depth=max_depth)
    finally:
        handle.remove()
    return tree, len(calls)


def test_static_tree_shape_ranks_and_one_forward_per_depth():
    target, _, tok = pair("llama")
    draft = noisy_copy("llama")
    ids = prompts(tok, 1)[0]
    drafter = DraftModelDrafter(draft, tree="binary")
    _bound(drafter, target, ids)
    tree, calls = _propose_counting_forwards(drafter, draft)
    compiled = compile_tree(load_preset("binary"))
    assert calls == 1 + (compiled.max_depth - 1)  # catch-up (root) + one per depth but the last
    assert tree.parents.tolist() == compiled.parents.tolist() and tree.draft_probs is None
    with torch.no_grad():  # the root's children are the draft's top-2 tokens after the prompt
        top2 = draft(ids).logits[0, -1].topk(2).indices.tolist()
    assert tree.tokens[:2].tolist() == top2
    for node in range(tree.num_nodes):  # siblings are distinct
        sibs = tree.tokens[tree.parents == tree.parents[node]].tolist()
        assert len(sibs) == len(set(sibs))
    pruned = DraftModelDrafter(draft, tree="binary")
    _bound(pruned, target, ids)
    assert pruned.propose(max_depth=2).parents.tolist() == compiled.parents[:6].tolist()  # max_depth prunes
    assert pruned.propose(max_depth=0).num_nodes == 0


def test_one_node_levels_take_the_causal_forward(monkeypatch):
    """chain4_alts feeds one node per level, its chain's: those forwards see every fed slot, so they run without a
    key mask (as a chain's do), and the tree is the chain's drafts with each depth's runner-up beside them."""
    from drafters.tree_expansion import TreeFeed

    target, _, tok = pair("llama")
    draft = noisy_copy("llama")
    ids = prompts(tok, 1)[0]
    masks = []
    run = TreeFeed.run
    monkeypatch.setattr(TreeFeed, "run", lambda self, i, p, mask, pos: masks.append(mask) or run(self, i, p, mask, pos))
    drafter = DraftModelDrafter(draft, tree="chain4_alts")
    _bound(drafter, target, ids)
    tree, calls = _propose_counting_forwards(drafter, draft)
    assert calls == 4 and masks == [None, None, None]  # the catch-up, then one masked-free forward per inner level
    chain = DraftModelDrafter(draft, num_speculative_tokens=4)
    _bound(chain, target, ids)
    spine = chain.propose(max_depth=64).tokens.tolist()
    assert tree.tokens[0::2].tolist() == spine and tree.parents.tolist() == [-1, -1, 0, 0, 2, 2, 4, 4]
    with torch.no_grad():  # the first runner-up is the draft's second choice after the prompt
        assert int(tree.tokens[1]) == draft(ids).logits[0, -1].topk(2).indices[1]


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
def test_sampled_children_record_the_nodes_q(mode):
    target, _, tok = pair("llama")
    drafter = DraftModelDrafter(noisy_copy("llama"), tree="sparse60", tree_sampling=mode)
    _bound(drafter, target, prompts(tok, 1)[0], SamplingParams(temperature=1.0, top_k=20))
    tree = drafter.propose(max_depth=64)
    assert tree.sampling == mode and tree.draft_probs.shape == (60, 257)
    probs = tree.draft_probs
    assert torch.allclose(probs.sum(-1), torch.ones(60)) and int((probs[0] > 0).sum()) == 20  # warped q
    for node in range(tree.num_nodes):
        sibs = (tree.parents == tree.parents[node]).nonzero().flatten()
        assert torch.equal(probs[sibs], probs[node].expand(len(sibs), -1))  # every child records its node's q
        assert float(probs[node, tree.tokens[node]]) > 0
    if mode == "without_replacement":
        for node in range(-1, tree.num_nodes):
            sibs = tree.tokens[tree.parents == node].tolist()
            assert len(sibs) == len(set(sibs))


def test_without_replacement_drops_children_past_the_support():
    """top_k=2 leaves 2 tokens in q: the third root child and its subtree cannot be drawn."""
    target, _, tok = pair("llama")
    drafter = DraftModelDrafter(noisy_copy("llama"), tree=[[0], [1], [2], [2, 0], [0, 0]],
                                tree_sampling="without_replacement")
    _bound(drafter, target, prompts(tok, 1)[0], SamplingParams(temperature=1.0, top_k=2))
    tree = drafter.propose(max_depth=8)
    assert tree.parents.tolist() == [-1, -1, 0] and tree.tokens[0] != tree.tokens[1]


def test_dynamic_tree_budget_depth_and_forwards():
    target, _, tok = pair("llama")
    draft = noisy_copy("llama")
    ids = prompts(tok, 1)[0]
    drafter = DraftModelDrafter(draft, budget=10, num_speculative_tokens=4, top_k_children=3)
    _bound(drafter, target, ids)
    tree, calls = _propose_counting_forwards(drafter, draft)
    assert calls == 1 + 3 and tree.num_nodes == 10 and int(tree.depth.max()) <= 4
    assert tree.draft_probs is None and tree.sampling == "deterministic"
    with torch.no_grad():
        logp = torch.log_softmax(draft(ids).logits[0, -1], -1)
    assert tree.tokens[0] == int(logp.argmax())  # the best node comes first
    assert drafter.propose(max_depth=2).depth.max() <= 2


# --------------------------------------------------------------------------- draft cache after commit


class CheckedDrafter(DraftModelDrafter):
    """Checks after every commit that the draft cache equals a fresh forward over the committed tokens."""

    checks = 0

    def commit(self, result, verify):
        super().commit(result, verify)
        length = self.cache.length
        assert len(self.tokens) - 2 <= length <= len(self.tokens) - 1  # unseen: the extra token, maybe one draft
        fresh = SpecDecCache.for_model(self.model, length + 1)
        ids = torch.tensor([self.tokens[:length]])
        tree_forward(self.model, fresh, ids, torch.ones(length, length, dtype=torch.bool).tril(), torch.arange(length))
        for mine, ref in zip(self.cache.layers, fresh.layers):
            torch.testing.assert_close(mine.keys[:, :, :length], ref.keys[:, :, :length], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.values[:, :, :length], ref.values[:, :, :length], atol=1e-5, rtol=1e-4)
        type(self).checks += 1


@pytest.mark.parametrize("shape, sampling, mode", [
    ("binary", SamplingParams(), "deterministic"),
    ("sparse60", SamplingParams(temperature=1.0), "deterministic"),
    ("sparse60", SamplingParams(temperature=1.0), "with_replacement"),
    ("sparse60", SamplingParams(temperature=0.8, top_k=5), "without_replacement"),
    ("dynamic", SamplingParams(), "deterministic"),
])
def test_draft_cache_after_commit_equals_a_fresh_forward(shape, sampling, mode):
    target, _, tok = pair("qwen2")
    kwargs = dict(SHAPES[shape], tree_sampling=mode) if shape != "dynamic" else SHAPES[shape]
    drafter = CheckedDrafter(noisy_copy("qwen2", noise=0.3), **kwargs)
    acceptance = "greedy" if sampling.greedy else "rejection"
    decoder = SpeculativeDecoder(target, drafter, acceptance=acceptance, sampling=sampling)
    CheckedDrafter.checks = 0
    accepted = []
    for ids in prompts(tok, 3, seed=2):
        out = decoder.generate(ids, max_new_tokens=40, seed=0)
        accepted += out.stats.accepted_per_step
    assert CheckedDrafter.checks >= 10
    assert 0 < sum(accepted) and min(accepted) < max(accepted)  # partial acceptance happened


# --------------------------------------------------------------------------- tau sanity


@pytest.mark.parametrize("kwargs, sampling", [
    ({"tree": "binary"}, SamplingParams()),
    ({"tree": "sparse60"}, SamplingParams()),
    ({"budget": 5, "num_speculative_tokens": 5, "top_k_children": 1}, SamplingParams()),  # the top path only
    # p == q: the first child is always accepted (min(1, p/q) = 1), whatever the sampling mode.
    ({"tree": "sparse60", "tree_sampling": "with_replacement"}, SamplingParams(temperature=1.0)),
    ({"tree": "binary", "tree_sampling": "without_replacement"}, SamplingParams(temperature=1.0, top_k=5)),
], ids=["binary", "sparse60", "dynamic", "sparse60-with", "binary-without"])
def test_target_as_draft_accepts_the_whole_depth(kwargs, sampling):
    target, _, tok = pair("llama")
    depth = compile_tree(load_preset(kwargs["tree"])).max_depth if "tree" in kwargs else kwargs["num_speculative_tokens"]
    eos = target.generation_config.eos_token_id
    target.generation_config.eos_token_id = None  # no early stop: every step is a full one
    try:
        decoder = SpeculativeDecoder(target, DraftModelDrafter(target, **kwargs),
                                     acceptance="greedy" if sampling.greedy else "rejection", sampling=sampling)
        out = decoder.generate(prompts(tok, 1)[0], max_new_tokens=(depth + 1) * 6, seed=0)
    finally:
        target.generation_config.eos_token_id = eos
    assert out.stats.tau == pytest.approx(depth + 1, abs=1e-9)
    assert out.stats.acceptance_rate_by_depth == pytest.approx([1.0] * depth)


# --------------------------------------------------------------------------- tree scoring


def test_nodes_past_the_acceptance_table_are_never_accepted():
    """A node deeper or wider than the rank-acceptance table has acceptance 0 (Medusa: no head drafts it), so a
    preset deeper than the heads gets no credit for depths they cannot draft, and the best tree adds no such node."""
    from specdec.tree import best_tree_by_depth, expected_tokens_by_depth

    table = [[0.6, 0.3], [0.5]]
    assert expected_tokens_by_depth([[0], [0, 0], [0, 0, 0]], table) == pytest.approx(1 + 0.6 + 0.6 * 0.5)
    assert expected_tokens_by_depth([[0], [1], [2], [0, 1]], table) == pytest.approx(1 + 0.6 + 0.3)
    assert best_tree_by_depth([[0.6, 0.3]], 3) == [[0], [1]]  # the table holds two nodes, not three


def test_dynamic_tree_expands_the_best_nodes_of_each_level():
    """With budget 2 and 3 root children, expand_dynamic feeds the 2 best-scoring ones (not the 2 worst); the best
    child's own child (a draft sure of it) then outscores the second root child, so the tree is that path."""
    from drafters.tree_expansion import expand_dynamic

    class Feed:  # a stand-in for the draft model: after any token, token 0 is (almost) certain
        def __init__(self):
            self.num_fed, self.fed = 0, []

        def feed(self, tokens, parents, depth):
            self.fed.append(tokens)
            self.num_fed += len(tokens)
            logits = torch.full((len(tokens), 8), -20.0)
            logits[:, 0] = 20.0
            return logits

    feed = Feed()
    root = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0])  # best 5, then 3, then 1
    tree, fed = expand_dynamic(feed, root, depth_limit=2, budget=2, top_k=3)
    assert feed.fed == [[5, 3]]
    assert tree.tokens.tolist() == [5, 0] and tree.parents.tolist() == [-1, 0] and fed == [0, -1]


def test_a_preset_ranked_past_a_tiny_vocabulary_warns_once(caplog, monkeypatch):
    """Over 6 tokens a preset's rank-6 node (and the node under it) are never drafted: the draft model's tree says so
    once (per preset and vocabulary: not once per row of a batch), as Medusa's does, instead of dropping them
    silently."""
    from drafters import tree_drafter
    from tests.tiny_models import peaky_pair

    monkeypatch.setattr(tree_drafter, "_RANKS_CHECKED", set())
    target, draft = peaky_pair(vocab=6)
    drafter = DraftModelDrafter(draft, tree=[[0], [1], [6], [6, 0], [0, 0]])
    _bound(drafter, target, torch.tensor([[1, 2, 3]]))
    with caplog.at_level("WARNING", logger="drafters.tree_drafter"):
        tree = drafter.propose(max_depth=8)
        drafter.propose(max_depth=8)
        other = DraftModelDrafter(draft, tree=[[0], [1], [6], [6, 0], [0, 0]])  # a batch's next row: no second line
        _bound(other, target, torch.tensor([[3, 2]]))
        other.propose(max_depth=8)
    assert tree.num_nodes == 3  # [0], [1], [0, 0]
    warned = [r.getMessage() for r in caplog.records if "ranked past" in r.getMessage()]
    assert warned == ["tree preset: 2 of 5 nodes are ranked past the draft's 6 tokens (or lie under such a node) "
                      + "and are never drafted"]
