"""Aggregate decode runs into a table and plots: ``python -m experiments.report <run or multirun dir>``.

Reads each run's local results (``summary.json``, ``records.jsonl`` and ``.hydra/overrides.yaml``
for its swept values; runs are found in the directory and below it) and writes, in
``<dir>/report/``:

- ``report.md`` and ``report.csv``: one row per run (CSV values are the summaries' own numbers, at
  full precision), what is missing, and the check of the cost model's ``recommended_k``
  against the best measured k;
- ``tau_speedup_vs_k.png`` (measured, with the cost model's predicted curves),
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
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments import cli
from experiments.costs import chain_speedup_by_k, fit_alpha, recommend_k
from experiments.results import BASELINE, RECORDS_FILE, SPECULATIVE, SUMMARY_FILE, build_summary, read_records, \
    results_from_records

REPORT_DIR = "report"
K_KEY = "drafter.num_speculative_tokens"
SPLITS = ("prefill", "draft", "verify", "accept_commit", "other")
#: Columns that depend on wall-clock measurements (they differ between otherwise identical runs).
TIMING_COLUMNS = ("tokens_per_s", "baseline_tokens_per_s", "speedup", "predicted_speedup", "efficiency",
                  "recommended_k", "ms_per_step") + tuple(f"split_{s}" for s in SPLITS)
COLUMNS = ("run", "status", "prompts_done", "num_prompts", "drafter_class", "shape", "k", "temperature", "acceptance",
           "tau", "draft_acceptance_rate", "acceptance_by_depth", "alpha", "matches_baseline") + TIMING_COLUMNS
_SHORT = {K_KEY: "k", "sampling.temperature": "T", "sweep/shape": "shape"}
_SKIP_DIRS = {REPORT_DIR, "wandb", ".hydra", ".submitit"}


class ReportError(Exception):
    """Bad input to the report (no runs, not a directory): one line, exit status 2."""


# --------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """One decode run directory and what it holds."""

    path: Path
    name: str
    overrides: dict[str, str] = field(default_factory=dict)
    summary: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return (self.summary or {}).get("status", "no results")

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def metrics(self) -> dict:
        return (self.summary or {}).get("metrics", {})

    @property
    def config(self) -> dict:
        return (self.summary or {}).get("config") or {}


def find_run_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding a summary, records or a Hydra job config."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        has_job = (Path(dirpath) / ".hydra" / "overrides.yaml").is_file()
        if SUMMARY_FILE in filenames or RECORDS_FILE in filenames or has_job:
            found.append(Path(dirpath))
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("superseded-"))
    return sorted(found)


def _read_overrides(path: Path) -> dict[str, str]:
    import yaml

    file = path / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(file.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def _rebuild_summary(path: Path, records: list[dict]) -> dict | None:
    """Metrics from complete records when ``summary.json`` is missing (the config from ``.hydra``)."""
    if not records:
        return None
    config: dict = {}
    try:
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=True)
    except Exception:  # no or unreadable Hydra config: report the metrics without it
        pass
    greedy = float(config.get("sampling", {}).get("temperature", 0.0) or 0.0) == 0.0
    results = results_from_records(records)
    num = len({r["question_id"] for r in records})
    summary = build_summary(results, greedy=greedy, status="no summary (rebuilt from records)", num_prompts=num,
                            extra={"config": config, "drafter": records[0].get("drafter")})
    summary["acceptance"] = config.get("acceptance", {}).get("name")
    return summary


def load_run(path: Path, root: Path) -> Run:
    """Read one run directory; unreadable files become ``problems``, never exceptions."""
    name = str(path.relative_to(root)) if path != root else path.name
    run = Run(path=path, name=name, overrides=_read_overrides(path))
    records: list[dict] = []
    if (path / RECORDS_FILE).is_file():
        records, run.problems = read_records(path / RECORDS_FILE)
    if (path / SUMMARY_FILE).is_file():
        try:
            run.summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            run.problems.append(f"{path / SUMMARY_FILE}: unreadable ({exc}); metrics rebuilt from records")
    if run.summary is None:
        run.summary = _rebuild_summary(path, records)
    return run


def expected_jobs(root: Path) -> list[frozenset] | None:
    """The job override sets of a Hydra multirun (``multirun.yaml``, basic sweeper), or None."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(root / "multirun.yaml")
        if "BasicSweeper" not in str(cfg.hydra.sweeper.get("_target_", "")):
            return None
        params = cfg.hydra.sweeper.get("params") or {}
        lines = [f"{k}={v}" for k, v in params.items()] + list(cfg.hydra.overrides.task)
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(lines), None)
    except Exception:  # no multirun.yaml, another sweeper, or a syntax we do not expand
        return None
    return [frozenset(job) for batch in batches for job in batch]


