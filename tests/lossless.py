"""Shared machinery of the distribution tests: the exact target distribution, the chi-square test,
seeded decoding runs, and the planted bugs.

Tiny vocabulary (6 tokens), 3 generated tokens: all 216 continuations of ``PROMPT`` are scored with
the target (warped by the sampling parameters under test) and compared with seeded decoding runs
by a chi-square test at significance ``ALPHA``.

The planted bugs are :class:`~specdec.acceptance.RejectionAcceptance` with exactly one formula
overridden, so each differs from the real rule in one place:

- ``correction_from_p``: after a sampled draft is rejected, p' stays p instead of the residual
  ``norm(max(0, p' - q'))`` (so the correction is sampled from p);
- ``p_not_zeroed``: after a deterministic child x is rejected, ``p'(x)`` is not zeroed;
- ``q_not_updated``: children drawn without replacement, yet q' keeps the rejected child's mass;
- ``accept_always``: every draft is accepted.
"""
from __future__ import annotations

import functools
import itertools

import torch
from scipy.stats import chisquare

from specdec import SamplingParams, SpeculativeDecoder
from specdec.acceptance import RejectionAcceptance
from specdec.sampling import warp_probs
from specdec.stats import DecodeStats

VOCAB, NEW, RUNS, ALPHA = 6, 3, 2000, 1e-3
PROMPT = torch.tensor([[1, 2, 3, 1, 2]])
#: A prompt whose continuation a lookup drafter can guess: "4 2" recurs, and what followed it (1, p = 0.32-0.38 under
#: the peaky pair, then 4) is proposed; the n-gram, hybrid and README example drafters' distribution cells use it.
NGRAM_PROMPT = torch.tensor([[4, 2, 1, 4, 2]])

#: The settings every lossless rule is tested in.
SETTINGS = {
    "t1.0": SamplingParams(temperature=1.0),
    "t0.7_topk3": SamplingParams(temperature=0.7, top_k=3),
    "t1.0_topp0.8": SamplingParams(temperature=1.0, top_p=0.8),
}
#: Further settings, tested on a draft-model chain only (``tests/test_distribution.py``).
MORE_SETTINGS = {"t1.0_minp0.2": SamplingParams(temperature=1.0, min_p=0.2)}
ALL_SETTINGS = {**SETTINGS, **MORE_SETTINGS}


class CorrectionFromP(RejectionAcceptance):
    """Planted bug: p' is not replaced by the residual after a sampled draft is rejected."""

    def residual(self, p, q):
        return p


class PNotZeroed(RejectionAcceptance):
    """Planted bug: p'(x) is not zeroed after a deterministic child x is rejected."""

    def after_deterministic_rejection(self, p, x):
        return p


class QNotUpdated(RejectionAcceptance):
    """Planted bug: q' is not updated after a child drawn without replacement is rejected."""

    def q_without_replacement(self, q, x):
        return q


class AcceptAlways(RejectionAcceptance):
    """Planted bug: every draft is accepted."""

    def accepts(self, u, px, qx):
        return True


PLANTED_BUGS = {"correction_from_p": CorrectionFromP, "p_not_zeroed": PNotZeroed, "q_not_updated": QNotUpdated,
                "accept_always": AcceptAlways}


def exact_distribution(target, sampling: SamplingParams, prompt: torch.Tensor = PROMPT) -> dict[tuple[int, ...], float]:
    """P(x1, x2, x3 | prompt) under the warped target, by scoring every continuation."""
    seqs = list(itertools.product(range(VOCAB), repeat=NEW))
    t = prompt.shape[1]
    batch = torch.cat([prompt.repeat(len(seqs), 1), torch.tensor(seqs)], dim=1)  # [216, T + 3]
    with torch.no_grad():
        logits = target(batch).logits[:, t - 1 : t + NEW - 1]  # [216, 3, V]
    probs = warp_probs(logits, sampling)  # [216, 3, V]
    tok = torch.tensor(seqs)  # [216, 3]
    joint = probs.gather(-1, tok[..., None])[..., 0].prod(-1)  # [216]
    return {s: float(p) for s, p in zip(seqs, joint)}


@functools.cache
def cached_exact_distribution(target, setting: str, prompt: tuple[int, ...]) -> dict[tuple[int, ...], float]:
    """:func:`exact_distribution` for a named setting, computed once per process."""
    return exact_distribution(target, ALL_SETTINGS[setting], torch.tensor([prompt]))


