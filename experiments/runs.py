"""Reading decode runs back: the run directories under a run or sweep directory, their summaries
(rebuilt from records where a run was cut short), one table row per run, and chain runs grouped into
series with the cost model pooled over each. A library: ``experiments.report`` (the entry point)
and :mod:`experiments.report_plots` build on it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.costs import fit_alpha
from experiments.results import BASELINE, RECORDS_FILE, SPECULATIVE, SUMMARY_FILE, acceptance_rate, build_summary, \
    read_records, results_from_records, steps_of
from specdec.stats import add_counts

REPORT_DIR = "report"
K_KEY = "drafter.num_speculative_tokens"
SPLITS = ("prefill", "draft", "verify", "accept_commit", "other")
#: Columns that depend on wall-clock measurements (they differ between otherwise identical runs).
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
    error: str | None = None  # the line the last command there failed with (``cli.JOB_ERROR_FILE``), if it did

    @property
    def status(self) -> str:
        """The summary's status; a failure the summary cannot know of (before any results, or a later command's
        there) is added from :attr:`error`."""
        if self.summary is None:
            return f"failed before writing results: {self.error}" if self.error else "no results"
        status = self.summary.get("status", "no results")
        later = self.error and status != "complete" and not status.startswith("failed")  # else the summary says it
        return f"{status}; the last command there failed: {self.error}" if later else status

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def metrics(self) -> dict:
        return (self.summary or {}).get("metrics", {})

    @property
    def config(self) -> dict:
        return (self.summary or {}).get("config") or {}

    @property
    def warnings(self) -> list[str]:
        """The warnings its summary records (an implausible cost curve, a batch missing rows, ...)."""
        found = (self.summary or {}).get("warnings")
        if found is None:
            return []
        return [str(w) for w in found] if isinstance(found, list) else [str(found)]


def find_run_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding a summary, records or a decode job's Hydra config (not
    another entry point's, such as a training's output directory)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        has_job = (Path(dirpath) / ".hydra" / "overrides.yaml").is_file() and _decode_job(Path(dirpath))
        if SUMMARY_FILE in filenames or RECORDS_FILE in filenames or has_job:
            found.append(Path(dirpath))
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("superseded-"))
    return sorted(found)


# the Hydra entry points that are not decode runs (their job name is the module's, their config name the same)
_OTHER_ENTRY_POINTS = frozenset({"build_draft", "build_zoo", "train_eagle", "train_medusa"})


def _decode_job(path: Path) -> bool:
    """Whether the Hydra job in ``path`` ran ``experiments.decode``: neither its job name nor its config name is
    another entry point's (a decode run keeps its results when ``hydra.job.name`` was overridden; True when its
    ``.hydra/hydra.yaml`` cannot tell)."""
    import yaml

    try:
        job = yaml.safe_load((path / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"))["hydra"]["job"]
        names = {job.get("name"), job.get("config_name")}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return True
    return not names & _OTHER_ENTRY_POINTS


def _read_overrides(path: Path) -> dict[str, str]:
    """The overrides of ``.hydra/overrides.yaml`` (those of the last command started there)."""
    import yaml

    file = path / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(file.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError):
        return {}
    return _overrides_of(items)


def _overrides_of(items: list) -> dict[str, str]:
    """``{key: value}`` of ``key=value`` overrides."""
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def _read_error(path: Path) -> str | None:
    """The line a failed Hydra job left in ``path`` (:data:`experiments.cli.JOB_ERROR_FILE`), or None."""
    from experiments.cli import JOB_ERROR_FILE

    try:
        return (path / JOB_ERROR_FILE).read_text(encoding="utf-8").strip().removeprefix("error: ") or None
    except (OSError, ValueError):
        return None


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
    summary["acceptance"] = rule_name(config.get("acceptance") or {})
    return summary


def rule_name(rule: dict) -> str | None:
    """The name a run's summary gives the acceptance rule of config ``rule`` (``greedy`` for
    ``specdec.acceptance.GreedyAcceptance``, as decode writes it); a custom rule's class name."""
    from specdec.acceptance import RULES

    cls = str(rule.get("_target_", "")).rsplit(".", 1)[-1]
    names = {c.__name__: name for name, c in RULES.items()}
    return rule.get("name") or names.get(cls) or cls or None


