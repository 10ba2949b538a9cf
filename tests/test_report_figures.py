"""The sweep report's aggregations on hand-made runs: no decoding, no timing, seconds in all.

Each run is a :class:`experiments.runs.Run` (or a ``summary.json`` with its ``.hydra/overrides.yaml``) whose
numbers are chosen so that every figure the report derives from them is known exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import report
from experiments.runs import K_KEY, Run, load_runs, pooled_model, row_of, series, shape_of, swept_keys

T_KEY = "sampling.temperature"
#: A flat verify cost and a draft forward of 0.2 target forwards: alpha 0.8 recommends k = 4 (REFERENCES.md).
COSTS = {"target": {1: 1.0, 64: 1.0}, "draft": {1: 0.2}}


def chain_summary(k: int, speedup: float | None = None, *, status: str = "complete", alpha: float = 0.8,
                  new_tokens: int = 40, num_prompts: int = 2, costs: dict | None = COSTS, temperature: float = 0.0,
                  spec: dict | None = None) -> dict:
    """A draft-model chain's summary: geometric acceptance ``alpha`` over 1000 steps, ``speedup`` if given."""
    metrics = {"speculative": {"depth_proposed": [1000] * k,
                               "depth_accepted": [round(1000 * alpha ** d) for d in range(1, k + 1)],
                               "new_tokens": new_tokens, "num_prompts": num_prompts, "tau": 3.0, "tokens_per_s": 10.0,
                               **(spec or {})}}
    if speedup is not None:
        metrics["speedup"] = speedup
    return {"status": status, "drafter": "DraftModelDrafter", "num_prompts": num_prompts, "metrics": metrics,
            "config": {"drafter": {"num_speculative_tokens": k}, "sampling": {"temperature": temperature}},
            "cost_model": {"costs": costs}}


def chain_run(tmp_path: Path, k: int, speedup: float | None = None, temperature: str | None = None, **kw) -> Run:
    overrides = {K_KEY: str(k)} | ({T_KEY: temperature} if temperature is not None else {})
    name = f"k{k}" + (f"_t{temperature}" if temperature is not None else "")
    return Run(tmp_path / name, name, overrides=overrides, summary=chain_summary(k, speedup, **kw))


def write_run(root: Path, name: str, summary: dict, overrides: dict[str, str]) -> Path:
    path = root / name
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    (path / "summary.json").write_text(json.dumps(summary))
    return path


# --------------------------------------------------------------------------- recommended k vs measured


def test_recommended_k_is_checked_against_the_best_measured_k(tmp_path):
    """k = 4 is recommended; k = 6 measured best (2.00x) and k = 4 1.80x: 10.0% below the best, a MISS at a 5%
    tolerance and OK at 10%."""
    runs = [chain_run(tmp_path, k, up) for k, up in ((2, 1.5), (4, 1.8), (6, 2.0))]
    (line,) = report.check_recommendations(runs, [K_KEY], 0.05)
    assert line.startswith("all runs: recommended k=4 (alpha=0.800); best measured k=6 (2.00x); ")
    assert line.endswith("k=4 measured 1.80x, 10.0% below the best (tolerance 5%): MISS")
    assert report.check_recommendations(runs, [K_KEY], 0.10)[0].endswith("(tolerance 10%): OK")


def test_a_recommended_k_that_measured_best_passes_at_zero_tolerance(tmp_path):
    runs = [chain_run(tmp_path, k, up) for k, up in ((2, 1.5), (4, 2.0), (6, 1.9))]
    (line,) = report.check_recommendations(runs, [K_KEY], 0.0)
    assert "best measured k=4 (2.00x)" in line and line.endswith("0.0% below the best (tolerance 0%): OK")
    assert report._share("0") == 0.0 and report._share("1") == 1.0  # both ends are valid tolerances


def test_recommendation_check_without_a_measured_speedup_or_outside_the_sweep(tmp_path):
    no_baseline = [chain_run(tmp_path, k) for k in (2, 4)]
    assert report.check_recommendations(no_baseline, [K_KEY], 0.05) == [
        "all runs: no recommendation check (needs costs=true, drafts proposed and a baseline)"]
    outside = [chain_run(tmp_path, k, up) for k, up in ((2, 1.5), (6, 2.0))]
    assert report.check_recommendations(outside, [K_KEY], 0.05)[0].endswith("k=4 is not in the sweep")
    batched = [chain_run(tmp_path, k) for k in (2, 4)]
    batched[1].summary["metrics"]["speculative"]["batch_size"] = 3  # decode measures no costs for batches
    assert report.check_recommendations(batched, [K_KEY], 0.05) == [
        "all runs: no recommendation check (the cost model prices batch-1 runs; these ran batch_size=3)"]


