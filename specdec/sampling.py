"""Sampling parameters and the one warping function shared by drafters and acceptance rules.

The draft distribution q and the target distribution p must be warped by the *same*
parameters before an acceptance rule compares them (vLLM issue 42744 is what happens otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Temperature / top-k / top-p / min-p. ``temperature=0`` means greedy decoding.

    Attributes:
        temperature: 0 for greedy (argmax), else the softmax temperature (> 0).
        top_k: keep the k most likely tokens; 0 disables.
        top_p: keep the smallest set of tokens whose probability reaches top_p; 1.0 disables.
        min_p: keep the tokens at least ``min_p`` times as likely as the most likely one (after top-k and
            top-p); 0 disables.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"sampling.temperature={self.temperature!r}: use 0 for greedy or a finite value > 0")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"sampling.top_k={self.top_k!r}: use 0 to disable or a positive integer")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling.top_p={self.top_p!r}: use a value in (0, 1]; 1.0 disables")
        if not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0):
            raise ValueError(f"sampling.min_p={self.min_p!r}: use a value in [0, 1]; 0 disables")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits ``[..., V]`` into the warped distribution ``[..., V]`` (float32).

    Greedy gives a one-hot on the argmax, so that every acceptance rule reduces to greedy
    matching at temperature 0. Order: temperature, top-k, top-p, then min-p (as in HF generate).
    """
    logits = logits.float()
    if params.greedy:
        out = torch.zeros_like(logits)  # [..., V]
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)  # [..., V]
        cum = sorted_logits.softmax(-1).cumsum(-1)  # [..., V]
        drop_sorted = cum <= (1.0 - params.top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)  # [..., V]
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits.softmax(-1)


def draft_confidence(logits: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The draft's probability of its own ``tokens [...]`` (what a chain's confidence threshold compares):
    under the warped distribution ``q [..., V]`` they were drawn from, or at temperature 0, where ``q``
    is one-hot, under ``softmax(logits [..., V])`` (as Hugging Face's ``assistant_confidence_threshold``)."""
    dist = logits.float().softmax(-1) if params.greedy else q  # [..., V]
    return dist.gather(-1, tokens[..., None])[..., 0]  # [...]
