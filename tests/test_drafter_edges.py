"""Edges of the drafters that no other test relied on (found by a mutation pass): trees as data, prompt lookup
and its datastore, the hybrid drafter and its config, the cross-tokenizer drafter, growing trees."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from drafters import CrossTokenizerDrafter, DraftModelDrafter, HybridDrafter, NGramDrafter
from drafters.datastore import Datastore
from drafters.hybrid import behind_lookup
from experiments.chat_data import ChatRows, save_rows
from experiments.drafter_config import build_drafter, check_before_loading
from experiments.models_from_config import LoadedModels
from specdec import SamplingParams, SpeculativeDecoder
from specdec.batch_drafting import keyed_rows
from specdec.drafting import DraftContext
from specdec.errors import ConfigError, SpecDecError
from specdec.rng import KeyedRandom
from specdec.tree import best_tree, compile_tree, load_preset
from specdec.types import DraftTree
from tests.test_cross_tokenizer import CHARS, PERM, char_tokenizer, permuted
from tests.tiny_models import pair, peaky_pair, prompts


def _started(drafter, tokens):
    """``drafter`` bound to a run (no target: lookups run none) that has committed ``tokens``."""
    drafter.start(DraftContext(target=None, sampling=None, rng=None, capacity=64))
    drafter.prefill(torch.tensor([tokens]), None)
    return drafter


# --------------------------------------------------------------------------- trees as data


def test_a_node_that_is_its_own_parent_is_not_a_tree():
    """A drafter's tree whose node names itself as parent is refused where its depths are read, as its mask is."""
    tree = DraftTree(tokens=torch.tensor([5, 6]), parents=torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="parents must come before their children"):
        _ = tree.depth
    with pytest.raises(ValueError, match="parents must come before their children"):
        _ = tree.ancestor_mask


@pytest.mark.parametrize("bad", [[[0], [-1]], [[0], [0, -2]]])
def test_a_negative_sibling_rank_is_not_a_tree(bad):
    """A rank of -1 would pick the draft's least likely token (``topk`` order read from the end): refused."""
    with pytest.raises(ValueError, match="sibling ranks >= 0"):
        compile_tree(bad)
    with pytest.raises(ConfigError, match="not a valid tree"):
        load_preset(bad)


def test_a_boolean_rank_is_not_an_integer():
    """YAML's ``true`` in a path (a typo for a rank) is refused, not read as rank 1."""
    with pytest.raises(ConfigError, match="is not a list of integers"):
        load_preset([[0], [True]])


def test_a_tree_file_given_by_path_needs_no_yaml_suffix(tmp_path):
    """Only a bare name is looked up among the presets; a path is read as it is, whatever its suffix."""
    (tmp_path / "mytree").write_text("paths: [[0], [1], [0, 0]]\n")
    assert load_preset(str(tmp_path / "mytree")) == [[0], [1], [0, 0]]


def test_best_tree_breaks_ties_towards_the_shallower_tree():
    """Equal expected acceptance: the shallower node wins (one draft forward fewer for the same tau)."""
    assert best_tree([1.0, 1.0], 2, max_depth=2) == [[0], [1]]
    assert best_tree([1.0, 1.0], 3, max_depth=2) == [[0], [1], [0, 0]]


# --------------------------------------------------------------------------- prompt lookup and its datastore


def test_the_datastore_counts_what_follows_each_rows_first_token():
    """With unigrams on, a row's first token is an n-gram like any other: its continuation is counted."""
    store = Datastore([[1, 2, 7], [1, 2, 8]], min_ngram=1, max_ngram=2, min_count=2, min_share=0.5)
    assert store.next_token([1]) == 2


def test_a_datastore_of_longer_ngrams_than_the_default_is_built_and_used(tmp_path):
    """``datastore_min_ngram=5`` (above the default longest n-gram, 4): the datastore looks up 5-grams."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]] * 2)  # [2, T]: a 2-token prompt, a 5-token answer, padding
    save_rows(ChatRows(ids, torch.tensor([7, 7]), torch.tensor([2, 2]), 0), tmp_path / "rows.safetensors")
    lookup = _started(NGramDrafter(2, datastore=str(tmp_path), datastore_min_ngram=5), [9, 1, 2, 3, 4, 5])
    assert lookup.datastore.min_ngram == 5 and lookup.propose(8).tokens.tolist() == [6, 7]


# --------------------------------------------------------------------------- the hybrid drafter


def _two_lookups(min_drafts: int) -> HybridDrafter:
    """A hybrid of two lookups (one name, so its parts are labelled ``first`` and ``second``): the first matches
    the last token and proposes up to 2 nodes, the second proposes 1."""
    return HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=1), NGramDrafter(num_speculative_tokens=1),
                         min_drafts=min_drafts)


@pytest.mark.parametrize(("min_drafts", "source", "tokens"), [(1, "first", [2, 3]), (2, "first", [2, 3]),
                                                              (3, "second", [2])])
def test_a_lookup_of_exactly_min_drafts_nodes_is_used(min_drafts, source, tokens):
    """``min_drafts`` is the fewest nodes used: a 2-node lookup is taken at ``min_drafts=2``, not at 3."""
    hybrid = _started(_two_lookups(min_drafts), [1, 2, 3, 1])
    assert hybrid.labels == ("first", "second")
    tree = hybrid.propose(8)
    assert (tree.source, tree.tokens.tolist()) == (source, tokens)


def test_behind_lookup_proposes_only_where_min_suffix_tokens_recur():
    """``min_suffix=2``: a recurring last token alone leaves the step to the drafter behind the lookup."""
    second = NGramDrafter(num_speculative_tokens=1)
    assert _started(behind_lookup(second, min_suffix=2), [5, 1, 6, 1]).propose(8).source == "second"
    tree = _started(behind_lookup(second, min_suffix=2), [5, 1, 6, 5, 1]).propose(8)
    assert (tree.source, tree.tokens.tolist()[:2]) == ("first", [6, 5])


def test_a_merged_hybrid_whose_second_part_proposes_nothing_takes_the_lookup_alone():
    """``merge=True``: a step where only the lookup proposes verifies its chain, labelled as the lookup's."""
    hybrid = HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=1),
                           NGramDrafter(num_speculative_tokens=1, min_ngram=3), merge=True)
    tree = _started(hybrid, [1, 2, 3, 1]).propose(8)  # "2 3 1" never occurred before: the second part has none
    assert (tree.source, tree.tokens.tolist(), tree.parents.tolist()) == ("first", [2, 3], [-1, 0])


