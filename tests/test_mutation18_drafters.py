"""Mutation pass 18: the drafters' own logic (Medusa's pruning of ranks past the vocabulary, trees derived from an
eval report for exactly / more heads than used, ``medusa_tree``'s ``max_depth``; the draft model's kept drafts
after a chain's or a tree's commit, a chain's forward count, the confidence threshold's boundary). Each test names
the planted bug it catches."""
from __future__ import annotations

import pytest
import torch

from drafters import DraftModelDrafter, MedusaDrafter
from drafters.medusa import medusa_tree
from drafters.medusa_heads import MedusaHeads, save_heads
from specdec import SamplingParams
from specdec.drafting import DraftContext
from specdec.types import AcceptResult, VerifyOutput
from tests.test_tree_drafting import _bound, _propose_counting_forwards
from tests.tiny_models import noisy_copy, pair, peaky_pair, prompts

# --------------------------------------------------------------------------- Medusa: pruning and derived trees


def test_medusa_drops_nodes_ranked_at_the_vocabulary_size():
    """Over 6 tokens a node of rank 6 cannot be drafted: it is dropped with the nodes of rank < 6 kept (planted bug:
    ``max(p) <= vocab`` keeps rank 6, and the top-7 of 6 logits fails)."""
    target, _ = peaky_pair(vocab=6)
    heads = MedusaHeads.for_target(target, 2, init="random", seed=0)
    drafter = MedusaDrafter(heads, tree=[[0], [5], [6], [0, 0], [6, 0]])
    assert [list(p) for p in drafter.compiled.paths] == [[0], [5], [0, 0]]
    drafter.start(DraftContext(target, SamplingParams(), None, 32 + drafter.max_nodes))
    drafter.prefill(torch.tensor([[1, 2, 3]]), torch.randn(2, target.config.hidden_size))
    assert drafter.propose(max_depth=4).num_nodes == 3


def test_an_eval_report_for_exactly_the_heads_used_shapes_the_tree(tmp_path):
    """Rank accuracies measured for as many heads as the drafter uses give its tree (planted bug: ``len(acc) >
    num_heads`` falls back to the default accuracies unless the report has more heads than used)."""
    target = pair("llama")[0]
    heads = MedusaHeads.for_target(target, 3, init="random", seed=0)
    acc = [[0.1, 0.8, 0.05], [0.9, 0.05], [0.7]]  # rank 1 best: the fallback's tree grows under rank 0
    save_heads(heads, tmp_path, evaluation={"rank_accuracy": acc})
    drafter = MedusaDrafter(str(tmp_path), num_heads=3, tree_nodes=5)
    assert drafter.tree_paths() == medusa_tree(acc, 5)
    assert [1, 0, 0] in drafter.tree_paths()  # deep under rank 1: the fallback's tree goes deep under rank 0


def test_an_eval_report_for_more_heads_than_used_shapes_a_tree_of_the_heads_used(tmp_path):
    """With 2 of 4 measured heads in use, the tree is derived from the first 2 heads' accuracies and keeps all its
    ``tree_nodes`` nodes (planted bug: deriving it from all 4 puts nodes deeper than 2, which are then dropped)."""
    target = pair("llama")[0]
    acc = [[0.9, 0.05], [0.9, 0.05], [0.9, 0.05], [0.9, 0.05]]
    save_heads(MedusaHeads.for_target(target, 4, init="random", seed=0), tmp_path, evaluation={"rank_accuracy": acc})
    drafter = MedusaDrafter(str(tmp_path), num_heads=2, tree_nodes=6)
    assert drafter.tree_paths() == medusa_tree(acc[:2], 6)
    assert drafter.compiled.num_nodes == 6 and drafter.compiled.max_depth == 2


def test_medusa_tree_max_depth_keeps_that_many_heads():
    """``max_depth=2`` limits the tree to the first two heads, both used (planted bug: slicing ``[:max_depth - 1]``
    keeps one head, a one-level tree)."""
    acc = [[0.9, 0.05], [0.9, 0.05], [0.9, 0.05]]
    paths = medusa_tree(acc, 6, max_depth=2)
    assert paths == medusa_tree(acc[:2], 6) and max(map(len, paths)) == 2
    assert max(map(len, medusa_tree(acc, 6, max_depth=1))) == 1


# --------------------------------------------------------------------------- draft model: kept drafts of a chain


