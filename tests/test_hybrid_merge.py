"""The hybrid drafter's ``merge=True``: the lookup's chain grafted onto the second drafter's tree, one verify.

Grafting keeps shared prefixes once and the second's node numbering; greedy equals plain greedy with every kind
of deterministic second part (a draft-model chain, whose cache must follow a path that leaves its chain; a
tree preset; Medusa; an EAGLE chain), and merged steps occur in those runs; ``rejection`` over merged deterministic trees passes
the chi-square test against the exact distribution while a planted bug fails it; batches equal their batch-1
runs; a sampled proposal cannot be merged (one clear error).
"""
from __future__ import annotations

import pytest
import torch

from drafters import DraftModelDrafter, HybridDrafter, NGramDrafter
from drafters.hybrid import behind_lookup, graft_chain
from specdec import SamplingParams, SpeculativeDecoder
from specdec.errors import ConfigError
from specdec.types import DraftTree
from tests.greedy import cases_for, check_greedy
from tests.lossless import NGRAM_PROMPT, check_cell
from tests.test_hybrid import (
    _batch_second,
    _batch_setup,
    greedy_rows_match,
)
from tests.tiny_models import pair, peaky_noisy_pair


def _tree(tokens, parents) -> DraftTree:
    return DraftTree(torch.tensor(tokens), torch.tensor(parents))


def _merged(second) -> HybridDrafter:
    return HybridDrafter(NGramDrafter(num_speculative_tokens=5, max_ngram=3, min_ngram=2), second, merge=True)


def _merged_steps(drafter: HybridDrafter, target, prompts, **kw) -> int:
    decoder = SpeculativeDecoder(target, drafter, **kw)
    return sum(decoder.generate(ids, max_new_tokens=24, seed=s).stats.steps_by_source.get(drafter.merged_label, 0)
               for s, ids in enumerate(prompts))


def test_graft_shares_the_common_prefix_and_keeps_the_tree_numbering():
    tree = _tree([5, 7, 6, 8], [-1, -1, 0, 2])  # 5 -> 6 -> 8 and 7
    merged = graft_chain(tree, DraftTree.chain(torch.tensor([5, 6, 9, 1])))
    assert merged.tokens.tolist() == [5, 7, 6, 8, 9, 1] and merged.parents.tolist() == [-1, -1, 0, 2, 2, 4]
    assert merged.draft_probs is None and merged.sampling == "deterministic"
    assert torch.equal(graft_chain(tree, DraftTree.chain(torch.tensor([5, 6]))).tokens, tree.tokens)  # held already
    fresh = graft_chain(tree, DraftTree.chain(torch.tensor([3, 5])))  # parts at the root: a new root child
    assert fresh.tokens.tolist()[4:] == [3, 5] and fresh.parents.tolist()[4:] == [-1, 4]
    assert torch.equal(graft_chain(tree, DraftTree.empty()).parents, tree.parents)


def test_a_sampled_proposal_cannot_be_merged():
    q = torch.full((2, 4), 0.25)
    with pytest.raises(ConfigError, match="merge=false"):
        graft_chain(DraftTree.chain(torch.tensor([1, 2]), q), DraftTree.chain(torch.tensor([1, 3])))
    target, draft = peaky_noisy_pair()
    drafter = HybridDrafter(NGramDrafter(2, max_ngram=2, min_ngram=2), DraftModelDrafter(draft, 2), merge=True)
    with pytest.raises(ConfigError, match=r"merge=true .* the second part \(DraftModelDrafter\) samples its drafts at "
                                          "temperature 1.0: set drafter.merge=false"):  # was: at the first merged step
        SpeculativeDecoder(target, drafter, "rejection", SamplingParams(temperature=1.0))  # built, before any prompt
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0, top_k=1)):  # greedy drafts: point masses
        out = SpeculativeDecoder(target, drafter, "rejection", sampling).generate(NGRAM_PROMPT, 8, seed=0)
        assert out.stats.steps_by_source.get(drafter.merged_label, 0) > 0  # merged steps ran
    tree = HybridDrafter(NGramDrafter(2, max_ngram=2, min_ngram=2), DraftModelDrafter(draft, tree="chain4_alts"),
                         merge=True)  # a deterministic tree at temperature 1 merges
    SpeculativeDecoder(target, tree, "rejection", SamplingParams(temperature=1.0)).generate(NGRAM_PROMPT, 8, seed=0)


