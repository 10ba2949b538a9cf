"""Tests from a mutation pass over :mod:`drafters.datastore`, :mod:`drafters.eagle_heads` and
:mod:`verifier.fused_projections`: each pins a behaviour that a small change to the module (a flipped
comparison, an off-by-one, a dropped check or argument) left the earlier tests passing.

- The datastore: n-grams of one token at a row's start, the longest suffix of the context deciding a
  chain's first token, chains of at most ``k``, the vocabulary bound, and ``load_datastore`` passing its
  settings through.
- EAGLE heads: EAGLE-3's default feature layers on deep targets, the feature tap (order, bounds, stale
  reads, one hook per layer), an untrained head being the target cut to one layer, the input checks.
- Fused projections: the count of fused groups, and groups that are not fusable staying untouched.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from drafters.datastore import Datastore, load_datastore
from drafters.eagle_heads import EagleHead, EagleHeadError, FeatureTap, default_feature_layers, layer_config
from experiments.chat_data import ChatRows, save_rows
from specdec.errors import ConfigError
from specdec.models import tiny_random_pair
from tests.tiny_models import pair
from verifier.fused_projections import FusedPart, fuse_projections

# --------------------------------------------------------------------------- the datastore


def test_one_token_ngrams_count_from_a_rows_first_token():
    """With ``min_ngram=1`` a row's first token is an n-gram too: its follower is drafted."""
    store = Datastore([[1, 2], [1, 2]], min_ngram=1, max_ngram=1, min_count=1)
    assert store.next_token([1]) == 2
    assert store.chain([7, 1], 3) == [2]


def test_a_chains_first_token_comes_from_the_contexts_longest_suffix():
    """The chain starts from the context's last ``max_ngram`` tokens, not its last ``min_ngram``."""
    rows = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 2, 3, 9], [6, 2, 3, 9], [7, 2, 3, 9]]
    store = Datastore(rows, min_ngram=2, max_ngram=3, min_count=1, min_share=0.0)
    assert store.chain([1, 2, 3], 2) == [4]  # "1 2 3" -> 4, though "2 3" -> 9 more often
    assert store.chain([8, 2, 3], 2) == [9]


def test_a_chain_holds_at_most_k_tokens():
    """``chain(context, k)`` stops at ``k`` tokens even where the datastore would continue."""
    store = Datastore([list(range(1, 12))] * 2, min_ngram=1, max_ngram=2, min_count=1)
    assert store.chain([1], 2) == [2, 3]
    assert store.chain([1], 1) == [2]
    assert store.chain([1], 0) == []


def test_a_token_id_equal_to_the_vocabulary_size_is_outside_it():
    """Ids run ``0 .. vocab - 1``: rows holding the id ``vocab`` were written with another tokenizer."""
    store = Datastore([[1, 2, 3, 10]], min_count=1)
    store.check_vocab(11)
    with pytest.raises(ConfigError, match="its rows hold token id 10, outside the target's vocabulary of 10 ids"):
        store.check_vocab(10)


def _rows_dir(tmp_path, name: str, answers: list[list[int]]):
    """A chat-rows directory of ``answers`` (equal lengths), each after a 3-token prompt ending in 21, 22."""
    ids = torch.tensor([[20 + i, 21, 22, *answer] for i, answer in enumerate(answers)])  # [B, T]
    n = ids.shape[0]
    directory = tmp_path / name
    directory.mkdir()
    save_rows(ChatRows(ids, torch.full((n,), ids.shape[1]), torch.full((n,), 3), 0), directory / "rows.safetensors")
    return str(directory)


def test_load_datastore_passes_min_ngram_and_min_share_through(tmp_path):
    """``load_datastore``'s ``min_ngram`` above the default ``max_ngram`` widens ``max_ngram`` with it, and its
    ``min_share`` reaches the datastore (not the default)."""
    store = load_datastore(_rows_dir(tmp_path, "wide", [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]]), min_ngram=5)
    assert (store.min_ngram, store.max_ngram) == (5, 5)
    assert store.next_token([22, 1, 2, 3, 4]) == 5  # a 5-gram, seen in both answers
    answers = [[1, 2, 3, 1, 2, 3, 1, 2, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9]]  # "2" -> 3 three times, -> 4 once
    shared = load_datastore(_rows_dir(tmp_path, "share", answers), min_ngram=1, min_share=0.0)
    strict = load_datastore(_rows_dir(tmp_path, "strict", answers), min_ngram=1, min_share=1.0)
    assert (shared.min_share, strict.min_share) == (0.0, 1.0)
    assert shared.next_token([2]) == 3 and strict.next_token([2]) is None


