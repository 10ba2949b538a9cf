"""Mutation pass 12, continued (:mod:`tests.test_mutation12_report`): the sweep report's table and check
(``experiments.report``), the numbers ``experiments.report_plots`` draws, and a summary rebuilt from records.
Hand-made runs only: no model builds, no timing. Each test names the planted bug it catches.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import report
from experiments.costs import KS, chain_speedup_by_k
from experiments.runs import K_KEY, Run, pooled_model, row_of
from specdec.stats import DecodeStats

# --------------------------------------------------------------------------- report.py: the table and the check


def _chain(k: int, speedup: float, **summary) -> dict:
    return {"status": "complete", "drafter": "DraftModelDrafter", "num_prompts": 2,
            "config": {"drafter": {"num_speculative_tokens": k}}, "cost_model": {"costs": {"target": {1: 1.0, 64: 1.0},
                                                                                     "draft": {1: 0.2}}},
            "metrics": {"speculative": {"depth_proposed": [1000] * k,
                                        "depth_accepted": [round(1000 * 0.8 ** d) for d in range(1, k + 1)],
                                        "new_tokens": 40, "num_prompts": 2, "tau": 3.0, "tokens_per_s": 10.0},
                        "speedup": speedup, "predicted_speedup": 9.0}, **summary}


def _write(root: Path, name: str, summary: dict, overrides: dict) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    (root / name / "summary.json").write_text(json.dumps(summary))


def test_the_report_counts_complete_runs_and_names_failed_ones(tmp_path, monkeypatch):
    """Bugs: every run counted complete, a failed run (it has a status) left out of the missing list, the alpha or
    draft acceptance column dropped."""
    monkeypatch.setattr("experiments.report_plots.make_plots", lambda runs, swept, out: {})
    _write(tmp_path, "k2", _chain(2, 1.5), {K_KEY: 2})
    _write(tmp_path, "k4", {"status": "failed: RuntimeError: boom", "config": {}}, {K_KEY: 4})
    result = report.report(tmp_path)
    text = (result["out"] / "report.md").read_text()
    assert "2 runs, 1 complete." in text
    assert result["missing"] == [f"k4 ({K_KEY}=4): failed: RuntimeError: boom"]
    assert "alpha" in result["columns"] and "draft_acceptance_rate" in result["columns"]


def test_the_check_compares_measured_speedups_and_zero_tolerance_is_valid(tmp_path):
    """Bugs: the check ranked the runs' predicted speedups instead of their measured ones; ``--tolerance 0`` refused
    (a share from 0 to 1); a group without measured speedups checked (``not speed`` dropped)."""
    runs = [Run(tmp_path / f"k{k}", f"k{k}", overrides={K_KEY: str(k)}, summary=_chain(k, up))
            for k, up in ((2, 1.5), (4, 1.8), (6, 2.0))]
    (line,) = report.check_recommendations(runs, [K_KEY], 0.05)
    assert "best measured k=6 (2.00x)" in line and "k=4 measured 1.80x" in line
    assert report._share("0") == 0.0
    bare = [Run(tmp_path / "k2", "k2", overrides={K_KEY: "2"}, summary=_chain(2, None))]
    assert report.check_recommendations(bare, [K_KEY], 0.05) == [
        "all runs: no recommendation check (needs costs=true, drafts proposed and a baseline)"]


# --------------------------------------------------------------------------- report_plots.py: the k chart's numbers


def test_the_k_charts_cost_model_curve_spans_every_k_with_prefills(tmp_path, monkeypatch):
    """Bugs: the cost model's dashed curve drawn only at the swept ks (not 1..8 with them), or without the runs'
    tokens per prompt (its values then leave the prefills out)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from experiments.report_plots import make_plots

    lines = {}
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **kw: lines.setdefault(kw.get("label"), [list(v) for v in a[:2]])
                        and plot(ax, *a, **kw))
    costs = {"target": {1: 1.0, 64: 1.0}, "draft": {1: 0.2}, "prefill": {"target": 4.0, "draft": 2.0}}
    runs = [Run(tmp_path / f"k{k}", f"k{k}", overrides={K_KEY: str(k)},
                summary=_chain(k, 1.5, cost_model={"costs": costs})) for k in (2, 4)]
    make_plots(runs, [K_KEY], tmp_path)
    (label,) = [name for name in lines if name and "cost model" in name]
    xs, ys = lines[label]
    alpha, _, tokens = pooled_model(runs)
    assert xs == list(KS) and tokens == 20.0
    assert ys == pytest.approx(list(chain_speedup_by_k(alpha, costs, KS, 20.0).values()))


