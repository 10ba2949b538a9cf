"""Literal tables for the acceptance arithmetic, in the style of vLLM's rejection-sampler tests.

Each row gives a tree, the target distribution p at the root and at every node, the draft
distribution q each node was sampled from (none for deterministic children), the uniform draws u
the rule makes (in order), and the accepted path, emitted tokens and distributions the
recovered / bonus token is drawn from, all computed by hand. The draws are scripted through the
rule's ``draw_uniform`` / ``draw_token``: ``draw_token`` records the distribution it is given and
returns its inverse-CDF token at the next scripted u. Every scripted draw must be used, so a row
also fixes how many draws the rule makes.

Vocabulary of 4 unless noted. Most rows share the root's ``P = [0.4, 0.1, 0.3, 0.2]`` and the draft
``Q = [0.3, 0.5, 0.2, 0.0]``: ``max(0, P - Q) = [0.1, 0, 0.1, 0.2]``, so the residual after
rejecting a draw from Q is ``[0.25, 0, 0.25, 0.5]``.
"""
from __future__ import annotations

import math

import pytest
import torch

from specdec import SamplingParams
from specdec.acceptance import GreedyAcceptance, RejectionAcceptance, TypicalAcceptance
from specdec.rng import KeyedRandom
from specdec.types import DraftTree
from tests.lossless import PLANTED_BUGS

P = [0.4, 0.1, 0.3, 0.2]
Q = [0.3, 0.5, 0.2, 0.0]
U4 = [0.25, 0.25, 0.25, 0.25]
T1 = SamplingParams(temperature=1.0)


def scripted(rule, us: list[float]):
    """``rule`` with its draws taken from ``us``; returns it and the list ``draw_token`` appends to."""
    draws, drawn_from = iter(us), []

    def draw_token(probs, rng):
        drawn_from.append(probs)
        cdf = probs.cumsum(0)  # [V]
        return min(int(torch.searchsorted(cdf, torch.tensor(next(draws)), right=True)), probs.shape[0] - 1)

    rule.draw_uniform = lambda rng, node: next(draws)
    rule.draw_token = draw_token
    rule.unused_draws = lambda: list(draws)
    return rule, drawn_from


def decide(rule, parents, tokens, p_rows, us, q_rows=None, mode="deterministic", sampling=T1, temperature=1.0):
    """Run ``rule`` on the tree with target rows ``p_rows`` ([root] + one per node) and scripted ``us``."""
    tree = DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents),
                     draft_probs=None if q_rows is None else torch.tensor(q_rows), sampling=mode)
    logits = temperature * torch.tensor(p_rows).log()  # [1 + N, V]: warping at `temperature` gives p back
    rule, drawn_from = scripted(rule, us)
    result = rule(tree, logits, sampling, None)
    assert rule.unused_draws() == [], "the rule made fewer draws than the table says"
    return result, [d.tolist() for d in drawn_from]


def assert_rows_close(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-6)


# --------------------------------------------------------------------------- rejection: chains
# (tokens, q rows, p rows, us) -> (accepted nodes, emitted tokens, distributions drawn from)

CHAIN = [
    pytest.param([1], [Q], [P, U4], [0.1, 0.6], [0], [1, 2], [U4],
                 id="accept: u=0.1 < p/q=0.1/0.5; leaf -> bonus from p at the node"),
    pytest.param([1], [Q], [P, U4], [0.3, 0.3], [], [2], [[0.25, 0, 0.25, 0.5]],
                 id="reject: u=0.3 > 0.2; recovered from norm(max(0, p - q))"),
    pytest.param([0], [Q], [P, U4], [0.99, 0.1], [0], [0, 0], [U4],
                 id="p > q: accepted whatever u"),
    pytest.param([0, 3], [Q, [0.1, 0.1, 0.1, 0.7]], [P, U4, U4], [0.99, 0.5, 0.9], [0], [0, 2],
                 [[1 / 3, 1 / 3, 1 / 3, 0]],
                 id="second draft rejected: u=0.5 > 0.25/0.7; residual max(0, 1/4 - q)=[.15,.15,.15,0]"),
    pytest.param([0, 3], [Q, [0.1, 0.1, 0.1, 0.7]], [P, U4, U4], [0.99, 0.3, 0.8], [0, 1], [0, 3, 3], [U4],
                 id="both accepted: u=0.3 < 0.357; bonus from p at the leaf"),
]


