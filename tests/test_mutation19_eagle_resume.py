"""Mutation pass 19: the cost model's formulas (:mod:`experiments.costs`: interpolation past and between measured
widths, expected tau at alpha 1, the k curve's verify width and prefills, which shapes get a recommended k),
resuming a decode run (:mod:`experiments.resume`: completeness, the methods' records, ``resume=false``, pinned dtypes
only with kept records, the W&B run of a resume) and EAGLE (default feature layers, the tap's order, the untrained
head's ``fc``, eagle2's regression target, one-token prompts in batches of trees). Each test names the planted bug it
catches."""
from __future__ import annotations

import json

import pytest
import torch

from drafters.eagle_heads import EagleHead, EagleHeadError, FeatureTap, default_feature_layers
from experiments.costs import KS, chain_speedup_by_k, cost_at, cost_model, expected_tau, predicted_speedups
from experiments.resume import WANDB_STATE_FILE, pinned_model, prepare
from specdec.stats import DecodeStats
from tests.tiny_models import pair

# --------------------------------------------------------------------------- the cost model


def test_cost_at_extrapolates_past_the_widest_measured_width_from_the_last_two():
    """Past the last measured width the cost grows along the last two points' line (planted bug: the last
    point's cost is returned for every wider width, so a 16-node tree verifies as cheaply as 9 tokens)."""
    curve = {1: 1.0, 2: 2.0, 4: 3.0}
    assert cost_at(curve, 6) == pytest.approx(4.0)
    assert cost_at(curve, 8) == pytest.approx(5.0)


def test_cost_at_reads_a_curve_given_out_of_order():
    """The measured widths are sorted before interpolating (planted bug: a curve whose first key is its widest
    width, as one merged from two measurements, prices every narrower width at that width's cost)."""
    curve = {8: 8.0, 1: 1.0, 4: 4.0}
    assert cost_at(curve, 2) == pytest.approx(2.0)
    assert cost_at(curve, 6) == pytest.approx(6.0)


def test_expected_tau_at_alpha_one_is_k_plus_one():
    """Every draft accepted (fit_alpha clamps to exactly 1.0): k drafts and the bonus token per step (planted
    bug: ``alpha > 1`` for the special case divides by 1 - alpha = 0)."""
    assert expected_tau(1.0, 3) == 4.0
    assert expected_tau(1.0, 1) == 2.0


def test_the_k_curve_verifies_k_drafts_and_the_root():
    """A k-chain's verify forward is ``k + 1`` tokens wide (planted bug: priced at width ``k``, the root left out,
    which flatters long chains on a rising curve)."""
    costs = {"target": {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}, "draft": {1: 0.1}}
    curve = chain_speedup_by_k(0.5, costs, ks=(2, 3))
    assert curve[2] == pytest.approx(expected_tau(0.5, 2) * 1.0 / (2 * 0.1 + 3.0))
    assert curve[3] == pytest.approx(expected_tau(0.5, 3) * 1.0 / (3 * 0.1 + 4.0))


def test_the_k_curve_with_prefills_counts_the_drafts_prefill():
    """With prefills measured and tokens per prompt given, speculation pays the target's and the draft's prefill
    (planted bug: the draft's prefill left out of the denominator)."""
    costs = {"target": {1: 1.0, 9: 1.0}, "draft": {1: 0.1}, "prefill": {"target": 5.0, "draft": 2.0}}
    curve = chain_speedup_by_k(0.5, costs, ks=(2,), tokens_per_prompt=10.0)
    step = 2 * 0.1 + 1.0
    assert curve[2] == pytest.approx((5.0 + 10.0) / (5.0 + 2.0 + 10.0 / expected_tau(0.5, 2) * step))


def test_predicted_speedup_counts_the_drafts_prefill_once_per_prompt():
    """Over 3 prompts, speculation pays 3 target and 3 draft prefills (planted bug: the draft's prefill counted
    once per run, not per prompt)."""
    costs = {"target": {1: 1.0, 2: 1.0, 9: 1.0}, "draft": {1: 0.5}, "prefill": {"target": 4.0, "draft": 2.0}}
    stats = DecodeStats()
    for _ in range(6):
        stats.record_step(2, 2, 1)
    stats.new_tokens = 12
    shape = {"kind": "chain", "draft_forwards": "per_level"}
    speedup, step_speedup = predicted_speedups(stats, costs, shape, 3)
    step = 2 * 0.5 + 1.0
    assert speedup == pytest.approx((3 * 4.0 + 12 * 1.0) / (3 * 4.0 + 3 * 2.0 + 6 * step))
    assert step_speedup == pytest.approx(stats.tau * 1.0 / step)


