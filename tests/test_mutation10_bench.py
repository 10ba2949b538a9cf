"""Mutation pass 10 over the side-by-side benchmark's figures (:mod:`experiments.bench`,
:mod:`experiments.bench_methods`) and the draft cost it measures (:mod:`experiments.cost_measure`), on stand-in
methods, fake clocks and fake forwards as in ``tests/test_bench_figures.py``. Each test names the planted bugs it
catches."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from experiments import cost_measure
from experiments.bench import median_costs, spread_cell, summarize
from experiments.bench_methods import Method, add_loop, isolated_round, loop_table, run_all
from experiments.bench_output import publish
from specdec.stats import DecodeStats

COSTS = {"target": {1: 0.004, 3: 0.005}, "draft": 0.001}  # T_t(1), T_t(3), T_d(1)

# --------------------------------------------------------------------------- isolated costs and the loop table


def test_an_isolated_round_without_drafts_costs_one_target_forward_even_without_a_draft_cost():
    """The AR loop (k None or 0) drafts nothing, also when no draft was timed (``draft`` None: a run without a draft
    model). Catches ``k * None`` (a TypeError) where the missing draft cost was not read as 0."""
    for k in (None, 0):
        assert isolated_round(k, {"target": {1: 0.004}, "draft": None}) == (0.0, 0.004)
    assert isolated_round(2, COSTS) == pytest.approx((0.002, 0.005))


def _loop(name: str, k: int | None = None, dynamic: bool = False, **times) -> Method:
    meth = Method(name, None, True, k, dynamic=dynamic)
    add_loop(meth.loop, DecodeStats(target_forwards=10, time_total=0.6, time_prefill=0.5, **times))
    return meth


def test_the_loop_table_has_the_ar_loop_and_leaves_out_dynamic_chains_and_methods_without_costs():
    """The AR loop drafts nothing (0 ms drafting, timed) and verifies at T_t(1); a chain of varying length has no one
    isolated k; a method its costs do not cover gets no row. Catches the AR row dropped (only ``ours_chain``), its
    phases shown as untimed because one of them is 0 (``all`` for ``any``), a dynamic chain costed as a fixed k,
    and ``costs_for`` returning None not skipped."""
    ar = _loop("ours_ar", time_verify=0.05, time_accept=0.01)
    dynamic = _loop("ours_chain_k2_conf0.5", 2, dynamic=True, time_draft=0.02, time_verify=0.05)
    uncosted = _loop("ours_chain_k4", 4, time_draft=0.02, time_verify=0.05)
    rows, table = loop_table([ar, dynamic, uncosted], lambda m: None if m is uncosted else COSTS)
    assert list(rows) == ["ours_ar"]
    ms = rows["ours_ar"]
    assert (ms["draft"], ms["verify"], ms["accept"], ms["rest"]) == pytest.approx((0.0, 5.0, 1.0, 4.0))
    assert table.splitlines()[-1] == "| ours_ar | 10.00 (4.00) | 0.00 (0.00) | 5.00 (4.00) | 1.00 | 4.00 |"


def test_run_all_adds_every_timed_calls_loop_and_not_the_warm_ups():
    """Three timed rounds of a call that takes 2 steps: the loop sums 6 steps and three times each phase. Catches
    ``run_all`` not adding the calls' loops (the loop table empty for every method)."""
    def plain(ids):
        return torch.cat([ids, torch.zeros(1, 2, dtype=ids.dtype)], 1), None

    def chain(ids):
        return plain(ids)[0], DecodeStats(target_forwards=2, time_total=0.3, time_prefill=0.1, time_draft=0.05,
                                          time_verify=0.1, time_accept=0.01)
    methods = [Method("hf_plain", plain, False), Method("ours_chain_k2", chain, True, 2)]
    run_all(methods, [torch.tensor([[1, 2]])], reps=3)
    assert methods[1].loop == pytest.approx({"steps": 6, "decode": 0.6, "draft": 0.15, "verify": 0.3, "accept": 0.03})


# --------------------------------------------------------------------------- the summary's per-prompt figures


def _two_prompt_methods() -> list[Method]:
    """Two prompts of 30 tokens. Our AR loop and the k = 2 chain each take exactly what their forwards cost (median
    over reps; the chain's third rep of prompt 0 is an outlier, its prefills 0.05, 0.01, 0.02 have median 0.02):
    efficiency 1.00 on both prompts. The chain's zero-overhead seconds are 0.02 + 10 * 0.007 = 0.09 and
    0.01 + 15 * 0.007 = 0.115; HF's assisted k = 2 takes 0.2 and 0.4 s, so the ceiling is 2.22 and 3.48."""
    new = {0: 30, 1: 30}
    hf = {"times": {0: [1.0], 1: [1.0]}, "new_tokens": new}
    ar_s = 0.01 + 30 * 0.004
    return [
        Method("hf_plain", None, False, **hf),
        Method("ours_ar", None, True, times={0: [ar_s], 1: [ar_s]}, new_tokens=new, tau={0: 1.0, 1: 1.0},
               prefill_s={0: [0.01], 1: [0.01]}, forwards={0: 30, 1: 30}),
        Method("hf_assisted_k2", None, False, 2, times={0: [0.2], 1: [0.4]}, new_tokens=new),
        Method("ours_chain_k2", None, True, 2, peer="hf_assisted_k2", times={0: [0.09, 0.09, 0.5], 1: [0.115]},
               new_tokens=new, tau={0: 3.0, 1: 2.0}, acceptance={0: 0.9, 1: 0.5},
               prefill_s={0: [0.05, 0.01, 0.02], 1: [0.01]}, forwards={0: 10, 1: 15}),
        Method("ours_chain_k2_conf0.5", None, True, 2, peer="hf_assisted_k2", dynamic=True,
               times={0: [0.09], 1: [0.115]}, new_tokens=new, tau={0: 3.0, 1: 2.0}, acceptance={0: 0.9, 1: 0.5},
               prefill_s={0: [0.02], 1: [0.01]}, forwards={0: 10, 1: 15}),
    ]