@pytest.mark.parametrize("tokens, q_rows, p_rows, us, accepted, emitted, drawn_from", CHAIN)
def test_rejection_on_a_sampled_chain(tokens, q_rows, p_rows, us, accepted, emitted, drawn_from):
    parents = list(range(-1, len(tokens) - 1))
    res, got = decide(RejectionAcceptance(), parents, tokens, p_rows, us, q_rows, "with_replacement")
    assert (res.accepted_nodes, res.tokens) == (accepted, emitted)
    assert_rows_close(got, drawn_from)


# --------------------------------------------------------------------------- rejection: sibling children
# Root children: node 0 (token 1), node 1 (token 0), both drawn from Q. After node 0 is rejected
# (u=0.5 > 0.1/0.5) p' = [0.25, 0, 0.25, 0.5]. For node 1 (token 0):
# - with replacement q' = Q: accept w.p. 0.25/0.3 = 0.833; on rejection
#   p'' = norm(max(0, p' - Q)) = norm([0, 0, 0.05, 0.5]) = [0, 0, 1/11, 10/11];
# - without replacement q' = norm(Q with token 1 zeroed) = [0.6, 0, 0.4, 0]: accept w.p. 0.25/0.6 = 0.417;
#   on rejection p'' = norm(max(0, p' - q')) = norm([0, 0, 0, 0.5]) = [0, 0, 0, 1].

SIBLINGS = [
    pytest.param("with_replacement", [0.5, 0.6, 0.3], [1], [0, 1], [U4], id="wr: u=0.6 < 0.833 accepts node 1"),
    pytest.param("with_replacement", [0.5, 0.9, 0.05], [], [2], [[0, 0, 1 / 11, 10 / 11]],
                 id="wr: both rejected, recovered from [0, 0, 1/11, 10/11]"),
    pytest.param("without_replacement", [0.5, 0.6, 0.05], [], [3], [[0, 0, 0, 1]],
                 id="wor: u=0.6 > 0.417 rejects node 1, recovered from [0, 0, 0, 1]"),
    pytest.param("without_replacement", [0.5, 0.4, 0.8], [1], [0, 3], [U4], id="wor: u=0.4 < 0.417 accepts node 1"),
]


@pytest.mark.parametrize("mode, us, accepted, emitted, drawn_from", SIBLINGS)
def test_rejection_on_sampled_siblings(mode, us, accepted, emitted, drawn_from):
    res, got = decide(RejectionAcceptance(), [-1, -1], [1, 0], [P, U4, U4], us, [Q, Q], mode)
    assert (res.accepted_nodes, res.tokens) == (accepted, emitted)
    assert_rows_close(got, drawn_from)


# --------------------------------------------------------------------------- rejection: deterministic children
# Root children: node 0 (token 2), node 1 (token 0); node 2 (token 3) and node 3 (token 1) under node 1.
# Node 0: accept w.p. p(2) = 0.3; on rejection p' = norm([0.4, 0.1, 0, 0.2]) = [4/7, 1/7, 0, 2/7].
# Node 1: accept w.p. p'(0) = 4/7 = 0.571; on rejection p'' = norm([0, 0.1, 0, 0.2]) = [0, 1/3, 0, 2/3].
# Under node 1, p = [0.1, 0.2, 0.3, 0.4]: node 2 (token 3) w.p. 0.4; then p' = [1/6, 1/3, 1/2, 0]; node 3
# (token 1) w.p. 1/3; then p'' = [1/4, 0, 3/4, 0].