# --------------------------------------------------------------------------- EAGLE heads


def test_default_feature_layers_of_deep_and_shallow_targets():
    """EAGLE-3's low, middle and high layers: 1, the middle and L - 2, clamped for shallow targets."""
    assert default_feature_layers(32) == [1, 15, 30]
    assert default_feature_layers(4) == [1, 1, 2]
    assert default_feature_layers(5) == [1, 2, 3]
    assert default_feature_layers(2) == [1, 1, 1]
    assert default_feature_layers(1) == [0, 0, 0]


@pytest.fixture(scope="module")
def deep():
    """A 3-layer tiny Llama target (vocabulary 16) and a few token ids for it."""
    target = tiny_random_pair("llama", seed=0, vocab=16, hidden=32, layers=3)[0]
    return target, torch.tensor([[1, 4, 2, 9, 3]])


def test_the_tap_concatenates_in_the_given_layer_order(deep):
    """``take()`` concatenates the captured outputs in ``layers`` order, not in layer-index order."""
    target, ids = deep
    h = target.config.hidden_size
    shuffled, ordered = FeatureTap(target, [2, 0, 1]), FeatureTap(target, [0, 1, 2])
    try:
        with torch.no_grad():
            target(ids)
        got, ref = shuffled.take(), ordered.take()  # [1, 5, 3H]
    finally:
        shuffled.remove(), ordered.remove()
    parts = ref.split(h, dim=-1)
    torch.testing.assert_close(got, torch.cat([parts[2], parts[0], parts[1]], dim=-1))
    assert not torch.equal(got, ref)


def test_the_tap_hooks_each_layer_once_and_reads_are_not_stale(deep):
    """One hook per distinct layer; a second ``take()`` without a forward raises, as does one after ``remove()``."""
    target, ids = deep
    tap = FeatureTap(target, [1, 1, 2])
    assert len(tap.handles) == 2
    with torch.no_grad():
        target(ids)
    assert tap.take().shape == (1, 5, 3 * target.config.hidden_size)
    with pytest.raises(RuntimeError, match="no target forward since the last read"):
        tap.take()
    with torch.no_grad():
        target(ids)
    tap.remove()
    with pytest.raises(RuntimeError, match="no target forward since the last read"):
        tap.take()


def test_feature_layers_past_the_target_are_one_error(deep):
    """Layer ``L`` of an ``L``-layer target is outside it: an EagleHeadError naming it, not an IndexError."""
    target, _ = deep
    with pytest.raises(EagleHeadError, match=r"feature layers \[3\] are outside the target's 3 decoder layers"):
        FeatureTap(target, [0, 2, 3])
    FeatureTap(target, [0, 1, 2]).remove()


def _cut_to_one_layer(target):
    """``target`` with only its first decoder layer (and its final norm and LM head)."""
    cut = copy.deepcopy(target)
    cut.model.layers = nn.ModuleList(list(cut.model.layers)[:1])
    cut.config.num_hidden_layers = 1
    return cut


def test_an_untrained_eagle2_head_is_the_target_cut_to_one_layer():
    """``init="target"``: layer 0 and the final norm copied, ``fc`` = [I | 0] with no bias, so the head's logits
    and output features are the one-layer target's whatever features it reads."""
    target = pair("llama")[0]
    with torch.no_grad():
        target_norm = target.model.norm.weight.clone()
        target.model.norm.weight.mul_(1.5)  # a final norm other than ones, so that copying it shows
        try:
            head = EagleHead.for_target(target, "eagle2", seed=3)
            cut = _cut_to_one_layer(target)
            ids = torch.tensor([[5, 70, 3, 200, 41, 9]])
            feats = torch.randn(1, 6, target.config.hidden_size, generator=torch.Generator().manual_seed(0))
            logits, hidden = head(ids, feats)
            ref = cut(ids, output_hidden_states=True)
        finally:
            target.model.norm.weight.copy_(target_norm)
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(hidden, ref.hidden_states[-1])


