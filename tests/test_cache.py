"""KV cache: after any sequence of writes, compact and truncate, attention over it equals a fresh cache."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.batch_cache import BatchCache
from specdec.cache import CacheOverflowError, SpecDecCache

B, H, D, LAYERS, CAP = 1, 2, 4, 2, 48

op = st.one_of(
    st.tuples(st.just("write"), st.integers(1, 6)),
    st.tuples(st.just("truncate"), st.integers(0, 40)),
    st.tuples(st.just("compact"), st.integers(0, 40), st.lists(st.integers(0, 12), max_size=8, unique=True)),
)


def _attend(keys, values, query):
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values)  # [B, H, 1, D]


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_cache_matches_fresh_cache_of_committed_tokens(ops, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = SpecDecCache(LAYERS, CAP)
    truth: list[list[torch.Tensor]] = [[] for _ in range(LAYERS)]  # per layer: [k, v] per token
    for o in ops:
        if o[0] == "write":
            n = min(o[1], CAP - cache.length)
            if n == 0:
                continue
            for layer in range(LAYERS):
                k = torch.randn(B, H, n, D, generator=gen)  # [B, H, n, D]
                v = torch.randn(B, H, n, D, generator=gen)
                cache.update(k, v, layer)
                truth[layer] += [(k[:, :, i], v[:, :, i]) for i in range(n)]
        elif o[0] == "truncate":
            cache.truncate(o[1])
            truth = [t[: o[1]] for t in truth]
        else:
            offset = min(o[1], cache.length)
            keep = sorted(i for i in o[2] if offset + i < cache.length)
            cache.compact(keep, offset=offset)
            truth = [t[:offset] + [t[offset + i] for i in keep] for t in truth]
        assert cache.length == len(truth[0]) == cache.get_seq_length()
    if cache.length == 0:
        return
    query = torch.randn(B, H, 1, D, generator=gen)
    fresh = SpecDecCache(LAYERS, CAP)
    for layer in range(LAYERS):
        k = torch.stack([kv[0] for kv in truth[layer]], dim=2)  # [B, H, L, D]
        v = torch.stack([kv[1] for kv in truth[layer]], dim=2)
        fk, fv = fresh.update(k, v, layer)
        ck, cv = cache.layers[layer].keys[:, :, : cache.length], cache.layers[layer].values[:, :, : cache.length]
        assert torch.equal(ck, fk) and torch.equal(cv, fv)
        assert torch.allclose(_attend(ck, cv, query), _attend(fk, fv, query))


def test_write_past_capacity_raises_clear_error():
    cache = SpecDecCache(1, 4)
    cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    with pytest.raises(CacheOverflowError, match="capacity is 4"):
        cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0)


def test_compact_rejects_unsorted_and_out_of_range():
    cache = SpecDecCache(1, 8)
    cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.compact([2, 1])
    with pytest.raises(ValueError, match="past the cache length"):
        cache.compact([0, 5])


def test_verify_compact_then_step_equals_fresh_forward():
    """Through a real model: a tree step, compaction to one path, then the next token == fresh forward."""
    from tests.tiny_models import pair
    from verifier import tree_forward

    target, _, _ = pair("llama")
    prompt = torch.tensor([[5, 9, 13, 2, 7]])
    cache = SpecDecCache.for_model(target, 32)
    n = prompt.shape[1]
    tree_forward(target, cache, prompt, torch.ones(n, n, dtype=torch.bool).tril(), torch.arange(n))
    # root 11 with two children 3 and 4, and 6 below 4: accept path 11 -> 4 -> 6
    ids = torch.tensor([[11, 3, 4, 6]])
    parents = [-1, 0, 0, 2]
    mask = torch.eye(4, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    tree_forward(target, cache, ids, mask, torch.tensor([0, 1, 1, 2]))
    cache.compact([0, 2, 3], offset=n)
    nxt, _ = tree_forward(target, cache, torch.tensor([[8]]), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    full = target(torch.tensor([[5, 9, 13, 2, 7, 11, 4, 6, 8]])).logits[0, -1]
    assert torch.allclose(nxt[-1], full, atol=1e-5)


def test_compact_rejects_the_first_slot_past_the_length():
    """Slot ``length`` holds nothing written (capacity past it is zeros or stale KV): keeping it is an error."""
    cache = SpecDecCache(1, 8)
    cache.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2), 0)
    with pytest.raises(ValueError, match="slot 4 is past the cache length 4"):
        cache.compact([0, 4])
    with pytest.raises(ValueError, match="slot 4 is past the cache length 4"):
        cache.compact([1, 2], offset=2)
    assert cache.length == 4


# --------------------------------------------------------------------------- the batch's ragged cache (its bookkeeping)


def _written(batch: int, capacity: int = 16) -> BatchCache:
    """A one-layer batch cache whose rows hold row-numbered keys (a block of 2 written at length 0)."""
    cache = BatchCache(1, capacity, batch)
    cache.begin_block(2)
    keys = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 1, 2, 4)  # [B, H, 2, D]
    cache.layers[0].update(keys, keys.clone())
    cache.set_lengths([2] * batch)
    return cache


def test_a_batch_block_fits_up_to_the_capacity_and_names_the_longest_row_past_it():
    cache = BatchCache(1, 10, 3, row_ids=[5, 6, 7])
    cache.set_lengths([1, 8, 2])
    assert cache.layers[0].get_seq_length() == 8  # the longest row's length (what transformers may read)
    cache.begin_block(2)  # slots 8 and 9 of 10: fits
    with pytest.raises(CacheOverflowError, match=r"row 6: writing 3 tokens at slot 8 .* capacity is 10"):
        cache.begin_block(3)
    cache.select_rows([1, 2])  # rows keep their ids through selections
    cache.select_rows([0])
    with pytest.raises(CacheOverflowError, match="row 6"):
        cache.begin_block(3)


def test_admitting_rows_whose_cache_was_never_written():
    """Continuous batching admits rows prefilled on their own; a one-token prompt's prefill writes nothing."""
    cache = _written(3)
    cache.extend(BatchCache(1, 16, 1))  # never written: zero rows of the batch's shape
    assert cache.layers[0].keys.shape == (4, 1, 16, 4) and cache.batch == 4 and cache.rows == [0, 1, 2, 0]
    assert torch.equal(cache.layers[0].keys[:3, :, :2, 0], torch.arange(3.0).view(3, 1, 1).expand(3, 1, 2))
    assert not cache.layers[0].keys[3].any()
    empty = BatchCache(1, 16, 2)  # the other way round: the batch unwritten, the admitted rows written
    empty.extend(_written(1))
    assert empty.layers[0].keys.shape == (3, 1, 16, 4) and not empty.layers[0].keys[:2].any()
    assert empty.host_lengths == [0, 0, 2]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4), n=st.integers(1, 4), seed=st.integers(0, 99))
def test_block_mask_is_its_docstring(lengths, n, seed):
    """Key ``s`` is visible to block token ``j`` of row ``b`` iff ``s < lengths[b]``, or ``s = lengths[b] + i``
    with ``tree_mask[b, j, i]``: checked slot by slot, for any tree mask (a column 0 that is False included)."""
    cache = BatchCache(1, 16, len(lengths))
    cache.set_lengths(lengths)
    cache.begin_block(n)
    tree = torch.rand(len(lengths), n, n, generator=torch.Generator().manual_seed(seed)) < 0.5  # [B, n, n]
    mask = cache.block_mask(tree)[:, 0]  # [B, n, S]
    for b, length in enumerate(lengths):
        for j in range(n):
            for s in range(mask.shape[-1]):
                i = s - length
                assert bool(mask[b, j, s]) == (s < length or (0 <= i < n and bool(tree[b, j, i]))), (b, j, s)