def test_a_draft_of_fixed_forwards_gets_no_k_recommendation_and_no_cost_curve(tmp_path, monkeypatch):
    """A cross-tokenizer sweep: its summaries give no ``recommended_k`` (its drafter runs a fixed number of draft
    forwards whatever k), yet the report checked "recommended k=1" and drew the chain cost model's curve ("rec.
    k=1"), which disagreed with the run's own predictions. Its measured points stay on the k plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from experiments.report_plots import make_plots

    runs = [chain_run(tmp_path, k, up) for k, up in ((2, 1.2), (3, 1.1))]
    for run in runs:
        run.summary["drafter_shape"] = {"kind": "chain", "max_nodes": 3, "k": 3, "draft_forwards": "fixed"}
    (line,) = report.check_recommendations(runs, [K_KEY], 0.05)
    assert line.startswith("all runs: no recommendation check (its drafter runs a fixed number of draft forwards")
    labels = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **kw: labels.append(kw.get("label")) or plot(ax, *a, **kw))
    assert "tau_speedup_vs_k" in make_plots(runs, [K_KEY], tmp_path)
    assert "all runs measured" in labels and not [name for name in labels if name and "cost model" in name]


# --------------------------------------------------------------------------- series and the pooled model


def test_series_group_complete_chains_by_the_other_swept_values(tmp_path):
    """One curve per temperature (k is the curve's x); an interrupted run is on no curve."""
    runs = [chain_run(tmp_path, k, 1.0, t) for t in ("0.7", "1.0") for k in (1, 2)]
    runs.append(chain_run(tmp_path, 4, 1.0, "1.0", status="interrupted"))
    groups = series(runs, swept_keys(runs))
    assert {label: [r.name for r in group] for label, group in groups.items()} == {
        "T=0.7": ["k1_t0.7", "k2_t0.7"], "T=1.0": ["k1_t1.0", "k2_t1.0"]}


def test_a_hybrids_k_is_its_model_parts_and_it_draws_no_chain_curve(tmp_path):
    """``drafter=hybrid`` has no top-level ``num_speculative_tokens``: its k column is the step shape's (the model
    part's chain length); its runs are on no k-curve, since the chain cost model would price its free lookup steps
    as k draft forwards. Other chains' k is their config's (a cross-tokenizer draft's step k counts its forwards)."""
    hybrid = chain_summary(4, 1.3) | {"drafter": "HybridDrafter", "config": {"drafter": {"min_drafts": 1}}}
    hybrid["drafter_shape"] = {"kind": "chain", "max_nodes": 8, "k": 4, "draft_source": "eagle"}
    cross = chain_summary(3, 1.2) | {"drafter": "CrossTokenizerDrafter"}
    cross["drafter_shape"] = {"kind": "chain", "max_nodes": 3, "k": 4, "draft_forwards": "fixed", "draft_source": None}
    runs = [Run(tmp_path / "h", "h", overrides={K_KEY: "4"}, summary=hybrid), chain_run(tmp_path, 2, 1.1),
            Run(tmp_path / "x", "x", overrides={K_KEY: "3"}, summary=cross)]  # its step k: its draft's forwards
    assert [row_of(r, [])["k"] for r in runs] == [4, 2, 3]
    assert [r.name for r in series(runs, [K_KEY])["all runs"]] == ["k2", "x"]  # not the hybrid


def test_labels_keep_a_hybrid_parts_place(tmp_path):
    """A hybrid sweep's points were labelled ``num_speculative_tokens=2``, its part (``second.``) dropped."""
    from experiments.runs import label_of

    run = Run(tmp_path, "a", overrides={"drafter.second.num_speculative_tokens": "2", "sampling.top_p": "0.9",
                                        K_KEY: "4", "sampling.temperature": "0.7"})
    assert label_of(run, list(run.overrides)) == "second.num_speculative_tokens=2 top_p=0.9 k=4 T=0.7"


def test_swept_keys_are_the_overrides_that_differ(tmp_path):
    runs = [Run(tmp_path, "a", overrides={"seed": "0", K_KEY: "1"}), Run(tmp_path, "b", overrides={"seed": "0", K_KEY: "2"}),
            Run(tmp_path, "c", overrides={"seed": "0", K_KEY: "2", "extra": "x"})]
    assert swept_keys(runs) == [K_KEY, "extra"]  # seed is the same everywhere; extra is absent from two runs


def test_pooled_model_means_tokens_per_prompt_and_takes_the_first_runs_costs(tmp_path):
    """Tokens per prompt is the mean over runs (20, 20 and 50: 30); the costs are the first run's that has them."""
    other = {"target": {1: 2.0}, "draft": {1: 0.5}}
    group = [chain_run(tmp_path, 1, costs=None), chain_run(tmp_path, 2, new_tokens=40, costs=COSTS),
             chain_run(tmp_path, 3, new_tokens=100, costs=other)]
    alpha, costs, tokens = pooled_model(group)
    assert costs == COSTS and tokens == pytest.approx(30.0) and alpha == pytest.approx(0.8, abs=1e-3)


def test_shape_of_a_tree_preset_counts_its_paths_before_the_drafter_is_built(tmp_path):
    failed = Run(tmp_path, "tree", summary={"status": "failed: OSError", "drafter": "DraftModelDrafter",
                                            "config": {"tree": {"paths": [[0], [1], [0, 0]]}}})
    assert shape_of(failed) == "tree3" and row_of(failed, [])["k"] is None


# --------------------------------------------------------------------------- the report of a directory


def test_report_names_incomplete_runs_and_the_swept_columns_name_the_runs(tmp_path):
    write_run(tmp_path, "0", chain_summary(1, 1.2), {K_KEY: "1"})
    write_run(tmp_path, "1", chain_summary(2, status="interrupted (1/2 prompts)"), {K_KEY: "2"})
    result = report.report(tmp_path)
    assert result["missing"] == [f"1 ({K_KEY}=2): interrupted (1/2 prompts)"]
    header = result["markdown"].splitlines()[0]
    assert header.startswith(f"| {K_KEY} | status |") and "| run |" not in header
    md = (tmp_path / "report" / "report.md").read_text()
    assert "2 runs, 1 complete." in md and f"- 1 ({K_KEY}=2): interrupted (1/2 prompts)" in md
    assert [row["run"] for row in result["rows"]] == ["0", "1"] and result["columns"][:2] == ["run", K_KEY]



def test_the_runs_warnings_reach_the_report_and_implausible_costs_mark_the_recommendation(tmp_path):
    """A run's recorded warnings (an implausible cost curve) are listed in the report and printed; the
    recommendation check built on those costs says so (a trial read "recommended k=7" with no caveat while every
    run had warned)."""
    implausible = {**COSTS, "implausible": {"target": "width 8 costs 3x width 16"}}
    for k, up in ((2, 1.5), (4, 1.8)):
        summary = chain_summary(k, up, costs=implausible)
        summary["warnings"] = [f"the target forward-cost curve is implausible (k={k})"]
        write_run(tmp_path, str(k), summary, {K_KEY: str(k)})
    result = report.report(tmp_path)
    assert result["warnings"] == [f"{k}: the target forward-cost curve is implausible (k={k})" for k in (2, 4)]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Warnings the runs recorded\n\n- 2: the target forward-cost curve is implausible (k=2)" in md
    (line,) = result["checks"]
    assert line.startswith(f"all runs: recommended k=4 (alpha=0.800, {report.IMPLAUSIBLE}); best measured k=4")
    plausible = [chain_run(tmp_path, k, up) for k, up in ((2, 1.5), (4, 1.8))]
    assert report.IMPLAUSIBLE not in report.check_recommendations(plausible, [K_KEY], 0.05)[0]
    assert all(r.warnings == [] for r in plausible)
    plausible[0].summary["warnings"] = "one line, not a list"  # a hand-edited summary's warning is still shown
    assert plausible[0].warnings == ["one line, not a list"]

def test_a_multirun_job_without_a_directory_is_named_never_started(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n    params: null\n"
        f"  overrides:\n    task:\n    - {K_KEY}=1,2,3\n")
    write_run(tmp_path, "0", chain_summary(1, 1.2), {K_KEY: "1"})
    write_run(tmp_path, "2", chain_summary(3, 1.1), {K_KEY: "3"})
    runs, never_started = load_runs(tmp_path)
    assert [r.name for r in runs] == ["0", "2"] and never_started == [f"{K_KEY}=2"]
    assert report.report(tmp_path)["missing"] == [f"{K_KEY}=2: never started"]



def test_a_failed_commands_line_joins_the_runs_status(tmp_path):
    """``error.txt`` (what a failed Hydra job leaves): alone, the run failed before writing results; next to a
    summary cut short, a later command there failed; next to a complete one or a failed summary, it adds nothing.
    The missing list names the run with its swept values."""
    write_run(tmp_path, "0", chain_summary(1, 1.2, status="running"), {K_KEY: "1"})
    write_run(tmp_path, "1", chain_summary(2, 1.2), {K_KEY: "2"})
    write_run(tmp_path, "2", chain_summary(3, 1.2, status="failed: ValueError: x"), {K_KEY: "3"})
    (tmp_path / "3" / ".hydra").mkdir(parents=True)
    (tmp_path / "3" / ".hydra" / "overrides.yaml").write_text(f"- {K_KEY}=0\n")
    for name in "0123":
        (tmp_path / name / "error.txt").write_text("error: the key is wrong\n")
    runs = {r.name: r for r in load_runs(tmp_path)[0]}
    assert runs["0"].status == "running; the last command there failed: the key is wrong"
    assert (runs["1"].status, runs["2"].status) == ("complete", "failed: ValueError: x")
    assert runs["3"].status == "failed before writing results: the key is wrong"
    assert report.report(tmp_path)["missing"][-1] == f"3 ({K_KEY}=0): failed before writing results: the key is wrong"
    (tmp_path / "0" / "error.txt").write_text("")
    assert next(r for r in load_runs(tmp_path)[0] if r.name == "0").status == "running"


# --------------------------------------------------------------------------- the charts' numbers


def test_charts_plot_time_per_batch_step_and_depths_from_one(tmp_path, monkeypatch):
    """time_per_step: each phase's seconds over the run's steps (a batch of 4 rows: 10 steps, not its rows' 40
    forwards), accept+commit from time_accept; acceptance_by_depth: depth d at x = d."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from experiments.report_plots import make_plots

    bars, lines = {}, {}
    bar, plot = Axes.bar, Axes.plot
    monkeypatch.setattr(Axes, "bar", lambda ax, x, height, *a, **kw: bars.setdefault(kw.get("label"), list(height))
                        and bar(ax, x, height, *a, **kw))
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **kw: lines.setdefault(kw.get("label"), [list(v) for v in a[:2]])
                        and plot(ax, *a, **kw))
    spec = {"tau": 2.0, "tokens_per_s": 50.0, "target_forwards": 40, "steps": 10, "time_total": 0.6,
            "time_prefill": 0.1, "time_draft": 0.1, "time_verify": 0.2, "time_accept": 0.05, "time_other": 0.15,
            "acceptance_rate_by_depth": [0.8, 0.5]}
    run = Run(tmp_path, "b4", summary=chain_summary(2, 1.5, spec=spec))
    paths = make_plots([run], [], tmp_path)
    assert set(paths) == {"tau_speedup_vs_k", "acceptance_by_depth", "time_per_step", "drafters"}
    assert bars["draft"] == pytest.approx([10.0]) and bars["verify"] == pytest.approx([20.0])
    assert bars["accept+commit"] == pytest.approx([5.0]) and bars["other"] == pytest.approx([15.0])
    assert lines["DraftModelDrafter"] == [[1, 2], [0.8, 0.5]]
    assert "whole step (fixed-shape, not split)" not in bars  # every step here was timed phase by phase


def test_the_fixed_shape_step_is_one_unsplit_segment_not_all_other(tmp_path, monkeypatch):
    """compile=static|graph|inductor times no phase apart: its bar is one "whole step" segment and its draft,
    verify, accept and other are 0 there (they were plotted as 0 + 0 + 0 + the whole step as "other")."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from experiments.report_plots import make_plots

    bars = {}
    bar = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda ax, x, height, *a, **kw: bars.setdefault(kw.get("label"), list(height))
                        and bar(ax, x, height, *a, **kw))
    static = {"tau": 2.0, "tokens_per_s": 50.0, "target_forwards": 10, "time_total": 0.6, "time_prefill": 0.1,
              "time_draft": 0.0, "time_verify": 0.0, "time_accept": 0.0, "time_other": 0.5}
    make_plots([Run(tmp_path, "static", summary=chain_summary(2, 1.5, spec=static))], [], tmp_path)
    assert bars["whole step (fixed-shape, not split)"] == pytest.approx([50.0])
    assert bars["other"] == [0.0] and bars["verify"] == [0.0]


