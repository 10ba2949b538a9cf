"""Greedy losslessness: speculative decoding at temperature 0 must equal ``model.generate(do_sample=False)`` token
for token, EOS and ``max_new_tokens`` landing mid-step included. The helpers every greedy-equality test uses; a
drafter of one's own is tested in a file of its own with them (README: Adding a drafter)::

    from tests.greedy import cases_for, check_greedy
    from tests.tiny_models import pair

    @pytest.mark.parametrize("arch", ["llama", "qwen2"])
    def test_my_drafter_equals_plain_greedy(arch):
        check_greedy(pair(arch)[0], MyDrafter(num_speculative_tokens=4), cases_for(arch))
"""
from __future__ import annotations

import torch

from specdec import SamplingParams, SpeculativeDecoder
from tests.tiny_models import pair, prompts

#: One greedy case: ``(input_ids [1, T], max_new_tokens, eos_token_id, reference [1, T + new])``.
Case = tuple[torch.Tensor, int, int, torch.Tensor]


def greedy_reference(target, ids: torch.Tensor, max_new: int, eos: int) -> torch.Tensor:
    """``target.generate(do_sample=False)`` of ``ids [1, T]`` stopping at ``eos`` (it stays the target's EOS)."""
    target.generation_config.eos_token_id = eos
    return target.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=eos)  # [1, T + new]


def greedy_cases(target, prompt_list: list[torch.Tensor], eos_default: int) -> list[Case]:
    """One case per prompt, ``max_new_tokens`` from 9 to 31 (so long chains end mid-step); every other prompt stops
    on a token its plain greedy continuation emits, so EOS lands mid-step too. The target's EOS is
    ``eos_default`` afterwards."""
    cases = []
    for i, ids in enumerate(prompt_list):
        max_new, eos = 9 + (i * 7) % 23, eos_default
        if i % 2:
            free = greedy_reference(target, ids, max_new, eos_default)[0, ids.shape[1]:]  # [new]
            eos = int(free[min(len(free) - 1, 3 + i % 5)])
        cases.append((ids, max_new, eos, greedy_reference(target, ids, max_new, eos)))
    target.generation_config.eos_token_id = eos_default
    return cases


def cases_for(arch: str, n: int = 20) -> list[Case]:
    """:func:`greedy_cases` of ``n`` prompts (seed 1) for the tiny random pair ``arch`` (``llama``, ``qwen2``)."""
    target, _, tok = pair(arch)
    return greedy_cases(target, prompts(tok, n, seed=1), len(tok) - 1)


def check_greedy(target, drafter, cases: list[Case], acceptance: str = "greedy") -> float:
    """Assert that decoding every case with ``drafter`` and ``acceptance`` at temperature 0 equals its reference
    and emits at most its ``max_new_tokens``; the mean tokens per target forward (tau). The target's EOS is
    restored afterwards."""
    default_eos, taus = target.generation_config.eos_token_id, []
    try:
        for ids, max_new, eos, ref in cases:
            target.generation_config.eos_token_id = eos
            decoder = SpeculativeDecoder(target=target, drafter=drafter, acceptance=acceptance,
                                         sampling=SamplingParams(temperature=0.0))
            out = decoder.generate(ids, max_new_tokens=max_new, seed=0)
            assert out.sequences.tolist() == ref.tolist(), f"{drafter.name} differs on prompt {ids.tolist()}"
            assert out.stats.new_tokens <= max_new
            taus.append(out.stats.tau)
    finally:
        target.generation_config.eos_token_id = default_eos
    return sum(taus) / len(taus)
