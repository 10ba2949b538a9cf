"""Unit tests of the pieces: warping, tree compilation, acceptance on hand-made trees, n-gram lookup."""
from __future__ import annotations

import random

import pytest
import torch

from drafters import NGramDrafter
from specdec import SamplingParams
from specdec.acceptance import (
    GreedyAcceptance,
    RejectionAcceptance,
    TypicalAcceptance,
    get_rule,
)
from specdec.drafting import DraftContext
from specdec.rng import KeyedRandom
from specdec.sampling import warp_probs
from specdec.stats import DecodeStats
from specdec.tree import ancestor_mask, chain_paths, compile_tree
from specdec.types import AcceptResult, DraftTree, VerifyOutput


def test_warp_top_k_and_top_p():
    logits = torch.tensor([0.0, 1.0, 5.0, 2.0, -1.0])
    topk = warp_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.count_nonzero(topk) == 2 and topk[2] > topk[3] > 0
    full = torch.softmax(logits, -1)
    topp = warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.95))
    kept = topp > 0
    assert full[kept].sum() >= 0.95 and full[kept].sum() - full[kept].min() < 0.95  # smallest such set
    assert torch.allclose(topp[kept], full[kept] / full[kept].sum())
    greedy = warp_probs(logits, SamplingParams())
    assert greedy.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("params", [SamplingParams(1.0, min_p=0.1), SamplingParams(0.7, top_k=10, min_p=0.3),
                                    SamplingParams(1.3, top_p=0.9, min_p=0.05), SamplingParams(1.0, 5, 0.8, 0.5),
                                    SamplingParams(0.8, top_k=7, top_p=0.7)])
