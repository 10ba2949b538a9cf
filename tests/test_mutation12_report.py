"""Mutation pass 12: the cost model and the sweep report, whose figures researchers read (``experiments.costs``,
``experiments.runs``, ``experiments.report`` and the numbers ``experiments.report_plots`` draws). The existing tests
pin the formulas at one prompt, without prefills in the k curve, and away from ties and boundaries; these pin the
prefills per prompt, the k curve with prefills, ties and break-evens, the guards (no steps, a non-finite measured
speedup, a batched or compiled run), the notes by drafter shape, and the report's row, label, pooling and column
bookkeeping. Hand-made stats and runs only: no model builds, no timing. Each test names the planted bug it catches.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.costs import (
    KS,
    chain_speedup_by_k,
    cheap_widths,
    cost_model,
    cost_model_scope,
    draft_cost_warnings,
    draft_forwards_per_step,
    expected_tau,
    fit_alpha,
    predicted_speedups,
    recommend_k,
    step_seconds,
)
from experiments.runs import K_KEY, Run, find_run_dirs, job_label, k_of, label_of, pooled_model, row_of, shape_of
from specdec.stats import DecodeStats

#: A flat verify cost, a draft forward of a fifth of it, and prefills (per prompt) of 4 and 2 target forwards.
PREFILLED = {"target": {1: 1.0, 2: 1.5, 3: 2.0}, "draft": {1: 0.25}, "prefill": {"target": 4.0, "draft": 2.0}}
CHAIN = {"kind": "chain", "draft_forwards": "per_level", "k": 2}


def _chain_stats(new_tokens: int = 12) -> DecodeStats:
    """Four steps of a 2-chain accepting 2, 2, 1, 1 drafts (3 + 3 + 2 + 2 tokens)."""
    stats = DecodeStats(new_tokens=new_tokens)
    for accepted in (2, 2, 1, 1):
        stats.record_step(2, 2, accepted)
    return stats


# --------------------------------------------------------------------------- costs.py: the curves


def test_cheap_widths_keeps_the_wider_of_two_equal_costs():
    """Bug: ``seconds <= best`` keeps a narrower width that costs exactly what a wider one does (padding to it saves
    nothing; the wider one is the cheap width)."""
    assert cheap_widths({1: 1.0, 2: 3.0, 3: 3.0, 4: 5.0}) == (1, 3, 4)


def test_a_draft_forward_is_priced_at_width_one():
    """Bug: the draft forward read at width 2 of a draft curve measured at more than one width."""
    costs = {"target": {1: 1.0, 4: 1.0}, "draft": {1: 0.2, 2: 0.5}}
    assert step_seconds(costs, 3, 4) == pytest.approx(3 * 0.2 + 1.0)


# --------------------------------------------------------------------------- costs.py: alpha and tau


def test_fit_alpha_stops_at_the_first_depth_nothing_reached():
    """Bug: ``proposed < 0`` instead of ``<= 0`` goes on past a depth with no proposals (and divides by its 0)."""
    assert fit_alpha([10, 0], [5, 0]) == pytest.approx(0.5)
    assert fit_alpha([0], [0]) is None


def test_expected_tau_by_k_in_the_summary_is_tau_of_k():
    """Bug: ``expected_tau_by_k`` keyed k but computed for k + 1 (the figure researchers read beside the k curve)."""
    stats = _chain_stats()
    _, model = cost_model(stats, PREFILLED, CHAIN, None)
    alpha = model["alpha"]
    assert model["expected_tau_by_k"] == pytest.approx({k: expected_tau(alpha, k) for k in KS})
    assert model["expected_tau_by_k"][1] == pytest.approx(1 + alpha)


# --------------------------------------------------------------------------- costs.py: draft forwards per step


def test_a_fixed_draft_runs_k_forwards_every_step_or_only_its_parts_steps():
    """Bugs: a fixed-shape drafter without ``draft_source`` costed 0 forwards (``else 0.0``), or a hybrid's fixed part
    costed k forwards on every step, the lookup part's included."""
    stats = DecodeStats()
    for source in ("draft_model", "ngram", "ngram", "ngram"):
        stats.record_step(3, 3, 0, source)
    assert draft_forwards_per_step(stats, {"draft_forwards": "fixed", "k": 5}) == pytest.approx(5.0)
    assert draft_forwards_per_step(stats, {"draft_forwards": "fixed", "k": 5, "draft_source": "draft_model"}) == \
        pytest.approx(5 * 1 / 4)


