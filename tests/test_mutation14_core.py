"""Mutation pass 14: the acceptance rules (:mod:`specdec.acceptance`), sampling parameters and warping
(:mod:`specdec.sampling`), the hybrid drafter (:mod:`drafters.hybrid`) and narrow linears
(:mod:`verifier.narrow_linear`).

Each test names the planted bug it catches: small edits (a comparison, a dropped line, a swapped argument) that the
rest of the suite let through.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drafters import DraftModelDrafter, NGramDrafter
from drafters.hybrid import HybridDrafter, behind_lookup, graft_chain, part_errors
from specdec import SamplingParams
from specdec.acceptance import RejectionAcceptance, TypicalAcceptance, checked_result, get_rule
from specdec.errors import ConfigError, SpecDecError
from specdec.sampling import warp_probs
from specdec.types import AcceptResult, DraftTree
from tests.test_acceptance_tables import U4, P, Q, assert_rows_close, batch_decide, decide
from tests.test_drafter_edges import _started
from tests.tiny_models import pair
from verifier import narrow_linear
from verifier.narrow_linear import MAX_ROWS, best_product, packed_available, use_narrow_linears

# --------------------------------------------------------------------------- acceptance


def test_siblings_drawn_with_replacement_are_each_judged_by_their_own_draft_row():
    """Planted bug: siblings drawn with replacement all used the first sibling's q (``tree.sampling == "chain"``
    only re-read each sibling's row), so a sibling drawn from another distribution (a second drafter, SpecInfer's
    multi-draft) was judged by the wrong q.

    Root children: node 0 (token 1, from Q), node 1 (token 0, from Q2 = [0.8, 0.1, 0.1, 0]). Node 0 is rejected
    (u = 0.5 > 0.1 / 0.5): p' = [0.25, 0, 0.25, 0.5]. Node 1: accept iff u * Q2(0) = 0.5 * 0.8 < 0.25: rejected
    (Q(0) = 0.3 would accept it); p'' = norm(max(0, p' - Q2)) = [0, 0, 3/13, 10/13], token 2 at u = 0.05."""
    from specdec.batch_acceptance import batch_rejection

    q2 = [0.8, 0.1, 0.1, 0.0]
    res, got = decide(RejectionAcceptance(), [-1, -1], [1, 0], [P, U4, U4], [0.5, 0.5, 0.05], [Q, q2],
                      "with_replacement")
    assert (res.accepted_nodes, res.tokens) == ([], [2])
    assert_rows_close(got, [[0, 0, 3 / 13, 10 / 13]])
    (nodes, toks), batch_got = batch_decide(batch_rejection, [-1, -1], [1, 0], [P, U4, U4], {0: 0.5, 1: 0.5}, 0.05,
                                            [Q, q2], "with_replacement")
    assert (nodes, toks) == ([], [2])
    assert_rows_close(batch_got, got)


def test_typical_acceptance_rejects_a_token_exactly_at_the_threshold():
    """Planted bug: ``p(x) >= threshold`` (Medusa's rule is strict: ``p(x) > min(epsilon, delta * exp(-H))``).

    p uniform over 4 tokens: p(x) = 0.25 exactly, H = ln 4, delta * exp(-H) = 0.75, so with epsilon = 0.25 the
    threshold is 0.25 exactly and no child is accepted; the extra token is drawn from p at the root."""
    from specdec.batch_acceptance import batch_typical

    res, got = decide(TypicalAcceptance(epsilon=0.25, delta=3.0), [-1], [1], [U4, U4], [0.6])
    assert (res.accepted_nodes, res.tokens) == ([], [2])
    assert_rows_close(got, [U4])
    (nodes, toks), _ = batch_decide(batch_typical, [-1], [1], [U4, U4], {}, 0.6, epsilon=0.25, delta=3.0)
    assert (nodes, toks) == ([], [2])


def test_a_subclass_that_changes_the_rejection_arithmetic_is_not_recorded_as_lossless():
    """Planted bug: ``__init_subclass__`` no longer reset ``lossless``, so a subclass of ``RejectionAcceptance``
    that overrides one formula inherited the lossless claim (and its run summary said so)."""
    class Bolder(RejectionAcceptance):
        def accepts(self, u, px, qx):
            return u * qx < 2 * px

    class Declared(RejectionAcceptance):
        lossless = True

    assert (Bolder.name, Bolder.lossless) == ("Bolder", False)
    assert Declared.lossless and RejectionAcceptance.lossless


def test_typical_acceptance_takes_epsilon_1_and_refuses_epsilon_or_delta_0():
    """Planted bugs: the check read ``epsilon < 1`` (refusing the documented bound ``0 < epsilon <= 1``),
    ``0 <= epsilon`` or ``delta >= 0`` (accepting a rule that keeps every token, or none by entropy)."""
    assert TypicalAcceptance(epsilon=1.0, delta=0.3).epsilon == 1.0
    for bad, said in (({"epsilon": 0.0}, r"acceptance.epsilon=0.0: .* 0 < epsilon <= 1"),
                      ({"epsilon": 2}, r"acceptance.epsilon=2: "), ({"delta": 0.0}, r"acceptance.delta=0.0: .* > 0")):
        with pytest.raises(ConfigError, match=said):  # the key named, as everywhere else
            TypicalAcceptance(**bad)


def test_a_result_with_more_than_one_extra_token_is_refused():
    """Planted bug: ``checked_result`` tested ``len(tokens) < len(nodes) + 1``, letting a rule emit two extra
    tokens (the loop would commit a token the target never verified)."""
    tree = DraftTree(tokens=torch.tensor([5, 6]), parents=torch.tensor([-1, 0]))
    rule = RejectionAcceptance()
    ok = AcceptResult(accepted_nodes=[0], tokens=[5, 7])
    assert checked_result(rule, ok, tree, 10) is ok
    with pytest.raises(SpecDecError, match=r"1 accepted nodes and 3 tokens"):
        checked_result(rule, AcceptResult(accepted_nodes=[0], tokens=[5, 7, 8]), tree, 10)


def test_a_result_naming_a_node_past_the_tree_or_a_tensor_token_is_the_rules_error():
    """Planted bugs: the node bound read ``node <= len(ids)`` (a node one past the tree raised IndexError, not the
    error naming the rule), and the type checks on the path's nodes, its tokens and the extra token were dropped (a 0-d tensor equal to
    the node, its token or a valid id passed, and fed the cache and drafters a tensor)."""
    tree = DraftTree(tokens=torch.tensor([5, 6]), parents=torch.tensor([-1, 0]))
    rule = RejectionAcceptance()
    with pytest.raises(SpecDecError, match=r"not a path of the tree \(node 2 at position 0\)"):
        checked_result(rule, AcceptResult(accepted_nodes=[2], tokens=[5, 7]), tree, 10)
    with pytest.raises(SpecDecError, match=r"whose entry 0 \(tensor\(5\)\) is not node 0's token 5"):
        checked_result(rule, AcceptResult(accepted_nodes=[0], tokens=[torch.tensor(5), 7]), tree, 10)
    with pytest.raises(SpecDecError, match=r"not a path of the tree \(node tensor\(0\) at position 0\)"):
        checked_result(rule, AcceptResult(accepted_nodes=[torch.tensor(0)], tokens=[5, 7]), tree, 10)
    with pytest.raises(SpecDecError, match=r"an extra token tensor\(7\), not an id"):
        checked_result(rule, AcceptResult(accepted_nodes=[0], tokens=[5, torch.tensor(7)]), tree, 10)


def test_a_rule_whose_call_has_no_readable_signature_is_taken_as_is():
    """Planted bug: ``check_signature`` re-raised the ValueError of a callable without a signature (a C function
    as ``__call__``), refusing a rule that may well take ``(tree, logits, sampling, rng)``."""
    class Builtin(RejectionAcceptance):
        __call__ = max  # no signature to read

    rule = Builtin()
    assert get_rule(rule) is rule


def test_sampling_refuses_an_infinite_temperature():
    """Planted bug: the temperature check lost ``math.isfinite`` (``inf >= 0``), so ``temperature=inf`` warped
    every distribution to uniform (or NaN) instead of failing."""
    with pytest.raises(ValueError, match="sampling.temperature=inf"):
        SamplingParams(temperature=float("inf"))
    assert SamplingParams(temperature=1e6).temperature == 1e6


def test_sampling_refuses_a_fractional_top_k():
    """Planted bug: ``top_k`` was checked as ``(int, float)``, so ``top_k=2.5`` passed the config check and failed
    later, inside ``torch.topk``, at the first warp."""
    with pytest.raises(ValueError, match="sampling.top_k=2.5"):
        SamplingParams(temperature=1.0, top_k=2.5)


def test_only_temperature_0_is_greedy():
    """Planted bug: ``greedy`` read ``temperature < 1e-3``, so a small positive temperature (a valid, sampled
    setting) ran the greedy rule and argmax warping instead of sampling."""
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-4).greedy
    probs = warp_probs(torch.tensor([0.0, 1e-4]), SamplingParams(temperature=1e-4))
    assert probs.tolist() == pytest.approx([1 / (1 + torch.e), torch.e / (1 + torch.e)])


# --------------------------------------------------------------------------- hybrid drafter


def test_a_hybrid_step_where_neither_part_proposes_stays_unlabelled():
    """Planted bug: ``labelled`` set ``source`` on an empty tree too, so a step with no draft at all was counted
    as the second part's (``DecodeStats.steps_by_source``; None means not counted)."""
    hybrid = _started(HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=1),
                                    NGramDrafter(num_speculative_tokens=1)), [1, 2, 3])
    tree = hybrid.propose(8)
    assert (tree.num_nodes, tree.source) == (0, None)