def load_runs(root: Path) -> tuple[list[Run], list[str]]:
    """Every run under ``root`` and the names of expected multirun jobs that have no directory."""
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory: give a run directory or a multirun directory")
    runs = [load_run(p, root) for p in find_run_dirs(root)]
    if not runs:
        raise ReportError(f"no decode runs under {root}: expected summary.json or records.jsonl in it or its "
                          "subdirectories (a run directory, or a sweep's such as multirun/draft_length)")
    never_started = []
    jobs = expected_jobs(root)
    if jobs:
        have = {frozenset(f"{k}={v}" for k, v in r.overrides.items()) for r in runs}
        never_started = [" ".join(sorted(job)) for job in jobs if job not in have]
    return runs, never_started


# --------------------------------------------------------------------------- the table


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (or that some runs lack), in first-seen order."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def _shape(run: Run) -> str:
    kind = (run.summary or {}).get("cost_model", {}).get("drafter", {}).get("kind") if run.summary else None
    config = run.config
    paths = (config.get("tree") or {}).get("paths")
    budget = (config.get("drafter") or {}).get("budget")
    if kind == "none" or (run.summary or {}).get("drafter") == "NoDrafter":
        return "none"
    if paths:
        return f"tree{len(paths)}"
    if budget:
        return f"dynamic{budget}"
    return "chain"


def row_of(run: Run, swept: list[str]) -> dict:
    """The table row of one run: swept values, then the summary's metrics (None where absent)."""
    spec, base, m = run.metrics.get(SPECULATIVE, {}), run.metrics.get(BASELINE, {}), run.metrics
    shape = _shape(run)
    steps = spec.get("target_forwards") or 0
    alpha = fit_alpha(spec.get("depth_proposed", []), spec.get("depth_accepted", [])) if spec else None
    row: dict[str, Any] = {"run": run.name}
    row.update({
        "status": run.status, "prompts_done": spec.get("num_prompts"), "num_prompts": (run.summary or {}).get("num_prompts"),
        "drafter_class": (run.summary or {}).get("drafter"), "shape": shape,
        "k": (run.config.get("drafter") or {}).get("num_speculative_tokens")  # a dynamic tree's depth limit
        if shape == "chain" or shape.startswith("dynamic") else None,
        "temperature": (run.config.get("sampling") or {}).get("temperature"),
        "acceptance": (run.summary or {}).get("acceptance"),
        "tau": spec.get("tau"), "draft_acceptance_rate": spec.get("draft_acceptance_rate"),
        "acceptance_by_depth": " ".join(f"{r:.4f}" for r in spec.get("acceptance_rate_by_depth", [])) or None,
        "alpha": alpha, "matches_baseline": m.get("matches_baseline"),
        "tokens_per_s": spec.get("tokens_per_s"), "baseline_tokens_per_s": base.get("tokens_per_s"),
        "speedup": m.get("speedup"), "predicted_speedup": m.get("predicted_speedup"),
        "efficiency": m.get("efficiency"), "recommended_k": m.get("recommended_k"),
        "ms_per_step": 1000 * (spec["time_total"] - spec["time_prefill"]) / steps if steps else None,
    })
    row.update({f"split_{s}": spec.get("time_split", {}).get(s) for s in SPLITS})
    row.update({key: run.overrides.get(key) for key in swept})  # swept values win a name clash
    return row


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