def _stats(accepted_depths, depth: int = 3) -> DecodeStats:
    stats = DecodeStats(new_tokens=sum(a + 1 for a in accepted_depths))
    for accepted in accepted_depths:
        stats.record_step(depth, depth, accepted)
    return stats


def test_a_preset_tree_gets_no_recommended_k():
    """recommended_k prices chains only: a preset tree (kind ``tree``) gets a note and no k curve (planted bug:
    every shape but the dynamic tree gets a chain's recommendation)."""
    costs = {"target": {1: 1.0, 9: 1.2}, "draft": {1: 0.05}}
    metrics, model = cost_model(_stats([2, 1, 3, 0]), costs, {"kind": "tree", "draft_forwards": "per_level"}, 1.2)
    assert metrics["recommended_k"] is None and model["predicted_speedup_by_k"] is None
    assert "chains only" in model["note"]
    metrics, model = cost_model(_stats([2, 1, 3, 0]), costs, {"kind": "chain", "draft_forwards": "per_level"}, 1.2)
    assert metrics["recommended_k"] in KS


def test_a_best_k_that_breaks_even_is_no_warning():
    """Only a best k predicted *below* 1x is warned about (planted bug: ``<= 1`` also warns at exactly 1x): nothing
    accepted, no draft cost and a flat curve predict exactly 1.0 for every k."""
    costs = {"target": {1: 1.0, 9: 1.0}}
    metrics, model = cost_model(_stats([0, 0, 0]), costs, {"kind": "chain", "draft_forwards": "per_level"}, 1.0)
    assert model["alpha"] == 0.0 and set(model["predicted_speedup_by_k"].values()) == {1.0}
    assert metrics["recommended_k"] == 1 and not any("pays off" in w for w in model["warnings"])


# --------------------------------------------------------------------------- resuming a decode run

METHODS = ["speculative", "baseline"]


def _run_dir(path, summary: dict, records: list[dict]):
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(qids, methods=METHODS) -> list[dict]:
    return [{"question_id": q, "method": m, "stats": {"new_tokens": 1}} for q in qids for m in methods]


def test_a_complete_run_of_other_prompts_is_not_skipped(tmp_path):
    """A complete summary over as many prompts as this run, but other ones (its ``question_ids`` differ), is not
    this run's: it is resumed, keeping only the prompts both share (planted bug: ``_is_complete`` ignores the ids,
    so the run is skipped and prompt 2 is never decoded)."""
    config = {"seed": 0}
    summary = {"status": "complete", "config": config, "num_prompts": 2, "question_ids": [0, 1],
               "metrics": {m: {} for m in METHODS}}
    state = prepare(_run_dir(tmp_path, summary, _records([0, 1])), config, METHODS, [0, 2])
    assert state.complete is None and state.done == {0}
    assert state.records == _records([0])


def test_a_complete_summary_without_ids_over_fewer_prompts_is_not_skipped(tmp_path):
    """A summary written before summaries listed their prompts counts them: complete over 2 prompts is not
    complete for a run of 3 (planted bug: the ``num_prompts`` check dropped, the run with one more prompt is
    skipped)."""
    config = {"seed": 0}
    summary = {"status": "complete", "config": config, "num_prompts": 2, "metrics": {m: {} for m in METHODS}}
    state = prepare(_run_dir(tmp_path, summary, _records([0, 1])), config, METHODS, [0, 1, 2])
    assert state.complete is None and state.done == {0, 1} and len(state.records) == 4
    assert prepare(tmp_path, config, METHODS, [0, 1]).complete == summary


def test_a_resume_keeps_only_the_records_of_the_runs_methods(tmp_path):
    """Records of a method this run does not decode are not kept (planted bug: the method check dropped: the
    resumed run's records file would carry a baseline record of a run without a baseline)."""
    config = {"seed": 0}
    state = prepare(_run_dir(tmp_path, {"status": "interrupted", "config": config}, _records([0, 1])), config,
                    ["speculative"], [0, 1, 2])
    assert state.done == {0, 1} and state.records == _records([0, 1], ["speculative"])


def test_a_complete_summary_missing_a_methods_metrics_is_resumed(tmp_path):
    """A summary marked complete that holds no metrics of a method this run decodes is not complete for it
    (planted bug: the per-method check dropped, so the baseline's aggregates are never computed)."""
    config = {"seed": 0}
    summary = {"status": "complete", "config": config, "num_prompts": 2, "question_ids": [0, 1],
               "metrics": {"speculative": {}}}
    state = prepare(_run_dir(tmp_path, summary, _records([0, 1])), config, METHODS, [0, 1])
    assert state.complete is None and state.done == {0, 1}
    assert prepare(tmp_path, config, ["speculative"], [0, 1]).complete == summary


