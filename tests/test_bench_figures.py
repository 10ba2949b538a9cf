"""The benchmarks' per-method figures, the cost model's arithmetic and the cost measurement's bookkeeping, on
stand-ins: fake methods, fake clocks and fake forwards. Nothing here times a real forward."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from experiments import cost_measure
from experiments.bench_methods import Method, decode_seconds_per_token, pick_methods, run_all, tau_cell
from experiments.bench_output import command_line, match_note
from experiments.costs import KS, chain_speedup_by_k, cost_model, draft_cost_warnings, fit_alpha, recommend_k
from specdec.stats import DecodeStats

# --------------------------------------------------------------------------- bench_methods / bench_output


def _method(name: str, log: list, outputs: dict | None = None, prefills: list | None = None) -> Method:
    """A method whose output for prompt ``ids`` is ``outputs[call number]`` (default: ``ids`` plus one 0 token);
    ours (with stats) when ``prefills`` is given, each call's prefill time taken from it in turn."""
    calls = []

    def run(ids):
        log.append(name)
        calls.append(1)
        out = (outputs or {}).get(len(calls), torch.cat([ids, torch.zeros(1, 1, dtype=ids.dtype)], 1))
        stats = None if prefills is None else SimpleNamespace(
            tau=2.0, draft_acceptance_rate=0.5, time_prefill=prefills[(len(calls) - 1) % len(prefills)],
            target_forwards=4, time_compile=0.0)
        return out, stats
    return Method(name, run, ours=prefills is not None)


def test_run_all_rotates_the_order_keeps_every_prefill_and_any_mismatch(capsys):
    """Round r starts with method r (mod n); every round's prefill is kept; a method that differed from the
    reference in any round does not match, even if its last round did."""
    log: list[str] = []
    ids = torch.tensor([[1, 2]])
    wrong = torch.tensor([[1, 2, 9]])
    methods = [_method("hf_plain", log), _method("ours_a", log, prefills=[0.1, 0.2, 0.3]),
               _method("ours_b", log, outputs={2: wrong}, prefills=[0.5])]  # call 2: the first timed round
    run_all(methods, [ids], reps=3)
    assert log[:4] == ["hf_plain", "ours_a", "ours_b", "hf_plain"]  # warm-ups, then the reference
    assert log[4:] == ["hf_plain", "ours_a", "ours_b", "ours_a", "ours_b", "hf_plain", "ours_b", "hf_plain", "ours_a"]
    assert len(methods[1].prefill_s[0]) == 3 and len(methods[0].times[0]) == 3
    assert methods[1].matches and not methods[2].matches and methods[2].outputs[0].tolist() == [[1, 2, 0]]
    assert methods[1].new_tokens == {0: 1} and methods[1].forwards == {0: 4} and methods[0].forwards == {}
    assert "prompt 1/1 done" in capsys.readouterr().err


def test_decode_seconds_per_token_subtracts_the_median_prefill():
    """(median time - median prefill) per prompt, over the new tokens: (1.0 - 0.2 + 2.0 - 0.5) / 10."""
    meth = Method("ours", run=None, ours=True, new_tokens={0: 4, 1: 6}, times={0: [1.0, 0.9, 1.2], 1: [2.0]},
                  prefill_s={0: [0.2, 0.1, 0.6], 1: [0.5]})
    assert decode_seconds_per_token(meth) == pytest.approx((0.8 + 1.5) / 10)
    assert decode_seconds_per_token(Method("hf_plain", run=None, ours=False, times={0: [1.0]})) is None


def test_tau_cell_is_the_mean_then_the_pooled_tau():
    assert tau_cell({"tau": 5.0, "tau_pooled": 3.2}) == "5.00 / 3.20"
    assert tau_cell({"tau": None, "tau_pooled": None}) == ""


def test_pick_methods_ignores_empty_names():
    methods = [Method(n, run=None, ours=False) for n in ("hf_plain", "ours_x")]
    assert [m.name for m in pick_methods(methods, "ours_x,", ("hf_plain",))] == ["hf_plain", "ours_x"]
    assert [m.name for m in pick_methods(methods, ",ours_x")] == ["ours_x"]