def test_warping_equals_hugging_faces_warpers(params):
    """Temperature, top-k, top-p and min-p in HF generate's order and arithmetic: the same distribution (what
    ``sampling.*`` means is what it means in ``generate(do_sample=True, ...)``)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3  # [8, V]
    warpers = [TemperatureLogitsWarper(params.temperature)] + ([TopKLogitsWarper(params.top_k)] if params.top_k else [])
    warpers += [TopPLogitsWarper(params.top_p)] if params.top_p < 1 else []
    warpers += [MinPLogitsWarper(params.min_p)] if params.min_p else []
    expected = LogitsProcessorList(warpers)(None, logits.clone()).softmax(-1)  # [8, V]
    ours = warp_probs(logits, params)  # [8, V]
    assert torch.equal(ours > 0, expected > 0) and torch.allclose(ours, expected, atol=1e-6)
    assert 0 < int((ours > 0).sum()) < logits.numel()  # the warping kept some tokens and dropped others


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1},
                                 {"min_p": 1.5}])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError, match="sampling"):
        SamplingParams(**bad)


def _random_paths(rng: random.Random, n: int) -> list[list[int]]:
    paths: list[list[int]] = []
    while len(paths) < n:
        parent = rng.choice([[]] + paths)
        rank = sum(1 for p in paths if p[:-1] == parent)
        paths.append(parent + [rank])
    rng.shuffle(paths)
    return paths


@pytest.mark.parametrize("seed", range(20))
def test_compiled_random_trees(seed):
    rng = random.Random(seed)
    paths = _random_paths(rng, rng.randint(1, 40))
    tree = compile_tree(paths)
    index = {p: i for i, p in enumerate(tree.paths)}
    for i, p in enumerate(tree.paths):
        ancestors = {index[p[:d]] for d in range(1, len(p) + 1)}
        assert set(torch.nonzero(tree.mask[i]).flatten().tolist()) == ancestors  # ancestors and self
        assert int(tree.depth[i]) == len(p)
    for i, p in enumerate(tree.paths):  # every node's path reads back through its parents
        node, walked = i, []
        while node >= 0:
            walked.append(tree.paths[node])
            node = int(tree.parents[node])
        assert walked[::-1] == [p[:d] for d in range(1, len(p) + 1)]
    assert torch.equal(ancestor_mask(tree.parents), tree.mask)


def test_invalid_tree_preset_names_missing_parent():
    with pytest.raises(ValueError, match=r"add the path \[0\]"):
        compile_tree([[0, 1]])
    assert compile_tree(chain_paths(3)).parents.tolist() == [-1, 0, 1]


def _tree():
    # root children: node0 (tok 4), node1 (tok 7); node2 (tok 5) under node1; node3 (tok 2) under node2
    return DraftTree(tokens=torch.tensor([4, 7, 5, 2]), parents=torch.tensor([-1, -1, 1, 2]))


def test_greedy_on_a_tree_takes_the_matching_branch():
    logits = torch.full((5, 8), -5.0)
    logits[0, 7] = logits[2, 5] = logits[3, 6] = 5.0  # root -> 7, node1 -> 5, node2 -> 6 (not 2)
    res = GreedyAcceptance()(_tree(), logits, SamplingParams(), None)
    assert res.accepted_nodes == [1, 2] and res.tokens == [7, 5, 6]


def test_rejection_deterministic_children_point_mass():
    """Children are point masses: with p = one-hot on the second child it is always taken."""
    logits = torch.full((5, 8), -30.0)
    logits[0, 7] = logits[2, 5] = logits[3, 2] = logits[4, 1] = 30.0
    res = RejectionAcceptance()(_tree(), logits, SamplingParams(temperature=1.0), KeyedRandom.for_seed(0))
    assert res.accepted_nodes == [1, 2, 3] and res.tokens == [7, 5, 2, 1]  # leaf reached: bonus token


def test_rule_registry_and_flags():
    assert get_rule("rejection").lossless and get_rule("greedy").lossless
    assert not TypicalAcceptance().lossless
    with pytest.raises(ValueError, match="unknown"):
        get_rule("beam")


def test_stats_metrics_mean_what_they_say():
    s = DecodeStats()
    for (proposed, acc), source in zip([(4, 4), (4, 1), (4, 0)], ["ngram", None, "eagle"]):
        s.record_step(proposed, proposed - (source == "eagle"), acc, source)
    s.new_tokens = (4 + 1) + (1 + 1) + (0 + 1)
    assert s.tau == pytest.approx(8 / 3)
    assert s.mean_accepted_drafts == pytest.approx(5 / 3)
    assert s.draft_acceptance_rate == pytest.approx(5 / 12)
    assert s.acceptance_rate_by_depth == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 2])
    merged = DecodeStats.merge([s, s])
    assert merged.tau == pytest.approx(s.tau) and merged.depth_proposed == [6, 6, 6, 4]
    assert s.steps_by_source == {"ngram": 1, "eagle": 1} and merged.steps_by_source == {"ngram": 2, "eagle": 2}
    assert s.depth_by_source == {"ngram": 4, "eagle": 3} and merged.depth_by_source == {"ngram": 8, "eagle": 6}


def _ngram(tokens, **kw):
    d = NGramDrafter(**kw)
    d.start(DraftContext(target=None, sampling=SamplingParams(), rng=None, capacity=100))
    d.tokens = list(tokens)
    return d


def test_ngram_longest_suffix_match_and_incremental_index():
    d = _ngram([1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 0, 2, 3], num_speculative_tokens=3, max_ngram=3)
    assert d.propose(8).tokens.tolist() == [4, 5, 0]  # "2 3" last seen before "4 5 0"
    d.commit(AcceptResult([0], [4, 6]), VerifyOutput(torch.empty(0), torch.empty(0)))
    assert d.propose(8).tokens.tolist() == []  # "... 3 4 6": 6 never seen before
    assert _ngram([5, 6, 7], num_speculative_tokens=2).propose(8).num_nodes == 0


def test_ngram_periodic_context_proposes_full_length():
    d = _ngram([3, 8, 8, 8, 8], num_speculative_tokens=4, max_ngram=2)
    assert d.propose(8).tokens.tolist() == [8, 8, 8, 8]
    assert d.propose(2).tokens.tolist() == [8, 8]  # capped by max_depth


def test_resolve_draft_dtype(monkeypatch):
    from specdec import models
    from specdec.errors import SpecDecError

    assert models.resolve_draft_dtype(None, "float32", "cpu") == "float32"
    assert models.resolve_draft_dtype("bfloat16", "float32", "cpu") == "bfloat16"
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.resolve_draft_dtype("auto", "float32", "cpu") == "float32"  # loaded so, then measured (auto_dtype)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert models.resolve_draft_dtype("auto", "float32", "cpu") == "float32"
    with pytest.raises(SpecDecError, match="model.draft_dtype='bf16' is unknown"):
        models.resolve_draft_dtype("bf16", "float32", "cpu")


def test_pooled_tau_is_tokens_over_forwards_not_mean_of_taus():
    """bench_drafters' pooled tau: all prompts' tokens over all their target forwards (3.2 here), not the
    mean of per-prompt taus (5.0); None for HF's methods, which count no forwards."""
    from experiments.bench_methods import Method, pooled_tau

    ours = Method("ours", run=None, ours=True, new_tokens={0: 96, 1: 96}, forwards={0: 12, 1: 48},
                  tau={0: 8.0, 1: 2.0})
    assert pooled_tau(ours) == pytest.approx(192 / 60)
    assert pooled_tau(Method("hf_plain", run=None, ours=False, new_tokens={0: 96})) is None