def test_per_step_draft_forwards_are_the_steps_that_proposed_depth_one():
    """Bug: ``depth_proposed[-1]`` (steps that reached the deepest level) instead of ``[0]`` (steps that proposed at
    all): a tree of depth 3, one of depth 1 and an empty step make 2 calls over 3 steps, not 1."""
    stats = DecodeStats()
    for nodes, depth in ((4, 3), (2, 1), (0, 0)):
        stats.record_step(nodes, depth, 0)
    assert draft_forwards_per_step(stats, {"draft_forwards": "per_step"}) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- costs.py: predicted speedups


def test_no_steps_predict_nothing():
    """Bug: without the ``not steps`` guard a run with no steps raises (the mean over no steps) instead of predicting
    None."""
    assert predicted_speedups(DecodeStats(), PREFILLED, CHAIN, 1) == (None, None)
    metrics, _ = cost_model(DecodeStats(), PREFILLED, CHAIN, 1.2)
    assert metrics["predicted_speedup"] is None and metrics["efficiency"] is None


def test_no_drafter_predicts_exactly_one():
    """Bug: a NoDrafter run predicted None (or anything but 1.0): it is the baseline itself."""
    assert predicted_speedups(_chain_stats(), PREFILLED, {"kind": "none", "draft_forwards": "none"}, 1) == (1.0, 1.0)


def test_prefills_are_counted_once_per_prompt():
    """Bugs: the target's or the draft's prefill counted once per run, not once per prompt (``* num_prompts``
    dropped): two prompts pay two of each."""
    stats, step = _chain_stats(), 2 * 0.25 + 2.0
    assert predicted_speedups(stats, PREFILLED, CHAIN, num_prompts=2) == pytest.approx(
        ((8.0 + 12 * 1.0) / (8.0 + 4.0 + 4 * step), 3.0 / step))


def test_the_k_curve_with_prefills_per_prompt():
    """Bugs in ``chain_speedup_by_k(tokens_per_prompt=n)``: the draft's prefill left out of the denominator, the
    target's left out of the numerator, or ``n`` ignored (the step speedup instead): the curve is
    ``(P_t + n T_t(1)) / (P_t + P_d + n / tau(k) * step(k))``."""
    n, alpha = 6.0, 0.5
    curve = chain_speedup_by_k(alpha, PREFILLED, ks=(1, 2), tokens_per_prompt=n)
    step = {1: 0.25 + 1.5, 2: 0.5 + 2.0}
    assert curve == pytest.approx({k: (4.0 + n) / (4.0 + 2.0 + n / expected_tau(alpha, k) * step[k]) for k in (1, 2)})
    assert curve[1] != pytest.approx(expected_tau(alpha, 1) / step[1])  # differs from the step speedup


def test_the_summarys_k_curve_uses_tokens_per_prompt():
    """Bug: ``cost_model`` gave the k curve the run's new tokens, not its new tokens per prompt (with prefills the
    curve's values depend on it)."""
    stats = _chain_stats(new_tokens=12)
    _, model = cost_model(stats, PREFILLED, CHAIN, None, num_prompts=2)
    assert model["predicted_speedup_by_k"] == pytest.approx(
        chain_speedup_by_k(model["alpha"], PREFILLED, tokens_per_prompt=6.0))


def test_efficiency_is_measured_over_predicted_and_none_for_a_non_finite_speedup():
    """Bugs: efficiency inverted (predicted / measured), or a measured speedup of inf (a baseline of no time)
    turned into an efficiency of inf instead of None."""
    stats = _chain_stats()
    metrics, _ = cost_model(stats, PREFILLED, CHAIN, 1.5, num_prompts=1)
    predicted = metrics["predicted_speedup"]
    assert predicted == pytest.approx(1.0)  # (4 + 12) / (4 + 2 + 4 * 2.5)
    assert metrics["efficiency"] == pytest.approx(1.5)
    assert cost_model(stats, PREFILLED, CHAIN, float("inf"))[0]["efficiency"] is None


