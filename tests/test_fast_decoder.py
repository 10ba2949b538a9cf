"""The lean forward of draft models (:mod:`drafters.fast_decoder`) against the models' own forwards.

- Every kind of draft forward the drafters run (a causal chunk after a prefix, one token, a tree level
  with a key mask and its own positions, a ragged batch block at each row's length) gives the same
  logits, hidden states and cache contents both ways, for EAGLE heads (eagle2, eagle3) and draft
  models of one and two layers, Llama and Qwen2, float32 and bfloat16.
- The fused weights follow the model: new values (training in place) and a new dtype are picked up;
  a draft-vocabulary view scores with its own LM head.
- Models it does not know (sliding-window attention) take the model's own forward.
- Decoding with ``fast_forward`` on and off drafts the same (accepted counts per step, fp32), batch 1
  and batched, chain and trees, EAGLE, the draft model and the layer-skip view; all equal HF greedy.
"""
from __future__ import annotations

import copy

import pytest
import torch

from drafters import DraftModelDrafter, EagleDrafter, LayerSkipDrafter
from drafters.draft_vocab import with_draft_vocab
from drafters.eagle import run_head
from drafters.fast_decoder import FastDecoder, fast_decoder, forward_lm, unsupported
from specdec import SpeculativeDecoder
from specdec.batch_cache import BatchCache
from specdec.cache import SpecDecCache
from tests.test_eagle import noisy_head, trained_head
from tests.tiny_models import noisy_copy, pair, prompts
from verifier.batch import begin_block, causal_block

TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {"atol": 0.1, "rtol": 0.05}}
KINDS = ["eagle2", "eagle3", "draft", "draft_2_layers"]


class Runner:
    """One kind of draft (an EAGLE head, or a draft model) behind one call: ``(ids, feats, cache, pos, mask,
    keep, fast) -> (logits, hidden)``; ``model`` is the causal LM whose cache it writes."""

    def __init__(self, kind: str, arch: str, dtype: torch.dtype):
        target = pair(arch)[0]
        if kind.startswith("eagle"):
            self.head = noisy_head(target, kind, noise=0.3).bind(target, dtype)
            self.model = self.head.model
        else:
            self.head = None
            self.model = copy.deepcopy(noisy_copy(arch) if kind == "draft_2_layers" else pair(arch)[1]).to(dtype)
        self.dtype, self.hidden = dtype, int(self.model.config.hidden_size)

    def __call__(self, ids, feats, cache, pos, mask, keep, fast):
        if self.head is not None:
            return run_head(self.head, ids, feats, cache, pos, mask, keep, fast)
        return forward_lm(self.model, ids, cache, pos, mask, keep, fast)

    def inputs(self, b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, int(self.model.config.vocab_size), (b, n), generator=gen)  # [B, n]
        return ids, torch.randn(b, n, self.hidden, generator=gen).to(self.dtype)  # [B, n, H]


def _both(runner: Runner, fn):
    """``fn(fast)`` through the lean forward and through the model's own, each on fresh caches it builds."""
    assert fast_decoder(runner.model) is not None
    return fn(True), fn(False)