DET_PARENTS, DET_TOKENS = [-1, -1, 1, 1], [2, 0, 3, 1]
DET_P = [P, U4, [0.1, 0.2, 0.3, 0.4], U4, U4]
DETERMINISTIC = [
    pytest.param([0.2, 0.9], [0], [2, 3], [U4], id="u=0.2 < 0.3 accepts node 0 (a leaf): bonus"),
    pytest.param([0.5, 0.6, 0.5], [], [3], [[0, 1 / 3, 0, 2 / 3]],
                 id="u=0.6 > 4/7 rejects node 1 too: recovered from [0, 1/3, 0, 2/3]"),
    pytest.param([0.5, 0.55, 0.5, 0.3, 0.9], [1, 3], [0, 1, 3], [U4],
                 id="node 1 (0.55 < 4/7), then node 3 after node 2 fails (0.3 < 1/3)"),
    pytest.param([0.5, 0.55, 0.5, 0.4, 0.3], [1], [0, 2], [[0.25, 0, 0.75, 0]],
                 id="node 1, then both its children rejected: recovered from [1/4, 0, 3/4, 0]"),
]


@pytest.mark.parametrize("us, accepted, emitted, drawn_from", DETERMINISTIC)
def test_rejection_on_deterministic_children(us, accepted, emitted, drawn_from):
    res, got = decide(RejectionAcceptance(), DET_PARENTS, DET_TOKENS, DET_P, us)
    assert (res.accepted_nodes, res.tokens) == (accepted, emitted)
    assert_rows_close(got, drawn_from)


def test_the_formulas_on_their_own():
    """The residual and q updates, one call each, on the module's P and Q."""
    rule = RejectionAcceptance()
    p, q = torch.tensor(P), torch.tensor(Q)
    assert rule.residual(p, q).tolist() == pytest.approx([0.25, 0, 0.25, 0.5])
    assert rule.after_deterministic_rejection(p, 2).tolist() == pytest.approx([4 / 7, 1 / 7, 0, 2 / 7])
    assert rule.q_without_replacement(q, 1).tolist() == pytest.approx([0.6, 0, 0.4, 0])
    assert rule.residual(p, p).tolist() == pytest.approx(P)  # nothing left: p itself, not NaN
    assert rule.accepts(0.199, 0.1, 0.5) and not rule.accepts(0.2, 0.1, 0.5) and rule.accepts(0.99, 0.4, 0.3)


@pytest.mark.parametrize("bug", list(PLANTED_BUGS))
def test_the_tables_catch_each_planted_bug(bug):
    """Every planted bug of the distribution tests changes at least one row above."""
    wrong = 0
    for rows, run in ((CHAIN, _run_chain), (SIBLINGS, _run_siblings), (DETERMINISTIC, _run_deterministic)):
        for row in rows:
            *inputs, accepted, emitted, drawn_from = row.values
            try:
                res, got = run(PLANTED_BUGS[bug](), *inputs)
            except (StopIteration, AssertionError):  # a different number of draws
                wrong += 1
                continue
            same_dists = len(got) == len(drawn_from) and all(
                g == pytest.approx(w, abs=1e-6) for g, w in zip(got, drawn_from))
            wrong += (res.accepted_nodes, res.tokens) != (accepted, emitted) or not same_dists
    assert wrong > 0


def _run_chain(rule, tokens, q_rows, p_rows, us):
    return decide(rule, list(range(-1, len(tokens) - 1)), tokens, p_rows, us, q_rows, "chain")


def _run_siblings(rule, mode, us):
    return decide(rule, [-1, -1], [1, 0], [P, U4, U4], us, [Q, Q], mode)


def _run_deterministic(rule, us):
    return decide(rule, DET_PARENTS, DET_TOKENS, DET_P, us)


# --------------------------------------------------------------------------- greedy
# Target argmax per row (root first); no draws at all.

