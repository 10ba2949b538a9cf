"""The batch cache under ``torch.compile``: block writes and slot moves stay in place and write what the
eager cache writes.

Inductor in torch 2.11 (the GPU machine's) compiled the eager ``index_copy_`` into a graph input as a copy of
the whole buffer out and back (two full passes per layer and tensor); the compiled path's indexed store is
written in place. The generated code is read for any loop over the whole buffer: with the ``index_copy_``
write this test fails on torch 2.11 (later releases re-inplace it too)."""
from __future__ import annotations

import pytest
import torch

from specdec.batch_cache import BatchCache

B, H, C, D = 2, 3, 640, 16  # buffer numel 30720: a loop over it shows in the generated code
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cache(seed: int = 0) -> BatchCache:
    cache = BatchCache(num_layers=1, capacity=C, batch=B)
    g = torch.Generator().manual_seed(seed)
    layer = cache.layers[0]
    layer.lazy_initialization(torch.zeros(B, H, 1, D), torch.zeros(B, H, 1, D))
    layer.keys.copy_(torch.randn(B, H, C, D, generator=g))
    layer.values.copy_(torch.randn(B, H, C, D, generator=g))
    cache.lengths.copy_(torch.tensor([5, 9]))
    return cache


def _block_write(cache: BatchCache, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    cache.begin_static_block(k.shape[2], 0)
    keys, values = cache.layers[0].update(k.sin(), v * 2)  # a producer for inductor to fuse the store into
    return keys[:, :, :1].sum() + values[:, :, :1].sum()


def _move(cache: BatchCache, src: torch.Tensor, dst: torch.Tensor) -> None:
    cache.layers[0].move(src, dst)


def _full_loops(code: list[str]) -> bool:
    return any(str(B * H * C * D) in c for c in code)


def test_compiled_block_write_is_in_place_and_equals_eager():
    from torch._inductor.utils import run_and_get_code

    k, v = torch.randn(B, H, 3, D), torch.randn(B, H, 3, D)  # [B, H, n, D]
    eager, compiled = _cache(), _cache()
    _block_write(eager, k, v)
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(_block_write, dynamic=False), compiled, k, v)
    assert not _full_loops(code), "the compiled block write copies the whole cache buffer"
    for a, b in ((eager.layers[0].keys, compiled.layers[0].keys), (eager.layers[0].values, compiled.layers[0].values)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert torch.equal(compiled.layers[0].values[0, :, 5:8], v[0] * 2)  # the block went to row 0's length


def test_compiled_overlapping_move_equals_eager():
    from torch._inductor.utils import run_and_get_code

    src = torch.tensor([[7, 9, 11], [10, 11, 12]])  # [B, M]: row 1 moves onto slots it also reads
    dst = torch.tensor([[5, 6, 7], [9, 10, 11]])
    eager, compiled = _cache(1), _cache(1)
    expected = eager.layers[0].keys[:, :, :].clone()
    for b in range(B):
        expected[b, :, dst[b]] = eager.layers[0].keys[b, :, src[b]]
    _move(eager, src, dst)
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(_move, dynamic=False), compiled, src, dst)
    assert not _full_loops(code), "the compiled move copies the whole cache buffer"
    assert torch.equal(eager.layers[0].keys, expected)
    assert torch.equal(compiled.layers[0].keys, expected)
    assert torch.equal(compiled.layers[0].values, eager.layers[0].values)
