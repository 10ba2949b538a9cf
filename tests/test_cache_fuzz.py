"""Fuzz of the KV cache as decoding drives it: prefill writes, tree verify steps compacted to a random
accepted root-to-node path, rollbacks (truncate), and writes after each, against a plain list of the
committed keys and values. 1000 examples per run (tests/test_cache.py has the general property test)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec.cache import SpecDecCache

B, H, D, LAYERS, CAP = 1, 2, 3, 2, 64


@st.composite
def tree_step(draw):
    """A verify step: a tree of ``len(parents)`` nodes below the root, and the accepted node (-1: root only)."""
    n = draw(st.integers(0, 8))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    return ("tree", parents, draw(st.integers(-1, n - 1)))


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(1, 9)),  # prefill / plain decode
    tree_step(),
    st.tuples(st.just("truncate"), st.integers(0, 70)),
    st.tuples(st.just("as_tensor"), st.booleans()),  # keep indices as a list or a LongTensor from here on
), min_size=1, max_size=10)


def accepted_slots(parents: list[int], node: int) -> list[int]:
    """Slots (0 = the root) kept after accepting ``node``: the root and its ancestors, ascending."""
    path = []
    while node >= 0:
        path.append(node + 1)
        node = parents[node]
    return [0, *reversed(path)]


class Reference:
    """Committed (key, value) pairs per layer, as plain lists."""

    def __init__(self) -> None:
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(LAYERS)]

    def write(self, cache: SpecDecCache, n: int, gen: torch.Generator) -> None:
        for layer in range(LAYERS):
            k = torch.randn(B, H, n, D, generator=gen)  # [B, H, n, D]
            v = torch.randn(B, H, n, D, generator=gen)  # [B, H, n, D]
            cache.update(k, v, layer)
            self.kv[layer] += [(k[:, :, i], v[:, :, i]) for i in range(n)]

    def check(self, cache: SpecDecCache) -> None:
        assert cache.length == cache.get_seq_length() == len(self.kv[0])
        for layer in range(LAYERS):
            if not self.kv[layer]:
                continue
            keys = torch.stack([k for k, _ in self.kv[layer]], dim=2)  # [B, H, L, D]
            values = torch.stack([v for _, v in self.kv[layer]], dim=2)  # [B, H, L, D]
            assert torch.equal(cache.layers[layer].keys[:, :, : cache.length], keys)
            assert torch.equal(cache.layers[layer].values[:, :, : cache.length], values)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=ops, seed=st.integers(0, 2**16))
def test_cache_fuzz_tree_steps_compaction_and_rollback(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    cache, ref, as_tensor = SpecDecCache(LAYERS, CAP), Reference(), False
    for step in steps:
        if step[0] == "as_tensor":
            as_tensor = step[1]
        elif step[0] == "write":
            n = min(step[1], CAP - cache.length)
            if n:
                ref.write(cache, n, gen)
        elif step[0] == "truncate":
            cache.truncate(step[1])
            ref.kv = [kv[: step[1]] for kv in ref.kv]
        else:
            _, parents, node = step
            offset = cache.length
            if offset + len(parents) + 1 > CAP:
                continue
            ref.write(cache, len(parents) + 1, gen)  # root + nodes, as one verify forward writes them
            keep = accepted_slots(parents, node)
            cache.compact(torch.tensor(keep) if as_tensor else keep, offset=offset)
            ref.kv = [kv[:offset] + [kv[offset + i] for i in keep] for kv in ref.kv]
        ref.check(cache)
        assert cache.layers[0].get_mask_sizes(2)[0] == cache.length + 2