GREEDY = [
    pytest.param([-1, 0], [2, 1], [[0, 0, 9, 0], [0, 9, 0, 0], [0, 0, 0, 9]], [0, 1], [2, 1, 3],
                 id="chain: both match, bonus = argmax at the leaf"),
    pytest.param([-1, 0], [2, 1], [[0, 0, 9, 0], [9, 0, 0, 0], [0, 0, 0, 9]], [0], [2, 0],
                 id="chain: second mismatches, correction = argmax at node 0"),
    pytest.param([-1, 0], [3, 1], [[0, 0, 9, 0], [0, 9, 0, 0], [0, 0, 0, 9]], [], [2],
                 id="chain: first mismatches"),
    pytest.param([-1, -1, 1, 1], [0, 2, 1, 3], [[0, 0, 9, 0], U4, [0, 0, 0, 9], U4, [9, 0, 0, 0]], [1, 3], [2, 3, 0],
                 id="tree: second root child, then its second child"),
]


@pytest.mark.parametrize("parents, tokens, logits, accepted, emitted", GREEDY)
def test_greedy(parents, tokens, logits, accepted, emitted):
    tree = DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents))
    rule, drawn = scripted(GreedyAcceptance(), [])
    res = rule(tree, torch.tensor(logits, dtype=torch.float32), SamplingParams(), None)
    assert (res.accepted_nodes, res.tokens, drawn) == (accepted, emitted, [])


# --------------------------------------------------------------------------- typical (T = 0.7, V = 6)
# Accept x if p(x) > min(epsilon, delta * exp(-H(p))), epsilon = 0.09, delta = 0.3, p warped at T = 0.7.
# HIGH: H = 1.6056, delta * exp(-H) = 0.0602 < epsilon: the entropy term decides (0.07 passes, 0.03 fails;
#       a rule without it would reject 0.07 against 0.09).
# LOW:  H = 0.5182, delta * exp(-H) = 0.1787 > epsilon: epsilon decides (0.10 passes, 0.05 fails;
#       a rule without epsilon would reject 0.10 against 0.1787).

HIGH = [0.30, 0.25, 0.20, 0.15, 0.07, 0.03]
LOW = [0.85, 0.10, 0.05, 0.0, 0.0, 0.0]
U6 = [1 / 6] * 6
TYPICAL = [
    pytest.param(HIGH, [5, 4], [1], [4, 3], id="high entropy: 0.03 rejected, 0.07 > 0.0602 accepted"),
    pytest.param(HIGH, [5, 3], [1], [3, 3], id="high entropy: 0.15 accepted"),
    pytest.param(LOW, [2, 1], [1], [1, 3], id="low entropy: 0.05 rejected, 0.10 > 0.09 accepted"),
    pytest.param(LOW, [2, 3], [], [0], id="low entropy: both rejected, extra token from p at the root"),
]


@pytest.mark.parametrize("p_root, tokens, accepted, emitted", TYPICAL)
def test_typical_at_temperature_0_7(p_root, tokens, accepted, emitted):
    sampling = SamplingParams(temperature=0.7)
    res, got = decide(TypicalAcceptance(), [-1, -1], tokens, [p_root, U6, U6], [0.6], sampling=sampling,
                      temperature=0.7)
    assert (res.accepted_nodes, res.tokens) == (accepted, emitted)
    assert_rows_close(got, [U6] if accepted else [p_root])