def _same(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_one_forwards_match_the_models_own(arch, kind, dtype):
    """A 7-token prefix, a causal chunk of 4, one token, then a tree level of 3 (two share a parent)."""
    run = Runner(kind, arch, dtype)
    ids, feats = run.inputs(1, 15, seed=1)
    level_mask = torch.ones(1, 1, 3, 15, dtype=torch.bool)  # [1, 1, n, S]: slots 0..11 visible, the level per row
    level_mask[0, 0, :, 12:] = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    level_mask[0, 0, 2, 11] = False  # node 2 does not see the last slot (another branch)

    def go(fast):
        cache = SpecDecCache.for_model(run.model, 32)
        outs = []
        for lo, hi in ((0, 7), (7, 11), (11, 12)):
            pos = torch.arange(lo, hi)[None]  # [1, m]
            outs += run(ids[:, lo:hi], feats[:, lo:hi], cache, pos, None, 0, fast)
        pos = torch.full((1, 3), 12)  # [1, 3]: one depth
        outs += run(ids[:, 12:15], feats[:, 12:15], cache, pos, level_mask, 0, fast)
        return outs + [t for layer in cache.layers for t in (layer.keys[:, :, :15], layer.values[:, :, :15])]

    for fast, slow in zip(*_both(run, go)):
        _same(fast, slow, dtype)


@pytest.mark.parametrize("rows", [1, 3])
def test_kept_logits_read_a_copy_with_standard_strides(rows):
    """With logits_to_keep < n the LM head reads a copy of the kept positions, not a slice: on the CPU a bf16
    matmul on a slice leaves oneDNN's fast path, even ``[1, 1, H]`` of ``[1, n, H]`` (BENCHMARKS.md: the EAGLE
    head's catch-up forward 5.4 -> 2.0 ms). The logits equal the full forward's last position's."""
    run = Runner("draft", "llama", torch.bfloat16)
    ids, _ = run.inputs(rows, 5, seed=3)
    seen = []
    hook = run.model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        outs = [forward_lm(run.model, ids, SpecDecCache.for_model(run.model, 8), torch.arange(5)[None].expand(rows, 5),
                           None, keep, True)[0] for keep in (1, 0)]
    finally:
        hook.remove()
    assert seen[0].shape == (rows, 1, run.hidden) and seen[0].stride() == torch.empty(seen[0].shape).stride()
    torch.testing.assert_close(outs[0], outs[1][:, -1:])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["eagle3", "draft_2_layers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_batch_blocks_match_the_models_own(arch, kind, dtype):
    """Rows of 5, 2 and 0 tokens joined in one block, then a block of one token per row (the batched
    chains' catch-up and feed), with per-row masks and positions from the batch cache."""
    run = Runner(kind, arch, dtype)
    ids, feats = run.inputs(3, 6, seed=2)
    rows = [list(range(5)), [0, 1], []]

    def go(fast):
        cache = BatchCache.for_model(run.model, 16, 3)
        _, depth, mask = causal_block([r or [0] for r in rows], "cpu")  # [3, 5] ...
        pos, key_mask = begin_block(cache, depth, mask)
        first = run(ids[:, :5], feats[:, :5], cache, pos, key_mask, 0, fast)
        cache.keep_block([list(range(len(r))) for r in rows])
        pos, key_mask = begin_block(cache, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, 1, dtype=torch.bool))
        second = run(ids[:, 5:], feats[:, 5:], cache, pos, key_mask, 0, fast)
        cache.keep_block([[0]] * 3)
        valid = [(b, s) for b, r in enumerate(rows) for s in range(len(r) + 1)]  # slots each row holds
        kv = [torch.stack([buf[b, :, s] for b, s in valid]) for layer in cache.layers
              for buf in (layer.keys, layer.values)]
        real = [first[0][0, :5], first[0][1, :2], first[1][0, :5], first[1][1, :2]]  # rows' real block tokens
        return real + list(second) + kv

    for fast, slow in zip(*_both(run, go)):
        _same(fast, slow, dtype)


def test_fused_weights_follow_the_model_and_a_view_scores_its_own_vocabulary():
    """In-place changes of the weights (training) and a new dtype reach the lean forward; a draft-vocabulary
    view (a shallow copy of the model) gets its own forward and its reduced LM head."""
    run = Runner("eagle2", "llama", torch.float32)
    ids, feats = run.inputs(1, 4, seed=3)

    def check(dtype, model=None):
        outs = []
        for fast in (True, False):
            cache = SpecDecCache.for_model(run.model, 8)
            pos = torch.arange(4)[None]
            if model is None:
                outs.append(run(ids, feats.to(dtype), cache, pos, None, 0, fast)[0])
            else:
                outs.append(forward_lm(model, ids, cache, pos, None, 0, fast)[0])
        _same(outs[0], outs[1], dtype)
        return outs[0]

    check(torch.float32)
    with torch.no_grad():
        run.model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        run.model.model.layers[0].mlp.up_proj.weight.add_(0.05)
    check(torch.float32)
    run.head.bind(pair("llama")[0], torch.bfloat16)
    check(torch.bfloat16)

    draft = copy.deepcopy(pair("llama")[1])
    fast_decoder(draft)  # built before the view is made: the view must not reuse it blindly
    view = with_draft_vocab(draft, torch.arange(0, 64, 2))
    assert fast_decoder(view) is not fast_decoder(draft)
    run.model = draft
    logits = check(torch.float32, view)
    assert torch.isinf(logits[..., 1::2]).all() and torch.isfinite(logits[..., 0:64:2]).all()


def test_models_it_does_not_know_take_their_own_forward():
    target = pair("qwen2")[0]
    config = dict(target.config.to_dict(), use_sliding_window=True, sliding_window=4, max_window_layers=0)
    config.pop("layer_types", None)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**config))
    assert "sliding" in unsupported(model) and fast_decoder(model) is None
    with pytest.raises(ValueError, match="sliding"):
        FastDecoder(model)
    cache = SpecDecCache.for_model(model, 8)
    logits, _ = forward_lm(model, torch.tensor([[3, 4]]), cache, torch.arange(2)[None])  # the model's own forward
    assert logits.shape == (1, 2, model.config.vocab_size) and cache.length == 2