@pytest.mark.parametrize("arch, second", [("llama", "draft_model"), ("qwen2", "draft_model"), ("llama", "draft_tree"),
                                          ("llama", "medusa"), ("qwen2", "eagle3")])
def test_greedy_merged_hybrid_equals_plain_greedy(arch, second):
    """20 prompts; merged steps occur. The draft-model chain's cache must keep only the path it drafted when the
    accepted path leaves its chain for the lookup's branch (else its later drafts, not the output, go wrong: the
    steps and accepted counts would then differ from a run that re-feeds everything)."""
    cases = cases_for(arch)
    target = pair(arch)[0]
    if second == "draft_tree":
        part = DraftModelDrafter(pair(arch)[1], tree="chain4_alts")
    else:
        part = _batch_second(second, arch)
    drafter = _merged(part)
    assert drafter.max_nodes == 5 + part.max_nodes and drafter.step_shape(target).draft_source == (
        drafter.labels[1], drafter.merged_label)
    check_greedy(target, drafter, cases)
    assert _merged_steps(drafter, target, [ids for ids, *_ in cases[:6]]) > 0


def test_a_merged_step_accepts_at_least_what_either_part_would():
    """Greedy, one step from the same state: the merged tree's accepted path is the longer of the two parts'. Each
    prompt is followed by 20 of the target's greedy tokens (it falls into loops the lookup finds), so the lookup's
    branch is the longer one at some prompts and the model's chain at others."""
    from tests.tiny_models import noisy_copy

    target = pair("llama")[0]
    close = noisy_copy("llama")
    wins = set()
    for ids, *_ in cases_for("llama")[:8]:
        with torch.no_grad():
            ids = target.generate(ids, max_new_tokens=20, do_sample=False)  # [1, T + 20]
        counts = {}
        for name, drafter in (("lookup", NGramDrafter(5, max_ngram=3, min_ngram=1)),
                              ("model", DraftModelDrafter(close, 3)),
                              ("merged", HybridDrafter(NGramDrafter(5, max_ngram=3, min_ngram=1),
                                                       DraftModelDrafter(close, 3), merge=True))):
            stats = SpeculativeDecoder(target, drafter).generate(ids, max_new_tokens=8, seed=0).stats
            counts[name] = stats.accepted_per_step[0]
        assert counts["merged"] == max(counts["lookup"], counts["model"]), counts
        if counts["lookup"] != counts["model"]:
            wins.add("lookup" if counts["lookup"] > counts["model"] else "model")
    assert wins == {"lookup", "model"}  # each part's branch was the one accepted somewhere


@pytest.mark.parametrize("setting, rule", [("t1.0", "rejection"), ("t0.7_topk3", "rejection"),
                                           ("t1.0", "p_not_zeroed")])
def test_rejection_over_merged_deterministic_trees_is_lossless(setting, rule, record_property):
    """Lookup chains grafted onto a deterministic tree preset (siblings from both parts): ``rejection`` passes,
    p left unzeroed after a rejected deterministic draft fails."""
    target, draft = peaky_noisy_pair()
    drafter = HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=2, min_ngram=2),
                            DraftModelDrafter(draft, tree="chain4_alts"), merge=True)
    for name, value in check_cell(target, drafter, setting, rule, NGRAM_PROMPT).items():
        record_property(name, value)
    decoder = SpeculativeDecoder(target, drafter, "rejection", SamplingParams(temperature=1.0))
    merged = sum(decoder.generate(NGRAM_PROMPT, max_new_tokens=3, seed=s).stats.steps_by_source.get(
        drafter.merged_label, 0) for s in range(20))
    assert merged >= 20, "every run's first step must be a merged one"