def _series(runs: list[Run], swept: list[str]) -> dict[str, list[Run]]:
    """Complete chain runs with a k, grouped by their other swept values (one curve each)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.complete and _shape(run) == "chain" and row_of(run, []).get("k"):
            label = label_of(run, [k for k in swept if k != K_KEY]) or "all runs"
            groups.setdefault(label, []).append(run)
    return groups


def pooled_model(group: list[Run]) -> tuple[float | None, dict | None, bool, float | None]:
    """``(alpha, costs, draft_model, tokens per prompt)``: alpha fitted to the group's pooled
    acceptance by depth, the costs measured by its first run that has them."""
    proposed: list[int] = []
    accepted: list[int] = []
    costs, draft_model = None, True
    tokens = [s["new_tokens"] / s["num_prompts"] for s in (r.metrics.get(SPECULATIVE, {}) for r in group)
              if s.get("num_prompts")]
    for run in group:
        spec = run.metrics.get(SPECULATIVE, {})
        for mine, theirs in ((proposed, spec.get("depth_proposed", [])), (accepted, spec.get("depth_accepted", []))):
            mine.extend([0] * (len(theirs) - len(mine)))
            for d, v in enumerate(theirs):
                mine[d] += v
        model = (run.summary or {}).get("cost_model") or {}
        if costs is None and model.get("costs"):
            costs, draft_model = model["costs"], bool((model.get("drafter") or {}).get("draft_model", True))
    return fit_alpha(proposed, accepted), costs, draft_model, (sum(tokens) / len(tokens) if tokens else None)


def check_recommendations(runs: list[Run], swept: list[str], tolerance: float) -> list[str]:
    """Per series: the cost model's recommended k against the best measured k."""
    lines = []
    for label, group in _series(runs, swept).items():
        alpha, costs, draft_model, tokens = pooled_model(group)
        speed = {row_of(r, [])["k"]: r.metrics.get("speedup") for r in group if r.metrics.get("speedup")}
        if alpha is None or costs is None or not speed:
            lines.append(f"{label}: no recommendation check (needs costs=true, drafts proposed and a baseline)")
            continue
        rec = recommend_k(chain_speedup_by_k(alpha, costs, draft_model, tokens_per_prompt=tokens))
        best = max(speed, key=speed.get)
        head = (f"{label}: recommended k={rec} (alpha={alpha:.3f}); best measured k={best} "
                f"({speed[best]:.2f}x)")
        if rec not in speed:
            lines.append(f"{head}; k={rec} is not in the sweep")
        else:
            gap = 1.0 - speed[rec] / speed[best]
            verdict = "OK" if gap <= tolerance else "MISS"
            lines.append(f"{head}; k={rec} measured {speed[rec]:.2f}x, {gap:.1%} below the best "
                         f"(tolerance {tolerance:.0%}): {verdict}")
    return lines


# --------------------------------------------------------------------------- labels


def label_of(run: Run, keys: list[str]) -> str:
    parts = [f"{_SHORT.get(k, k.split('.')[-1])}={run.overrides.get(k)}" for k in keys if k in run.overrides]
    return " ".join(parts)


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


def report(root: Path, out: Path | None = None, tolerance: float = 0.05) -> dict:
    """Build the report of the runs under ``root``; returns rows, columns, files and messages."""
    runs, never_started = load_runs(root)
    swept = swept_keys(runs)
    columns = ["run", *swept, *[c for c in COLUMNS if c not in ("run", *swept)]]
    rows = [row_of(r, swept) for r in runs]
    out = out or root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    missing = [f"{r.name}: {r.status}" for r in runs if not r.complete]
    missing += [f"{job}: never started" for job in never_started]
    problems = [p for r in runs for p in r.problems]
    checks = check_recommendations(runs, swept, tolerance)
    from experiments.report_plots import make_plots

    images = make_plots(runs, swept, out)
    shown = [c for c in columns if c != "run"] if swept else columns  # the swept values name the runs
    md = [f"# Report: {root}", "", f"{len(runs)} runs, {sum(r.complete for r in runs)} complete.",
          "", markdown_table(rows, shown), ""]
    if missing:
        md += ["## Missing (no complete summary)", "", *[f"- {m}" for m in missing], ""]
    if problems:
        md += ["## Problems in result files", "", *[f"- {p}" for p in problems], ""]
    if checks:
        md += ["## Recommended k vs measured", "", *[f"- {c}" for c in checks], ""]
    md += [f"![{name}]({path.name})" for name, path in images.items()]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    write_csv(rows, columns, out / "report.csv")
    return {"runs": runs, "rows": rows, "columns": columns, "images": images, "missing": missing,
            "problems": problems, "checks": checks, "out": out, "markdown": markdown_table(rows, shown)}


@cli.guard(ReportError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="a run directory or a multirun (sweep) directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: <dir>/report)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="recommended k passes if its measured speedup is within this share of the best (0.05)")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled", "none"), default="offline",
                        help="log the report to W&B (offline by default; none skips W&B)")
    parser.add_argument("--project", default="specdec")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--group", default=None, help="W&B group (default: <parent>/<dir>, as the sweep's runs)")
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    result = report(root, args.out, args.tolerance)
    print(result["markdown"])
    for title, lines in (("missing (no complete summary)", result["missing"]), ("problems", result["problems"]),
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