def test_command_line_and_match_note(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/path/to/experiments/bench.py", "--size", "micro"])
    assert command_line(None) == "Command: `python -m experiments.bench --size micro`\n\n"
    assert command_line(["--prompts", "2"]) == "Command: `python -m experiments.bench --prompts 2`\n\n"
    assert "In float16, 'output = HF plain greedy' is shown but not checked" in match_note("float16")


# --------------------------------------------------------------------------- the cost model


def test_recommend_k_takes_the_smallest_k_on_a_tie():
    assert recommend_k({3: 2.0, 1: 2.0, 2: 1.5}) == 1 and recommend_k({}) is None


def test_a_draft_as_costly_as_the_target_is_no_warning():
    """Only a draft forward that costs *more* than a target forward is warned about."""
    assert draft_cost_warnings({"target": {1: 0.004}, "draft": {1: 0.004}}) == []
    assert len(draft_cost_warnings({"target": {1: 0.004}, "draft": {1: 0.0041}})) == 1


def test_speedup_by_k_takes_the_tokens_per_prompt():
    """With prefills measured, the curve by k depends on the tokens per prompt: the run's new tokens over its
    prompts (30 / 3 = 10), not all its new tokens."""
    costs = {"target": {1: 1.0, 2: 1.2, 9: 2.0}, "draft": {1: 0.1}, "prefill": {"target": 5.0, "draft": 1.0}}
    stats = DecodeStats(new_tokens=30)
    for accepted in (2, 1, 0, 2, 1, 2):
        stats.record_step(2, 2, accepted)
    metrics, model = cost_model(stats, costs, {"kind": "chain", "draft_forwards": "per_level"}, 1.5, num_prompts=3)
    expected = chain_speedup_by_k(model["alpha"], costs, KS, tokens_per_prompt=10.0)
    assert model["predicted_speedup_by_k"] == pytest.approx(expected)
    assert expected != pytest.approx(chain_speedup_by_k(model["alpha"], costs, KS, tokens_per_prompt=30.0))
    assert metrics["efficiency"] == pytest.approx(1.5 / metrics["predicted_speedup"])


def test_cheap_widths_drops_a_narrower_width_that_costs_the_same():
    """Padding to a wider width of equal cost is free, so only the wider of two equal widths is kept."""
    from experiments.costs import cheap_widths

    assert cheap_widths({1: 1.0, 2: 1.0, 3: 2.0}) == (2, 3)


def test_fit_alpha_is_a_probability_and_stops_at_the_first_depth_nobody_reached():
    """Hand-made depth counts (DecodeStats never makes these): a deeper depth accepting more often than the one
    above it fits an alpha over 1, which is clamped to 1; a depth with no proposals ends the fit (the depths
    below it are not weighed by a stale rate)."""
    assert fit_alpha([2, 10], [1, 10]) == 1.0  # unclamped: 11 / 7
    assert fit_alpha([10, 0, 5], [5, 0, 3]) == pytest.approx(0.5)  # not (5 + 3) / (10 + 0.5 * 5)


def test_only_batch_1_runs_are_priced():
    from experiments.costs import cost_model_scope

    assert cost_model_scope(1, "none") is None
    assert "batch_size=2" in cost_model_scope(2, "none")


# --------------------------------------------------------------------------- measuring costs


def test_spot_check_tolerates_small_absolute_differences_and_skips_prefills(monkeypatch):
    """A cached per-step curve holds if the spot check is within a factor of 2 *or* within 2 ms of it; a prefill
    entry (context 0) is never re-timed."""
    now = {}
    monkeypatch.setattr(cost_measure, "measure_interleaved", lambda requests, reps, backend: [dict(now)])
    now[1] = 0.001
    assert cost_measure._still_holds((None, 8, (1,)), {1: 0.0025}, "sdpa")  # 2.5x, but 1.5 ms apart
    assert cost_measure._still_holds((None, 8, (1,)), {1: 0.0018}, "sdpa")  # 1.8x
    assert not cost_measure._still_holds((None, 8, (1,)), {1: 0.0040}, "sdpa")  # 4x and 3 ms apart
    now.clear()  # a prefill entry would raise here (no width 1 timed)
    assert cost_measure._still_holds((None, 0, (5,)), {5: 1.0}, "sdpa")


def test_measure_interleaved_drops_two_warm_up_rounds(monkeypatch):
    """Rounds 0 and 1 are not timed: a fake forward that takes 10 s in them and 1 s after gives 1 s."""
    clock = [0.0]
    forwards = []

    def forward(model, cache, ids, *args, **kwargs):
        forwards.append(ids)
        clock[0] += 10.0 if len(forwards) <= 4 else 1.0  # two forwards per round: the warm-up one and width 1
    setup = {"model": None, "device": torch.device("cpu"), "context": 8,
             "cache": SimpleNamespace(truncate=lambda n: None), "inputs": {1: ("w1", None, None)}}
    monkeypatch.setattr(cost_measure, "_setup", lambda *a: setup)
    monkeypatch.setattr(cost_measure, "tree_forward", forward)
    monkeypatch.setattr(cost_measure.time, "perf_counter", lambda: clock[0])
    assert cost_measure.measure_interleaved([(None, 8, (1,))], reps=1) == [{1: 1.0}]
    assert len(forwards) == 2 * (1 + 2)


def test_time_probe_drops_two_warm_up_calls(monkeypatch):
    clock, calls = [0.0], []

    def probe():
        calls.append(1)
        clock[0] += 10.0 if len(calls) <= 2 else 1.0
    monkeypatch.setattr(cost_measure.time, "perf_counter", lambda: clock[0])
    assert cost_measure.time_probe(probe, reps=1) == 1.0 and len(calls) == 3


def test_the_cost_fingerprint_holds_the_context():
    """A curve measured after 8 cached tokens is not the one after 200: another cache entry."""
    from tests.tiny_models import pair

    target = pair("llama")[0]
    keys = {cost_measure.fingerprint_key(cost_measure.fingerprint(target, context, (1, 2), "sdpa", 3))
            for context in (8, 200)}
    assert len(keys) == 2


def test_measure_costs_times_widths_1_and_k_plus_1(monkeypatch):
    """A k-chain verifies k + 1 tokens: ks 2 and 4 time the target at widths 1, 3 and 5, the draft at width 1."""
    seen = []

    def measure(requests, reps, backend):
        seen.extend(requests)
        return [{w: float(w) for w in widths} for _, _, widths in requests]
    monkeypatch.setattr(cost_measure, "measure_interleaved", measure)
    costs = cost_measure.measure_costs("target", "draft", 40, [2, 4])
    assert seen == [("target", 40, (1, 3, 5)), ("draft", 40, (1,))]
    assert costs == {"context": 40, "target": {1: 1.0, 3: 3.0, 5: 5.0}, "draft": 1.0, "draft_transformers": 1.0}


def test_measure_costs_times_the_draft_as_our_chain_runs_it(monkeypatch):
    """With a probe (the lean forward our chains draft through), ``draft`` is the probe's time and
    transformers' own forward (HF's) is kept beside it: the zero-overhead ceiling costs our drafts, not HF's."""
    monkeypatch.setattr(cost_measure, "measure_interleaved",
                        lambda requests, reps, backend: [{w: float(w) for w in widths} for _, _, widths in requests])
    monkeypatch.setattr(cost_measure, "time_probe", lambda probe, reps: probe())
    costs = cost_measure.measure_costs("target", "draft", 40, [2], draft_probe=lambda: 0.25)
    assert (costs["draft"], costs["draft_transformers"]) == (0.25, 1.0)


def test_the_bench_probe_runs_the_draft_through_the_lean_forward():
    """A Llama draft gets a probe (one token through the lean forward after the context, giving its logits), and
    the header names both costs when they differ."""
    from drafters.fast_decoder import lean_probe
    from experiments.cost_measure import draft_cost_note
    from tests.tiny_models import pair

    draft = pair("llama")[1]
    probe = lean_probe(draft, True, 12)
    assert probe is not None and probe().shape[-1] == draft.config.vocab_size
    assert lean_probe(draft, False, 12) is None  # fast_forward=False: timed as transformers' forward
    assert "lean forward" in draft_cost_note({"draft": 0.001, "draft_transformers": 0.002})
    assert draft_cost_note({"draft": 0.001, "draft_transformers": 0.001}) == "1.00 ms"


def test_the_loop_table_splits_our_steps_and_sets_isolated_costs_beside():
    """Two calls of 10 and 30 steps: ms per step over all 40 steps, the rest of the loop what the phases leave; a
    chain's isolated drafting is k T_d(1) and its verify T_t(k + 1); HF's methods and trees get no row."""
    from experiments.bench_methods import add_loop, loop_table

    chain = Method("ours_chain_k2", None, True, 2)
    for steps, draft, verify in ((10, 0.02, 0.06), (30, 0.06, 0.18)):
        add_loop(chain.loop, SimpleNamespace(target_forwards=steps, time_total=0.5 + draft + verify + 0.004 * steps,
                                             time_prefill=0.5, time_draft=draft, time_verify=verify,
                                             time_accept=0.001 * steps))
    add_loop(chain.loop, SimpleNamespace(tau=2.0))  # stand-in stats without timings are skipped
    others = [Method("hf_plain", None, False), Method("ours_tree_binary", None, True)]
    rows, table = loop_table([*others, chain], lambda m: {"target": {1: 0.004, 3: 0.005}, "draft": 0.001})
    ms = rows["ours_chain_k2"]
    assert list(rows) == ["ours_chain_k2"] and table.count("\n") == 2
    assert (ms["draft"], ms["verify"], ms["accept"]) == pytest.approx((2.0, 6.0, 1.0))
    assert (ms["step"], ms["rest"]) == pytest.approx((12.0, 3.0))  # 8 ms of phases + 4 ms of loop per step
    assert (ms["draft_isolated"], ms["verify_isolated"]) == pytest.approx((2.0, 5.0))


def test_the_loop_table_leaves_untimed_phases_unknown():
    """The fixed-shape step (``--compile``) times no phases: its row gives the whole step beside the isolated
    forwards, and its phases as unknown (``-``, None in the JSON), not as 0 ms."""
    from experiments.bench_methods import add_loop, loop_table

    fixed = Method("ours_chain_k2_graph", None, True, 2)
    add_loop(fixed.loop, DecodeStats(target_forwards=10, time_total=0.6, time_prefill=0.5))
    rows, table = loop_table([fixed], lambda m: {"target": {1: 0.004, 3: 0.005}, "draft": 0.001})
    ms = rows["ours_chain_k2_graph"]
    assert ms["step"] == pytest.approx(10.0) and ms["draft"] is ms["verify"] is ms["accept"] is ms["rest"] is None
    assert table.splitlines()[-1] == "| ours_chain_k2_graph | 10.00 (7.00) | - (2.00) | - (5.00) | - | - |"


def test_drafters_bench_pools_depth1_acceptance_over_the_timed_calls_only():
    """bench_drafters' depth-1 acceptance: steps accepting at depth 1 over steps proposing there, over the timed
    calls; run_all's warm-up on prompt 0 is not one of them (it counted prompt 0 once more)."""
    from experiments.bench_drafters import _record_stats, summarize

    accepted = {1: 1, 2: 0}  # prompt 0 (marked by its first token 1): 1 of 1 step accepted; prompt 1: 0 of 3

    def ours(ids):
        stats = DecodeStats(target_forwards=3, new_tokens=4, time_total=1.0)
        steps = 1 if int(ids[0, 0]) == 1 else 3
        for step in range(steps):
            stats.record_step(1, 1, accepted[int(ids[0, 0])] if step == 0 else 0)
        return torch.cat([ids, torch.zeros(1, 1, dtype=ids.dtype)], 1), stats

    methods = [_method("hf_plain", []), Method("ours_ar", ours, ours=True)]
    kept = _record_stats(methods)
    run_all(methods, [torch.tensor([[1, 5]]), torch.tensor([[2, 5]])], reps=1)
    assert len(kept["ours_ar"]) == 2  # two timed calls; the warm-up is not kept
    rows, _ = summarize(methods, kept, greedy=True)
    assert rows[1]["alpha_depth1"] == pytest.approx(1 / 4)  # pooled: (1 + 0) / (1 + 3); with the warm-up 2 / 5


def _cut_at(call: int) -> list[Method]:
    """hf_plain and an ``ours_ar`` whose ``call``-th call (1: the warm-up) is cut by Ctrl-C."""
    calls = []

    def ours(ids):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return torch.cat([ids, torch.zeros(1, 1, dtype=ids.dtype)], 1), DecodeStats(
            target_forwards=2, new_tokens=1, time_total=1.0, time_prefill=0.25)
    return [_method("hf_plain", []), Method("ours_ar", ours, ours=True)]


def test_a_ctrl_c_keeps_the_finished_prompts_and_drops_the_cut_one(capsys):
    """Ctrl-C in prompt 2's second round (call 5: warm-up, prompt 1's two rounds, prompt 2's first): run_all
    returns 1 (prompts finished), every method keeps prompt 1's figures only and its loop sums as they were after
    prompt 1 (the cut prompt's finished round drops out too); the exit status says the run was cut unless an
    output differed. In the first prompt the interrupt goes on up (nothing to show)."""
    from experiments.bench_methods import final_status, interrupted_note

    prompts = [torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), torch.tensor([[5, 6]])]
    assert run_all(_cut_at(99), prompts, reps=2) == 3
    methods = _cut_at(5)
    assert run_all(methods, prompts, reps=2) == 1
    assert "interrupted (Ctrl-C) during prompt 2/3: the tables cover the 1 finished" in capsys.readouterr().err
    for meth in methods:
        assert list(meth.times) == list(meth.outputs) == list(meth.new_tokens) == [0] and len(meth.times[0]) == 2
    assert list(methods[1].prefill_s) == list(methods[1].tau) == list(methods[1].forwards) == [0]
    assert methods[1].loop["steps"] == 2 * 2  # prompt 1's two rounds of 2 steps, not prompt 2's round
    with pytest.raises(KeyboardInterrupt):
        run_all(_cut_at(3), prompts, reps=2)
    assert interrupted_note(3, 3) == "" and "after 1 of 3 prompts" in interrupted_note(1, 3)
    assert (final_status(0, 1, 3), final_status(1, 1, 3), final_status(0, 3, 3), final_status(1, 3, 3)) == (130, 1, 0, 1)