def test_table_cells_in_markdown_and_csv(tmp_path):
    """Markdown: yes/no, '-' for missing, 3 decimals; CSV: blank for missing, floats at full precision."""
    row = {"run": "0", "matches_baseline": True, "other": False, "tau": 2.123456789, "speedup": None,
           "efficiency": float("inf")}
    columns = list(row)
    assert report.markdown_table([row], columns).splitlines() == [
        "| run | matches_baseline | other | tau | speedup | efficiency |", "|---|---|---|---|---|---|",
        "| 0 | yes | no | 2.123 | - | inf |"]
    report.write_csv([row], columns, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[1] == "0,True,False,2.123456789,,inf"


def test_a_run_that_proposed_nothing_has_no_acceptance_rate_in_its_row():
    """0 accepted of 0 proposed is no rate: ``drafter=none`` (or prompt lookup that never matched) shows an empty
    cell, not 0.0 read as "every draft rejected"; a run that proposed drafts keeps its rate, 0.0 included."""
    def row(**spec):
        return row_of(Run(Path("r"), "r", summary={"drafter": "NoDrafter", "config": {},
                                                    "metrics": {"speculative": {"tau": 1.0, **spec}}}), [])
    assert row(draft_acceptance_rate=0.0, mean_proposed_drafts=0.0)["draft_acceptance_rate"] is None
    assert row(draft_acceptance_rate=0.0, mean_proposed_drafts=3.0)["draft_acceptance_rate"] == 0.0
    assert row(draft_acceptance_rate=0.25, mean_proposed_drafts=4.0)["draft_acceptance_rate"] == 0.25
    assert row(draft_acceptance_rate=0.25)["draft_acceptance_rate"] == 0.25  # a summary without the count keeps it


def test_a_runs_swept_values_are_its_own_not_those_of_a_later_command_that_failed_there(tmp_path):
    """A later command in the same directory that fails its checks (a typo'd option) has Hydra rewrite
    ``.hydra/overrides.yaml`` first: the report reads the values the summary recorded (k=2, as decoded), not
    the failed command's k=3; a summary from before overrides were recorded still falls back to ``.hydra``."""
    from experiments.runs import load_run

    recorded = write_run(tmp_path, "0", {**chain_summary(2), "overrides": [f"{K_KEY}=2", "num_prompts=2"]},
                         {K_KEY: "3", "drafter.tree_sampling": "bogus"})
    assert load_run(recorded, tmp_path).overrides == {K_KEY: "2", "num_prompts": "2"}
    older = write_run(tmp_path, "1", chain_summary(4), {K_KEY: "4"})
    assert load_run(older, tmp_path).overrides == {K_KEY: "4"}


def test_a_series_whose_runs_priced_a_forward_far_apart_says_so(tmp_path):
    """Two runs of one series measured the draft 36.0 and 11.6 ms (3.1x apart: a busy machine): the check says
    the curve and recommendation use the first run's costs; within 1.5x (the target here) nothing is said, nor
    where a run measured 0 (no ratio to take)."""
    from experiments.report import cost_spread

    def run(name, draft_s):
        costs = {"target": {"1": 0.010, "5": 0.012}, "draft": {"1": draft_s}}
        return Run(tmp_path / name, name, summary={**chain_summary(2), "cost_model": {"costs": costs}})
    lines = cost_spread("all runs", [run("0", 0.036), run("1", 0.0116), Run(tmp_path, "x", summary={})])
    assert lines == [("all runs: the runs priced a draft forward 11.60-36.00 ms (3.1x apart: the machine's speed "
                      "changed between them); the cost-model curve and the recommended k use 0's costs")]
    assert cost_spread("all runs", [run("0", 0.010), run("1", 0.014)]) == []
    assert cost_spread("all runs", [run("0", 0.0), run("1", 0.014)]) == []