def chi_square_pvalue(counts: dict, exact: dict, runs: int) -> float:
    """Chi-square over cells with expected count >= 5; the rest pooled into one cell. A continuation of exact
    probability 0 (past top-k or top-p) that was produced even once fails outright (0.0): pooled with rare possible
    ones, a few of them would pass."""
    if any(p == 0.0 and counts.get(seq, 0) for seq, p in exact.items()):
        return 0.0  # an impossible continuation was produced
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for seq, p in exact.items():
        if p * runs >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(p * runs)
        else:
            rest_o += counts.get(seq, 0)
            rest_e += p * runs
    if rest_e > 0.0:
        obs.append(rest_o)
        exp.append(rest_e)
    assert len(obs) >= 3, "too few cells for a chi-square test: make the distribution less peaky"
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def decode_runs(target, drafter, rule, sampling, runs: int = RUNS, prompt: torch.Tensor = PROMPT):
    """Continuation counts and merged :class:`DecodeStats` of ``runs`` decodes with seeds ``0 .. runs - 1``."""
    decoder = SpeculativeDecoder(target=target, drafter=drafter, acceptance=rule, sampling=sampling)
    counts: dict[tuple[int, ...], int] = {}
    stats = []
    for seed in range(runs):
        out = decoder.generate(prompt, max_new_tokens=NEW, seed=seed)
        seq = tuple(out.sequences[0, -NEW:].tolist())
        counts[seq] = counts.get(seq, 0) + 1
        stats.append(out.stats)
    return counts, DecodeStats.merge(stats)


def sample_counts(target, drafter, rule, sampling, runs: int = RUNS) -> dict:
    """Continuation counts of ``runs`` seeded decodes of ``PROMPT``."""
    return decode_runs(target, drafter, rule, sampling, runs)[0]


# --------------------------------------------------------------------------- the matrix of lossless cells

#: Runs per test. The real rule gets the project's standard 2000; each planted bug gets what its
#: smallest effect over the settings needs for power >= 0.99 at ALPHA (see the tests' power tables).
RUNS_FOR = {"rejection": 2000, "correction_from_p": 500, "p_not_zeroed": 500, "q_not_updated": 1000,
            "accept_always": 100}

#: The planted bugs that change the arithmetic of each drafter shape (the others leave it as it is).
BUGS_FOR_SHAPE = {
    "chain": ["correction_from_p", "accept_always"],
    "ngram": ["p_not_zeroed", "accept_always"],
    "tree_deterministic": ["p_not_zeroed", "accept_always"],
    "tree_with_replacement": ["correction_from_p", "accept_always"],
    "tree_without_replacement": ["correction_from_p", "q_not_updated", "accept_always"],
}

#: Depth-1 acceptance of the real rule must lie in this band: both the accept and the reject branch run.
ACCEPTANCE_BAND = (0.2, 0.9)


def cells(shapes: list[str]) -> list[tuple[str, str, str]]:
    """(setting, shape, rule) for every setting, every shape and the real rule plus the shape's planted bugs."""
    return [(setting, shape, rule) for setting in SETTINGS for shape in shapes
            for rule in ["rejection", *BUGS_FOR_SHAPE[shape]]]


def check_cell(target, drafter, setting: str, rule: str, prompt: torch.Tensor = PROMPT,
               runs: int | None = None) -> dict[str, float]:
    """Decode ``runs`` times (default ``RUNS_FOR[rule]``; a draft close to its target needs more for a bug to show)
    and run the chi-square test: it must pass for ``rejection`` (with depth-1 acceptance inside
    :data:`ACCEPTANCE_BAND`) and fail for a planted bug.

    Returns the p-value and the depth-1 acceptance rate (for the test report)."""
    runs = runs or RUNS_FOR[rule]
    exact = cached_exact_distribution(target, setting, tuple(prompt[0].tolist()))
    acceptance = "rejection" if rule == "rejection" else PLANTED_BUGS[rule]()
    counts, stats = decode_runs(target, drafter, acceptance, ALL_SETTINGS[setting], runs, prompt)
    pvalue, rate = chi_square_pvalue(counts, exact, runs), stats.acceptance_rate_by_depth[0]
    if rule != "rejection":
        assert pvalue < ALPHA, f"planted bug {rule} passed the chi-square test (p = {pvalue:.3g}): no power here"
    else:
        low, high = ACCEPTANCE_BAND
        assert low <= rate <= high, f"depth-1 acceptance {rate:.2f} is outside {ACCEPTANCE_BAND}: a branch barely runs"
        assert pvalue > ALPHA, f"rejection failed the chi-square test (p = {pvalue:.3g})"
    return {"pvalue": pvalue, "depth1_acceptance": rate}
