"""Hugging Face's assisted generation as the benchmarks run it (experiments.hf_generate.hf_assisted): a fixed draft
length and a confidence threshold are what each call asks for, whatever an earlier call set on the draft.

The draft is an exact copy of the tiny target, so every drafted token is accepted and the number of target forwards
shows how many tokens each step drafted; its near-uniform distributions (257 tokens) never reach a confidence of 0.99.
"""
from __future__ import annotations

import copy

import torch

from experiments.hf_generate import hf, hf_assisted
from tests.tiny_models import pair

PROMPT = torch.tensor([[5, 9, 13, 2, 7]])  # [1, 5]


def _target_forwards(target, run) -> tuple[int, torch.Tensor]:
    """``(target forwards, output ids [1, T + new])`` of one ``run(PROMPT)``."""
    calls = []
    hook = target.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        out = run(PROMPT)[0]
    finally:
        hook.remove()
    return len(calls), out


def test_assisted_generation_drafts_a_constant_k_and_stops_at_the_confidence_threshold():
    """k=3 with every draft accepted: 4 tokens per target forward (6 forwards for 24 tokens), the same number at each
    step (not HF's growing heuristic schedule); a threshold of 0.99 stops each draft after its first token (12
    forwards); and a later call without one drafts k again. Every run emits plain greedy's tokens."""
    target = pair("llama")[0]
    draft = copy.deepcopy(target)
    expected = hf(target, 24)(PROMPT)[0]  # [1, 29]
    for confidence, forwards in ((0.0, 6), (0.99, 12), (0.0, 6)):
        n, out = _target_forwards(target, hf_assisted(target, draft, 24, 3, confidence))
        assert n == forwards and torch.equal(out, expected), (confidence, n)
