"""The EAGLE head's lean forward (:mod:`drafters.fast_layer`) against the one-layer model's own forward.

- Every kind of head forward the drafters run (a causal chunk after a prefix, one token, a tree level
  with a key mask and its own positions, a ragged batch block at each row's length) gives the same
  logits, output features and cache contents both ways, Llama and Qwen2 heads, float32 and bfloat16.
- The fused weights follow the head: new values (training in place) and a new dtype are picked up.
- Layers it does not know (sliding-window attention) take the model's own forward.
- Decoding with ``fast_forward`` on and off drafts the same (accepted counts per step, fp32), batch 1
  and batched, chain and dynamic tree; both equal HF greedy.
"""
from __future__ import annotations

import pytest
import torch

from drafters import EagleDrafter
from drafters.eagle import run_head
from drafters.eagle_heads import EagleHead
from drafters.fast_layer import FastLayer, unsupported
from specdec import SpeculativeDecoder
from specdec.batch_cache import BatchCache
from specdec.cache import SpecDecCache
from tests.test_eagle import noisy_head, trained_head
from tests.tiny_models import pair, prompts
from verifier.batch import begin_block, causal_block

TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {"atol": 0.1, "rtol": 0.05}}


def _head(arch: str, version: str, dtype: torch.dtype) -> EagleHead:
    target = pair(arch)[0]
    return noisy_head(target, version, noise=0.3).bind(target, dtype)


def _both(head, fn):
    """``fn(fast)`` with the fast layer and with the model's forward, each on fresh caches it builds."""
    assert head.fast_layer() is not None
    return fn(True), fn(False)


def _feats(head, b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(head.parameters()).dtype
    ids = torch.randint(0, head.vocab_size, (b, n), generator=gen)  # [B, n]
    return ids, torch.randn(b, n, head.hidden_size, generator=gen).to(dtype)  # [B, n, H]


def _same(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("version", ["eagle2", "eagle3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_one_forwards_match_the_models_own(arch, version, dtype):
    """A 7-token prefix, a causal chunk of 4, one token, then a tree level of 3 (two share a parent)."""
    head = _head(arch, version, dtype)
    ids, feats = _feats(head, 1, 15, seed=1)
    level_mask = torch.ones(1, 1, 3, 15, dtype=torch.bool)  # [1, 1, n, S]: slots 0..11 visible, the level per row
    level_mask[0, 0, :, 12:] = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    level_mask[0, 0, 2, 11] = False  # node 2 does not see the last slot (another branch)

    def run(fast):
        cache = SpecDecCache.for_model(head.model, 32)
        outs = []
        for lo, hi in ((0, 7), (7, 11), (11, 12)):
            pos = torch.arange(lo, hi)[None]  # [1, m]
            outs += run_head(head, ids[:, lo:hi], feats[:, lo:hi], cache, pos, None, 0, fast)
        pos = torch.full((1, 3), 12)  # [1, 3]: one depth
        outs += run_head(head, ids[:, 12:15], feats[:, 12:15], cache, pos, level_mask, 0, fast)
        layer = cache.layers[0]
        return outs + [layer.keys[:, :, :15], layer.values[:, :, :15]]

    for fast, slow in zip(*_both(head, run)):
        _same(fast, slow, dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_batch_blocks_match_the_models_own(arch, dtype):
    """Rows of 5, 2 and 0 prompt pairs joined in one block, then a block of one pair per row (the batched
    chain's catch-up and feed), with per-row masks and positions from the batch cache."""
    head = _head(arch, "eagle3", dtype)
    ids, feats = _feats(head, 3, 6, seed=2)
    rows = [list(range(5)), [0, 1], []]

    def run(fast):
        cache = BatchCache.for_model(head.model, 16, 3)
        _, depth, mask = causal_block([r or [0] for r in rows], "cpu")  # [3, 5] ...
        pos, key_mask = begin_block(cache, depth, mask)
        first = run_head(head, ids[:, :5], feats[:, :5], cache, pos, key_mask, 0, fast)
        cache.keep_block([list(range(len(r))) for r in rows])
        pos, key_mask = begin_block(cache, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, 1, dtype=torch.bool))
        second = run_head(head, ids[:, 5:], feats[:, 5:], cache, pos, key_mask, 0, fast)
        cache.keep_block([[0]] * 3)
        layer = cache.layers[0]
        valid = [(b, s) for b, r in enumerate(rows) for s in range(len(r) + 1)]  # slots each row holds
        kv = [torch.stack([layer.keys[b, :, s] for b, s in valid]), torch.stack([layer.values[b, :, s] for b, s in valid])]
        real = [first[0][0, :5], first[0][1, :2], first[1][0, :5], first[1][1, :2]]  # rows' real block tokens
        return real + list(second) + kv

    for fast, slow in zip(*_both(head, run)):
        _same(fast, slow, dtype)


def test_fused_weights_follow_the_head():
    """In-place changes of the weights (training) and a new dtype reach the fast forward."""
    head = _head("llama", "eagle2", torch.float32)
    ids, feats = _feats(head, 1, 4, seed=3)

    def check(dtype):
        outs = []
        for fast in (True, False):
            cache = SpecDecCache.for_model(head.model, 8)
            outs.append(run_head(head, ids, feats.to(dtype), cache, torch.arange(4)[None], None, 0, fast)[0])
        _same(outs[0], outs[1], dtype)

    check(torch.float32)
    with torch.no_grad():
        head.model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        head.model.model.layers[0].mlp.up_proj.weight.add_(0.05)
    check(torch.float32)
    head.bind(pair("llama")[0], torch.bfloat16)
    check(torch.bfloat16)


def test_layers_it_does_not_know_take_the_models_forward():
    target = pair("qwen2")[0]
    config = dict(target.config.to_dict(), use_sliding_window=True, sliding_window=4, max_window_layers=0)
    config.pop("layer_types", None)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**{**config, "num_hidden_layers": 1}))
    assert "sliding" in unsupported(model)
    with pytest.raises(ValueError, match="sliding"):
        FastLayer(model)
    assert "one-layer" in unsupported(target)  # the two-layer target itself


@pytest.mark.parametrize("kwargs", [{"num_speculative_tokens": 3}, {"budget": 8, "num_speculative_tokens": 4}],
                         ids=["chain", "dynamic"])
def test_decoding_drafts_the_same_either_way(kwargs):
    target, _, tok = pair("llama")
    rows = prompts(tok, 3, seed=11)
    runs = {}
    for fast in (True, False):
        def make(fast=fast):
            return EagleDrafter(trained_head("llama", "eagle3"), fast_forward=fast, **kwargs)

        single = [SpeculativeDecoder(target, make()).generate(ids, 12) for ids in rows]
        batch = SpeculativeDecoder(target, make()).generate_batch(rows, 12)
        runs[fast] = ([s.stats.accepted_per_step for s in single], [s.accepted_per_step for s in batch.row_stats])
        for i, ids in enumerate(rows):
            ref = target.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
            assert single[i].sequences.tolist() == ref.tolist() == batch.sequences[i].tolist()
    assert runs[True] == runs[False]