@pytest.mark.parametrize("accepted", [0, 2, 4])
def test_a_chains_commit_keeps_the_fed_accepted_drafts_in_the_draft_cache(accepted):
    """After a 4-chain, the draft cache keeps the accepted drafts it has fed (at most 3: the last draft is never
    fed), so the next step feeds only what it has not seen (planted bug: truncating to the committed prefix
    re-feeds every accepted draft)."""
    target, _, tok = pair("llama")
    ids = prompts(tok, 1)[0]
    drafter = DraftModelDrafter(noisy_copy("llama"), num_speculative_tokens=4)
    _bound(drafter, target, ids)
    tree = drafter.propose(max_depth=8)
    assert tree.num_nodes == 4 and drafter.cache.length == ids.shape[1] + 3
    nodes = list(range(accepted))
    result = AcceptResult(accepted_nodes=nodes, tokens=[int(tree.tokens[n]) for n in nodes] + [7])
    drafter.commit(result, VerifyOutput(logits=torch.zeros(5, 257), hidden=None))
    assert drafter.cache.length == ids.shape[1] + min(accepted, 3)
    calls = []
    handle = drafter.model.get_input_embeddings().register_forward_hook(lambda m, a, out: calls.append(a[0].shape[1]))
    try:
        drafter.propose(max_depth=1)
    finally:
        handle.remove()
    assert calls == [accepted + 1 - min(accepted, 3)]  # the catch-up: the unfed drafts and the correction


def test_a_draft_exactly_as_likely_as_the_threshold_does_not_stop_the_chain():
    """The chain stops after a draft *below* the confidence threshold; one exactly at it goes on (planted bug: ``<=``
    stops it too). Uniform logits over 4 tokens give probability 0.25 exactly."""
    drafter = DraftModelDrafter(noisy_copy("llama"), num_speculative_tokens=4, confidence_threshold=0.25)
    logits, q = torch.zeros(2, 4), torch.full((2, 4), 0.25)
    assert drafter.unsure(logits, q, torch.tensor([0, 3]), SamplingParams()).tolist() == [False, False]
    below = torch.tensor([[0.0, 0.0, 0.0, 1e-3]] * 2)  # tokens 0-2 just under 0.25
    assert drafter.unsure(below, q, torch.tensor([0, 3]), SamplingParams()).tolist() == [True, False]
    assert drafter.unsure(logits, q, torch.tensor([1]), SamplingParams(temperature=1.0)).tolist() == [False]


def _first_forward_widths(drafter, max_depth: int) -> list[int]:
    """The token count of every draft-model forward one ``propose`` runs."""
    widths = []
    handle = drafter.model.get_input_embeddings().register_forward_hook(lambda m, a, out: widths.append(a[0].shape[1]))
    try:
        drafter.propose(max_depth=max_depth)
    finally:
        handle.remove()
    return widths


def test_a_chain_runs_one_forward_per_draft_but_the_last():
    """A k-chain costs the catch-up forward and k - 1 one-token forwards: the last draft is never fed (planted
    bug: feeding it too, one wasted forward per step)."""
    target, _, tok = pair("llama")
    draft = noisy_copy("llama")
    drafter = DraftModelDrafter(draft, num_speculative_tokens=4)
    ids = prompts(tok, 1)[0]
    _bound(drafter, target, ids)
    tree, calls = _propose_counting_forwards(drafter, draft, max_depth=8)
    assert tree.num_nodes == 4 and calls == 4 and drafter.cache.length == ids.shape[1] + 3


def test_after_a_tree_commit_the_next_step_feeds_only_the_unseen_tokens():
    """A committed tree is forgotten: its accepted fed nodes stay compacted in the draft cache and the next step's
    catch-up feeds only the correction token (planted bug: keeping the last tree's prefix makes the next proposal
    truncate the cache back to before the root, re-feeding the root and the accepted drafts every step)."""
    target, _, tok = pair("llama")
    drafter = DraftModelDrafter(noisy_copy("llama"), tree="binary")
    ids = prompts(tok, 1)[0]
    _bound(drafter, target, ids)
    tree = drafter.propose(max_depth=8)
    path = [0, int((tree.parents == 0).nonzero()[0])]  # the first root child and its first child: both fed
    result = AcceptResult(accepted_nodes=path, tokens=[int(tree.tokens[n]) for n in path] + [7])
    drafter.commit(result, VerifyOutput(logits=torch.zeros(1 + tree.num_nodes, 257), hidden=None))
    assert drafter.cache.length == ids.shape[1] + 2
    widths = _first_forward_widths(drafter, max_depth=8)
    assert widths[0] == 1  # the correction token (the new root) only
