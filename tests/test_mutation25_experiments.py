"""Mutation pass 25: the report's charts, the busy-machine check, the step profiler's table and timings, the decode
run's cost-model plumbing and the greedy-up-to-rounding check (each test names the planted bug it catches)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from experiments import decode_costs, greedy_check, machine_load, step_profile
from experiments.runs import K_KEY, Run
from tests.test_report_figures import chain_summary
from tests.tiny_models import peaky_pair


def _unsaved(monkeypatch) -> None:
    """The charts are drawn but neither laid out nor written (seconds saved per test)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kw: None)
    monkeypatch.setattr(Figure, "tight_layout", lambda fig, *args, **kw: None)


def _calls(monkeypatch, method: str) -> list[tuple[str | None, tuple, dict]]:
    """Every ``Axes.<method>`` call, as ``(label, args, kwargs)``, while still drawing it (nothing is saved)."""
    from matplotlib.axes import Axes

    _unsaved(monkeypatch)
    calls, real = [], getattr(Axes, method)

    def record(ax, *args, **kw):
        calls.append((kw.get("label"), args, kw))
        return real(ax, *args, **kw)

    monkeypatch.setattr(Axes, method, record)
    return calls


def _by_label(calls, label: str):
    (found,) = [(args, kw) for name, args, kw in calls if name == label]
    return found


def _k_runs(tmp_path, ks, **kw) -> list[Run]:
    return [Run(tmp_path / f"k{k}", f"k{k}", overrides={K_KEY: str(k)}, summary=chain_summary(k, 1.2, **kw))
            for k in ks]


# --- experiments/report_plots.py -----------------------------------------------------------------------------


def test_bar_labels_keep_their_line_breaks_and_size_the_figure_by_them():
    """Each line of a label wraps on its own, the height counts the lines and a bar is as wide as its label (planted
    bugs: the text wrapped whole, its newlines lost; the line count one short; ``min`` for the bar's ``max``)."""
    from experiments.report_plots import _bar_labels

    wrapped, (width, height) = _bar_labels(["k=2\nDraftModelDrafter", "x"])
    assert wrapped == ["k=2\nDraftModelDrafter", "x"]
    assert width == 6.0 and height == pytest.approx(4.2 + 0.045 * 17 + 0.1 * 2)
    assert _bar_labels(["a" * 30], width=26)[0] == ["a" * 26 + "\n" + "a" * 4]
    wide = _bar_labels(["a" * 26] * 10)[1][0]  # each bar as wide as its label, not the 0.8 inch floor
    assert wide == pytest.approx((0.042 * 26 + 0.15) * 10 + 3)


def test_a_legend_of_exactly_the_inside_limit_stays_inside_and_no_labels_draw_none(monkeypatch):
    """``LEGEND_INSIDE`` entries stay in the axes, one more goes below; no labelled line, no legend (planted bugs:
    ``>=`` for ``>``; a legend drawn for an axes without labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.report_plots import LEGEND_INSIDE, _finish_axes

    fig, axes = plt.subplots(1, 3)
    for n, ax in zip((LEGEND_INSIDE, LEGEND_INSIDE + 1, 0), axes):
        for i in range(n):
            ax.plot([0, 1], [i, i], label=f"line {i}")
        _finish_axes(ax)
    assert axes[0].get_legend().get_bbox_to_anchor() == axes[0].bbox  # inside: anchored to the axes
    assert axes[1].get_legend().get_bbox_to_anchor() != axes[1].bbox
    assert axes[2].get_legend() is None
    plt.close(fig)


def test_the_k_chart_sorts_runs_by_k_and_draws_the_expected_tau_over_every_k(tmp_path, monkeypatch):
    """Runs given k=10 first are drawn in k order, the expected-tau curve spans 1..8 and the swept k=10 at each k's
    own value, and the "predicted" crosses are each run's ``predicted_speedup`` (planted bugs: the runs left
    unsorted; the grid without the swept ks; ``expected_tau(alpha, k + 1)``; the crosses read from ``speedup``)."""
    from experiments.costs import KS, expected_tau
    from experiments.report_plots import make_plots
    from experiments.runs import pooled_model

    lines = _calls(monkeypatch, "plot")
    runs = _k_runs(tmp_path, (10, 2))
    for run, predicted in zip(runs, (1.7, 1.4)):
        run.summary["metrics"]["predicted_speedup"] = predicted
    make_plots(runs, [K_KEY], tmp_path)
    assert _by_label(lines, "all runs")[0][0] == [2, 10]
    assert _by_label(lines, "all runs predicted (measured tau)")[0][:2] == ((2, 10), (1.4, 1.7))
    alpha = pooled_model(runs)[0]
    (expected,) = [args for name, args, _ in lines if name and "expected, pooled alpha=" in name]
    assert expected[0] == [*KS, 10] and expected[1] == pytest.approx([expected_tau(alpha, k) for k in [*KS, 10]])


def test_one_fixed_forward_run_in_a_series_drops_its_cost_model_curve(tmp_path, monkeypatch):
    """The chain cost model's curve needs every run of the series priced by k (planted bug: ``any`` for ``all``)."""
    from experiments.report_plots import make_plots

    lines = _calls(monkeypatch, "plot")
    runs = _k_runs(tmp_path, (2, 3))
    runs[0].summary["drafter_shape"] = {"kind": "chain", "k": 2, "draft_forwards": "fixed"}
    make_plots(runs, [K_KEY], tmp_path)
    assert not [name for name, _, _ in lines if name and "cost model" in name]
    lines.clear()
    make_plots(_k_runs(tmp_path, (2, 3)), [K_KEY], tmp_path)  # both priced: drawn
    assert [name for name, _, _ in lines if name and "cost model" in name]


