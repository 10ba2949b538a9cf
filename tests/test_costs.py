"""The cost model predicts what a run measures, for every drafter shape.

Each model's forward (and Medusa's heads) is made to cost a known time (a sleep hook, far above the
tiny models' own compute), so the costs the model measures, and the speedup a run measures, are
known; ``predicted_speedup`` must then match the measured speedup (efficiency near 1). No assertion
depends on how fast this machine is.
"""
from __future__ import annotations

import copy
import gc
import time

import pytest

from drafters import DraftModelDrafter, MedusaDrafter, NGramDrafter, NoDrafter
from drafters.medusa_heads import MedusaHeads
from experiments.cost_measure import measure_run_costs
from experiments.costs import cost_model
from specdec import SamplingParams, SpeculativeDecoder
from specdec.stats import DecodeStats
from tests.tiny_models import noisy_copy, pair, prompts

T_TARGET, T_DRAFT, T_HEADS = 0.008, 0.002, 0.004  # seconds per forward


def _slow(module, seconds):
    """A copy of ``module`` whose every forward sleeps ``seconds`` more: a causal LM's input embedding (which
    transformers' forward and the drafts' lean forward both call once per forward) or the module itself."""
    module = copy.deepcopy(module)
    embedding = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    (embedding or module).register_forward_pre_hook(lambda *args: time.sleep(seconds))
    return module


@pytest.fixture(scope="module")
def setup():
    target = _slow(pair("llama")[0], T_TARGET)
    return target, prompts(pair("llama")[2], 3, seed=5)


def _measured_speedup_and_model(target, drafter, ids_list, cache_dir, max_new=24):
    decoders = {name: SpeculativeDecoder(target, d, sampling=SamplingParams())
                for name, d in (("spec", drafter), ("ar", NoDrafter()))}
    for dec in decoders.values():  # one-off first-call costs land in neither timed run
        dec.generate(ids_list[0], max_new_tokens=4, seed=0)
    per_run = {name: [] for name in decoders}
    gc.collect()
    gc.disable()  # as timeit does: a collection pass lands in one run only
    try:
        for ids in ids_list:  # interleaved per prompt, so a machine whose speed drifts slows both runs alike
            for name, dec in decoders.items():
                per_run[name].append(dec.generate(ids, max_new_tokens=max_new, seed=0).stats)
    finally:
        gc.enable()
    runs = {name: DecodeStats.merge(stats) for name, stats in per_run.items()}
    speedup = runs["spec"].tokens_per_s / runs["ar"].tokens_per_s
    shape = drafter.step_shape(target)
    context = ids_list[0].shape[1] + max_new // 2
    prefill = round(sum(ids.shape[1] for ids in ids_list) / len(ids_list)) - 1
    costs = measure_run_costs(target, shape, context, prefill, cache_dir=cache_dir)
    metrics, model = cost_model(runs["spec"], costs, shape.describe(type(drafter).__name__), speedup, len(ids_list))
    return speedup, metrics, model, runs["spec"], costs


def test_draft_model_chain_predicted_equals_measured(setup, tmp_path):
    target, ids_list = setup
    drafter = DraftModelDrafter(_slow(noisy_copy("llama"), T_DRAFT), num_speculative_tokens=3)
    speedup, metrics, _model, stats, costs = _measured_speedup_and_model(target, drafter, ids_list, tmp_path)
    assert costs["draft"][1] >= T_DRAFT and costs["target"][1] >= T_TARGET  # the sleeps, plus the models' compute
    assert 0.8 < metrics["efficiency"] < 1.2, (speedup, metrics)
    assert 1.0 < stats.tau < 4.0  # a chain that accepts some drafts: the prediction is not trivial


def test_medusa_heads_are_costed(setup, tmp_path):
    """Medusa's heads run once per step; their cost is in the prediction (it used to count as zero)."""
    target, ids_list = setup
    heads = _slow(MedusaHeads.for_target(target, num_heads=3, init="random"), T_HEADS)
    drafter = MedusaDrafter(heads, tree="binary")
    speedup, metrics, model, stats, costs = _measured_speedup_and_model(target, drafter, ids_list, tmp_path)
    assert model["drafter"]["draft_forwards"] == "per_step" and model["drafter"]["draft_module"] == "probe"
    assert costs["draft"][1] >= T_HEADS
    assert 0.8 < metrics["efficiency"] < 1.2, (speedup, metrics)
    free = dict(costs, draft=None)  # the same run with the heads costed at zero predicts too much
    no_heads, _ = cost_model(stats, free, model["drafter"], speedup, len(ids_list))
    assert no_heads["predicted_speedup"] > metrics["predicted_speedup"] * 1.1