def test_a_ctrl_c_between_prompts_keeps_the_prompt_before_it(capsys):
    """Ctrl-C in ``between()`` (bench's cost sampling) after prompt 2: its rounds finished, so run_all returns 2 and
    every method keeps prompts 1 and 2."""
    prompts = [torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), torch.tensor([[5, 6]])]
    methods, sampled = _cut_at(99), []

    def between():
        if len(sampled) == 1:
            raise KeyboardInterrupt
        sampled.append(1)
    assert run_all(methods, prompts, reps=2, between=between) == 2
    assert "interrupted (Ctrl-C) after prompt 2/3: the tables cover the 2 finished" in capsys.readouterr().err
    for meth in methods:
        assert list(meth.times) == list(meth.outputs) == [0, 1] and len(meth.times[1]) == 2
    assert methods[1].loop["steps"] == 2 * 2 * 2

@pytest.mark.parametrize("cut_at", ["first prompt", "second prompt"])
def test_bench_drafters_keeps_the_temperatures_it_finished(cut_at, monkeypatch, capsys, tmp_path):
    """Ctrl-C at the second temperature: in its first prompt, the greedy table stands and a note says the rest has
    none (it was thrown away with the interrupt); in its second, that temperature's table covers prompt 1. Exit
    status 130 either way; --json says how many prompts the last table covers."""
    import json

    from experiments import bench_drafters

    prompts = [torch.tensor([[1, 2]]), torch.tensor([[3, 4]])]
    monkeypatch.setattr(bench_drafters, "load_pair", lambda args: (None, None, None))
    monkeypatch.setattr(bench_drafters, "load_prompt_ids", lambda tok, target, args: prompts)
    monkeypatch.setattr(bench_drafters, "head_drafters", lambda args, notes: {})
    monkeypatch.setattr(bench_drafters, "verify_widths", lambda widths, *args: widths)
    monkeypatch.setattr(bench_drafters, "machine_line", lambda: "test machine")
    built = []

    def build_methods(target, draft, args, temperature, heads):
        built.append(temperature)
        calls = {"n": 0}
        cut = {"first prompt": 2, "second prompt": 3}[cut_at] if len(built) == 2 else None  # 1: the warm-up

        def ours(ids):
            calls["n"] += 1
            if calls["n"] == cut:
                raise KeyboardInterrupt
            return torch.cat([ids, torch.zeros(1, 1, dtype=ids.dtype)], 1), DecodeStats(
                target_forwards=1, new_tokens=1, time_total=1.0)
        return [_method("hf_plain", []), Method("ours_ar", ours, ours=True)]

    monkeypatch.setattr(bench_drafters, "build_methods", build_methods)
    status = bench_drafters.main(["--temperatures", "0,0.8", "--reps", "1", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "r.json").read_text())
    assert status == 130 and "### greedy\n" in out and list(data["results"]) == (
        ["0.0"] if cut_at == "first prompt" else ["0.0", "0.8"])
    if cut_at == "first prompt":
        assert "Note: interrupted (Ctrl-C) in the first prompt at temperature 0.8: no table for it" in out
        assert "T = 0.8" not in out and data["prompts_done"] == 0
    else:
        assert "### T = 0.8, rejection (Interrupted (Ctrl-C) after 1 of 2 prompts: the tables cover those.)" in out
        assert data["prompts_done"] == 1 and data["prompts_asked"] == 2