def test_an_eagle3_head_normalises_its_inputs_and_starts_from_the_targets_lm_head():
    """EAGLE-3 RMS-normalises embedding and feature before ``fc`` (a feature's scale does not matter), and its
    own LM head starts as a copy of the target's."""
    target = pair("llama")[0]
    head = EagleHead.for_target(target, "eagle3", seed=0, init="random")
    assert torch.equal(head.model.lm_head.weight, target.get_output_embeddings().weight)
    assert head.model.lm_head.weight is not target.get_output_embeddings().weight
    ids = torch.tensor([[5, 70, 3]])
    feats = torch.randn(1, 3, target.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(head.input.combine(ids, feats), head.input.combine(ids, 4.0 * feats))


def test_head_inputs_are_checked_and_not_kept():
    """Features must match the ids one to one; the head holds no features after a forward."""
    target = pair("llama")[0]
    head = EagleHead.for_target(target, "eagle2")
    h = target.config.hidden_size
    with pytest.raises(RuntimeError, match="one feature per token"):
        head(torch.tensor([[1, 2, 3, 4]]), torch.zeros(1, 3, h))
    with torch.no_grad():
        head(torch.tensor([[1, 2, 3]]), torch.zeros(1, 3, h))
    assert head.input.features is None
    with pytest.raises(RuntimeError, match="one feature per token"):  # no features left from the last forward
        head.model(input_ids=torch.tensor([[1, 2, 3]]))


def test_head_construction_errors():
    """An eagle3 head needs three feature layers, ``init`` is ``target`` or ``random``, a draft vocabulary is set
    once, and an eagle2 head keeps no feature layers."""
    target = pair("llama")[0]
    with pytest.raises(EagleHeadError, match=r"fuses three target layers, got feature_layers=\[0, 1\]"):
        EagleHead(layer_config(target), "eagle3", [0, 1])
    with pytest.raises(EagleHeadError, match=r"init='zeros': use 'target' or 'random'"):
        EagleHead.for_target(target, "eagle2", init="zeros")
    head = EagleHead.for_target(target, "eagle2", draft_vocab=torch.arange(0, 257, 2))
    assert head.draft_vocab == 129
    with pytest.raises(EagleHeadError, match="already drafts over a draft vocabulary"):
        head.use_draft_vocab(torch.arange(10))
    eagle2 = EagleHead(layer_config(target), "eagle2", [0, 1, 1])
    assert eagle2.feature_layers == [] and eagle2.config()["feature_layers"] == [] and eagle2.tap(target) is None


# --------------------------------------------------------------------------- fused projections


def test_fuse_projections_counts_every_group():
    """Two groups per decoder layer (q/k/v and gate/up) are fused, each into one product, and the count says so."""
    target = copy.deepcopy(pair("llama")[0])
    config = target.config
    assert fuse_projections(target) == 2 * config.num_hidden_layers
    assert fuse_projections(target) == 0
    head_dim = config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    for layer in target.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert all(isinstance(m, FusedPart) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj))
        assert attn.q_proj.weight.shape == (qkv, config.hidden_size)
        assert mlp.gate_proj.weight.shape == (2 * config.intermediate_size, config.hidden_size)
        assert not (attn.k_proj.first or attn.v_proj.first or mlp.up_proj.first) and mlp.up_proj.last


def _attention(*linears):
    """A module with ``self_attn.q_proj / k_proj / v_proj`` set to ``linears`` (None: absent)."""
    layer = nn.Module()
    layer.self_attn = nn.Module()
    for name, linear in zip(("q_proj", "k_proj", "v_proj"), linears):
        if linear is not None:
            setattr(layer.self_attn, name, linear)
    return layer


class _SubLinear(nn.Linear):
    """A subclass of ``nn.Linear`` (it may compute something else): not fused."""


def test_groups_that_are_not_plain_linears_of_one_input_stay_untouched():
    """Different input widths, a missing linear, or a linear of another class: nothing is fused, nothing raises."""
    torch.manual_seed(0)
    cases = [(nn.Linear(6, 4), nn.Linear(5, 2), nn.Linear(6, 2)),  # k reads another input
             (nn.Linear(6, 4), nn.Linear(6, 2), None),  # no v_proj
             (nn.Linear(6, 4), nn.Linear(6, 2), _SubLinear(6, 2))]
    for linears in cases:
        layer = _attention(*linears)
        assert fuse_projections(layer) == 0
        kept = [getattr(layer.self_attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        assert kept == list(linears) and not any(isinstance(m, FusedPart) for m in layer.modules())
