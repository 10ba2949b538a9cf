"""Mutation pass 13: the rollback KV caches (:mod:`specdec.cache`, :mod:`specdec.batch_cache`), keyed random
numbers (:mod:`specdec.rng`), the EAGLE drafter (:mod:`drafters.eagle`, :mod:`drafters.eagle_batch`) and tree
growth (:mod:`drafters.tree_expansion`).

Each test names the planted bug it catches: small edits (an off-by-one, a comparison, a dropped line) that the
rest of the suite let through.
"""
from __future__ import annotations

import copy

import pytest
import torch

from drafters import EagleDrafter
from drafters.eagle import HeadFeed
from drafters.eagle_heads import EagleHead
from drafters.fast_decoder import forward_lm
from drafters.tree_expansion import TreeFeed, accepted_fed_slots, expand_static
from specdec import SamplingParams, SpeculativeDecoder
from specdec.batch_cache import BatchCache
from specdec.batch_drafting import keyed_rows
from specdec.cache import CacheOverflowError, SpecDecCache
from specdec.drafting import DraftContext
from specdec.rng import ACCEPT, CHILD, DRAFT, EXTRA, KeyedRandom, _mix, hash_keys, uniform
from specdec.tree import compile_tree
from tests.tiny_models import pair, prompts


def _kv(n: int, start: float = 0.0) -> torch.Tensor:
    """``[1, 1, n, 2]`` keys numbered ``start, start + 1, ...`` (slot contents are easy to read back)."""
    return (start + torch.arange(n, dtype=torch.float32)).view(1, 1, n, 1).expand(1, 1, n, 2).clone()


# --------------------------------------------------------------------------- SpecDecCache