def test_dtypes_are_pinned_only_where_records_are_kept(tmp_path):
    """The earlier process's ``models`` and ``drafter_shape`` (the dtypes ``auto`` picked) are taken only with records
    that were drafted in them: a run cut before any prompt finished every method decides afresh (planted bugs: the
    ``state.records`` guards dropped, a resumed run with nothing kept still drafts in the old process's dtype)."""
    config = {"seed": 0}
    summary = {"status": "interrupted", "config": config, "models": {"draft_dtype": "bfloat16"},
               "drafter_shape": {"draft_dtype": "bfloat16", "draft_module": "probe"}}
    cut = _records([0], ["speculative"])  # cut before prompt 0's baseline
    state = prepare(_run_dir(tmp_path, summary, cut), config, METHODS, [0, 1])
    assert state.done == set() and state.records == []
    assert state.models == {} and state.drafter_shape == {}
    assert pinned_model({"draft_dtype": "auto"}, state) == ({"draft_dtype": "auto"}, None)
    kept = prepare(_run_dir(tmp_path, summary, _records([0])), config, METHODS, [0, 1])
    assert kept.models == summary["models"] and kept.drafter_shape == summary["drafter_shape"]


def test_a_resume_that_only_reruns_unfinished_prompts_keeps_its_wandb_run(tmp_path):
    """A run cut mid-prompt re-decodes that prompt: its records and summary are copied aside, but its W&B run stays
    (no series leaves it; planted bug: the W&B files moved aside whenever anything is decoded again, so every
    resumed run starts a new W&B run). Prompts not in this run do move it."""
    config = {"seed": 0}
    records = _records([0]) + _records([1], ["speculative"])  # cut during prompt 1's baseline
    _run_dir(tmp_path, {"status": "interrupted", "config": config}, records)
    (tmp_path / WANDB_STATE_FILE).write_text("{}")
    state = prepare(tmp_path, config, METHODS, [0, 1, 2])
    assert state.done == {0} and (tmp_path / WANDB_STATE_FILE).exists()
    (copy,) = tmp_path.glob("superseded-*")
    assert (copy / "records.jsonl").exists() and not (copy / WANDB_STATE_FILE).exists()
    state = prepare(tmp_path, config, METHODS, [1, 2])  # prompt 0 is not in this run: its series leave
    assert not (tmp_path / WANDB_STATE_FILE).exists()


def test_resume_false_sets_the_same_configs_results_aside(tmp_path):
    """``resume=false`` starts afresh even over finished results of the same config: they are moved aside, not
    skipped or kept (planted bug: the flag ignored, so the complete run is skipped)."""
    config = {"seed": 0}
    summary = {"status": "complete", "config": config, "num_prompts": 1, "question_ids": [0],
               "metrics": {m: {} for m in METHODS}}
    state = prepare(_run_dir(tmp_path, summary, _records([0])), config, METHODS, [0], resume=False)
    assert state.complete is None and state.done == set() and state.records == []
    assert not (tmp_path / "records.jsonl").exists() and not (tmp_path / "summary.json").exists()
    (moved,) = tmp_path.glob("superseded-*")
    assert "resume=false" in (moved / "REASON.txt").read_text()


# --------------------------------------------------------------------------- EAGLE


def test_eagle3_default_feature_layers_are_low_middle_and_high():
    """Layers 1, the middle and L - 2 (0-based outputs), clamped for shallow targets (planted bugs: layer 0 for
    the low one, L - 1 for the high one)."""
    assert default_feature_layers(32) == [1, 15, 30]
    assert default_feature_layers(4) == [1, 1, 2]
    assert default_feature_layers(1) == [0, 0, 0]


def test_a_feature_tap_concatenates_the_layers_in_the_order_given():
    """``take()`` is the outputs of ``layers`` in their given order, the order a saved eagle3 head's ``fuse`` was
    trained on (planted bug: another order; a head trained and run in one process cannot tell, a loaded one
    would fuse its three layers in the wrong slots)."""
    target = pair("llama")[0]
    assert target.config.num_hidden_layers == 2  # hidden_states: embeddings, layer 0's output, norm(layer 1's)
    tap = FeatureTap(target, [1, 0, 0])
    try:
        with torch.no_grad():
            out = target(torch.tensor([[3, 1, 4, 1, 5]]), output_hidden_states=True)
            high, low, low_again = tap.take().chunk(3, dim=-1)
            torch.testing.assert_close(target.get_decoder().norm(high), out.hidden_states[2])
        torch.testing.assert_close(low, out.hidden_states[1])
        torch.testing.assert_close(low_again, out.hidden_states[1])
    finally:
        tap.remove()