@pytest.mark.parametrize("second", ["draft_model", "medusa"])
def test_batched_merged_hybrid_rows_equal_generate_and_batch_one(second):
    target, rows, limits = _batch_setup("llama", 6)

    def make():
        return _merged(_batch_second(second, "llama"))

    batched = make()
    out = SpeculativeDecoder(target, batched).generate_batch(rows, max_new_tokens=limits, seed=3, max_rows=3)
    greedy_rows_match(target, make, rows, limits, out, seed=3)
    assert out.stats.steps_by_source.get(batched.merged_label, 0) > 0, out.stats.steps_by_source


def test_behind_lookup_passes_merge_on():
    drafter = behind_lookup(DraftModelDrafter(pair("llama")[1], 3), ngram_tokens=6, merge=True)
    assert drafter.merge and drafter.max_nodes == 9 and drafter.merged_label == "ngram+draft_model"


def test_hybrid_medusa_config_merges_through_decode(tmp_path):
    """``drafter=hybrid_medusa`` (lookup first, Medusa heads second, merged) through experiments.decode, at batch 1
    and in batches: the output matches the baseline and merged steps are counted by their own label."""
    from drafters import MedusaDrafter
    from drafters.medusa_heads import MedusaHeads, save_heads
    from experiments import decode
    from experiments.loggers import NoLogger
    from experiments.models_from_config import load_models
    from tests.test_medusa import compose_decode

    torch.manual_seed(0)
    heads = save_heads(MedusaHeads.for_target(pair("llama")[0], 3, init="random"), tmp_path / "heads")
    cfg = compose_decode("model=tiny_random", "drafter=hybrid_medusa", f"drafter.second.heads={heads}",
                         "drafter.first.min_ngram=1", "num_prompts=2", "max_new_tokens=16", "warmup=0", "logger=none",
                         "costs=false")
    drafter = decode.build_drafter(cfg.drafter, load_models(cfg.model))
    assert drafter.merge and isinstance(drafter.second, MedusaDrafter) and drafter.first.k == 10
    for batch in (1, 2):
        cfg.batch_size = batch
        summary = decode.run(cfg, tmp_path / f"b{batch}", logger=NoLogger())
        assert summary["metrics"]["matches_baseline"] is True
        assert summary["metrics"]["speculative"]["steps_by_source"].get("ngram+medusa", 0) > 0


@pytest.mark.parametrize("batched", [False, True])
def test_a_merged_steps_draft_forwards_are_the_model_parts_levels(batched):
    """A 2-deep draft-model chain under a lookup chain of up to 6: a merged step costs the model's 2 forwards,
    however deep the grafted chain makes the tree (the cost model reads depth_by_source)."""
    from experiments.costs import draft_forwards_per_step

    target = pair("llama")[0]
    drafter = HybridDrafter(NGramDrafter(6, max_ngram=3, min_ngram=1), DraftModelDrafter(pair("llama")[1], 2),
                            merge=True)
    rows = [ids for ids, *_ in cases_for("llama")[:4]]
    decoder = SpeculativeDecoder(target, drafter)
    stats = decoder.generate_batch(rows, 24).stats if batched else decoder.generate(rows[0], 24).stats
    merged = stats.steps_by_source.get(drafter.merged_label, 0)
    assert merged > 0 and stats.depth_by_source[drafter.merged_label] <= 2 * merged
    assert sum(stats.depth_proposed) > sum(stats.depth_by_source.values())  # grafted chains went deeper
    shape = drafter.step_shape(target).describe("hybrid")
    assert draft_forwards_per_step(stats, shape) == pytest.approx(sum(stats.depth_by_source.get(s, 0) for s in (
        drafter.labels[1], drafter.merged_label)) / stats.target_forwards)