def test_a_hybrid_keeps_the_committed_sequence_as_its_parts_do():
    """Planted bug: ``HybridDrafter.commit`` left out ``super().commit``, so the hybrid's own ``tokens`` (the
    committed sequence every drafter keeps, read by a subclass's ``propose``) stopped at the prompt."""
    hybrid = _started(HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=1),
                                    NGramDrafter(num_speculative_tokens=1)), [1, 2, 3, 1])
    tree = hybrid.propose(8)
    hybrid.commit(AcceptResult(accepted_nodes=[0], tokens=[int(tree.tokens[0]), 9]), None)
    assert hybrid.tokens == hybrid.first.tokens == hybrid.second.tokens == [1, 2, 3, 1, 2, 9]


def test_a_parts_error_names_its_own_keys_under_the_part_and_leaves_a_parts_keys_alone():
    """Planted bug: the key pattern lost its ``(?!first\\.|second\\.)`` guard, so an error already naming a nested
    part's key (``drafter.second.heads``, from a hybrid inside a part) was renamed a second time."""
    with pytest.raises(ConfigError) as err, part_errors("first"):
        raise ConfigError("drafter.heads=0 and drafter.second.heads=0 are bad; see /ckpt/drafter.pt")
    assert str(err.value) == "drafter.first.heads=0 and drafter.second.heads=0 are bad; see /ckpt/drafter.pt"