def load_run(path: Path, root: Path) -> Run:
    """Read one run directory; unreadable files become ``problems``, never exceptions."""
    name = str(path.relative_to(root)) if path != root else path.name
    run = Run(path=path, name=name, overrides=_read_overrides(path), error=_read_error(path))
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
    elif isinstance(run.summary.get("overrides"), list):  # the run's own: .hydra's are the last command's there
        run.overrides = _overrides_of(run.summary["overrides"])
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


def step_shape_of(run: Run) -> dict:
    """The drafter's step shape as the run's summary recorded it (``drafter_shape``, or the cost model's copy in
    older summaries); empty for a run that failed before its drafter was built."""
    summary = run.summary or {}
    return summary.get("drafter_shape") or (summary.get("cost_model") or {}).get("drafter") or {}


def is_hybrid(run: Run) -> bool:
    """Whether the run's drafter drafts some steps with a part that runs no model (a hybrid: its step shape has a
    ``draft_source``)."""
    return step_shape_of(run).get("draft_source") is not None


def k_priced(run: Run) -> bool:
    """Whether the chain cost model's k curve can price the run's drafts: not when its drafter runs a fixed number
    of draft forwards whatever k (a cross-tokenizer draft; its summary's ``recommended_k`` is null for it)."""
    return step_shape_of(run).get("draft_forwards") != "fixed"


def k_of(run: Run, shape: str | None) -> int | None:
    """The chain length (a dynamic tree's depth limit) of a chain or dynamic run: the config's
    ``drafter.num_speculative_tokens``, else (a hybrid, whose parts hold theirs) the step shape's k, its model
    part's; None for other shapes. (A cross-tokenizer draft's step k counts its draft forwards, not its chain.)"""
    if shape != "chain" and not (shape or "").startswith("dynamic"):
        return None
    configured = (run.config.get("drafter") or {}).get("num_speculative_tokens")
    return configured if configured is not None else step_shape_of(run).get("k")


def shape_of(run: Run) -> str | None:
    """``none``, ``chain``, ``tree<nodes>`` or ``dynamic<budget>``, from the drafter's step shape; None for a run
    that failed before its drafter was built (neither its summary nor its config says a shape)."""
    summary = run.summary or {}
    shape = step_shape_of(run)
    config = run.config
    paths = (config.get("tree") or {}).get("paths")
    budget = (config.get("drafter") or {}).get("budget")
    if shape.get("kind") == "none" or summary.get("drafter") == "NoDrafter":
        return "none"
    if paths or shape.get("kind") == "tree":  # a preset, or a tree the drafter derived (Medusa's)
        return f"tree{len(paths) if paths else shape.get('max_nodes')}"
    if budget or shape.get("kind") == "dynamic":
        return f"dynamic{budget or shape.get('max_nodes')}"
    return "chain" if shape or summary.get("drafter") else None