def test_typical_table_entropies_are_as_stated():
    def h(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    assert 0.3 * math.exp(-h(HIGH)) == pytest.approx(0.0602, abs=1e-4)
    assert 0.3 * math.exp(-h(LOW)) == pytest.approx(0.1787, abs=1e-4)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_typical_decisions_follow_the_formula(temperature):
    """Every token as the one child, over distributions from peaked to flat: accepted iff above the threshold.

    The entropy term must decide some of these cases, so a rule that drops it fails here.
    """
    rule, eps, delta = TypicalAcceptance(), 0.09, 0.3
    gen = torch.Generator().manual_seed(0)
    entropy_decided = 0
    for scale in [0.5, 1.0, 2.0, 4.0]:
        for _ in range(5):
            logits = torch.randn(1, 6, generator=gen) * scale  # [1, V]
            p = torch.softmax(logits[0].double() / temperature, -1).tolist()
            h = -sum(x * math.log(x) for x in p)
            thresh = min(eps, delta * math.exp(-h))
            for x in range(6):
                tree = DraftTree(tokens=torch.tensor([x]), parents=torch.tensor([-1]))
                accepted = rule(tree, logits.repeat(2, 1), SamplingParams(temperature=temperature),
                                KeyedRandom.for_seed(0)).accepted_nodes
                assert accepted == ([0] if p[x] > thresh else []), (p, x, thresh)
                entropy_decided += thresh < p[x] <= eps
    assert entropy_decided > 0


# --------------------------------------------------------------------------- the batch rules on the same tables


class ScriptedKeys:
    """A stand-in for :class:`specdec.rng.KeyedRandom` in the batch rules (one row): node ``c``'s acceptance draw
    is ``accept[c]``; the extra token is the inverse-CDF token of ``extra`` under the distribution it is drawn
    from, which is recorded."""

    def __init__(self, accept: dict[int, float], extra: float):
        self.accept, self.extra, self.drawn_from = accept, extra, []

    def uniform_per_row(self, purpose, index: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.accept.get(int(i), 0.999) for i in index.tolist()], dtype=torch.float64)

    def categorical(self, probs: torch.Tensor, purpose) -> torch.Tensor:
        self.drawn_from.append((probs[0] / probs[0].sum()).tolist())
        cdf = (probs[0] / probs[0].sum()).cumsum(0)  # [V]
        return torch.tensor([min(int(torch.searchsorted(cdf, torch.tensor(self.extra), right=True)),
                                 probs.shape[-1] - 1)])


def batch_decide(rule, parents, tokens, p_rows, accept, extra, q_rows=None, mode="deterministic", sampling=T1,
                 temperature=1.0, **kw):
    """``decide`` for a batch rule on a batch of the one tree: ``(accepted nodes, emitted tokens), drawn from``."""
    from specdec.batch_types import BatchTree

    tree = DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents),
                     draft_probs=None if q_rows is None else torch.tensor(q_rows), sampling=mode)
    batch = BatchTree.stack([tree])
    logits = temperature * torch.tensor(p_rows).log()[None]  # [1, 1 + N, V]
    keys = ScriptedKeys(accept, extra)
    out = rule(batch, logits, sampling, keys, **kw)
    return out.to_host(batch.tokens)[0], keys.drawn_from


@pytest.mark.parametrize("mode, us, accepted, emitted, drawn_from", SIBLINGS)
def test_batch_rejection_on_sampled_siblings(mode, us, accepted, emitted, drawn_from):
    """The sibling table through the batch rule (the draft's q updated between siblings drawn without replacement,
    the residual after each rejection): the same decisions and the same distribution for the extra token."""
    from specdec.batch_acceptance import batch_rejection

    (nodes, toks), got = batch_decide(batch_rejection, [-1, -1], [1, 0], [P, U4, U4], {0: us[0], 1: us[1]}, us[-1],
                                      [Q, Q], mode)
    assert (nodes, toks) == (accepted, emitted)
    assert_rows_close(got, drawn_from)


def _keyed(us: list[float]) -> tuple[dict[int, float], float]:
    """A table row's draws as the batch rule takes them: node i's acceptance draw is ``us[i]`` (the tables visit
    nodes in index order), the last one the extra token's."""
    return dict(enumerate(us[:-1])), us[-1]


@pytest.mark.parametrize("tokens, q_rows, p_rows, us, accepted, emitted, drawn_from", CHAIN)
def test_batch_rejection_on_a_sampled_chain(tokens, q_rows, p_rows, us, accepted, emitted, drawn_from):
    """The chain table through the batch rule: the same decisions, residual and bonus distributions."""
    from specdec.batch_acceptance import batch_rejection

    parents = list(range(-1, len(tokens) - 1))
    (nodes, toks), got = batch_decide(batch_rejection, parents, tokens, p_rows, *_keyed(us), q_rows, "with_replacement")
    assert (nodes, toks) == (accepted, emitted)
    assert_rows_close(got, drawn_from)