def test_a_hybrids_step_shape_verifies_the_widest_tree_either_part_proposes():
    """Planted bug: ``step_shape`` kept the second part's ``max_nodes`` (3 for a 3-draft chain), so the verify
    was sized (and its cost curve measured) for 1 + 3 nodes while the lookup proposes 8, or 3 + 8 merged."""
    target, draft, _ = pair("llama")
    for merge, nodes in ((False, 8), (True, 11)):
        hybrid = behind_lookup(DraftModelDrafter(draft, 3), merge=merge)
        assert hybrid.max_nodes == nodes and hybrid.step_shape(target).max_nodes == nodes

def test_closing_a_hybrid_closes_both_parts():
    """Planted bug: ``HybridDrafter.close`` released only the second part, leaving a first part's resources (a
    lookup of one's own that opened something in ``start``) held after the run."""
    closed = []

    class ClosingLookup(NGramDrafter):
        def close(self):
            closed.append(self)

    first, second = ClosingLookup(num_speculative_tokens=2), ClosingLookup(num_speculative_tokens=1)
    HybridDrafter(first, second).close()
    assert closed == [first, second]

def test_only_proposals_whose_every_node_is_a_point_mass_are_merged():
    """Planted bugs: ``point_masses`` read ``.any()`` (a tree with one greedy node and one sampled node passed as
    deterministic), and ``graft_chain`` checked only the tree, not the chain grafted onto it."""
    one_hot, spread = [0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]
    mixed = DraftTree.chain(torch.tensor([1, 2]), torch.tensor([one_hot, spread]))
    plain = DraftTree.chain(torch.tensor([1, 3]))
    for tree, chain, which in ((mixed, plain, "tree"), (plain, mixed, "chain")):
        with pytest.raises(ConfigError, match=f"this step's {which} was sampled"):
            graft_chain(tree, chain)
    greedy = DraftTree.chain(torch.tensor([1]), torch.tensor([one_hot]))
    assert graft_chain(greedy, plain).tokens.tolist() == [1, 3]


def test_behind_lookup_builds_the_lookup_it_documents_beside_a_copy_of_the_drafter():
    """Planted bugs: ``behind_lookup`` set ``max_ngram=min_suffix`` (not ``max(3, min_suffix)``), ignored
    ``min_suffix`` (``min_ngram=2``), or put the drafter itself second (not a shallow copy, so the original could
    not run beside it)."""
    drafter = NGramDrafter(num_speculative_tokens=1)
    hybrid = behind_lookup(drafter, ngram_tokens=6, min_suffix=1)
    lookup = hybrid.first
    assert (lookup.k, lookup.min_ngram, lookup.max_ngram) == (6, 1, 3)
    assert (behind_lookup(drafter, min_suffix=4).first.max_ngram, behind_lookup(drafter, min_suffix=4).first.min_ngram) == (4, 4)
    assert hybrid.second is not drafter and type(hybrid.second) is NGramDrafter and hybrid.second.k == 1