def test_ngram_predicted_equals_measured(setup, tmp_path):
    target, ids_list = setup
    speedup, metrics, model, _, costs = _measured_speedup_and_model(target, NGramDrafter(3), ids_list, tmp_path)
    assert costs["draft"] is None and model["drafter"]["draft_forwards"] == "none"
    assert 0.8 < metrics["efficiency"] < 1.2, (speedup, metrics)


def test_a_draft_slower_than_the_target_is_a_warning():
    """What a cuDNN re-plan per forward did to a bf16 draft on CUDA: visible in the summary."""
    costs = {"target": {1: 0.004, 2: 0.0045}, "draft": {1: 0.030}}
    shape = {"kind": "chain", "draft_forwards": "per_level"}
    _, model = cost_model(None, costs, shape, None)
    assert len(model["warnings"]) == 1 and "costs 30.00 ms, more than a target forward (4.00 ms)" in model["warnings"][0]
    _, fine = cost_model(None, dict(costs, draft={1: 0.001}), shape, None)
    assert fine["warnings"] == []


def test_a_recommended_k_that_cannot_pay_off_is_a_warning():
    """A drafter whose drafts are seldom accepted: every k is predicted slower than plain decoding, so the best k is
    only the least slow (the summary said recommended_k=4 and nothing else); a drafter that pays gets no warning."""
    from specdec.stats import DecodeStats

    costs = {"target": {w: 0.004 + 0.0002 * w for w in range(1, 10)}, "draft": {1: 0.0004}}
    shape = {"kind": "chain", "draft_forwards": "per_level", "k": 4}

    def stats(accepted_at_depth_1):
        return DecodeStats(new_tokens=100, depth_proposed=[100, 100, 100, 100],
                           depth_accepted=[accepted_at_depth_1, accepted_at_depth_1 // 2, 0, 0])

    metrics, model = cost_model(stats(2), costs, shape, None)
    assert max(model["predicted_speedup_by_k"].values()) < 1 and metrics["recommended_k"] is not None
    assert [w for w in model["warnings"] if w.startswith("no draft length pays off at alpha")], model["warnings"]
    _, good = cost_model(stats(90), costs, shape, None)
    assert max(good["predicted_speedup_by_k"].values()) > 1 and good["warnings"] == []


def test_a_cached_curve_that_a_spot_check_contradicts_is_measured_again(tmp_path):
    """A curve cached while the machine was busy (here: 50x the real cost) is not trusted forever: the spot check
    of its narrowest width disagrees, so it is measured again and the new curve replaces it."""
    from experiments.cost_measure import REPS, _store, cost_curve, fingerprint

    target = _slow(pair("llama")[0], T_TARGET)
    widths = (1, 2)
    real, _ = cost_curve(target, 8, widths, cache_dir=tmp_path)
    _store(fingerprint(target, 8, widths, "sdpa", REPS), {w: 50 * s for w, s in real.items()}, tmp_path)
    again, cached = cost_curve(target, 8, widths, cache_dir=tmp_path)
    assert not cached and again[1] < 5 * real[1]
    assert cost_curve(target, 8, widths, cache_dir=tmp_path) == (again, True)  # the new one is kept and holds


def test_a_hybrids_lookup_steps_cost_no_draft_forwards():
    """A hybrid's step shape is its model-running part's, with that part's label as draft_source: only the depths
    of that part's trees count as draft forwards (a 6-deep lookup step costs none), as Medusa-style per-step
    forwards count only that part's steps."""
    from drafters.hybrid import behind_lookup
    from experiments.costs import draft_forwards_per_step

    target, draft, _ = pair("llama")
    shape = behind_lookup(DraftModelDrafter(draft, 3)).step_shape(target).describe("hybrid")
    assert shape["draft_source"] == "draft_model" and shape["draft_forwards"] == "per_level"
    stats = DecodeStats()
    for depth, source in ((6, "ngram"), (3, "draft_model"), (6, "ngram"), (2, "draft_model")):
        stats.record_step(depth, depth, 0, source)
    assert draft_forwards_per_step(stats, shape) == pytest.approx((3 + 2) / 4)
    assert draft_forwards_per_step(stats, {**shape, "draft_source": None}) == pytest.approx(17 / 4)
    assert draft_forwards_per_step(stats, {**shape, "draft_forwards": "per_step"}) == pytest.approx(2 / 4)


def test_cheap_widths_and_verify_widths_auto():
    """cheap_widths keeps the widths no wider one undercuts; decode's verify_widths=auto gives them to the
    speculative decoder from the run's measured curve, and needs costs=true."""
    from omegaconf import OmegaConf

    from experiments.costs import cheap_widths
    from experiments.decode_costs import auto_widths, set_cheap_widths
    from specdec.errors import ConfigError
    from tests.tiny_models import pair

    curve = {1: 8.9, 2: 13.6, 3: 14.7, 4: 12.5, 5: 12.7, 6: 13.7, 7: 15.2, 8: 13.1, 9: 14.5, 12: 14.9, 16: 16.3}
    assert cheap_widths(curve) == (1, 4, 5, 8, 9, 12, 16)
    assert cheap_widths({1: 1.0, 2: 2.0, 3: 3.0}) == (1, 2, 3)  # a rising curve pads nothing
    assert not auto_widths(OmegaConf.create({"verify_widths": [1, 4], "costs": False}))
    assert auto_widths(OmegaConf.create({"verify_widths": "auto", "costs": True}))
    with pytest.raises(ConfigError, match="costs=true"):
        auto_widths(OmegaConf.create({"verify_widths": "auto", "costs": False}))
    target = pair("llama")[0]
    decoder = SpeculativeDecoder(target, NoDrafter())
    set_cheap_widths(decoder, {"target": curve})
    assert decoder.verifier.width(3) == 4 and decoder.verifier.width(7) == 8


def test_a_padded_run_is_priced_at_its_padded_widths():
    """A run whose verifies were padded (verify_widths, kept in the costs) is predicted at the widths it ran: a k=2
    chain verifies 3 tokens at width 4 (12 s, not T(3) = 16 s), so predicted_speedup is not too low and
    efficiency not too high (it went above 1 with auto widths); the k curve prices each k padded too."""
    from experiments.costs import chain_speedup_by_k, cost_at, predicted_speedups, step_seconds, verify_cost

    curve = {1: 10.0, 2: 14.0, 3: 16.0, 4: 12.0, 5: 13.0}
    plain, padded = {"target": curve}, {"target": curve, "verify_widths": [1, 4, 5]}
    assert verify_cost(plain, 3) == 16.0 and verify_cost(padded, 3) == 12.0 and verify_cost(padded, 1) == 10.0
    assert verify_cost(padded, 6) == cost_at(curve, 6)  # wider than every listed width: unpadded
    assert step_seconds(padded, 0, 3) == 12.0
    stats = DecodeStats()
    for _ in range(4):
        stats.record_step(2, 2, 1)
    stats.new_tokens = 8
    chain = {"kind": "chain", "draft_forwards": "none"}
    assert predicted_speedups(stats, padded, chain, 1)[1] == pytest.approx(2 * 10.0 / 12.0)
    assert predicted_speedups(stats, plain, chain, 1)[1] == pytest.approx(2 * 10.0 / 16.0)
    assert chain_speedup_by_k(0.5, padded, ks=(2,))[2] == pytest.approx(1.75 * 10.0 / 12.0)
    none, ar = {"kind": "none", "draft_forwards": "none"}, DecodeStats()
    for _ in range(4):
        ar.record_step(0, 0, 0)
    ar.new_tokens = 4
    assert predicted_speedups(ar, plain, none, 1) == (1.0, 1.0)
    assert predicted_speedups(ar, {"target": curve, "verify_widths": [4]}, none, 1)[1] == pytest.approx(10.0 / 12.0)


def test_the_baseline_is_never_padded(monkeypatch):
    """verify_widths pads the speculative decoder's verifies only: the autoregressive baseline, the speedup's
    reference, runs its one-token forwards unpadded (a list without 1, [4, 8], padded every baseline forward to 4
    and inflated the speedup); the run's costs carry the speculative widths for the cost model."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from experiments.decode import BASELINE, SPECULATIVE, make_decoders
    from experiments.decode_costs import padded_costs
    from specdec import SamplingParams
    from tests.tiny_models import pair

    cfg = OmegaConf.create({"verify_widths": [4, 8], "costs": True, "baseline": True, "attn_backend": "sdpa",
                            "compile": "none"})
    models = SimpleNamespace(target=pair("llama")[0])
    decoders = make_decoders(cfg, models, NoDrafter(), "greedy", SamplingParams())
    spec, base = decoders[SPECULATIVE][0], decoders[BASELINE][0]
    assert spec.verifier.width(1) == 4 and base.verifier.width(1) == 1
    assert padded_costs({"target": {1: 1.0}}, spec)["verify_widths"] == [4, 8]
    assert padded_costs({"target": {1: 1.0}}, base) == {"target": {1: 1.0}} and padded_costs(None, spec) is None


def test_per_step_draft_forwards_count_only_the_steps_that_proposed():
    """A drafter with one draft call per step (Medusa's heads) makes none on a step that proposes nothing (a
    prompt's last step, asked for depth 0): 2 calls over 3 steps."""
    from experiments.costs import draft_forwards_per_step

    stats = DecodeStats()
    for nodes, depth in ((4, 3), (4, 3), (0, 0)):
        stats.record_step(nodes, depth, 0)
    assert draft_forwards_per_step(stats, {"draft_forwards": "per_step", "draft_source": None}) == pytest.approx(2 / 3)


def test_the_run_measures_the_prefill_the_decoder_runs(monkeypatch):
    """The decoder prefills every prompt token but the last (the first step's root): the cost model's prefill is
    the mean prompt length less one, its context the median prompt plus half the new tokens."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from experiments import cost_measure
    from experiments.decode_costs import measure_run_costs as run_costs

    seen = []
    monkeypatch.setattr(cost_measure, "measure_run_costs", lambda *args: seen.append(args) or {"target": {}})
    cfg = OmegaConf.create({"costs": True, "max_new_tokens": 10, "attn_backend": "sdpa"})
    encoded = [SimpleNamespace(input_ids=torch.zeros(1, n, dtype=torch.long)) for n in (4, 6, 11)]
    target = object()
    assert run_costs(cfg, "shape", SimpleNamespace(target=target), encoded) == {"target": {}}
    assert seen == [(target, "shape", 6 + 5, 7 - 1, "sdpa", None, ": costs=false skips them")]
    assert run_costs(OmegaConf.create({"costs": False}), "shape", None, encoded) is None
    assert run_costs(cfg, "shape", SimpleNamespace(target=target), []) is None  # a warning, not ZeroDivisionError


def test_a_curve_where_fewer_tokens_cost_far_more_is_implausible():
    """A forward of more tokens does the work of fewer and more: a narrower width costing over 1.5x (and 2 ms
    more than) a wider one was timed on a busy machine (the curve below was cached beside a test run)."""
    from experiments.cost_measure import implausible

    assert implausible({1: .010, 2: .011, 4: .0105, 8: .013, 16: .020}) is None  # noise within the factor
    busy = {1: .016, 2: .280, 5: .280, 6: .055, 16: .0535, 24: .132}
    assert implausible(busy) == "2 tokens cost 280.00 ms, more than 1.5x the 53.50 ms of 16 tokens"
    assert implausible({1: .0149, 2: .010}) is None and implausible({1: .0151, 2: .010}) is not None  # the factor
    assert implausible({1: .0034, 2: .0015}) is None and implausible({1: .0036, 2: .0015}) is not None  # the floor
    assert implausible({1: .010, 64: .030, 2: .0151, 8: .010}) == "2 tokens cost 15.10 ms, more than 1.5x the 10.00 ms of 8 tokens"
    assert implausible({7: 1.0}) is None


def _fake_measurements(monkeypatch, curves):
    """``measure_interleaved`` answers ``curves`` in turn (one per call, for every request); the calls are counted."""
    from experiments import cost_measure

    calls = []

    def measure(requests, reps=0, backend="sdpa"):
        calls.append(len(requests))
        return [dict(curves[min(len(calls), len(curves)) - 1]) for _ in requests]

    monkeypatch.setattr(cost_measure, "measure_interleaved", measure)
    return calls


BUSY, QUIET = {1: .016, 2: .280, 16: .0535}, {1: .016, 2: .017, 16: .030}


def test_an_implausible_measurement_is_measured_again_and_only_a_plausible_one_is_cached(monkeypatch, tmp_path):
    from experiments.cost_measure import cost_curve

    calls = _fake_measurements(monkeypatch, [BUSY, QUIET])
    assert cost_curve(pair("llama")[0], 0, (1, 2, 16), cache_dir=tmp_path) == (QUIET, False) and calls == [1, 1]
    assert len(list(tmp_path.iterdir())) == 1
    calls = _fake_measurements(monkeypatch, [BUSY])  # busy twice: returned, never cached
    assert cost_curve(pair("llama")[0], 1, (1, 2, 16), cache_dir=tmp_path) == (BUSY, False) and calls == [1, 1]
    assert len(list(tmp_path.iterdir())) == 1


def test_a_curve_implausible_twice_is_a_warning_of_the_run(monkeypatch, tmp_path):
    from experiments.cost_measure import measure_run_costs

    _fake_measurements(monkeypatch, [BUSY])
    shape = NGramDrafter(3).step_shape(None)
    costs = measure_run_costs(pair("llama")[0], shape, 0, cache_dir=tmp_path)
    assert costs["implausible"] == {"target": "2 tokens cost 280.00 ms, more than 1.5x the 53.50 ms of 16 tokens"}
    _, model = cost_model(None, costs, {"kind": "chain", "draft_forwards": "none"}, None)
    assert len(model["warnings"]) == 1 and model["warnings"][0].startswith(
        "the target forward-cost curve is implausible even measured twice (2 tokens cost 280.00 ms")
    _fake_measurements(monkeypatch, [QUIET])
    assert measure_run_costs(pair("llama")[0], shape, 0, cache_dir=tmp_path)["implausible"] == {}


def test_an_implausible_cached_curve_is_measured_again(tmp_path):
    """An entry cached before curves were checked (or by hand) is not trusted: measured again, replaced."""
    from experiments.cost_measure import REPS, _store, cost_curve, fingerprint

    target = _slow(pair("llama")[0], T_TARGET)
    widths = (1, 2, 3)
    real, _ = cost_curve(target, 8, widths, cache_dir=tmp_path)
    _store(fingerprint(target, 8, widths, "sdpa", REPS), {**real, 2: 0.5}, tmp_path)  # width 1 holds
    again, cached = cost_curve(target, 8, widths, cache_dir=tmp_path)
    assert not cached and again[2] < 0.1
    assert cost_curve(target, 8, widths, cache_dir=tmp_path) == (again, True)


def test_the_drafter_bench_notes_an_implausible_curve(monkeypatch, tmp_path):
    """``bench_drafters --verify-widths auto`` reads widths off the curve: its notes say when the curve is not to be
    trusted."""
    import torch

    from experiments.bench_drafters import verify_widths

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    prompt = torch.zeros(1, 5, dtype=torch.long)  # [1, 5]
    for curve, lines in ((BUSY, 2), (QUIET, 1)):  # a busy curve is never cached: the quiet one is measured
        _fake_measurements(monkeypatch, [curve])
        notes = []
        verify_widths("auto", pair("llama")[0], [prompt], 8, notes)
        assert len(notes) == lines and notes[0].startswith("verify widths")
    _fake_measurements(monkeypatch, [BUSY])
    notes = []
    verify_widths("auto", pair("llama")[0], [prompt], 10, notes)
    assert notes[1].startswith("the target's cost curve is implausible even measured twice (2 tokens cost 280.00 ms")


def test_curves_not_cached_yet_are_announced_with_how_to_skip_them(monkeypatch, tmp_path, caplog):
    """A trial's first SmolLM2 run said nothing for ten minutes while its curves were measured: the measuring is
    announced (with the caller's hint), and a run whose curves are cached says nothing."""
    import logging

    from experiments.cost_measure import measure_run_costs

    _fake_measurements(monkeypatch, [QUIET])
    shape = NGramDrafter(3).step_shape(None)
    with caplog.at_level(logging.INFO, logger="experiments.cost_measure"):
        measure_run_costs(pair("llama")[0], shape, 0, cache_dir=tmp_path, skip_hint=": costs=false skips them")
        said = "measuring forward costs for the predicted speedup (target, after 0 tokens; cached per model and device)"
        assert caplog.messages == [f"{said}: costs=false skips them"]
        caplog.clear()
        measure_run_costs(pair("llama")[0], shape, 0, cache_dir=tmp_path)
        assert caplog.messages == []


@pytest.mark.parametrize("terminal", [True, False])
def test_timing_shows_a_bar_at_a_terminal_only(monkeypatch, terminal):
    """A busy machine's cost measurement ran minutes without a sign of life: at a terminal a bar counts the rounds;
    into a file or pipe (logs, tests) nothing is written."""
    import io
    import sys

    from experiments.cost_measure import measure_interleaved

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setattr(sys, "stderr", Stream())
    curve = measure_interleaved([(pair("llama")[0], 4, (1, 2))], reps=1)[0]
    assert sorted(curve) == [1, 2]
    assert ("timing forwards" in sys.stderr.getvalue()) == terminal
