"""Greedy speculative decoding must equal ``model.generate(do_sample=False)`` token for token."""
from __future__ import annotations

import copy

import pytest
import torch

from drafters import DraftModelDrafter, NGramDrafter, NoDrafter
from specdec import SamplingParams, SpeculativeDecoder
from tests.tiny_models import noisy_copy, pair, prompts

ARCHS = ["llama", "qwen2"]
KS = list(range(1, 9))


def _reference(target, ids, max_new, eos):
    target.generation_config.eos_token_id = eos
    return target.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=eos)


def _cases(arch):
    """20 prompts; every other one has EOS set to a token that appears mid-continuation."""
    target, _, tok = pair(arch)
    default_eos = len(tok) - 1
    cases = []
    for i, ids in enumerate(prompts(tok, 20, seed=1)):
        max_new = 9 + (i * 7) % 23  # ends mid-step for long chains
        eos = default_eos
        if i % 2:
            free = _reference(target, ids, max_new, default_eos)[0, ids.shape[1]:]
            eos = int(free[min(len(free) - 1, 3 + i % 5)])  # stop on a token plain decoding emits
        cases.append((ids, max_new, eos, _reference(target, ids, max_new, eos)))
    target.generation_config.eos_token_id = default_eos
    return cases


@pytest.fixture(scope="module", params=ARCHS)
def arch_cases(request):
    return request.param, _cases(request.param)


def _check_all(target, drafter, cases, acceptance="greedy"):
    default_eos = target.generation_config.eos_token_id
    try:
        for ids, max_new, eos, ref in cases:
            target.generation_config.eos_token_id = eos
            dec = SpeculativeDecoder(target=target, drafter=drafter, acceptance=acceptance,
                                     sampling=SamplingParams(temperature=0.0))
            out = dec.generate(ids, max_new_tokens=max_new, seed=0)
            assert out.sequences.tolist() == ref.tolist(), f"{drafter.name} differs on prompt {ids.tolist()}"
            assert out.stats.new_tokens <= max_new
    finally:
        target.generation_config.eos_token_id = default_eos


def test_eos_cases_really_stop_early(arch_cases):
    _, cases = arch_cases
    early = sum(ref.shape[1] - ids.shape[1] < max_new for ids, max_new, _, ref in cases)
    assert early >= 5, "the EOS cases must stop before max_new_tokens"


def test_autoregressive_baseline(arch_cases):
    arch, cases = arch_cases
    _check_all(pair(arch)[0], NoDrafter(), cases)


@pytest.mark.parametrize("k", KS)
def test_draft_model_chain(arch_cases, k):
    arch, cases = arch_cases
    target, random_draft, _ = pair(arch)
    _check_all(target, DraftModelDrafter(noisy_copy(arch), num_speculative_tokens=k), cases)
    if k in (1, 4, 8):
        _check_all(target, DraftModelDrafter(target, num_speculative_tokens=k), cases)  # every draft accepted
        _check_all(target, DraftModelDrafter(random_draft, num_speculative_tokens=k), cases)  # almost none


@pytest.mark.parametrize("k", [3, 5])
def test_bf16_draft_of_fp32_target(arch_cases, k):
    """A draft run in another precision (model.draft_dtype) changes acceptance, never the output."""
    arch, cases = arch_cases
    target = pair(arch)[0]
    draft = copy.deepcopy(noisy_copy(arch)).to(torch.bfloat16)
    _check_all(target, DraftModelDrafter(draft, num_speculative_tokens=k), cases)
    ids, max_new, _, _ = cases[0]
    out = SpeculativeDecoder(target, DraftModelDrafter(draft, num_speculative_tokens=k)).generate(ids, max_new)
    assert out.stats.draft_acceptance_rate > 0.1  # the bf16 draft still agrees with the fp32 target


@pytest.mark.parametrize("k", KS)
def test_ngram_chain(arch_cases, k):
    arch, cases = arch_cases
    _check_all(pair(arch)[0], NGramDrafter(num_speculative_tokens=k, max_ngram=3, min_ngram=1), cases)


@pytest.mark.parametrize("acceptance", ["rejection", "typical"])
def test_other_rules_reduce_to_greedy_at_temperature_zero(arch_cases, acceptance):
    arch, cases = arch_cases
    _check_all(pair(arch)[0], DraftModelDrafter(noisy_copy(arch), num_speculative_tokens=4), cases, acceptance)


def test_noisy_draft_accepts_some_but_not_all():
    target, _, tok = pair("llama")
    ids = prompts(tok, 1)[0]
    out = SpeculativeDecoder(target, DraftModelDrafter(noisy_copy("llama"), num_speculative_tokens=4)).generate(ids, 48)
    assert 0.1 < out.stats.draft_acceptance_rate < 0.95
    assert 1.0 < out.stats.tau < 5.0
    assert torch.equal(out.sequences, target.generate(ids, do_sample=False, max_new_tokens=48))


@pytest.mark.parametrize("arch", ["mistral", "gpt_neox"])
def test_more_architectures(arch):
    """Mistral and GPT-NeoX (parallel residual, partial rotary) through the same verifier."""
    target, _, tok = pair(arch)
    cases = [(ids, 20, len(tok) - 1, _reference(target, ids, 20, len(tok) - 1)) for ids in prompts(tok, 6, seed=3)]
    for k in (1, 3, 8):
        _check_all(target, DraftModelDrafter(noisy_copy(arch), num_speculative_tokens=k), cases)
        _check_all(target, NGramDrafter(num_speculative_tokens=k), cases)


@pytest.mark.parametrize("layers,k", [(1, 2), (1, 5)])
def test_layer_skip_chain(arch_cases, layers, k):
    """The target's first layer + its head as the draft (weights shared): output unchanged."""
    from drafters import LayerSkipDrafter

    arch, cases = arch_cases
    target = pair(arch)[0]
    _check_all(target, LayerSkipDrafter(layers=layers, num_speculative_tokens=k), cases)
