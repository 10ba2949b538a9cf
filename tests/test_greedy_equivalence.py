"""Greedy speculative decoding must equal ``model.generate(do_sample=False)`` token for token."""
from __future__ import annotations

import copy

import pytest
import torch

from drafters import DraftModelDrafter, NGramDrafter, NoDrafter
from specdec import SpeculativeDecoder
from tests.greedy import cases_for, check_greedy, greedy_reference
from tests.tiny_models import noisy_copy, pair, prompts

ARCHS = ["llama", "qwen2"]
KS = list(range(1, 9))


@pytest.fixture(scope="module", params=ARCHS)
def arch_cases(request):
    return request.param, cases_for(request.param)


def test_eos_cases_really_stop_early(arch_cases):
    _, cases = arch_cases
    early = sum(ref.shape[1] - ids.shape[1] < max_new for ids, max_new, _, ref in cases)
    assert early >= 5, "the EOS cases must stop before max_new_tokens"


def test_autoregressive_baseline(arch_cases):
    arch, cases = arch_cases
    check_greedy(pair(arch)[0], NoDrafter(), cases)


@pytest.mark.parametrize("k", KS)
def test_draft_model_chain(arch_cases, k):
    arch, cases = arch_cases
    target, random_draft, _ = pair(arch)
    check_greedy(target, DraftModelDrafter(noisy_copy(arch), num_speculative_tokens=k), cases)
    if k in (1, 4, 8):
        check_greedy(target, DraftModelDrafter(target, num_speculative_tokens=k), cases)  # every draft accepted
        check_greedy(target, DraftModelDrafter(random_draft, num_speculative_tokens=k), cases)  # almost none


@pytest.mark.parametrize("k", [3, 5])
def test_bf16_draft_of_fp32_target(arch_cases, k):
    """A draft run in another precision (model.draft_dtype) changes acceptance, never the output."""
    arch, cases = arch_cases
    target = pair(arch)[0]
    draft = copy.deepcopy(noisy_copy(arch)).to(torch.bfloat16)
    check_greedy(target, DraftModelDrafter(draft, num_speculative_tokens=k), cases)
    ids, max_new, _, _ = cases[0]
    out = SpeculativeDecoder(target, DraftModelDrafter(draft, num_speculative_tokens=k)).generate(ids, max_new)
    assert out.stats.draft_acceptance_rate > 0.1  # the bf16 draft still agrees with the fp32 target


@pytest.mark.parametrize("k", KS)
def test_ngram_chain(arch_cases, k):
    arch, cases = arch_cases
    check_greedy(pair(arch)[0], NGramDrafter(num_speculative_tokens=k, max_ngram=3, min_ngram=1), cases)


@pytest.mark.parametrize("acceptance", ["rejection", "typical"])
def test_other_rules_reduce_to_greedy_at_temperature_zero(arch_cases, acceptance):
    arch, cases = arch_cases
    check_greedy(pair(arch)[0], DraftModelDrafter(noisy_copy(arch), num_speculative_tokens=4), cases, acceptance)


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
    cases = [(ids, 20, len(tok) - 1, greedy_reference(target, ids, 20, len(tok) - 1)) for ids in prompts(tok, 6, seed=3)]
    for k in (1, 3, 8):
        check_greedy(target, DraftModelDrafter(noisy_copy(arch), num_speculative_tokens=k), cases)
        check_greedy(target, NGramDrafter(num_speculative_tokens=k), cases)


@pytest.mark.parametrize("layers,k", [(1, 2), (1, 5)])
def test_layer_skip_chain(arch_cases, layers, k):
    """The target's first layer + its head as the draft (weights shared): output unchanged."""
    from drafters import LayerSkipDrafter

    arch, cases = arch_cases
    target = pair(arch)[0]
    check_greedy(target, LayerSkipDrafter(layers=layers, num_speculative_tokens=k), cases)