class _AskedLookup(NGramDrafter):
    """A lookup that records the depth it is asked for at each proposal (shared by its per-row copies)."""
    def __init__(self, asked: list[int], **kwargs):
        super().__init__(**kwargs)
        self.asked = asked

    def propose(self, max_depth: int) -> DraftTree:
        self.asked.append(max_depth)
        return super().propose(max_depth)


def test_a_batch_uses_each_rows_lookup_from_min_drafts_nodes_and_asks_the_second_part_only_elsewhere():
    """Per row, as at batch 1: at ``min_drafts=2`` a 2-node lookup is used (row 0), one cut to 1 node by the row's
    depth limit is not (row 1, the only row the second part is asked to draft for)."""
    asked: list[int] = []
    hybrid = HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=1),
                           _AskedLookup(asked, num_speculative_tokens=1), min_drafts=2)
    batch = hybrid.batched()
    batch.start(DraftContext(target=pair("llama")[0], sampling=None, rng=keyed_rows([0, 1], "cpu"), capacity=64))
    batch.extend([[1, 2, 3, 1], [1, 2, 3, 1]], None)
    trees = batch.propose([8, 1])
    assert [(t.source, t.tokens.tolist()) for t in trees] == [("first", [2, 3]), ("second", [2])]
    assert asked == [0, 1]


# --------------------------------------------------------------------------- drafters from the config


class TextLookup(NGramDrafter):
    """A plugin-style lookup that reads text: it takes a ``tokenizer``."""
    def __init__(self, tokenizer=None, num_speculative_tokens: int = 4):
        super().__init__(num_speculative_tokens)
        self.tokenizer = tokenizer


def test_a_drafter_that_reads_text_gets_the_runs_tokenizer_unless_its_config_names_one():
    """``tokenizer: null`` gets the run's tokenizer; a tokenizer the drafter's config names is kept."""
    models = LoadedModels(target=None, draft=None, tokenizer="the run's tokenizer")
    node = {"_target_": f"{__name__}.TextLookup", "tokenizer": None}
    assert build_drafter(OmegaConf.create(node), models).tokenizer == "the run's tokenizer"
    own = build_drafter(OmegaConf.create({**node, "tokenizer": "its own"}), models)
    assert isinstance(own, TextLookup) and own.tokenizer == "its own"


def _hybrid_run(second: dict, tree=None, **hybrid) -> dict:
    """A run's config with an n-gram first and ``second`` behind it (and ``tree``, the ``tree`` group)."""
    return {"max_new_tokens": 4, "tree": tree,
            "drafter": {"_target_": "drafters.HybridDrafter", "first": {"_target_": "drafters.NGramDrafter"},
                        "second": {"_target_": "drafters.DraftModelDrafter", **second}, **hybrid}}


def test_a_hybrids_second_part_given_the_tree_may_not_stop_chains_early():
    """``tree=...`` with ``drafter=hybrid`` grows the second part's trees: its chain-only confidence threshold is
    refused before any model loads (as it is on a drafter given the tree itself)."""
    check_before_loading(OmegaConf.create(_hybrid_run({"confidence_threshold": 0.1})))  # chains: fine
    with pytest.raises(ConfigError, match="drafter.second.confidence_threshold=0.1 stops a chain early"):
        check_before_loading(OmegaConf.create(_hybrid_run({"confidence_threshold": 0.1}, {"paths": [[0], [1]]})))


def test_a_hybrids_min_drafts_may_not_be_null():
    """``min_drafts`` is a count: null is refused before any model loads, as 0 is."""
    with pytest.raises(ConfigError, match="drafter.min_drafts=None: it must be an integer >= 1$"):
        check_before_loading(OmegaConf.create(_hybrid_run({}, min_drafts=None)))