def test_pick_methods_keeps_the_baselines_and_names_unknown_ones():
    """``--methods`` (bench_drafters, bench_suite): the named methods in run order, plus the baselines the ratios
    are taken against; an unknown name is one error listing the choices; no option keeps every method."""
    from experiments.bench_methods import Method, pick_methods
    from specdec.errors import SpecDecError

    methods = [Method(n, run=None, ours=n.startswith("ours")) for n in ("hf_plain", "hf_lookup", "ours_ar", "ours_x")]
    assert pick_methods(methods, None) == methods
    picked = pick_methods(methods, "ours_x,hf_lookup", ("hf_plain", "ours_ar"))
    assert [m.name for m in picked] == ["hf_plain", "hf_lookup", "ours_ar", "ours_x"]
    assert [m.name for m in pick_methods(methods, "ours_x", ("hf_plain",))] == ["hf_plain", "ours_x"]
    with pytest.raises(SpecDecError, match="ours_y is not a method of this run.*choose from hf_plain, hf_lookup"):
        pick_methods(methods, "ours_y", ("hf_plain",))


def test_pooled_tokens_per_s_weighs_prompts_by_their_time():
    """Total new tokens over the sum of per-prompt median times: 200 tokens in 1.5 s, not the median (or mean) of the
    per-prompt rates (100 / 0.5 and 100 / 1.0 tokens/s)."""
    from experiments.bench_methods import Method, pooled_tokens_per_s, tokens_per_s

    meth = Method("ours", run=None, ours=True, new_tokens={0: 100, 1: 100}, times={0: [0.5, 0.4, 0.9], 1: [1.0]})
    assert pooled_tokens_per_s(meth) == pytest.approx(200 / 1.5)
    assert tokens_per_s(meth) == {0: pytest.approx(200.0), 1: pytest.approx(100.0)}


def test_timed_call_leaves_out_the_step_s_compile_time(monkeypatch):
    """A ``--compile graph`` row captures its step on every call: the bench times the steady state."""
    from types import SimpleNamespace

    from experiments import bench_batch

    clock = iter([10.0, 13.0, 20.0, 21.5])
    monkeypatch.setattr(bench_batch.time, "perf_counter", lambda: next(clock))
    cpu = torch.device("cpu")
    out, _, seconds = bench_batch.timed_call(lambda x: (x, SimpleNamespace(time_compile=1.0)), cpu, 7)
    assert (out, seconds) == (7, 2.0)
    assert bench_batch.timed_call(lambda: ("hf", None), cpu)[2] == 1.5  # HF's methods have no stats


def test_timers_wait_for_every_gpu(monkeypatch):
    """A target spread over 3 GPUs (device_map) is timed after all of them finish; the CPU waits for nothing."""
    from specdec.models import synchronize

    waited = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: waited.append(index))
    synchronize(torch.device("cpu"))
    assert waited == []
    synchronize(torch.device("cuda", 0))
    assert waited == [0, 1, 2]


def test_merged_acceptance_by_depth_pools_the_runs_counts():
    """Merging runs adds their per-depth counts: depth d's rate is all runs' steps that accepted a node at depth d
    over all runs' steps that proposed one (a run's proposals never stand in for its acceptances)."""
    a, b = DecodeStats(), DecodeStats()
    a.record_step(2, 2, 2)
    a.record_step(2, 2, 0)
    b.record_step(3, 3, 1)
    merged = DecodeStats.merge([a, b])
    assert merged.depth_proposed == [3, 3, 1] and merged.depth_accepted == [2, 1, 0]
    assert merged.acceptance_rate_by_depth == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert merged.draft_acceptance_rate == pytest.approx(3 / 7)


def test_ngram_continuation_past_the_end_repeats_the_match_s_period():
    """"1 2" last occurred two tokens back: its continuation runs into the end and goes on with period 2."""
    d = _ngram([5, 1, 2, 1, 2], num_speculative_tokens=5, max_ngram=3)
    assert d.propose(8).tokens.tolist() == [1, 2, 1, 2, 1]


def test_ngram_index_covers_the_previous_root_after_a_commit():
    """The n-grams ending at the token that was the root of the last lookup are indexed at the next one."""
    d = _ngram([7, 8, 9], num_speculative_tokens=2, max_ngram=3)
    assert d.propose(8).num_nodes == 0  # 9 never seen before
    d.commit(AcceptResult([0], [5, 9]), VerifyOutput(torch.empty(0), torch.empty(0)))  # "7 8 9 5 9"
    assert d.propose(8).tokens.tolist() == [5, 9]  # "9" at position 2 was followed by "5 9"


def test_top_p_keeps_the_smallest_set_that_reaches_top_p_exactly():
    """Four equal tokens (0.25 each, exact in float32), top_p=0.5: two tokens reach 0.5, so the other two go
    (Hugging Face's TopPLogitsWarper drops ``cumsum <= 1 - top_p`` the same way)."""
    probs = warp_probs(torch.zeros(4), SamplingParams(temperature=1.0, top_p=0.5))
    assert int(torch.count_nonzero(probs)) == 2 and probs.max().item() == 0.5