def test_a_write_that_exactly_fills_the_capacity_fits():
    """Planted bug: ``update`` raised when ``end >= capacity`` (the last slot could never be used)."""
    cache = SpecDecCache(1, 4)
    cache.update(_kv(3), _kv(3), 0)
    keys, _ = cache.update(_kv(1, 3.0), _kv(1, 3.0), 0)
    assert cache.length == 4 and keys[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(CacheOverflowError):
        cache.update(_kv(1), _kv(1), 0)


def test_reset_empties_the_cache_for_a_new_sequence():
    """Planted bug: ``SpecDecLayer.reset`` kept the length (transformers' ``Cache.reset`` reuses the cache)."""
    cache = SpecDecCache(2, 8)
    for layer in range(2):
        cache.update(_kv(5), _kv(5), layer)
    cache.reset()
    assert cache.length == 0 and cache.get_seq_length() == 0
    keys, _ = cache.update(_kv(2, 7.0), _kv(2, 7.0), 0)
    assert keys.shape[2] == 2 and keys[0, 0, :, 0].tolist() == [7.0, 8.0]


def test_truncate_to_a_negative_length_is_an_error():
    """Planted bug: ``truncate`` accepted ``n = -1`` (``if n < -1``), leaving a cache of length -1."""
    cache = SpecDecCache(1, 8)
    cache.update(_kv(3), _kv(3), 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        cache.truncate(-1)
    assert cache.length == 3


def test_compact_rejects_a_repeated_slot():
    """Planted bug: the order check was ``src[1:] < src[:-1]``, so ``compact([1, 1])`` kept one slot twice."""
    cache = SpecDecCache(1, 8)
    cache.update(_kv(4), _kv(4), 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.compact([1, 1])
    assert cache.length == 4


def test_compact_rejects_a_negative_slot():
    """Planted bug: the lower bound was ``src[0] < -1``, so ``compact([-1], offset=2)`` copied slot 1 (below the
    offset, which must stay as it is) into slot 2."""
    cache = SpecDecCache(1, 8)
    cache.update(_kv(4), _kv(4), 0)
    with pytest.raises(ValueError, match=">= 0"):
        cache.compact([-1], offset=2)
    assert cache.length == 4 and cache.layers[0].keys[0, 0, :4, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- BatchCache


def test_extend_refuses_a_cache_of_another_capacity_or_depth():
    """Planted bug: the shape check of ``BatchCache.extend`` was dropped (rows of another capacity would be
    concatenated, or fail later inside ``torch.cat``)."""
    cache = BatchCache(1, 10, 1)
    for other in (BatchCache(1, 12, 1), BatchCache(2, 10, 1)):
        with pytest.raises(ValueError, match="same capacity and layer count"):
            cache.extend(other)
    assert cache.batch == 1


def test_layers_of_different_head_counts_get_their_own_block_index():
    """Planted bug: ``block_index`` reused the block's flat index whatever the buffer's shape (a model whose layers
    hold different KV head counts then wrote layer 1 through layer 0's index)."""
    cache = BatchCache(2, 6, 2)
    cache.set_lengths([1, 3])
    cache.begin_block(2)
    for layer, heads in ((0, 1), (1, 3)):
        kv = torch.arange(2 * heads * 2, dtype=torch.float32).view(2, heads, 2, 1).expand(2, heads, 2, 4)
        keys, _ = cache.layers[layer].update(kv, kv.clone())  # [B, H, end, D]
        assert torch.equal(keys[0, :, 1:3], kv[0]) and torch.equal(keys[1, :, 3:5], kv[1]), layer


# --------------------------------------------------------------------------- keyed random numbers

P3 = torch.tensor([0.5, 0.3, 0.2])
N_DRAWS = 20000


def _many_rows() -> KeyedRandom:
    """``N_DRAWS`` rows (seeds 0 ..), each at step 3: one draw per row makes a sample of the draw's law."""
    rng = KeyedRandom(torch.arange(N_DRAWS))
    rng.set_step(3)
    return rng


def test_categorical_draws_follow_the_probabilities():
    """Planted bugs: the race divided by ``1 - u`` instead of ``-log u`` (not an exponential race: token 0 of
    ``[0.5, 0.3, 0.2]`` won about 0.58 of draws); the uniform kept only 20 of its 24 bits (``u < 1/16``)."""
    drawn = _many_rows().categorical(P3.expand(N_DRAWS, 3), EXTRA, 5)  # [N]
    freq = torch.bincount(drawn, minlength=3).float() / N_DRAWS
    assert torch.allclose(freq, P3, atol=0.015), freq.tolist()
    u = _many_rows().uniform(ACCEPT, 0)  # [N]
    assert 0.49 < float(u.mean()) < 0.51 and float(u.max()) > 0.99, (float(u.mean()), float(u.max()))


def test_draws_without_replacement_follow_the_gumbel_top_k_law():
    """Planted bugs: the race keys of ``top_without_replacement`` used a constant (or a clamped) uniform, so the
    draws were the top tokens by probability (first draw not ~``p``, second not ``sum_i p_i p_j / (1 - p_i)``)."""
    drawn = _many_rows().top_without_replacement(P3.expand(N_DRAWS, 3), 2, CHILD, 1)  # [N, 2]
    first = torch.bincount(drawn[:, 0], minlength=3).float() / N_DRAWS
    second = torch.bincount(drawn[:, 1], minlength=3).float() / N_DRAWS
    assert torch.allclose(first, P3, atol=0.015), first.tolist()
    expected = torch.tensor([0.3 * 0.5 / 0.7 + 0.2 * 0.5 / 0.8, 0.5 * 0.6 + 0.2 * 0.3 / 0.8,
                             0.5 * 0.4 + 0.3 * 0.2 / 0.7])
    assert torch.allclose(second, expected, atol=0.015), second.tolist()
    assert bool((drawn[:, 0] != drawn[:, 1]).all())


def test_the_first_draw_without_replacement_is_the_categorical_draw_of_the_same_key():
    """Planted bug: ``categorical`` keyed ``(purpose, token, *index)`` while ``top_without_replacement`` keys
    ``(purpose, *index, token)`` as its docstring says (\"keyed like categorical\"): the two disagreed."""
    rng = _many_rows()
    probs = torch.softmax(torch.randn(N_DRAWS, 7, generator=torch.Generator().manual_seed(0)), -1)  # [N, V]
    assert torch.equal(rng.top_without_replacement(probs, 1, CHILD, 2)[:, 0], rng.categorical(probs, CHILD, 2))


def test_draws_for_different_purposes_never_coincide():
    """Planted bugs: ``KeyedRandom.uniform`` left the purpose out of the key (an acceptance test's uniform of
    node v was the race key of token v of the same step's extra token); ``EXTRA`` equal to ``ACCEPT``, ``CHILD``
    equal to ``DRAFT``."""
    assert len({ACCEPT, EXTRA, DRAFT, CHILD}) == 4
    rng = KeyedRandom.for_seed(11)
    rng.set_step(2)
    draws = [rng.uniform(purpose, torch.arange(64)) for purpose in (ACCEPT, EXTRA, DRAFT, CHILD)]  # [1, 64] each
    for i in range(4):
        for j in range(i):
            assert not torch.equal(draws[i], draws[j]), (i, j)
    assert not torch.equal(rng.uniform(ACCEPT, 3), rng.uniform(ACCEPT, 3, 0))


def test_a_rows_own_draws_equal_its_batch_one_draws():
    """Planted bug: ``uniform_per_row`` keyed ``(index, purpose)``, so the batched acceptance's draw for row b's
    node differed from row b's batch-1 ``uniform(purpose, node)``."""
    rng = KeyedRandom(torch.tensor([4, 9, 13]))
    rng.set_step(torch.tensor([0, 5, 2]))
    nodes = torch.tensor([2, 0, 7])
    per_row = rng.uniform_per_row(ACCEPT, nodes)  # [B]
    for b in range(3):
        assert torch.equal(per_row[b : b + 1], rng.row(b).uniform(ACCEPT, int(nodes[b]))), b


def _splitmix_reference(*keys: int) -> int:
    """:func:`specdec.rng.hash_keys` in plain Python integers (unsigned 64-bit)."""
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    h = None
    for key in keys:
        h = mix((key * golden + 1) & mask) if h is None else mix(((h ^ key) * golden + 1) & mask)
    return h


def test_the_hash_is_splitmix64_and_seeded_draws_do_not_drift():
    """Planted bugs: a SplitMix64 shift of 26 instead of 27, ``h + key`` for ``h ^ key``, the ``+ 1`` dropped, an
    arithmetic shift for the logical one: each still looks random (the suite's statistical tests pass) but
    changes every seeded run's tokens. SplitMix64's first outputs for seed 0 are the published
    0xE220A8397B1DCDAF and 0x6E789E6AA1B965F4."""
    mask = (1 << 64) - 1
    golden = torch.tensor([0x9E3779B97F4A7C15 - (1 << 64), 0x3C6EF372FE94F82A])  # state after 1 and 2 steps
    assert [int(v) & mask for v in _mix(golden)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    for keys in [(0,), (7, 3, 1), (123456789, 42, 2, 5, 17), (-3, 2**40)]:
        ref = _splitmix_reference(*keys)
        assert int(hash_keys(*keys)) & mask == ref, keys
        assert float(uniform(*keys)) == pytest.approx(((ref >> 40) + 0.5) / 2**24, abs=1e-7), keys


# --------------------------------------------------------------------------- EAGLE


def _noisy_head(target, version: str = "eagle2"):
    """An untrained head (the target's first layer, which reads no features) with noise, so that it reads them."""
    head = EagleHead.for_target(target, version)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std().clamp_min(1e-3))
    return head


def test_eagle_tree_nodes_see_what_a_fresh_head_forward_over_their_path_sees():
    """A tree level's head logits equal a fresh head forward over the committed pairs and the node's path.
    Planted bugs: the drafter's causal forwards at ``cache.length + 1 + j`` (chains stay consistent, tree levels
    at ``prefix_len - 1 + depth`` are then one position off); tree levels at ``prefix_len + depth``; a level's
    node seeing every fed node, or not itself; a lone node that is not every fed node's child given the
    causal (no) mask."""
    target, _, tok = pair("llama")
    head = _noisy_head(target)
    drafter = EagleDrafter(head, tree="binary")
    drafter.start(DraftContext(target, SamplingParams(), KeyedRandom.for_seed(0), 64 + drafter.max_fed()))
    ids = prompts(tok, 1, seed=3)[0]
    with torch.no_grad():
        hidden = target(ids[:, :-1], output_hidden_states=True).hidden_states[-1][0]  # [T - 1, H]
        drafter.prefill(ids, hidden)
        drafter._catch_up()
        root_logits, root_feature = drafter._root
        feed = HeadFeed(drafter.head, drafter.cache, root_feature.device, root_feature, drafter.fast_forward)
        a, b = torch.topk(root_logits, 2).indices.tolist()
        level1 = feed.feed([a, b], [-1, -1], 1)  # [2, V]
        c = int(level1[1].argmax())
        level2 = feed.feed([c], [1], 2)  # [1, V]: b's child, which must not see its uncle a

        def fresh(path: list[int], feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = torch.tensor([ids[0, 1:].tolist() + path])  # [1, T - 1 + d]
            features = torch.cat([head.target_features(hidden), *[f[None] for f in feats]])[None]  # [1, T - 1 + d, H]
            logits, out = head(tokens, features)
            return logits[0, -1].float(), out[0, -1]

        torch.testing.assert_close(fresh([], [])[0], root_logits.float(), atol=1e-4, rtol=1e-4)
        logits_b, feature_b = fresh([b], [root_feature])
        torch.testing.assert_close(level1[1], logits_b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(level2[0], fresh([b, c], [root_feature, feature_b])[0], atol=1e-4, rtol=1e-4)


def test_feature_hooks_follow_the_bound_target_and_come_back_after_close():
    """Planted bugs: ``EagleDrafter._bind`` tapped a new target without removing the tap on the previous one
    (EAGLE-3's forward hooks stayed on a target the drafter no longer drafts for, and kept filling its buffer);
    ``close`` forgot the tap but not the target, so a later ``start`` on it drafted with no hooks."""


    first = pair("llama")[0]
    second = copy.deepcopy(first)

    def hooks(target) -> int:
        return sum("FeatureTap" in getattr(h, "__qualname__", "")
                   for layer in target.model.layers for h in layer._forward_hooks.values())

    before = hooks(first), hooks(second)
    drafter = EagleDrafter(EagleHead.for_target(first, "eagle3"), num_speculative_tokens=2)
    drafter.start(DraftContext(first, SamplingParams(), KeyedRandom.for_seed(0), 16))
    assert hooks(first) == before[0] + 1
    drafter.start(DraftContext(second, SamplingParams(), KeyedRandom.for_seed(0), 16))
    assert (hooks(first), hooks(second)) == (before[0], before[1] + 1)
    drafter.close()
    assert (hooks(first), hooks(second)) == before
    drafter.start(DraftContext(second, SamplingParams(), KeyedRandom.for_seed(0), 16))  # a later start taps again
    assert hooks(second) == before[1] + 1
    drafter.close()


def test_batched_chain_rows_of_one_two_and_more_prompt_tokens():
    """Planted bugs: ``BatchEagleChain._forward`` kept ``len(t or [0])`` slots per row, so a one-token prompt's
    row (no pair yet) kept a padding slot at every forward: its later pairs sat one slot (and position) late;
    ``extend`` left a row pending only with two or more pairs, so a two-token prompt drafted nothing on its first
    step (its batch-1 run drafts). The long row drafts what its batch-1 run drafts."""
    target, _, tok = pair("llama")
    head = _noisy_head(target)
    ids = prompts(tok, 1, seed=5)[0]
    n = ids.shape[1]
    with torch.no_grad():
        hidden = target(ids[:, :-1], output_hidden_states=True).hidden_states[-1]  # [1, n - 1, H]
        short = target(torch.tensor([[65]]), output_hidden_states=True).hidden_states[-1]  # [1, 1, H]
    feats = torch.zeros(3, n - 1, hidden.shape[-1])  # [3, n - 1, H]: rows [65], [65, 66], ids
    feats[1, :1], feats[2] = short[0], hidden[0]
    batch = EagleDrafter(head, num_speculative_tokens=2).batched()
    batch.start(DraftContext(target, SamplingParams(), keyed_rows([0, 1, 2], "cpu"), 64))
    batch.extend([[65], [65, 66], ids[0].tolist()], feats)
    assert batch.cache.host_lengths == [0, 0, n - 2]
    assert [t for _, t in batch.pending] == [[], [66], [int(ids[0, -1])]]
    trees = batch.propose([3, 3, 3])
    assert batch.committed == [0, 1, n - 1] and [t.num_nodes for t in trees] == [0, 2, 2]
    single = EagleDrafter(head, num_speculative_tokens=2)
    single.start(DraftContext(target, SamplingParams(), KeyedRandom.for_seed(2), 64))
    single.prefill(ids, hidden[0])
    assert trees[2].tokens.tolist() == single.propose(3).tokens.tolist()


def test_a_one_token_prompt_beside_longer_ones_in_an_eagle_tree_batch():
    """Planted bug: ``EagleDrafter.prefill`` queued the empty feature slice ``[0, H]`` a batch hands a one-token
    prompt's row (only ``None`` was skipped): its first catch-up fed zero pairs. The row drafts from its second
    step, as at batch 1, and every row equals greedy decoding."""
    target, _, tok = pair("llama")
    head = _noisy_head(target)
    rows = [torch.tensor([[65]]), prompts(tok, 1, seed=6)[0]]
    out = SpeculativeDecoder(target, EagleDrafter(head, tree="binary")).generate_batch(rows, 6)
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)
        assert out.sequences[i].tolist() == ref.tolist(), i
    assert out.row_stats[0].proposed_per_step[0] == 0 and out.row_stats[0].proposed_per_step[1] > 0


def test_a_cache_filled_to_its_capacity_by_causal_forwards_equals_a_plain_forward():
    """Both forwards of :func:`drafters.fast_decoder.forward_lm` (the model's own, whose causal mask transformers
    builds from ``get_mask_sizes``, and the lean one, whose RoPE table spans ``get_max_cache_shape``) over a
    cache filled to its last slot. Planted bug: ``get_max_cache_shape`` returned ``capacity - 1`` (the lean
    forward's RoPE table then ended one position early)."""
    target = pair("llama")[0]
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    with torch.no_grad():
        full = target(ids).logits[0].float()  # [6, V]
    for fast in (False, True):
        cache = SpecDecCache.for_model(target, 6)
        first, _ = forward_lm(target, ids[:, :4], cache, torch.arange(4)[None], fast=fast, output_hidden=False)
        last, _ = forward_lm(target, ids[:, 4:], cache, torch.arange(4, 6)[None], fast=fast, output_hidden=False)
        torch.testing.assert_close(torch.cat([first[0], last[0]]), full, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- tree growth


class _LevelFeed(TreeFeed):
    """A tree feed after 3 committed slots whose forward records each level and returns fixed logits (token v
    scores ``-v``: every node's rank-r child is token r)."""

    def __init__(self):
        cache = SpecDecCache(1, 32)
        cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
        super().__init__(None, cache, torch.device("cpu"))
        self.levels: list[list[int]] = []

    def run(self, ids, parents, key_mask, position_ids):
        n = ids.shape[1]
        self.levels.append(ids[0].tolist())
        self.cache.update(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2), 0)
        return -torch.arange(8.0).expand(n, 8)  # [n, V]


def test_a_preset_cut_by_the_depth_limit_feeds_no_level_past_it():
    """Planted bug: ``expand_static`` fed the nodes of the last allowed depth too (``depth <= depth_limit``): one
    wasted draft forward (and cache slots) whenever the depth limit cuts the preset, e.g. near
    ``max_new_tokens``."""
    compiled = compile_tree([[0], [1], [0, 0], [0, 0, 0]])
    feed = _LevelFeed()
    tree, fed = expand_static(feed, compiled, -torch.arange(8.0), 2, "deterministic", None, None)
    assert tree.tokens.tolist() == [0, 1, 0] and tree.parents.tolist() == [-1, -1, 0]
    assert feed.levels == [[0]] and fed == [0, -1, -1] and feed.cache.length == 4


def test_an_accepted_node_another_drafter_added_ends_the_fed_slots():
    """Planted bug: ``accepted_fed_slots`` dropped its ``node >= len(fed)`` test: an accepted node past this
    drafter's nodes (a merged hybrid tree's) raised ``IndexError`` instead of ending the kept slots."""
    assert accepted_fed_slots([0, 1, 3], [0, 1, -1]) == [0, 1]
    assert accepted_fed_slots([2, 4], [0, -1, 1]) == [1]
    assert accepted_fed_slots([1], [0, -1, 1]) == []


def test_compact_past_the_length_is_an_error_as_a_list_too():
    """Found by this pass (not a mutant): ``compact([0, 1, 2, 3, 4])`` on a cache of length 3 took the contiguous
    list's shortcut, ``truncate(5)``, and returned silently, where the same slots as a tensor raise."""
    cache = SpecDecCache(1, 8)
    cache.update(_kv(3), _kv(3), 0)
    for keep in ([0, 1, 2, 3, 4], torch.tensor([0, 1, 2, 3, 4])):
        with pytest.raises(ValueError, match="past the cache length 3"):
            cache.compact(keep)
    with pytest.raises(ValueError, match="offset is past the cache length 3"):  # nothing kept, past the end
        cache.compact([], offset=5)
    cache.compact([0, 1])
    assert cache.length == 2