# --------------------------------------------------------------------------- the cross-tokenizer drafter


def test_a_tokenizer_with_one_id_more_than_its_model_reads_is_refused():
    """One id past the model's vocabulary is already one the model cannot read."""
    target, _ = peaky_pair()
    one_more = CrossTokenizerDrafter(permuted(target, PERM), tokenizer=char_tokenizer(CHARS + "g"),
                                     draft_tokenizer=char_tokenizer(CHARS))
    with pytest.raises(SpecDecError, match="the target's tokenizer has 7 tokens but the target reads 6"):
        SpeculativeDecoder(target, one_more).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, seed=0)


def test_the_draft_window_moves_to_keep_half_its_cache_so_it_is_refilled_once_not_every_step():
    """A text past the draft cache's room moves the window to its last half; the next steps' tokens fit behind it."""
    d = CrossTokenizerDrafter(permuted(peaky_pair()[0], PERM), tokenizer=char_tokenizer(CHARS),
                              draft_tokenizer=char_tokenizer(CHARS), num_speculative_tokens=3)  # 4 draft tokens
    d._limit, d._offset, d._fed = 20, 0, []  # room for 20 - 4 - 1 = 15 ids of context
    ids = list(range(100))
    assert d._window(ids[:15]) == ids[:15]
    assert d._window(ids[:16]) == ids[9:16]  # moved: the last 15 // 2 = 7 ids
    for n in range(17, 25):  # 8 more steps' ids fit behind the moved window: it stays
        assert d._window(ids[:n]) == ids[9:n]


def test_a_chunk_whose_first_characters_merge_with_the_anchors_last_is_encoded_alone():
    """Draft token "ab" would span the anchor's "a" and the chunk's "b": the chunk is encoded on its own, whole."""
    merging = char_tokenizer(CHARS, [("a", "b")])  # "ab" is one draft token (id 6)
    d = CrossTokenizerDrafter(permuted(peaky_pair()[0], PERM), tokenizer=char_tokenizer(CHARS), draft_tokenizer=merging)
    d._reset_text()
    d._anchor_end, d._anchor_end_ids = "ca", d._encode("ca")
    assert d._encode("cabc") == [2, 6, 2]  # no "a" id where the anchor's text ends
    assert d._encode_after("bc") == [1, 2]


# --------------------------------------------------------------------------- growing trees


@pytest.mark.parametrize(("budget", "top_k"), [(4, 3), (2, 3)])
def test_a_dynamic_trees_draft_cache_holds_a_full_step_at_the_runs_capacity(budget, top_k):
    """A dynamic tree feeds ``min(top_k, budget)`` nodes per level below the last, more than the ``budget`` it keeps:
    a run whose capacity is its prompt plus one step's kept nodes still drafts a full-depth tree."""
    target, draft, tok = pair("llama")
    ids = prompts(tok, 1)[0]
    drafter = DraftModelDrafter(draft, num_speculative_tokens=4, budget=budget, top_k_children=top_k)
    drafter.start(DraftContext(target, SamplingParams(), KeyedRandom.for_seed(0), ids.shape[1] + drafter.max_nodes))
    drafter.prefill(ids, None)
    tree = drafter.propose(4)
    assert tree.num_nodes == budget
    assert drafter.cache.length == ids.shape[1] + min(top_k, budget) * 3  # the prefix (root included), 3 levels fed


def test_a_confidence_threshold_of_one_is_refused():
    """A threshold of 1 would stop every chain after its first draft that is not certain: [0, 1) only."""
    with pytest.raises(ConfigError, match=r"confidence_threshold=1: it must be a number in \[0, 1\)"):
        DraftModelDrafter(pair("llama")[1], num_speculative_tokens=3, confidence_threshold=1)


def _bound(drafter) -> int:
    """``drafter`` (on the llama pair's draft) at temperature 0 after a prompt; the prompt's length."""
    target, _, tok = pair("llama")
    ids = prompts(tok, 1)[0]
    drafter.start(DraftContext(target, SamplingParams(), KeyedRandom.for_seed(0), 64 + drafter.max_fed()))
    drafter.prefill(ids, None)
    return ids.shape[1]


def test_a_tree_cut_short_by_the_depth_limit_feeds_no_level_below_it():
    """``max_depth=2`` on the binary preset: only the depth-1 nodes are fed (their children are the last level)."""
    drafter = DraftModelDrafter(pair("llama")[1], tree="binary")
    prefix = _bound(drafter)
    assert drafter.propose(max_depth=2).num_nodes == 6
    assert drafter.cache.length == prefix + 2


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
def test_at_temperature_zero_sampled_children_are_the_drafts_top_tokens(mode):
    """Greedy runs draft trees by rank whatever ``tree_sampling`` says: distinct siblings, the deterministic tree."""
    trees = []
    for sampling in ("deterministic", mode):
        drafter = DraftModelDrafter(pair("llama")[1], tree="binary", tree_sampling=sampling)
        _bound(drafter)
        trees.append(drafter.propose(8))
    assert trees[1].tokens.tolist() == trees[0].tokens.tolist() and trees[1].draft_probs is None