def row_of(run: Run, swept: list[str]) -> dict:
    """The table row of one run: swept values, then the summary's metrics (None where absent)."""
    spec, base, m = run.metrics.get(SPECULATIVE, {}), run.metrics.get(BASELINE, {}), run.metrics
    shape = shape_of(run)
    steps = steps_of(spec)
    alpha = fit_alpha(spec.get("depth_proposed", []), spec.get("depth_accepted", [])) if spec else None
    row: dict[str, Any] = {"run": run.name}
    row.update({
        "status": run.status, "prompts_done": spec.get("num_prompts"), "num_prompts": (run.summary or {}).get("num_prompts"),
        "drafter_class": (run.summary or {}).get("drafter"), "shape": shape,
        "k": k_of(run, shape),
        "temperature": (run.config.get("sampling") or {}).get("temperature"),
        "acceptance": (run.summary or {}).get("acceptance"),
        "tau": spec.get("tau"),
        "draft_acceptance_rate": acceptance_rate(spec),
        "acceptance_by_depth": " ".join(f"{r:.4f}" for r in spec.get("acceptance_rate_by_depth", [])) or None,
        "alpha": alpha, "matches_baseline": m.get("matches_baseline"),
        "tokens_per_s": spec.get("tokens_per_s"), "baseline_tokens_per_s": base.get("tokens_per_s"),
        "speedup": m.get("speedup"), "predicted_speedup": m.get("predicted_speedup"),
        "efficiency": m.get("efficiency"),
        "recommended_k": None if is_hybrid(run) else m.get("recommended_k"),  # older summaries gave hybrids one
        "ms_per_step": 1000 * (spec["time_total"] - spec["time_prefill"]) / steps if steps else None,
    })
    row.update({f"split_{s}": spec.get("time_split", {}).get(s) for s in SPLITS})
    row.update({key: run.overrides.get(key) for key in swept})  # swept values win a name clash
    return row


def series(runs: list[Run], swept: list[str]) -> dict[str, list[Run]]:
    """Complete chain runs with a k, grouped by their other swept values (one curve each). A hybrid's runs are left
    out: the chain cost model prices every step's k draft forwards, a hybrid's lookup steps cost none."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.complete and shape_of(run) == "chain" and row_of(run, []).get("k") and not is_hybrid(run):
            label = label_of(run, [k for k in swept if k != K_KEY]) or "all runs"
            groups.setdefault(label, []).append(run)
    return groups


def pooled_model(group: list[Run]) -> tuple[float | None, dict | None, float | None]:
    """``(alpha, costs, tokens per prompt)``: alpha fitted to the group's pooled
    acceptance by depth, the costs measured by its first run that has them."""
    proposed: list[int] = []
    accepted: list[int] = []
    costs = None
    tokens = [s["new_tokens"] / s["num_prompts"] for s in (r.metrics.get(SPECULATIVE, {}) for r in group)
              if s.get("num_prompts")]
    for run in group:
        spec = run.metrics.get(SPECULATIVE, {})
        add_counts(proposed, spec.get("depth_proposed", []))
        add_counts(accepted, spec.get("depth_accepted", []))
        model = (run.summary or {}).get("cost_model") or {}
        if costs is None and model.get("costs"):
            costs = model["costs"]
    return fit_alpha(proposed, accepted), costs, (sum(tokens) / len(tokens) if tokens else None)


def label_of(run: Run, keys: list[str]) -> str:
    """``run``'s values of ``keys``, each key by its short name (``k=2 T=0.7``; else the key without its config
    group, so that a hybrid's part keeps its place: ``second.num_speculative_tokens=2``)."""
    parts = [f"{_SHORT.get(k, k.split('.', 1)[-1])}={run.overrides.get(k)}" for k in keys if k in run.overrides]
    return " ".join(parts)


def job_label(overrides: list[str], exclude: list[str]) -> str | None:
    """A multirun job's name (its W&B run's): its overrides (``key=value``, as Hydra passed them) but the keys in
    ``exclude`` (the sweep's ``override_dirname.exclude_keys``) and the logger's, ``drafter.num_speculative_tokens``
    and ``sampling.temperature`` as ``k`` and ``T`` (``k=2 T=0.7 num_prompts=2``): the job's own, so a rerun or an
    extension of the sweep names it as before; None for a job without overrides."""
    kept = [o.split("=", 1) for o in overrides if "=" in o]
    kept = [(k, v) for k, v in kept if k.lstrip("+~") not in exclude and k.lstrip("+~").split(".")[0] != "logger"]
    return " ".join(f"{_SHORT.get(k, k)}={v}" for k, v in kept) or None
