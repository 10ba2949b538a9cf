"""KV cache: after any sequence of writes, compact and truncate, attention over it equals a fresh cache."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
