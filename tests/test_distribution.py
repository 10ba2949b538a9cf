"""Sampling is lossless: the output distribution of ``rejection`` equals the target's, exactly enumerated.

Tiny vocabulary (6 tokens), 3 generated tokens: all 216 continuations are scored with the target
(warped by the same sampling parameters) and compared with 2000 seeded runs by a chi-square test
at significance 1e-3. A deliberately broken rule (accept every draft) must fail the same test.
"""
from __future__ import annotations

import copy

import itertools

import pytest
import torch
from scipy.stats import chisquare

from drafters import DraftModelDrafter, NGramDrafter
from specdec import SamplingParams, SpeculativeDecoder
from specdec.acceptance import AcceptanceRule, _walk
from specdec.sampling import sample, warp_probs
from tests.tiny_models import peaky_pair

VOCAB, NEW, RUNS, ALPHA = 6, 3, 2000, 1e-3
PROMPT = torch.tensor([[1, 2, 3, 1, 2]])


class AcceptAlways(AcceptanceRule):
    """Broken on purpose: keeps every draft, then samples the bonus from p."""

    name = "accept_always"

    def __call__(self, tree, logits, sampling, generator):
        p = warp_probs(logits, sampling)
        return _walk(tree, lambda node, children: children[0], lambda node: sample(p[node + 1], generator))


def exact_distribution(target, sampling: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(x1, x2, x3 | PROMPT) under the warped target, by scoring every continuation."""
    seqs = list(itertools.product(range(VOCAB), repeat=NEW))
    t = PROMPT.shape[1]
    batch = torch.cat([PROMPT.repeat(len(seqs), 1), torch.tensor(seqs)], dim=1)  # [216, T + 3]
    with torch.no_grad():
        logits = target(batch).logits[:, t - 1 : t + NEW - 1]  # [216, 3, V]
    probs = warp_probs(logits, sampling)  # [216, 3, V]
    tok = torch.tensor(seqs)  # [216, 3]
    joint = probs.gather(-1, tok[..., None])[..., 0].prod(-1)  # [216]
    return {s: float(p) for s, p in zip(seqs, joint)}


def chi_square_pvalue(counts: dict, exact: dict, runs: int) -> float:
    """Chi-square over cells with expected count >= 5; the rest pooled into one cell."""
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for seq, p in exact.items():
        if p * runs >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(p * runs)
        else:
            rest_o += counts.get(seq, 0)
            rest_e += p * runs
    if rest_e == 0.0 and rest_o > 0:
        return 0.0  # an impossible continuation was produced
    if rest_e > 0.0:
        obs.append(rest_o)
        exp.append(rest_e)
    assert len(obs) >= 3, "too few cells for a chi-square test: make the distribution less peaky"
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def sample_counts(target, drafter, rule, sampling) -> dict:
    decoder = SpeculativeDecoder(target=target, drafter=drafter, acceptance=rule, sampling=sampling)
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(RUNS):
        seq = tuple(decoder.generate(PROMPT, max_new_tokens=NEW, seed=seed).sequences[0, -NEW:].tolist())
        counts[seq] = counts.get(seq, 0) + 1
    return counts


SETTINGS = {
    "t1.0": SamplingParams(temperature=1.0),
    "t0.7_topk3": SamplingParams(temperature=0.7, top_k=3),
    "t1.0_topp0.8": SamplingParams(temperature=1.0, top_p=0.8),
}


@pytest.fixture(scope="module")
def models():
    return peaky_pair(VOCAB)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_rejection_with_draft_model_is_lossless(models, setting):
    target, draft = models
    sampling = SETTINGS[setting]
    exact = exact_distribution(target, sampling)
    counts = sample_counts(target, DraftModelDrafter(draft, num_speculative_tokens=2), "rejection", sampling)
    assert chi_square_pvalue(counts, exact, RUNS) > ALPHA


def test_rejection_with_bf16_draft_of_fp32_target_is_lossless(models):
    """model.draft_dtype: the draft's q comes from bf16 logits; the output must still be the target's p."""
    target, draft = models
    sampling = SETTINGS["t1.0"]
    exact = exact_distribution(target, sampling)
    drafter = DraftModelDrafter(copy.deepcopy(draft).to(torch.bfloat16), num_speculative_tokens=2)
    counts = sample_counts(target, drafter, "rejection", sampling)
    assert chi_square_pvalue(counts, exact, RUNS) > ALPHA


def test_rejection_with_deterministic_ngram_drafts_is_lossless(models):
    target, _ = models
    sampling = SETTINGS["t1.0"]
    exact = exact_distribution(target, sampling)
    counts = sample_counts(target, NGramDrafter(num_speculative_tokens=2, max_ngram=2), "rejection", sampling)
    assert chi_square_pvalue(counts, exact, RUNS) > ALPHA


def test_the_test_catches_a_broken_rule(models):
    target, draft = models
    sampling = SETTINGS["t1.0"]
    exact = exact_distribution(target, sampling)
    counts = sample_counts(target, DraftModelDrafter(draft, num_speculative_tokens=2), AcceptAlways(), sampling)
    assert chi_square_pvalue(counts, exact, RUNS) < ALPHA


def test_draft_and_target_really_differ(models):
    """Guard: if p and q were nearly equal the broken-rule test could not fail."""
    target, draft = models
    with torch.no_grad():
        p = torch.softmax(target(PROMPT).logits[0, -1], -1)
        q = torch.softmax(draft(PROMPT).logits[0, -1], -1)
    assert 0.5 * (p - q).abs().sum() > 0.2
