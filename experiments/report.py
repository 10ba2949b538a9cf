"""Aggregate decode runs into a table and plots: ``python -m experiments.report <run or multirun dir>``.

Reads each run's local results (``summary.json``, ``records.jsonl``; its swept values are the overrides the
summary recorded, else ``.hydra/overrides.yaml``, which a later command there rewrites even if it fails its
checks; runs are found in the directory and below it) and writes, in
``<dir>/report/``:

- ``report.md`` and ``report.csv``: one row per run (CSV values are the summaries' own numbers, at
  full precision), what is missing, the warnings the runs recorded (an implausible cost curve makes the
  predicted columns mean little) and the check of the cost model's ``recommended_k``
  against the best measured k;
- ``tau_speedup_vs_k.png`` (measured, with the cost model's predicted curves),
  ``tau_speedup_vs_nodes.png`` (trees and chains against the nodes they verify per step),
  ``acceptance_by_depth.png``, ``time_per_step.png`` (stacked time split per decoding step) and
  ``drafters.png`` (tokens/s and speedup per run); see :mod:`experiments.report_plots`.

The table is printed too. The same table and charts go to W&B (``--wandb offline`` by default,
``online``, or ``none``), in a ``report`` run grouped with the sweep's runs; a W&B failure is
reported and the local report stays. An incomplete sweep is reported as far as it got: runs
without a complete summary (and, for a Hydra multirun, configs that never started) are named.
A records line cut mid-write is reported and skipped. A directory without runs exits with status 2.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

from experiments import cli
from experiments.costs import chain_speedup_by_k, cost_at, recommend_k
from experiments.runs import (
    REPORT_DIR,
    SPLITS,
    ReportError,
    Run,
    k_priced,
    load_runs,
    pooled_model,
    row_of,
    series,
    swept_keys,
)

#: Columns that depend on wall-clock measurements (they differ between otherwise identical runs).
TIMING_COLUMNS = ("tokens_per_s", "baseline_tokens_per_s", "speedup", "predicted_speedup", "efficiency",
                  "recommended_k", "ms_per_step") + tuple(f"split_{s}" for s in SPLITS)
COLUMNS = ("run", "status", "prompts_done", "num_prompts", "drafter_class", "shape", "k", "temperature", "acceptance",
           "tau", "draft_acceptance_rate", "acceptance_by_depth", "alpha", "matches_baseline") + TIMING_COLUMNS


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                             for c in columns])


# --------------------------------------------------------------------------- cost-model check


def _share(text: str) -> float:
    """An argparse ``type``: a share between 0 and 1 (``--tolerance``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a share between 0 and 1, e.g. 0.05")
    return value


#: Said of a recommendation or a predicted curve whose measured cost curves were implausible (the runs warn).
IMPLAUSIBLE = "from implausible cost curves, see the runs' warnings: rerun on a quiet machine"


def check_recommendations(runs: list[Run], swept: list[str], tolerance: float) -> list[str]:
    """Per series: the cost model's recommended k against the best measured k."""
    lines = []
    for label, group in series(runs, swept).items():
        alpha, costs, tokens = pooled_model(group)
        speed = {row_of(r, [])["k"]: r.metrics.get("speedup") for r in group if r.metrics.get("speedup")}
        batched = sorted({r.metrics.get("speculative", {}).get("batch_size") or 1 for r in group} - {1})
        if batched:  # the cost model prices batch-1 steps (experiments.decode measures no costs for batches)
            lines.append(f"{label}: no recommendation check (the cost model prices batch-1 runs; these ran "
                         f"batch_size={','.join(map(str, batched))})")
            continue
        if not all(k_priced(r) for r in group):
            lines.append(f"{label}: no recommendation check (its drafter runs a fixed number of draft forwards "
                         "whatever k, which the k curve would misprice; the measured speedups above compare the k's)")
            continue
        if alpha is None or costs is None or not speed:
            lines.append(f"{label}: no recommendation check (needs costs=true, drafts proposed and a baseline)")
            continue
        lines += cost_spread(label, group)
        rec = recommend_k(chain_speedup_by_k(alpha, costs, tokens_per_prompt=tokens))
        best = max(speed, key=speed.get)
        head = (f"{label}: recommended k={rec} (alpha={alpha:.3f}"
                f"{', ' + IMPLAUSIBLE if costs.get('implausible') else ''}); best measured k={best} "
                f"({speed[best]:.2f}x)")
        if rec not in speed:
            lines.append(f"{head}; k={rec} is not in the sweep")
        else:
            gap = 1.0 - speed[rec] / speed[best]
            verdict = "OK" if gap <= tolerance else "MISS"
            lines.append(f"{head}; k={rec} measured {speed[rec]:.2f}x, {gap:.1%} below the best "
                         f"(tolerance {tolerance:.0%}): {verdict}")
    return lines


#: Runs of one series whose one-token forward costs differ by more than this factor priced their drafts on a
#: machine whose speed changed: the series' one cost curve (the first run's) says so.
COST_SPREAD = 1.5


def cost_spread(label: str, group: list[Run]) -> list[str]:
    """A line for a series whose runs measured a forward (the target's or the draft's, one token) more than
    :data:`COST_SPREAD` times apart: its cost-model curve and recommendation use the first run's costs only."""
    measured = [(r.name, (r.summary or {}).get("cost_model", {}).get("costs")) for r in group]
    measured = [(name, costs) for name, costs in measured if isinstance(costs, dict)]
    lines = []
    for model in ("target", "draft"):
        ms = [(1e3 * cost_at(costs[model], 1), name) for name, costs in measured if isinstance(costs.get(model), dict)
              and costs[model]]
        if len(ms) > 1 and 0 < min(ms)[0] and max(ms)[0] > COST_SPREAD * min(ms)[0]:
            lines.append(f"{label}: the runs priced a {model} forward {min(ms)[0]:.2f}-{max(ms)[0]:.2f} ms "
                         f"({max(ms)[0] / min(ms)[0]:.1f}x apart: the machine's speed changed between them); the "
                         f"cost-model curve and the recommended k use {measured[0][0]}'s costs")
    return lines


# --------------------------------------------------------------------------- labels


# --------------------------------------------------------------------------- W&B


def log_to_wandb(rows: list[dict], columns: list[str], images: dict[str, Path], out: Path, group: str | None,
                 mode: str, project: str, entity: str | None) -> None:
    """Log the table and the charts as one ``report`` run in the sweep's W&B group."""
    import wandb

    from experiments.wandb_run import start_wandb

    run = start_wandb({"dir": str(out), "mode": mode, "project": project, "entity": entity, "group": group,
                       "job_type": "report", "name": f"report {group or out.parent.name}", "reinit": "finish_previous"})
    try:
        data = [[row.get(c) for c in columns] for row in rows]
        table = wandb.Table(columns=list(columns), data=data, allow_mixed_types=True)
        run.log({"report/table": table, **{f"report/{n}": wandb.Image(str(p)) for n, p in images.items()}})
    finally:
        run.finish()


# --------------------------------------------------------------------------- entry point


def _labelled(run: Run, swept: list[str]) -> str:
    """A run's name with its swept values, e.g. ``0 (drafter.num_speculative_tokens=-1)``."""
    values = " ".join(f"{k}={run.overrides[k]}" for k in swept if k in run.overrides)
    return f"{run.name} ({values})" if values else run.name


def report(root: Path, out: Path | None = None, tolerance: float = 0.05) -> dict:
    """Build the report of the runs under ``root``; returns rows, columns, files and messages."""
    runs, never_started = load_runs(root)
    swept = swept_keys(runs)
    columns = ["run", *swept, *[c for c in COLUMNS if c not in ("run", *swept)]]
    rows = [row_of(r, swept) for r in runs]
    out = out or root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    missing = [f"{_labelled(r, swept)}: {r.status}" for r in runs if not r.complete]
    missing += [f"{job}: never started" for job in never_started]
    problems = [p for r in runs for p in r.problems]
    warnings = [f"{r.name}: {w}" for r in runs for w in r.warnings]
    checks = check_recommendations(runs, swept, tolerance)
    from experiments.report_plots import make_plots

    images = make_plots(runs, swept, out)
    named = swept and len({tuple(row.get(k) for k in swept) for row in rows}) == len(rows)
    shown = [c for c in columns if c != "run"] if named else columns  # the swept values name the runs when unique
    md = [f"# Report: {root}", "", f"{len(runs)} runs, {sum(r.complete for r in runs)} complete.",
          "", markdown_table(rows, shown), ""]
    if missing:
        md += ["## Missing (no complete summary)", "", *[f"- {m}" for m in missing], ""]
    if problems:
        md += ["## Problems in result files", "", *[f"- {p}" for p in problems], ""]
    if warnings:
        md += ["## Warnings the runs recorded", "", *[f"- {w}" for w in warnings], ""]
    if checks:
        md += ["## Recommended k vs measured", "", *[f"- {c}" for c in checks], ""]
    md += [f"![{name}]({path.name})" for name, path in images.items()]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    write_csv(rows, columns, out / "report.csv")
    return {"runs": runs, "rows": rows, "columns": columns, "images": images, "missing": missing,
            "problems": problems, "warnings": warnings, "checks": checks, "out": out,
            "markdown": markdown_table(rows, shown)}


def parse_args(argv: list[str] | None = None):
    """The report's command line (argparse; an error exits with status 2)."""
    parser = cli.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="a run directory or a multirun (sweep) directory")
    parser.add_argument("--out", type=cli.output_dir, default=None, help="where to write the report (default: <dir>/report)")
    parser.add_argument("--tolerance", type=_share, default=0.05,
                        help="recommended k passes if its measured speedup is within this share of the best (0.05)")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled", "none"), default="offline",
                        help="log the report to W&B (offline by default; none skips W&B)")
    parser.add_argument("--project", default="specdec")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--group", default=None, help="W&B group (default: <parent>/<dir>, as the sweep's runs)")
    return parser.parse_args(argv)


@cli.guard(ReportError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.dir.resolve()
    result = report(root, args.out, args.tolerance)
    print(result["markdown"])
    for title, lines in (("missing (no complete summary)", result["missing"]), ("problems", result["problems"]),
                         ("warnings the runs recorded", result["warnings"]),
                         ("recommended k vs measured", result["checks"])):
        if lines:
            print(f"\n{title}:\n" + "\n".join(f"  {line}" for line in lines))
    if args.wandb != "none":
        group = args.group or f"{root.parent.name}/{root.name}"
        try:
            log_to_wandb(result["rows"], result["columns"], result["images"], result["out"], group, args.wandb,
                         args.project, args.entity)
        except Exception as exc:  # W&B is a mirror: the local report is already written
            print(f"W&B logging failed: {type(exc).__name__}: {exc}; the local report is in {result['out']}",
                  file=sys.stderr)
    print(f"\nreport: {result['out'] / 'report.md'}, {result['out'] / 'report.csv'}, "
          + ", ".join(p.name for p in result["images"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