def test_a_chains_ceiling_and_efficiency_per_prompt_median_min_max():
    """Catches the ceiling inverted (ours over HF's) or taken against the chain itself, the first rep's prefill
    instead of the median, tokens/s from the mean time over reps (the outlier rep counted), the spread printed
    max-min, and a dynamic chain (no one k) given an efficiency or a ceiling."""
    rows = {r["method"]: r for r in summarize(_two_prompt_methods(), COSTS)[0]}
    chain = rows["ours_chain_k2"]
    assert spread_cell(chain["efficiency"]) == "1.00 (1.00-1.00)"
    assert spread_cell(chain["ceiling_vs_hf"]) == "2.85 (2.22-3.48)"
    assert chain["ceiling_vs_hf"]["min"] == pytest.approx(2.22, abs=5e-3)  # --json: numbers, not the table's text
    assert chain["tokens_per_s"] == pytest.approx((30 / 0.09 + 30 / 0.115) / 2)
    assert rows["ours_chain_k2_conf0.5"]["efficiency"] is None and rows["ours_chain_k2_conf0.5"]["ceiling_vs_hf"] is None


def test_median_costs_take_each_width_and_draft_cost_at_its_median_over_samples():
    """Catches the last sample's curve kept instead of the median of the samples timed between prompts."""
    samples = [{"context": 40, "target": {1: t1, 3: t3}, "draft": d, "draft_transformers": h}
               for t1, t3, d, h in ((1.0, 2.0, 0.1, 0.2), (3.0, 1.0, 0.3, 0.4), (2.0, 9.0, 0.2, 0.3))]
    assert median_costs(samples) == {"context": 40, "target": {1: 2.0, 3: 2.0}, "draft": 0.2, "draft_transformers": 0.3}


# --------------------------------------------------------------------------- measuring the draft's cost


def test_measure_costs_keeps_the_drafts_own_transformers_time_and_times_no_absent_draft(monkeypatch):
    """The fake forward costs 10 ms per token for the target and 1 ms for the draft. Catches ``draft_transformers``
    read from the target's curve, and a run without a draft model (None) timing a draft request anyway."""
    seen = []

    def measure(requests, reps, backend):
        seen.extend(model for model, _, _ in requests)
        return [{w: (0.01 if model == "target" else 0.001) * w for w in widths} for model, _, widths in requests]
    monkeypatch.setattr(cost_measure, "measure_interleaved", measure)
    assert cost_measure.measure_costs("target", "draft", 40, [2])["draft_transformers"] == 0.001
    seen.clear()
    costs = cost_measure.measure_costs("target", None, 40, [2])
    assert seen == ["target"] and costs["draft"] is None and costs["draft_transformers"] is None


def test_time_probe_keeps_the_median_of_the_timed_calls(monkeypatch):
    """Two untimed calls of 10 s, then 1, 3 and 2 s: the median is 2 s. Catches the fastest call kept instead."""
    clock, durations = [0.0], iter([10.0, 10.0, 1.0, 3.0, 2.0])
    monkeypatch.setattr(cost_measure.time, "perf_counter", lambda: clock[0])
    assert cost_measure.time_probe(lambda: clock.__setitem__(0, clock[0] + next(durations)), reps=3) == 2.0


def test_the_draft_cost_note_names_ours_first_and_transformers_only_when_known():
    """Catches the two costs swapped in the header, and a note without a transformers time (costs measured another
    way) raising on None."""
    note = cost_measure.draft_cost_note({"draft": 0.001, "draft_transformers": 0.002})
    assert note == "1.00 ms through our lean forward (2.00 ms through transformers', as HF runs it)"
    assert cost_measure.draft_cost_note({"draft": 0.001}) == "1.00 ms"
    assert cost_measure.draft_cost_note({"draft": 0.001, "draft_transformers": None}) == "1.00 ms"


# --------------------------------------------------------------------------- what the bench writes


def test_publish_writes_the_table_and_the_data_with_the_arguments(tmp_path, capsys):
    """Catches the Markdown file written without the table, and the JSON without the run's arguments."""
    args = SimpleNamespace(markdown=str(tmp_path / "t.md"), json=str(tmp_path / "t.json"), reps=3)
    publish("| a | b |", {"rows": [1]}, args)
    assert capsys.readouterr().out == "| a | b |\n"
    assert (tmp_path / "t.md").read_text() == "| a | b |\n"
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["rows"] == [1] and data["args"]["reps"] == 3 and data["machine"]