def test_the_swept_values_are_in_each_row():
    """Bug: the swept override values left out of the row (the table's first columns, which name the runs)."""
    run = Run(Path("r"), "r", overrides={K_KEY: "2", "sampling.temperature": "0.7"},
              summary=_chain(2, 1.5))
    row = row_of(run, [K_KEY, "sampling.temperature"])
    assert row[K_KEY] == "2" and row["sampling.temperature"] == "0.7"


def _records(tmp_path: Path, temperature: float) -> Path:
    """A run cut before its summary: 2 prompts, each decoded by both methods (4 records), same tokens."""
    from experiments.results import BASELINE, SPECULATIVE

    path = tmp_path / f"t{temperature}"
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(f"sampling:\n  temperature: {temperature}\n")
    lines = []
    for qid in (1, 2):
        for method in (BASELINE, SPECULATIVE):
            stats = DecodeStats(new_tokens=3, time_total=0.3, time_prefill=0.1)
            for _ in range(3 if method == BASELINE else 2):
                stats.record_step(0 if method == BASELINE else 2, 0 if method == BASELINE else 2, 0)
            lines.append(json.dumps({"question_id": qid, "method": method, "drafter": "DraftModelDrafter",
                                     "tokens": [5, 6, 7], "stats": stats.to_dict()}))
    (path / "records.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_a_summary_rebuilt_from_records_counts_prompts_and_greedy_from_the_config(tmp_path):
    """Bugs in ``_rebuild_summary``: the prompts counted as records (both methods' lines: 4, not 2); every rebuilt
    run taken as greedy (a sampled run's outputs compared token by token: matches_baseline must be None there)."""
    from experiments.runs import load_run

    greedy = load_run(_records(tmp_path, 0.0), tmp_path)
    assert greedy.summary["num_prompts"] == 2 and greedy.summary["metrics"]["matches_baseline"] is True
    sampled = load_run(_records(tmp_path, 0.7), tmp_path)
    assert sampled.summary["num_prompts"] == 2 and sampled.summary["metrics"]["matches_baseline"] is None


def test_two_runs_one_of_them_a_tree_get_the_nodes_chart(tmp_path):
    """Bug: ``len(sized) > 2``: a chain beside one tree (two runs) gets no tau/speedup-vs-nodes chart."""
    from experiments.report_plots import make_plots

    def run(name, config, nodes):
        spec = {"mean_proposed_drafts": nodes, "tau": 2.0, "tokens_per_s": 10.0}
        return Run(tmp_path / name, name, summary={"status": "complete", "drafter": "DraftModelDrafter",
                                                   "config": config, "metrics": {"speculative": spec, "speedup": 1.2}})

    chain = run("chain", {"drafter": {"num_speculative_tokens": 4}}, 4.0)
    tree = run("binary", {"tree": {"paths": [[0], [1], [0, 0]]}}, 3.0)
    assert "tau_speedup_vs_nodes" in make_plots([chain, tree], [], tmp_path)


def test_a_rebuilt_summary_names_the_rule_as_decode_does():
    """A run rebuilt from records showed ``GreedyAcceptance`` in the report's acceptance column beside complete runs'
    ``greedy``: the built-in rules take their short names, a custom rule its class name."""
    from experiments.runs import rule_name

    assert rule_name({"_target_": "specdec.acceptance.GreedyAcceptance"}) == "greedy"
    assert rule_name({"_target_": "specdec.acceptance.TypicalAcceptance", "posterior_threshold": 0.1}) == "typical"
    assert rule_name({"_target_": "mine.rules.Lenient"}) == "Lenient" and rule_name({}) is None