DRAFTERS = {
    "eagle_chain": lambda fast: EagleDrafter(trained_head("llama", "eagle3"), num_speculative_tokens=3, fast_forward=fast),
    "eagle_dynamic": lambda fast: EagleDrafter(trained_head("llama", "eagle3"), budget=8, num_speculative_tokens=4,
                                               fast_forward=fast),
    "draft_chain": lambda fast: DraftModelDrafter(noisy_copy("llama"), 3, fast_forward=fast),
    "draft_tree": lambda fast: DraftModelDrafter(noisy_copy("llama"), tree="binary", fast_forward=fast),
    "draft_dynamic": lambda fast: DraftModelDrafter(noisy_copy("llama"), budget=8, fast_forward=fast),
    "layer_skip": lambda fast: LayerSkipDrafter(layers=1, num_speculative_tokens=3, fast_forward=fast),
}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_decoding_drafts_the_same_either_way(name):
    target, _, tok = pair("llama")
    rows = prompts(tok, 3, seed=11)
    runs = {}
    for fast in (True, False):
        single = [SpeculativeDecoder(target, DRAFTERS[name](fast)).generate(ids, 12) for ids in rows]
        batch = SpeculativeDecoder(target, DRAFTERS[name](fast)).generate_batch(rows, 12)
        runs[fast] = ([s.stats.accepted_per_step for s in single], [s.accepted_per_step for s in batch.row_stats])
        for i, ids in enumerate(rows):
            ref = target.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
            assert single[i].sequences.tolist() == ref.tolist() == batch.sequences[i].tolist()
    assert runs[True] == runs[False]
    assert sum(sum(a) for a in runs[True][0]) > 0  # drafts were accepted: the comparison has content


@pytest.mark.parametrize("make", [lambda v: DraftModelDrafter(pair("llama")[1], fast_forward=v),
                                  lambda v: LayerSkipDrafter(layers=1, fast_forward=v),
                                  lambda v: EagleDrafter(trained_head("llama", "eagle3"), fast_forward=v)],
                         ids=["draft_model", "layer_skip", "eagle"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_fast_forward_must_be_a_bool(make, value):
    """``bool("false")`` is True: a value that is not a bool is a config error, not a silent choice."""
    from specdec.errors import ConfigError

    with pytest.raises(ConfigError, match=r"drafter.fast_forward=.*true or false"):
        make(value)
