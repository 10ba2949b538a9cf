"""The report over a sweep, the cost model, and bad input to both.

A 3x2 sweep (draft length x temperature, rejection sampling) runs once per module on the tiny
random pair through ``python -m experiments.decode``; the report runs on it through
``python -m experiments.report``. No assertion depends on timings.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments import decode, report
from experiments.cost_measure import costs_dir
from experiments.costs import chain_speedup_by_k, cost_at, expected_tau, fit_alpha, recommend_k
from tests.test_sweeps import compose_cfg, prompts_file, run_cli, tiny_args  # noqa: F401  (fixture)

PLOTS = ("tau_speedup_vs_k", "acceptance_by_depth", "time_per_step", "drafters")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path_factory.getbasetemp() / "specdec-cache"))


@pytest.fixture(scope="module")
def sweep_3x2(tmp_path_factory, prompts_file) -> Path:  # noqa: F811
    """k = 1, 2, 4 x temperature 0.7, 1.0 with rejection sampling: six runs, costs measured (once)."""
    sweep_dir = tmp_path_factory.mktemp("sweep_3x2")
    cache = tmp_path_factory.getbasetemp() / "specdec-cache"
    proc = run_cli("sweep=custom", *tiny_args(prompts_file, num_prompts=2), "acceptance=rejection",
                   "drafter.num_speculative_tokens=1,2,4", "sampling.temperature=0.7,1.0", f"hydra.sweep.dir={sweep_dir}",
                   env_extra={"SPECDEC_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.requires("wandb")
def test_3x2_sweep_report_tables_plots_and_wandb(sweep_3x2):
    proc = run_cli(str(sweep_3x2), "--wandb", "offline", module="experiments.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = sweep_3x2 / "report"
    for name in ("report.md", "report.csv", *(f"{p}.png" for p in PLOTS)):
        assert (out / name).stat().st_size > 0, name
    assert "| drafter.num_speculative_tokens | sampling.temperature |" in proc.stdout
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")) and "W&B logging failed" not in proc.stderr

    rows = read_csv(out / "report.csv")
    assert len(rows) == 6
    assert {(r["drafter.num_speculative_tokens"], r["sampling.temperature"]) for r in rows} == \
        {(k, t) for k in ("1", "2", "4") for t in ("0.7", "1.0")}
    costs = {}  # job number -> the target's cost bookkeeping
    for row in rows:
        summary = json.loads((sweep_3x2 / row["run"] / "summary.json").read_text())
        m, spec = summary["metrics"], summary["metrics"]["speculative"]
        assert row["status"] == summary["status"] == "complete"
        assert int(row["k"]) == summary["config"]["drafter"]["num_speculative_tokens"]
        assert f"drafter.num_speculative_tokens={row['k']}" in summary["overrides"]  # the job's own, kept
        assert float(row["temperature"]) == summary["config"]["sampling"]["temperature"]
        for column, value in (("tau", spec["tau"]), ("draft_acceptance_rate", spec["draft_acceptance_rate"]),
                              ("tokens_per_s", spec["tokens_per_s"]), ("speedup", m["speedup"]),
                              ("predicted_speedup", m["predicted_speedup"]), ("efficiency", m["efficiency"]),
                              ("baseline_tokens_per_s", m["baseline"]["tokens_per_s"])):
            assert float(row[column]) == value, column
        assert int(row["recommended_k"]) == m["recommended_k"] and 1 <= m["recommended_k"] <= 8
        assert row["matches_baseline"] == ""  # sampling: no token-for-token check
        hydra = OmegaConf.load(sweep_3x2 / row["run"] / ".hydra" / "hydra.yaml")
        costs[hydra.hydra.job.num] = summary["cost_model"]["costs"]
    # the jobs ran in order: once a job measured a plausible curve (or found one), every later job takes it from the
    # cache or says why it measured it again (a spot check or the plausibility check failed: a busy machine)
    entry = False  # a cached target curve exists, as far as the jobs before tell
    for job, c in sorted(costs.items()):
        cached, again = c["cached"]["target"], "target" in c["remeasured"]
        assert not (cached and again) and (cached or again or not entry), (job, c)
        entry = entry or cached or again or "target" not in c["implausible"]
    md = (out / "report.md").read_text()
    assert "Recommended k vs measured" in md and "![tau_speedup_vs_k](tau_speedup_vs_k.png)" in md


def test_report_of_one_run_and_of_a_cut_records_file(sweep_3x2, tmp_path, capsys):
    run = next(p for p in sweep_3x2.iterdir() if (p / "summary.json").exists())
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report"))
    summary = json.loads((copy / "summary.json").read_text())
    lines = (copy / "records.jsonl").read_text().splitlines(keepends=True)
    (copy / "records.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])  # the last line cut mid-write

    assert report.main([str(copy), "--wandb", "none"]) == 0
    out = capsys.readouterr().out
    assert f"records.jsonl:{len(lines)}: skipped an unreadable line (cut mid-line)" in out
    (row,) = read_csv(copy / "report" / "report.csv")
    assert float(row["tau"]) == summary["metrics"]["speculative"]["tau"]  # the summary is intact: nothing lost

    (copy / "summary.json").unlink()  # now only the records are left: metrics are rebuilt from the complete lines
    result = report.report(copy)
    (row,) = result["rows"]
    assert row["status"].startswith("no summary") and row["prompts_done"] == 2
    assert result["missing"] == [f"run: {row['status']}"]
    assert any("cut mid-line" in p for p in result["problems"])


def test_report_bad_input(tmp_path, capsys):
    assert report.main([str(tmp_path), "--wandb", "none"]) == 2
    assert "error: no decode runs under" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing"), "--wandb", "none"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # a sweep that failed before any run
    assert report.main([str(tmp_path), "--wandb", "none"]) == 2


def test_wandb_failure_keeps_the_local_report(sweep_3x2, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" raises ImportError
    assert report.main([str(sweep_3x2), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("W&B logging failed") == 1 and f"the local report is in {out}" in err
    assert (out / "report.csv").stat().st_size > 0

    seen = {}
    monkeypatch.setattr(report, "log_to_wandb", lambda *a, **kw: seen.update(group=a[4], mode=a[5]))
    assert report.main([str(sweep_3x2), "--out", str(out)]) == 0
    assert seen == {"group": f"{sweep_3x2.parent.name}/{sweep_3x2.name}", "mode": "offline"}


# --------------------------------------------------------------------------- the cost model


def test_predicted_vs_measured_speedup_of_a_draft_model_chain(prompts_file, tmp_path):  # noqa: F811
    cfg = compose_cfg(*tiny_args(prompts_file, num_prompts=2, tokens=16), "drafter.num_speculative_tokens=3")
    summary = decode.run(cfg, tmp_path / "chain")
    m, model = summary["metrics"], summary["cost_model"]
    print(f"\ndraft-model chain k=3 on tiny_random: measured speedup {m['speedup']:.3f}x, predicted "
          f"{m['predicted_speedup']:.3f}x, efficiency {m['efficiency']:.2f}, tau {m['speculative']['tau']:.2f}, "
          f"alpha {model['alpha']}, recommended k {m['recommended_k']}")
    assert m["predicted_speedup"] > 0 and m["efficiency"] == pytest.approx(m["speedup"] / m["predicted_speedup"])
    assert model["drafter"] == {"name": "DraftModelDrafter", "kind": "chain", "k": 3, "max_nodes": 3,
                                "draft_forwards": "per_level", "draft_module": "model",
                                "draft_dtype": "float32", "draft_source": None}
    assert sorted(map(int, model["costs"]["target"])) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 48, 64]
    assert list(model["costs"]["draft"]) == [1] and set(model["predicted_speedup_by_k"]) == set(range(1, 9))
    assert len(list(costs_dir().glob("*.json"))) >= 2  # one curve per model

    again = decode.run(cfg, tmp_path / "again")  # another run of the same models: the cached curves
    busy = set(model["costs"]["implausible"])  # timed on a busy machine (twice): not cached, by design
    cached, remeasured = again["cost_model"]["costs"]["cached"], again["cost_model"]["costs"]["remeasured"]
    assert set(cached) == {"target", "prefill_target", "prefill_draft"}  # the draft is timed through its probe
    # a cached curve is used unless its spot check failed (a busy machine again): then it says so
    assert all(cached[role] != (role in remeasured) for role in cached if role not in busy), (cached, remeasured, busy)
    if "target" not in busy | set(remeasured):
        assert again["cost_model"]["costs"]["target"] == model["costs"]["target"]

    ngram = decode.run(compose_cfg(*tiny_args(prompts_file, num_prompts=1), "drafter=ngram"), tmp_path / "ngram")
    assert ngram["cost_model"]["drafter"]["draft_module"] is None and ngram["cost_model"]["costs"]["draft"] is None
    assert ngram["metrics"]["predicted_speedup"] > 0

    skipped = decode.run(compose_cfg(*tiny_args(prompts_file, num_prompts=1), "costs=false"), tmp_path / "skip")
    assert skipped["metrics"]["predicted_speedup"] is None and skipped["cost_model"]["costs"] is None


def test_cost_model_arithmetic():
    assert expected_tau(0.0, 4) == 1.0 and expected_tau(1.0, 4) == 5.0
    assert expected_tau(0.5, 2) == pytest.approx(1.75)
    curve = {1: 1.0, 2: 1.2, 4: 2.0}
    assert cost_at(curve, 3) == pytest.approx(1.6) and cost_at(curve, 8) == pytest.approx(3.6)
    assert cost_at({"1": 2.0}, 5) == 2.0
    # Read as measured: a narrow width that costs more than a wider one keeps its own time.
    assert cost_at({1: 1.0, 3: 1.8, 5: 1.4}, 3) == pytest.approx(1.8)
    # Geometric acceptance alpha = 0.7, chains of 4: steps accepting >= d drafts = 0.7^d of all steps.
    proposed = [1000] * 4
    accepted = [round(1000 * 0.7 ** d) for d in range(1, 5)]
    assert fit_alpha(proposed, accepted) == pytest.approx(0.7, abs=0.01)
    assert fit_alpha([], []) is None
    # REFERENCES.md: alpha 0.8 gives an optimal k of about 4 at c = 0.2 and about 8 at c = 0.05 (flat verify cost).
    flat = {w: 1.0 for w in (1, 64)}
    assert recommend_k(chain_speedup_by_k(0.8, {"target": flat, "draft": {1: 0.2}})) == 4
    assert recommend_k(chain_speedup_by_k(0.8, {"target": flat, "draft": {1: 0.05}})) == 8


def test_shape_of_a_run_that_failed_before_its_drafter_was_built_is_unknown(tmp_path):
    """A run whose drafter never got built (Medusa without heads) has no shape: blank, not 'chain'."""
    from experiments.runs import Run, row_of, shape_of

    failed = Run(tmp_path, "medusa", summary={"status": "failed: MedusaHeadsError: no heads", "config": {}})
    assert shape_of(failed) is None and row_of(failed, [])["shape"] is None and row_of(failed, [])["k"] is None
    chain = Run(tmp_path, "chain", summary={"status": "complete", "drafter": "DraftModelDrafter",
                                            "config": {"drafter": {"num_speculative_tokens": 4}}})
    assert shape_of(chain) == "chain" and row_of(chain, [])["k"] == 4


def test_tree_runs_get_tau_and_speedup_against_nodes_per_step(tmp_path):
    """A sweep over shapes (a chain, a preset tree, a dynamic tree) gets the nodes-per-step chart; chains alone
    have theirs against k and no such chart."""
    from experiments.report_plots import make_plots
    from experiments.runs import Run

    def run(name, config, nodes, tau, speedup):
        spec = {"mean_proposed_drafts": nodes, "tau": tau, "tokens_per_s": 10.0, "target_forwards": 5, "steps": 5,
                "time_total": 1.0, "time_prefill": 0.1, "time_draft": 0.2, "time_verify": 0.5, "time_accept": 0.1,
                "time_other": 0.1}
        return Run(tmp_path, name, summary={"status": "complete", "drafter": "DraftModelDrafter", "config": config,
                                            "metrics": {"speculative": spec, "speedup": speedup}})

    chain = run("chain", {"drafter": {"num_speculative_tokens": 4}}, 4.0, 2.5, 1.2)
    tree = run("binary", {"tree": {"paths": [[0], [1], [0, 0]]}}, 3.0, 2.2, 1.1)
    dynamic = run("dyn30", {"drafter": {"budget": 30, "num_speculative_tokens": 6}}, 30.0, 3.4, 0.9)
    for sub in ("mixed", "chains"):
        (tmp_path / sub).mkdir()
    images = make_plots([chain, tree, dynamic], [], tmp_path / "mixed")
    assert images["tau_speedup_vs_nodes"].stat().st_size > 0
    assert "tau_speedup_vs_nodes" not in make_plots([chain, run("k2", {"drafter": {"num_speculative_tokens": 2}},
                                                                    2.0, 1.8, 1.1)], [], tmp_path / "chains")


def test_ms_per_step_of_a_batched_run_divides_by_the_batches_steps(tmp_path):
    """4 rows stepped 10 times each in one batch: 10 forwards of 50 ms, not 40 of 12.5 ms; a summary written
    before ``steps`` existed falls back to ``target_forwards``."""
    from experiments.runs import Run, row_of

    spec = {"time_total": 0.6, "time_prefill": 0.1, "target_forwards": 40, "steps": 10}
    batched = Run(tmp_path, "b4", summary={"status": "complete", "metrics": {"speculative": spec}})
    assert row_of(batched, [])["ms_per_step"] == pytest.approx(50.0)
    older = Run(tmp_path, "old", summary={"status": "complete", "metrics": {"speculative": dict(spec, steps=None)}})
    assert row_of(older, [])["ms_per_step"] == pytest.approx(12.5)


def test_predicted_speedup_counts_both_prefills_and_a_verify_of_k_plus_one():
    """``predicted_speedup = (P_t + N T_t(1)) / (P_t + P_d + S (F_d T_d(1) + T_t(n + 1)))``, and a k-chain in
    ``predicted_speedup_by_k`` verifies k + 1 positions (the root and its k drafts)."""
    from experiments.costs import predicted_speedups
    from specdec.stats import DecodeStats

    costs = {"target": {1: 1.0, 2: 1.5, 3: 2.0}, "draft": {1: 0.25}, "prefill": {"target": 4.0, "draft": 2.0}}
    stats = DecodeStats(new_tokens=12)
    for accepted in (2, 2, 1, 1):  # four steps of a 2-chain: 3 + 3 + 2 + 2 tokens
        stats.record_step(2, 2, accepted)
    step = 2 * 0.25 + 2.0  # two draft forwards, then a verify of width 3
    shape = {"kind": "chain", "draft_forwards": "per_level"}
    assert predicted_speedups(stats, costs, shape, num_prompts=1) == pytest.approx(
        ((4.0 + 12 * 1.0) / (4.0 + 2.0 + 4 * step), 3.0 / step))
    by_k = chain_speedup_by_k(0.5, costs, ks=(1, 2))
    assert by_k == pytest.approx({1: expected_tau(0.5, 1) / (0.25 + 1.5), 2: expected_tau(0.5, 2) / (0.5 + 2.0)})


def test_a_directory_of_many_long_labelled_runs_plots_without_cutting_labels(tmp_path):
    """A report over a directory of unrelated runs labels each by all its overrides: the bars' labels ran into each
    other and off the image (matplotlib warned "Tight layout not applied"), and the k plot's legend covered it. Now
    the labels wrap, each bar is as wide as its label, and a long legend goes below the axes."""
    import warnings

    from PIL import Image

    from experiments.report_plots import LEGEND_INSIDE, make_plots
    from experiments.runs import K_KEY, Run

    spec = {"tau": 2.0, "tokens_per_s": 10.0, "target_forwards": 5, "steps": 5, "time_total": 1.0,
            "time_prefill": 0.1, "time_draft": 0.2, "time_verify": 0.5, "time_accept": 0.1, "time_other": 0.1,
            "depth_proposed": [5, 5], "depth_accepted": [4, 3]}
    runs = []
    for i in range(LEGEND_INSIDE + 2):
        overrides = {K_KEY: "2", "num_prompts": str(i + 1), "drafter.datastore": f"/a/long/path/to/rows/{i}" * 2}
        runs.append(Run(tmp_path / str(i), str(i), overrides=overrides, summary={
            "status": "complete", "drafter": "DraftModelDrafter", "config": {"drafter": {"num_speculative_tokens": 2}},
            "metrics": {"speculative": dict(spec), "speedup": 1.1}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no plot warns (a legend below the axes is let out of tight_layout's reach)
        images = make_plots(runs, ["num_prompts", "drafter.datastore"], tmp_path)
    width, height = Image.open(images["drafters"]).size
    assert width > 110 * 0.042 * 26 * len(runs) and height > 110 * 4.2  # 26 characters a line, slanted below


def test_runs_alike_keep_their_names_and_a_trainings_directory_is_no_run(sweep_3x2, tmp_path):
    """A trial's report of a folder of its runs: two runs with the same overrides looked like one row twice in
    report.md (the run column left out whenever overrides differ), and train_medusa's output directories were
    listed as runs with "no results", their training keys added as columns."""
    import yaml

    runs = sorted(p for p in sweep_3x2.iterdir() if (p / "summary.json").exists())[:2]
    for name, run in (("a", runs[0]), ("again", runs[0]), ("b", runs[1])):
        shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("report"))
    train = tmp_path / "train" / ".hydra"
    train.mkdir(parents=True)
    (train / "overrides.yaml").write_text("- steps=4\n- num_heads=2\n")
    (train / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": "train_medusa"}}}))
    zoo = tmp_path / "zoo" / ".hydra"  # job name overridden: the config name still tells
    shutil.copytree(train, zoo)
    (zoo / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": "z", "config_name": "build_zoo"}}}))
    cut = tmp_path / "cut" / ".hydra"  # a decode run with its job name overridden, cut before its first prompt
    shutil.copytree(train, cut)
    (cut / "overrides.yaml").write_text("- hydra.job.name=mine\n")
    (cut / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": "mine", "config_name": "config"}}}))
    result = report.report(tmp_path)
    assert sorted(row["run"] for row in result["rows"]) == ["a", "again", "b", "cut"], result["rows"]
    assert "steps" not in result["columns"]
    header = (tmp_path / "report" / "report.md").read_text().split("\n| ", 1)[1].split("\n")[0]
    assert header.startswith("run |"), header


def test_the_entry_points_that_are_no_decode_runs_are_every_other_hydra_app():
    """runs._decode_job names the other Hydra entry points: a new one must be added there, or its output
    directories are listed as decode runs with no results."""
    import re

    from experiments import runs

    root = Path(runs.__file__).parent
    apps = {m for f in root.glob("*.py") for m in re.findall(r'@cli\.hydra_main\("(\w+)"', f.read_text())}
    assert apps - {"config"} == runs._OTHER_ENTRY_POINTS and "config" in apps