def test_recommend_k_takes_the_smallest_of_tied_ks():
    """Bug: on a tie the largest k (more draft work for the same predicted speedup)."""
    assert recommend_k({3: 1.5, 1: 2.0, 2: 2.0}) == 1
    assert recommend_k({}) is None


def test_a_break_even_best_k_is_no_warning():
    """Bug: ``curve[best] <= 1``: a k predicted at exactly 1.00x (no draft cost, nothing accepted) is not "slower"
    than plain decoding."""
    stats = DecodeStats(new_tokens=4, depth_proposed=[4, 4], depth_accepted=[0, 0])
    stats.target_forwards, stats.proposed_per_step = 4, [2, 2, 2, 2]
    flat = {"target": {1: 1.0, 64: 1.0}}
    _, model = cost_model(stats, flat, CHAIN, None)
    assert model["alpha"] == 0.0 and max(model["predicted_speedup_by_k"].values()) == pytest.approx(1.0)
    assert not [w for w in model["warnings"] if w.startswith("no draft length pays off")]


def test_a_draft_as_fast_as_the_target_is_no_warning():
    """Bug: ``t_draft < t_target`` warns when a draft forward costs exactly a target forward (not more)."""
    assert draft_cost_warnings({"target": {1: 0.004}, "draft": {1: 0.004}}) == []
    assert draft_cost_warnings({"target": {1: 0.004}, "draft": {1: 0.005}})


def test_the_cost_models_scope():
    """Bugs: a batch-1 run counted as batched (``>= 1``), or a compiled run priced against eager costs."""
    assert cost_model_scope(1, "none") is None
    assert "batch_size=2" in cost_model_scope(2, "none")
    assert "compile=static" in cost_model_scope(1, "static")


@pytest.mark.parametrize("shape, note", [
    ({"kind": "dynamic", "draft_forwards": "per_level", "k": 4}, "chains only"),
    ({"kind": "tree", "draft_forwards": "per_level", "k": 3}, "chains only"),
    ({"kind": "chain", "draft_forwards": "fixed", "k": 5}, "fixed number (5)"),
    ({"kind": "chain", "draft_forwards": "per_step", "k": 3, "draft_source": "draft_model"}, "several parts"),
])
def test_no_k_curve_for_trees_dynamic_trees_and_fixed_drafts(shape, note):
    """Bugs: the "chains only" note dropped for dynamic trees, or a fixed-shape chain (a cross-tokenizer draft's
    fixed forwards) given a k curve that prices k forwards per k-chain; a hybrid (lookups, then a draft-model
    chain) given a recommended_k from an alpha fitted over the lookups' steps too (a real bug the pass found:
    10-token lookups accepting 5 of 6 gave alpha 0.83 and k = 3 where the chain's own 0.5 gives k = 1)."""
    metrics, model = cost_model(_chain_stats(), PREFILLED, shape, None)
    assert note in model.get("note", "") and metrics["recommended_k"] is None
    assert model["predicted_speedup_by_k"] is None


# --------------------------------------------------------------------------- runs.py: rows, shapes, labels


def _spec(**kw) -> dict:
    return {"depth_proposed": [10, 10], "depth_accepted": [8, 6], "new_tokens": 40, "num_prompts": 2, "tau": 2.4,
            "tokens_per_s": 30.0, **kw}


def test_k_is_the_configured_one_before_the_step_shapes():
    """Bug: the step shape's k first: a cross-tokenizer draft's step k counts its draft forwards (8), the config its
    chain (4)."""
    run = Run(Path("x"), "x", summary={"status": "complete", "drafter": "CrossTokenizerDrafter",
                                       "config": {"drafter": {"num_speculative_tokens": 4}},
                                       "drafter_shape": {"kind": "chain", "k": 8}})
    assert k_of(run, "chain") == 4
    hybrid = Run(Path("h"), "h", summary={"status": "complete", "config": {"drafter": {}},
                                          "drafter_shape": {"kind": "chain", "k": 3, "draft_source": "draft_model"}})
    assert k_of(hybrid, "chain") == 3