@pytest.mark.parametrize("version", ["eagle2", "eagle3"])
def test_an_untrained_head_reads_the_token_and_ignores_the_feature(version):
    """``init="target"`` makes ``fc`` pass the token's embedding only (the target cut to one layer): the untrained
    head's outputs do not depend on the features (planted bugs: ``fc``'s identity over the feature half, or the
    concatenation ``cat(feature, embedding)``)."""
    target = pair("llama")[0]
    head = EagleHead.for_target(target, version)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 5, head.hidden_size, generator=gen) for _ in range(2)]
    with torch.no_grad():
        (l0, h0), (l1, h1) = head(ids, feats[0]), head(ids, feats[1])
    torch.testing.assert_close(l0, l1)
    torch.testing.assert_close(h0, h1)


def test_eagle2_regresses_each_slots_output_on_the_next_feature():
    """Slot s reads ``(f_s, t_{s+1})`` and predicts ``f_{s+1}``: the regression target is the teacher's hidden state
    one position on (planted bug: ``t_hidden[:, j : j + m]``, the feature the slot was given, which teaches the head
    to copy its input)."""
    import torch.nn.functional as F

    from experiments.eagle_training import VERSION_DEFAULTS, eagle_loss, teacher_features, unroll

    target = pair("llama")[0]
    head = EagleHead.for_target(target, "eagle2", init="random").eval()
    batch = torch.randint(0, target.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    raw, logits, hidden = teacher_features(target, None, batch)
    opts = dict(VERSION_DEFAULTS["eagle2"], feature_noise=0.0, ce_weight=0.0, ttt_decay=1.0, ce_target="soft")
    with torch.no_grad():
        loss, metrics = eagle_loss(head, raw, logits, hidden, batch, opts)
        out = unroll(head, head.target_features(raw[:, :-1]), batch, 1)[0][1]  # [B, 8, H]
    want = F.smooth_l1_loss(out.float(), hidden[:, 1:])
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert metrics["train/regression_step1"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("version", ["eagle2", "eagle3"])
def test_a_one_token_prompt_in_a_batch_of_eagle_trees_drafts_from_its_second_step(version):
    """In a batch, a one-token prompt's row is prefilled with an empty ``[0, H]`` slice of the batch's features: it
    queues nothing and drafts from its second step, as its batch-1 run (planted bug: only ``None`` skipped, so an
    empty pair block is fed to the head). Every row equals its batch-1 run."""
    from drafters import EagleDrafter
    from specdec import SpeculativeDecoder
    from tests.test_eagle import noisy_head
    from tests.tiny_models import prompts

    target, _, tok = pair("llama")
    head = noisy_head(target, version, 0.05)
    rows = [prompts(tok, 1, seed=4)[0], torch.tensor([[17]])]
    out = SpeculativeDecoder(target, EagleDrafter(head, tree="binary")).generate_batch(rows, 6)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, EagleDrafter(head, tree="binary")).generate(ids, 6)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"row {i}"
        assert out.row_stats[i].proposed_per_step == single.stats.proposed_per_step, f"row {i}"
    assert out.row_stats[1].proposed_per_step[0] == 0


def test_a_batch_of_one_token_prompts_runs_no_target_forward_to_read():
    """eagle3 trees over a batch whose prompts are all one token: the prefill runs no target forward, so the shared
    tap is not read (planted bug: read anyway, a stale-read error); the rows equal their batch-1 runs."""
    from drafters import EagleDrafter
    from specdec import SpeculativeDecoder
    from tests.test_eagle import noisy_head

    target = pair("llama")[0]
    head = noisy_head(target, "eagle3", 0.05)
    rows = [torch.tensor([[17]]), torch.tensor([[23]])]
    out = SpeculativeDecoder(target, EagleDrafter(head, tree="binary")).generate_batch(rows, 5)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, EagleDrafter(head, tree="binary")).generate(ids, 5)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"row {i}"


def test_a_feature_layer_one_past_the_last_is_a_head_error():
    """A head made for a deeper target names the layer it cannot find (planted bug: ``i <= len(layers)`` lets the
    index equal to the depth through, an IndexError from the module list)."""
    target = pair("llama")[0]
    with pytest.raises(EagleHeadError, match=r"feature layers \[2\]"):
        FeatureTap(target, [0, 1, target.config.num_hidden_layers])