def _sized(tmp_path, name: str, nodes: float, speedup: float | None, **summary) -> Run:
    spec = {"mean_proposed_drafts": nodes, "tau": 2.0, "tokens_per_s": 10.0}
    return Run(tmp_path / name, name, summary={"status": "complete", "drafter": "DraftModelDrafter",
                                               "config": {"drafter": {"num_speculative_tokens": 2}}, **summary,
                                               "metrics": {"speculative": spec, "speedup": speedup}})


def test_chains_beside_a_hybrid_get_the_nodes_chart(tmp_path, monkeypatch):
    """A hybrid's chain runs are not chains of one model (planted bug: ``is_hybrid`` dropped from the condition)."""
    from experiments.report_plots import make_plots

    _unsaved(monkeypatch)
    hybrid = _sized(tmp_path, "hybrid", 1.5, 1.1, drafter_shape={"kind": "chain", "k": 2, "draft_source": "ngram"})
    assert "tau_speedup_vs_nodes" in make_plots([_sized(tmp_path, "chain", 2.0, 1.2), hybrid], [], tmp_path)


def test_the_nodes_chart_colours_by_shape_kind_with_one_legend_entry_each(tmp_path, monkeypatch):
    """Two trees of different sizes share one colour and one legend entry, and the speedup panel plots the measured
    speedup (planted bugs: every point labelled; the digits kept so each tree is its own kind; ``predicted_speedup``
    read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.report_plots import nodes_figure

    lines = _calls(monkeypatch, "plot")
    runs = [_sized(tmp_path, f"t{n}", n, up, config={"tree": {"paths": [[0], [1], [0, 0], [1, 0]][:n]}})
            for n, up in ((3, 1.3), (4, 1.6))]
    for run in runs:
        run.summary["metrics"]["predicted_speedup"] = 9.0
    plt.close(nodes_figure(plt, runs, {r.name: r.name for r in runs}))
    assert [name for name, _, _ in lines] == ["tree", "tree", None, None]
    assert {kw["color"] for _, _, kw in lines} == {"C0"}
    assert [args[1][0] for _, args, _ in lines[1::2]] == [1.3, 1.6]


def _stepped(tmp_path, baseline: dict | None = None) -> Run:
    spec = {"tau": 2.0, "tokens_per_s": 50.0, "target_forwards": 10, "steps": 10, "time_total": 0.6,
            "time_prefill": 0.1, "time_draft": 0.1, "time_verify": 0.2, "time_accept": 0.05, "time_other": 0.15}
    run = Run(tmp_path, "r", summary=chain_summary(2, 1.5, spec=spec))
    if baseline is not None:
        run.summary["metrics"]["baseline"] = baseline
    return run


def test_time_per_step_stacks_the_phases_and_adds_the_baselines_bar(tmp_path, monkeypatch):
    """Each phase sits on the sum of those below it, the baseline's bar shows the baseline's own times, and the
    drafters chart pairs each run's tokens/s with its baseline's (planted bugs: ``bottom = values``; the baseline bar
    read from the speculative metrics; the baseline's tokens/s read from the speculative metrics)."""
    from experiments.report_plots import make_plots

    bars = _calls(monkeypatch, "bar")
    baseline = {"tokens_per_s": 20.0, "target_forwards": 40, "steps": 40, "time_total": 2.1, "time_prefill": 0.1,
                "time_draft": 0.0, "time_verify": 1.6, "time_accept": 0.2, "time_other": 0.2}
    make_plots([_stepped(tmp_path, baseline)], [], tmp_path)
    assert list(_by_label(bars, "verify")[0][1]) == pytest.approx([20.0, 40.0])
    assert _by_label(bars, "accept+commit")[1]["bottom"] == pytest.approx([30.0, 40.0])
    assert _by_label(bars, "other")[1]["bottom"] == pytest.approx([35.0, 45.0])
    assert _by_label(bars, "autoregressive baseline")[0][1] == [20.0]


def test_the_time_chart_takes_its_baseline_from_a_stepped_baseline(tmp_path, monkeypatch):
    """A baseline that reports tokens/s but no steps gets no bar (planted bug: the baseline chosen by ``tokens_per_s``
    instead of ``target_forwards``: a division by zero steps)."""
    from experiments.report_plots import make_plots

    bars = _calls(monkeypatch, "bar")
    make_plots([_stepped(tmp_path, {"tokens_per_s": 20.0})], [], tmp_path)
    assert list(_by_label(bars, "draft")[0][1]) == pytest.approx([10.0])


# --- experiments/machine_load.py -----------------------------------------------------------------------------


def _watch(monkeypatch, end: int | None, start_us: int | None, threads: int = 1, load=(1.0, 2.0, 3.0)):
    monkeypatch.setattr(machine_load, "cpu_stall_us", lambda: end)
    monkeypatch.setattr(machine_load, "time", SimpleNamespace(perf_counter=lambda: 12.0))
    monkeypatch.setattr(machine_load.os, "getloadavg", lambda: load, raising=False)
    monkeypatch.setattr(machine_load.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    return machine_load.LoadWatch(start_us, 10.0, threads).summary()


def test_the_wait_share_is_seconds_of_stall_over_seconds_of_wall_time(monkeypatch):
    """1 s of stall over 2 s of decoding is 50%, with the 1-minute load average and the warning for this process's
    one thread on two cores (planted bugs: stall microseconds divided by 1e3; ``getloadavg()[1]``; threads and cores
    swapped in the warning's call)."""
    summary = _watch(monkeypatch, 1_500_000, 500_000)
    assert summary["cpu_wait_share"] == pytest.approx(0.5) and summary["load_average_1m"] == 1.0
    assert summary["cpu_cores"] == 2
    (said,) = summary["warnings"]
    assert said.startswith("the machine was busy: work waited for a CPU 50% of the decoding's time")


def test_without_a_stall_reading_at_the_start_the_load_average_decides(monkeypatch):
    """No pressure file when the decoding started: no share, the load average judges (planted bug: the start's
    None not checked, a ``TypeError``)."""
    summary = _watch(monkeypatch, 7, None, load=(3.0, 0.0, 0.0))
    assert summary["cpu_wait_share"] is None
    assert summary["warnings"][0].startswith("the machine was busy: load average 3.0 on 2 cores")


def test_a_load_of_exactly_half_a_core_over_is_not_busy():
    """The load must exceed the cores by more than half a core (planted bug: ``>=``). (The threads' own half-core
    bound cannot be met exactly with threads <= cores while the load is over the cores' bound: ``>=`` there is an
    equivalent mutation.)"""
    assert machine_load.busy_machine_warnings(None, 2.5, 1, 2) == []
    assert machine_load.busy_machine_warnings(None, 2.75, 1, 2)


def test_a_cgroup_pressure_file_without_a_total_falls_back_to_the_systems(tmp_path, monkeypatch):
    """A file without a ``total=`` field is skipped like a missing one (planted bug: ``StopIteration`` not caught)."""
    cgroup, system = tmp_path / "cpu.pressure", tmp_path / "cpu"
    cgroup.write_text("some avg10=0.00 avg60=0.00\n")
    system.write_text("some avg10=0.15 total=99\n")
    monkeypatch.setattr(machine_load, "_PRESSURE_FILES", (cgroup, system))
    assert machine_load.cpu_stall_us() == 99


# --- experiments/step_profile.py -----------------------------------------------------------------------------


def test_a_variant_times_each_width_and_counts_only_the_setup_as_compile_time(monkeypatch):
    """Setup is the time from each width's start to its forward's being ready, not the timing runs between, and the
    curve counts as captured only if every width replayed (planted bugs: the clock not restarted after timing a width;
    ``captured or replayed``)."""
    clock = iter([0.0, 2.0, 10.0, 13.0, 20.0])
    monkeypatch.setattr(step_profile, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(step_profile, "static_forwards",
                        lambda model, context, widths, mode, backend: ((w, w, w == 1) for w in widths))
    monkeypatch.setattr(step_profile, "_median_s", lambda run, device, reps: run * 1e-3)
    got = step_profile.time_variant(torch.nn.Linear(1, 1), 16, (1, 4), "graph", "sdpa", 2)
    assert got == {"curve": {1: 1e-3, 4: 4e-3}, "captured": False, "setup_s": 5.0}


def test_the_markdown_table_divides_by_the_floor_and_the_narrowest_width():
    """Columns: one per width and five more; T(narrow) over the floor, T(wide) over T(narrow); the profile's device
    time in ms and us per call (planted bugs: the floor ratio inverted; the width ratio inverted; one separator
    column short; device seconds scaled by 1e6; us times calls)."""
    results = {"variants": {"graph-sdpa": {"curve": {1: 0.002, 4: 0.003}, "captured": True, "setup_s": 7.4}},
               "profile": {"variant": "graph-sdpa", "launches": 4, "device_s": 0.0015,
                           "kernels": [{"name": "aten::mm", "calls": 4, "us": 10.0}]}}
    lines = step_profile.markdown(results, (1, 4), 0.001).splitlines()
    header = "| variant | T(w1) ms | T(w4) ms | T(w1) / read floor | T(w4) / T(w1) | compile + capture s | captured |"
    assert lines[:3] == [header, "|---|---|---|---|---|---|---|", "| graph-sdpa | 2.00 | 3.00 | 2.00 | 1.50 | 7 | yes |"]
    assert lines[4] == ("Kernels of one uncaptured width-1 forward (graph-sdpa): 4 launches, 1.50 ms of device time "
                        "summed (read floor 1.00 ms).")
    assert lines[-1] == "| `aten::mm` | 4 | 10 | 2.5 |"


def test_the_kernel_table_counts_every_launch_and_sorts_by_time(monkeypatch):
    """Launches are the calls summed over the kernels, their time in seconds, and the rows longest first (planted
    bugs: launches counted as distinct kernels; microseconds scaled by 1e-3; the rows sorted shortest first)."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)

    def run():
        for _ in range(3):
            torch.mm(a, b)
        torch.add(a, b)

    monkeypatch.setattr(step_profile, "static_forwards", lambda *args, **kw: [(1, run, False)])
    rows, launches, seconds = step_profile.kernel_table(torch.nn.Linear(1, 1), 16, "graph", "sdpa", False, 100)
    assert launches == sum(r["calls"] for r in rows) and launches >= 4
    assert seconds == pytest.approx(sum(r["us"] for r in rows) * 1e-6)
    assert [r["us"] for r in rows] == sorted((r["us"] for r in rows), reverse=True)
    assert {"name": "aten::mm", "calls": 3} in [{"name": r["name"], "calls": r["calls"]} for r in rows]


# --- experiments/decode_costs.py -----------------------------------------------------------------------------


def test_the_run_prefills_the_rounded_mean_prompt_with_the_configured_backend(monkeypatch):
    """Prompts of 4, 5 and 5 tokens: the mean 4.67 rounds to 5, less the last token; the run's ``attn_backend`` is
    passed on; ``costs=null`` measures nothing (planted bugs: the mean floored; the backend fixed at ``sdpa``;
    ``costs is False`` for ``not costs``)."""
    from experiments import cost_measure

    seen = []
    monkeypatch.setattr(cost_measure, "measure_run_costs", lambda *args: seen.append(args) or {"target": {}})
    cfg = OmegaConf.create({"costs": True, "max_new_tokens": 4, "attn_backend": "triton"})
    encoded = [SimpleNamespace(input_ids=torch.zeros(1, n, dtype=torch.long)) for n in (4, 5, 5)]
    decode_costs.measure_run_costs(cfg, "shape", SimpleNamespace(target=None), encoded)
    assert seen[0][3:5] == (4, "triton")
    assert decode_costs.measure_run_costs(OmegaConf.create({"costs": None}), "shape", None, encoded) is None


def test_the_cost_model_gets_every_prompts_stats_merged_and_its_warnings_follow_the_runs(monkeypatch):
    """The model sees the prompts' merged stats, and its warnings come after the run's (planted bugs: the first
    prompt's stats only; the model's warnings put first)."""
    from experiments import costs
    from experiments.results import MethodResults
    from specdec.stats import DecodeStats

    seen = []
    monkeypatch.setattr(costs, "cost_model", lambda *args: seen.append(args) or (
        {"predicted_speedup": 2.0}, {"warnings": ["the model's"]}))
    spec = MethodResults(stats=[DecodeStats(new_tokens=3), DecodeStats(new_tokens=5)])
    summary = decode_costs.add_cost_model({"metrics": {"speedup": 1.5}, "warnings": ["the run's"]}, spec, None, {})
    assert seen[0][0].new_tokens == 8 and seen[0][3:5] == (1.5, 2)
    assert summary["warnings"] == ["the run's", "the model's"] and summary["metrics"]["predicted_speedup"] == 2.0


# --- experiments/greedy_check.py -----------------------------------------------------------------------------


def _bf16_target():
    return peaky_pair(vocab=16)[0].to(torch.bfloat16)


def test_the_float32_reference_is_in_eval_mode():
    """A target left in training mode gets a reference that runs without dropout (planted bug: ``.eval()``
    dropped)."""
    target = _bf16_target().train()
    assert not greedy_check.float32_reference(target).training and target.training


def test_rounding_is_judged_on_the_float32_reference_over_prompt_and_output_at_the_given_tolerance(monkeypatch):
    """The deficit is computed by the float32 copy over the prompt followed by the output, cut at the prompt's
    length, and judged at the tolerance given (planted bugs: the reduced-precision target passed; the default
    tolerance used whatever the caller asked)."""
    seen = []
    monkeypatch.setattr(greedy_check, "greedy_deficit", lambda ref, full, n: seen.append((ref, full, n)) or 1.0)
    target = _bf16_target()
    got = greedy_check.rounding_check(target, {"q": torch.tensor([[1, 2, 3]])}, {"q": [4, 5]}, ["q"], tolerance=2.0)
    assert got == {"greedy_deficit": 1.0, "greedy_up_to_rounding": True}
    ((ref, full, n),) = seen
    assert ref.get_output_embeddings().weight.dtype == torch.float32 and ref is not target
    assert full.tolist() == [[1, 2, 3, 4, 5]] and n == 3
    assert not greedy_check.rounding_check(target, {"q": torch.tensor([[1]])}, {"q": [4]}, ["q"])[
        "greedy_up_to_rounding"]


def test_the_deficit_is_the_largest_gap_to_the_argmax_at_each_generated_position():
    """On a float32 model: the argmax continuation has deficit 0 and the worst token has max - min at its position
    (planted bug: the logits sliced from ``prompt_len`` instead of ``prompt_len - 1``, one position late)."""
    target = peaky_pair(vocab=16)[0]
    ids = torch.tensor([[3, 1, 4]])
    with torch.inference_mode():
        z = target(input_ids=ids).logits[0, -1]  # [V]
    best, worst = torch.cat([ids, z.argmax().view(1, 1)], 1), torch.cat([ids, z.argmin().view(1, 1)], 1)
    assert greedy_check.greedy_deficit(target, best, 3) == 0.0
    assert greedy_check.greedy_deficit(target, worst, 3) == pytest.approx(float(z.max() - z.min()), rel=1e-5)


def test_the_speedup_charts_title_names_only_the_series_it_draws(tmp_path, monkeypatch):
    """A trial's costs=false sweep drew the measured line alone under a title promising predicted crosses and a
    cost-model curve; with costs, all three are named."""
    from experiments.report_plots import make_plots

    titles = _calls(monkeypatch, "set_title")

    def speedup_title() -> str:
        (title,) = [args[0] for _, args, _ in titles if args[0].startswith("Speedup vs k")]
        return title

    runs = _k_runs(tmp_path, (2, 3))
    for run in runs:
        run.summary["cost_model"] = {"costs": None}
    make_plots(runs, [K_KEY], tmp_path)
    assert "measured (o)" in speedup_title() and "predicted" not in speedup_title()
    assert "cost model" not in speedup_title()
    titles.clear()
    runs = _k_runs(tmp_path, (2, 3))
    for run, predicted in zip(runs, (1.4, 1.7)):
        run.summary["metrics"]["predicted_speedup"] = predicted
    make_plots(runs, [K_KEY], tmp_path)
    assert all(part in speedup_title() for part in ("measured (o)", "predicted from measured tau (x)", "cost model"))
