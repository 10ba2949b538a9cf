"""The verifier's forward: SDPA kernel choice, the cache keyword, attention inputs built once, and masked
attention over grouped heads."""
from __future__ import annotations

import warnings

import pytest
import torch

from specdec.cache import SpecDecCache
from tests.tiny_models import pair
from verifier import tree_forward
from verifier.verifier import attention_inputs, cache_argument


def test_forwards_never_use_cudnn_attention(monkeypatch):
    """cuDNN attention builds a plan per new KV length (tens of ms each on an H200): what made a bf16
    draft cost ~30 ms per forward on CUDA. Every SDPA call of our forwards must run with it disabled."""
    import verifier.attention

    seen = []
    sdpa = verifier.attention.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(verifier.attention, "scaled_dot_product_attention", spy)
    target = pair("llama")[0]
    cache = SpecDecCache.for_model(target, 32)
    tree_forward(target, cache, torch.tensor([[5, 9, 13, 2]]))  # causal prefill
    tree_forward(target, cache, torch.tensor([[7, 1, 2]]), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]]).bool(),
                 torch.tensor([0, 1, 1]))  # a tree
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the forward


def test_cache_keyword_follows_the_forward_signature():
    class New:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    assert cache_argument(New) == "cache" and cache_argument(Old) == "past_key_values"


def test_no_deprecation_warning_from_the_cache_keyword():
    target = pair("llama")[0]
    cache = SpecDecCache.for_model(target, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree_forward(target, cache, torch.tensor([[5, 9, 13]]))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_attention_inputs_per_backend():
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]]).bool()  # [3, 3]
    sdpa = attention_inputs("sdpa", 5, tree, None)
    assert sdpa["specdec_key_mask"].shape == (1, 1, 3, 8) and sdpa["specdec_tree_plan"] is None
    causal = attention_inputs("triton", 5, None, None)  # prefill: SDPA's causal path, no mask, no plan
    assert causal["specdec_key_mask"] is None and causal["specdec_tree_plan"] is None
    one = attention_inputs("triton", 5, torch.ones(1, 1, dtype=torch.bool), None)  # plain decoding: SDPA
    assert one["specdec_key_mask"] is None and one["specdec_tree_plan"] is None
    wide = attention_inputs("triton", 5, torch.ones(65, 65, dtype=torch.bool).tril(), None)  # past the kernel
    assert wide["specdec_key_mask"].shape == (1, 1, 65, 70) and wide["specdec_tree_plan"] is None


def test_padded_verify_blocks_decode_what_unpadded_ones_do():
    """verify_widths pads each verify block (padding sees the root and itself; nothing sees it; its slots
    are dropped by the commit): greedy chains and trees equal HF greedy, a sampled run emits what the
    unpadded run with the same seed does, the padded width is what the target ran."""
    import pytest

    from drafters import DraftModelDrafter
    from specdec import SamplingParams, SpeculativeDecoder
    from specdec.errors import ConfigError
    from tests.tiny_models import noisy_copy, prompts

    target, _, tokenizer = pair("llama")
    draft = noisy_copy("llama")
    widths = []
    original = target.forward
    target.forward = lambda *a, **k: (widths.append(k["input_ids"].shape[1]), original(*a, **k))[1]
    try:
        for p in prompts(tokenizer, n=3):
            ref = target.generate(p, do_sample=False, max_new_tokens=12, pad_token_id=0)
            for kw in ({"num_speculative_tokens": 2}, {"tree": "binary"}):
                widths.clear()
                dec = SpeculativeDecoder(target, DraftModelDrafter(draft, **kw), verify_widths=[4, 8, 32])
                assert torch.equal(dec.generate(p, max_new_tokens=12).sequences, ref)
                assert set(widths[1:]) <= {4, 8, 32}  # every verify (the prefill first) padded
            sampled = [SpeculativeDecoder(target, DraftModelDrafter(draft, num_speculative_tokens=2), "rejection",
                                          SamplingParams(temperature=1.0), verify_widths=v)
                       .generate(p, max_new_tokens=12, seed=5).sequences for v in (None, [4])]
            assert torch.equal(*sampled)
    finally:
        del target.forward
    with pytest.raises(ConfigError, match="verify_widths"):
        SpeculativeDecoder(target, DraftModelDrafter(draft, num_speculative_tokens=2), verify_widths=[0, 4])


@pytest.mark.parametrize("b, hq, hkv, n, s", [(1, 8, 2, 1, 50), (2, 12, 3, 5, 77), (3, 4, 4, 2, 9)])
def test_grouped_sdpa_equals_sdpa_over_grouped_heads(b, hq, hkv, n, s):
    """Packing each KV head's query heads into its rows (what masked GQA attention takes on a GPU) computes
    SDPA with ``enable_gqa``, for a per-row mask and for one mask shared by the batch."""
    from torch.nn.functional import scaled_dot_product_attention

    from verifier.attention import grouped_sdpa

    gen = torch.Generator().manual_seed(b * 100 + n)
    q = torch.randn(b, n, hq, 16, generator=gen).transpose(1, 2)  # [B, Hq, n, D], laid out as a model's
    k, v = torch.randn(2, b, hkv, s, 16, generator=gen)  # [B, Hkv, S, D] each
    mask = torch.rand(b, 1, n, s, generator=gen) < 0.7  # [B, 1, n, S]
    mask[..., 0] = True
    for m in (mask, mask[:1]):
        ref = scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3, enable_gqa=hq != hkv)  # [B, Hq, n, D]
        torch.testing.assert_close(grouped_sdpa(q, k, v, m, 0.3), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_grouped_sdpa_takes_the_memory_efficient_kernels_output_layout(monkeypatch):
    """On a GPU the memory-efficient kernel returns ``[B, H, M, D]`` laid out as ``[B, M, H, D]``: a plain view of
    the packed output would fail there (the CPU's kernel returns it contiguous)."""
    from verifier import attention

    real = attention.scaled_dot_product_attention
    monkeypatch.setattr(attention, "scaled_dot_product_attention",
                        lambda *a, **kw: real(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 8, 16, generator=gen).transpose(1, 2)  # [B, Hq, n, D]
    k, v = torch.randn(2, 2, 2, 40, 16, generator=gen)  # [B, Hkv, S, D] each
    mask = torch.ones(2, 1, 3, 40, dtype=torch.bool)
    ref = real(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)  # [B, n, Hq, D]
    torch.testing.assert_close(attention.grouped_sdpa(q, k, v, mask, None), ref, atol=1e-5, rtol=1e-5)


def test_a_verify_block_takes_the_smallest_width_that_holds_it():
    """``verify_widths``: a block of n tokens runs at the smallest listed width >= n (a block that fills a width
    exactly is not padded to the next one); past the widest, at n itself."""
    from verifier.verifier import Verifier

    verifier = Verifier(pair("llama")[0], verify_widths=[8, 4, 5, 4])
    assert verifier.verify_widths == (4, 5, 8)
    assert [verifier.width(n) for n in (1, 3, 4, 5, 6, 8, 9, 12)] == [4, 4, 4, 5, 8, 8, 9, 12]
    assert Verifier(pair("llama")[0]).width(6) == 6  # no widths: no padding