def test_shapes_named_by_the_config_before_the_step_shape():
    """Bugs: a dynamic tree named by the shape's node count instead of its configured budget; a tree the drafter
    derived (Medusa's: no preset paths) not named a tree; a NoDrafter run without a step shape named a chain."""
    dynamic = Run(Path("d"), "d", summary={"drafter": "EagleDrafter", "config": {"drafter": {"budget": 30}},
                                           "drafter_shape": {"kind": "dynamic", "max_nodes": 31}})
    assert shape_of(dynamic) == "dynamic30"
    medusa = Run(Path("m"), "m", summary={"drafter": "MedusaDrafter", "config": {},
                                          "drafter_shape": {"kind": "tree", "max_nodes": 10}})
    assert shape_of(medusa) == "tree10"
    none = Run(Path("n"), "n", summary={"drafter": "NoDrafter", "config": {}})
    assert shape_of(none) == "none"


def test_row_columns_read_their_own_fields():
    """Bugs: prompts_done read from the summary's num_prompts (the prompts asked for, not those done), the
    baseline's tokens/s read from the speculative method, recommended_k dropped, the acceptance by depth an empty
    string (not None) where the run has none, alpha fitted to the wrong counts."""
    summary = {"status": "interrupted", "drafter": "DraftModelDrafter", "num_prompts": 5,
               "config": {"drafter": {"num_speculative_tokens": 2}},
               "metrics": {"speculative": _spec(), "baseline": {"tokens_per_s": 12.0}, "recommended_k": 3}}
    row = row_of(Run(Path("r"), "r", summary=summary), [])
    assert row["prompts_done"] == 2 and row["num_prompts"] == 5
    assert row["tokens_per_s"] == 30.0 and row["baseline_tokens_per_s"] == 12.0 and row["recommended_k"] == 3
    assert row["acceptance_by_depth"] is None
    assert row["alpha"] == pytest.approx(fit_alpha([10, 10], [8, 6]))
    hybrid = {**summary, "drafter_shape": {"kind": "chain", "k": 2, "draft_source": "draft_model"}}
    assert row_of(Run(Path("h"), "h", summary=hybrid), [])["recommended_k"] is None  # an older summary's is shown not


def test_label_of_skips_keys_the_run_lacks():
    """Bug: a key the run was not given labelled ``key=None``."""
    run = Run(Path("r"), "r", overrides={K_KEY: "2"})
    assert label_of(run, [K_KEY, "sampling.temperature"]) == "k=2"


def test_job_label_drops_excluded_and_logger_keys():
    """Bugs: an excluded key given with a ``+``/``~`` prefix kept, or the logger's overrides kept in the job name."""
    overrides = ["+seed=3", "logger=wandb", "logger.project=x", K_KEY + "=2", "sampling.temperature=0.7",
                 "num_prompts=2"]
    assert job_label(overrides, ["seed"]) == "k=2 T=0.7 num_prompts=2"
    assert job_label(["logger=wandb"], []) is None


def test_superseded_copies_are_not_runs(tmp_path):
    """Bug: a ``superseded-*`` copy (the records a resume set aside) read as a run of its own."""
    (tmp_path / "run" / "superseded-1").mkdir(parents=True)
    (tmp_path / "run" / "summary.json").write_text("{}")
    (tmp_path / "run" / "superseded-1" / "summary.json").write_text("{}")
    assert find_run_dirs(tmp_path) == [tmp_path / "run"]


def test_pooled_alpha_pools_the_counts_of_every_run():
    """Bug: alpha fitted to the last run's counts alone (or any run's), not the group's pooled counts."""
    costs = {"target": {1: 1.0}}
    a = Run(Path("a"), "a", summary={"metrics": {"speculative": _spec(depth_proposed=[100, 100],
                                                                      depth_accepted=[90, 80])},
                                     "cost_model": {"costs": costs}})
    b = Run(Path("b"), "b", summary={"metrics": {"speculative": _spec(depth_proposed=[100],
                                                                      depth_accepted=[40])}})
    alpha, got_costs, tokens = pooled_model([a, b])
    assert alpha == pytest.approx(fit_alpha([200, 100], [130, 80])) and got_costs == costs and tokens == 20.0