@pytest.mark.parametrize("us, accepted, emitted, drawn_from", DETERMINISTIC)
def test_batch_rejection_on_deterministic_children(us, accepted, emitted, drawn_from):
    """The deterministic-children table through the batch rule (a point mass per child, p zeroed after each
    rejection): the same decisions and the same distribution for the extra token."""
    from specdec.batch_acceptance import batch_rejection

    (nodes, toks), got = batch_decide(batch_rejection, DET_PARENTS, DET_TOKENS, DET_P, *_keyed(us))
    assert (nodes, toks) == (accepted, emitted)
    assert_rows_close(got, drawn_from)


def test_typical_thresholds_are_the_nodes_own():
    """A chain of two under typical acceptance at T = 0.7: the root is LOW (threshold 0.09), node 0 is HIGH
    (threshold 0.0602). Node 1's token has p = 0.07 at node 0: accepted against node 0's own threshold, where the
    root's would reject it. The per-node and the batch rule agree."""
    from specdec.batch_acceptance import batch_typical

    sampling = SamplingParams(temperature=0.7)
    p_rows = [LOW, HIGH, U6]
    res, got = decide(TypicalAcceptance(), [-1, 0], [1, 4], p_rows, [0.6], sampling=sampling, temperature=0.7)
    assert (res.accepted_nodes, res.tokens) == ([0, 1], [1, 4, 3])
    assert_rows_close(got, [U6])
    (nodes, toks), got = batch_decide(batch_typical, [-1, 0], [1, 4], p_rows, {}, 0.6, sampling=sampling,
                                      temperature=0.7, epsilon=0.09, delta=0.3)
    assert (nodes, toks) == ([0, 1], [1, 4, 3])
    assert_rows_close(got, [U6])


@pytest.mark.parametrize("mode", ["chain", "with_replacement", "without_replacement"])
def test_a_draft_the_draft_could_not_sample_is_accepted_only_where_the_target_can_emit_it(mode):
    """q(x) = 0 (min(1, p/q) is 1 where p(x) > 0): accepted by both rules where the target can emit x, rejected by
    both where it cannot (p(x) = 0: never emitted; the residual norm(max(0, p - q)) = [1, 0, 0, 0] gives token 0)."""
    from specdec.batch_acceptance import batch_rejection

    for p_row, accepted, emitted, drawn in (([0.4, 0.1, 0.3, 0.2], [0], [3, 2], U4),
                                            ([0.5, 0.3, 0.2, 0.0], [], [0], [1.0, 0.0, 0.0, 0.0])):
        res, got = decide(RejectionAcceptance(), [-1], [3], [p_row, U4], [0.5, 0.6], q_rows=[Q], mode=mode)
        assert (res.accepted_nodes, res.tokens) == (accepted, emitted)
        assert_rows_close(got, [drawn])
        (nodes, toks), batch_got = batch_decide(batch_rejection, [-1], [3], [p_row, U4], {0: 0.5}, 0.6, [Q], mode)
        assert (nodes, toks) == (accepted, emitted)
        assert_rows_close(batch_got, got)


def test_a_node_with_fewer_children_than_the_widest_reads_its_own_draft_distribution():
    """Root with two children drawn without replacement, node 0 with one (padded in the batch's child table): node
    2 was drawn from node 0's q (q(x) = 0.2 < p(x) = 0.25: accepted whatever u), not the root's (0.5: u = 0.7
    would reject it)."""
    from specdec.batch_acceptance import batch_rejection

    q_n0 = [0.4, 0.2, 0.2, 0.2]
    rows, q_rows = [P, U4, U4, U4], [Q, Q, q_n0]
    res, got = decide(RejectionAcceptance(), [-1, -1, 0], [0, 1, 1], rows, [0.5, 0.7, 0.6], q_rows=q_rows,
                      mode="without_replacement")
    assert (res.accepted_nodes, res.tokens) == ([0, 2], [0, 1, 2])
    (nodes, toks), batch_got = batch_decide(batch_rejection, [-1, -1, 0], [0, 1, 1], rows, {0: 0.5, 2: 0.7}, 0.6,
                                            q_rows, "without_replacement")
    assert (nodes, toks) == ([0, 2], [0, 1, 2])
    assert_rows_close(batch_got, got)