# --------------------------------------------------------------------------- narrow linears
# The suite's product checks run with gradients enabled, where every NarrowLinear call takes F.linear: these run
# under no_grad, where the narrow products are used.


def _counting_linear(monkeypatch) -> list:
    """``F.linear`` as narrow_linear calls it, recording the row count of each call."""
    calls, plain = [], F.linear
    monkeypatch.setattr(narrow_linear.F, "linear", lambda x, w, b=None: calls.append(x.numel() // x.shape[-1])
                        or plain(x, w, b))
    return calls


@pytest.mark.parametrize("product", ["transposed", "packed"])
def test_narrow_products_add_the_bias_and_match_linear_without_gradients(product):
    """Planted bug: the ``transposed`` product dropped the bias (``out + self.bias``), unseen because the suite
    compared products with gradients enabled (the F.linear path)."""
    if product == "packed" and not packed_available():
        pytest.skip("this torch build / CPU cannot pack for oneDNN")
    torch.manual_seed(0)
    plain = nn.Linear(24, 40)
    narrow = copy.deepcopy(plain)
    use_narrow_linears(narrow, product=product)
    with torch.no_grad():
        for rows in (2, 3, narrow_linear.PACKED_FROM_ROWS, MAX_ROWS):
            x = torch.randn(1, rows, 24)  # [B, T, in]
            torch.testing.assert_close(narrow(x), F.linear(x, plain.weight, plain.bias), rtol=1e-5, atol=1e-5)


def test_one_row_and_more_than_max_rows_take_f_linear_and_the_rows_between_do_not(monkeypatch):
    """Planted bugs: ``1 <= rows`` (one-token decoding through the transposed product, no longer bit for bit what
    Hugging Face's ``generate`` computes) and ``rows < max_rows`` (a verify of exactly ``max_rows`` rows lost the
    narrow product)."""
    narrow = nn.Linear(8, 4)
    use_narrow_linears(narrow, product="transposed")
    calls = _counting_linear(monkeypatch)
    with torch.no_grad():
        for rows in (1, 2, MAX_ROWS, MAX_ROWS + 1):
            narrow(torch.randn(rows, 8))
    assert calls == [1, MAX_ROWS + 1]


def test_a_weight_dtype_onednn_cannot_pack_takes_the_transposed_product():
    """Planted bug: ``_packable`` asked ``packed_available()`` for float32 whatever the weight's dtype, so a float64
    model switched to ``packed`` tried to pack weights oneDNN cannot take."""
    if packed_available(torch.float64):
        pytest.skip("oneDNN packs float64 here")
    torch.manual_seed(0)
    narrow = nn.Linear(6, 5).double()
    use_narrow_linears(narrow, product="packed")
    x = torch.randn(narrow_linear.PACKED_FROM_ROWS + 2, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), F.linear(x, narrow.weight, narrow.bias))


def test_weights_off_the_cpu_are_never_packed():
    """Planted bugs: ``best_product`` and ``_packable`` left out the device check, so a model off the CPU (here on
    the meta device, standing in for a GPU) was told ``packed`` and its forward tried to pack its weights for
    oneDNN."""
    model = nn.Linear(4, 4, device="meta")
    assert best_product(model) == "transposed"
    use_narrow_linears(model, product="packed")  # switched on the CPU, then moved: the forward must not pack
    with torch.no_grad():
        assert model(torch.empty(narrow_linear.PACKED_FROM_ROWS + 2, 4, device="meta")).shape == (8, 4)


def test_bad_products_and_modes_are_refused_and_none_means_off():
    """Planted bugs: ``use_narrow_linears`` took any ``product`` (a typo switched every linear to a product no
    forward knows: the transposed path, silently), and ``narrow_mode(None)`` (an unset key) was an error."""
    with pytest.raises(ValueError, match="product 'fast' is not one of packed, transposed"):
        use_narrow_linears(nn.Linear(4, 4), product="fast")
    assert narrow_linear.narrow_mode(None) == "off" and narrow_linear.narrow_mode(False) == "off"


def test_switching_back_to_plain_linears_drops_the_packed_weights():
    """Planted bug: ``plain_linears`` kept the module's packed copy (as much memory as its weights) alive."""
    if not packed_available():
        pytest.skip("this torch build / CPU cannot pack for oneDNN")
    model = nn.Linear(8, 4)
    use_narrow_linears(model, product="packed")
    with torch.no_grad():
        model(torch.randn(narrow_linear.PACKED_FROM_ROWS, 8))
    assert narrow_linear._PACKED.get(model) is not None
    assert narrow_linear.plain_linears(model) == 1 and type(model) is nn.Linear
    assert narrow_linear._PACKED.get(model) is None

