"""Ties and extremes of the sampling warps (specdec.sampling.warp_probs) that random logits never hit: a token whose
probability sits exactly at the top-p or min-p boundary, and a top-p so small that only the rounding of the
cumulative sum separates the most likely token from the rest. Each matches Hugging Face's warpers."""
from __future__ import annotations

import torch

from specdec import SamplingParams
from specdec.sampling import warp_probs


def _hf(logits: torch.Tensor, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Hugging Face's top-p then min-p warping of ``logits [B, V]`` at temperature 1, as probabilities."""
    from transformers.generation.logits_process import LogitsProcessorList, MinPLogitsWarper, TopPLogitsWarper

    warpers = ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else [])
    return LogitsProcessorList(warpers)(None, logits.clone()).softmax(-1)


def test_top_p_keeps_the_smallest_set_that_reaches_it_when_the_boundary_is_exact():
    """Four equally likely tokens and top_p 0.75: three of them reach 0.75 exactly, so one is dropped (the smallest
    set whose probability reaches top_p, as HF's ``cumsum <= 1 - top_p``)."""
    logits = torch.zeros(1, 4)  # [1, 4]: each token 0.25
    probs = warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.75))  # [1, 4]
    assert int((probs > 0).sum()) == 3 == int((_hf(logits, top_p=0.75) > 0).sum())
    assert torch.allclose(probs[probs > 0], torch.full((3,), 1 / 3))


def test_min_p_keeps_the_tokens_exactly_min_p_times_as_likely_as_the_top_one():
    """``min_p`` keeps the tokens *at least* ``min_p`` times as likely as the most likely one: with min_p 1.0 every
    token tied for the top stays (none is dropped, the distribution is not NaN)."""
    logits = torch.tensor([[2.0, 2.0, 0.0]])  # [1, 3]
    probs = warp_probs(logits, SamplingParams(temperature=1.0, min_p=1.0))  # [1, 3]
    assert torch.equal(probs, torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.equal(probs > 0, _hf(logits, min_p=1.0) > 0)


def test_a_tiny_top_p_keeps_the_most_likely_token():
    """With top_p far below any token's probability, ``1 - top_p`` rounds to 1 in float32 and the cumulative sum
    reaches it at the last (most likely) token too: that token is always kept, so the warp is a one-hot, not NaN."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))  # [4, V]
    probs = warp_probs(logits, SamplingParams(temperature=1.0, top_p=1e-8))  # [4, V]
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())
