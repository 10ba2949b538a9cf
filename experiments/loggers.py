"""Result loggers: one interface, a W&B implementation, a no-op, and a guard.

Local results (``records.jsonl``, ``summary.json``) are written by
:mod:`experiments.results` before and independently of any logger. A logger only mirrors
them elsewhere; :class:`GuardedLogger` makes sure a logger failure (W&B missing, init
refused, a log call raising) is reported once and never stops the run. W&B starts within a
bounded time or falls back to offline logging, and keeps one W&B run per run directory
(:mod:`experiments.wandb_run`).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.wandb_run import DEFAULT_INIT_TIMEOUT, RunState, offline_parts, set_aside, start_wandb
from specdec.errors import ConfigError

#: W&B modes ``logger.mode`` may name.
WANDB_MODES = ("offline", "online", "disabled")


class Logger:
    """Interface of a results logger; every method is a no-op here."""

    #: Human-readable name used in failure messages.
    name = "logger"

    def log_config(self, config: dict) -> None:
        """Start the run and record the resolved config."""

    def log_prompt(self, index: int, record: dict) -> None:
        """Record one decoded prompt (a ``records.jsonl`` line with its ``stats`` dict)."""

    def log_resumed(self, records: list[dict], question_ids: list | tuple = ()) -> None:
        """Records decoded before this run was interrupted (already logged then, unless this logger's run is new);
        the run continues after them. ``question_ids``: the run's prompts in order (a record's index)."""

    def log_summary(self, summary: dict) -> None:
        """Record the final summary (the content of ``summary.json``)."""

    def finish(self) -> None:
        """Close the run."""

    def backfill(self, summary: dict, records: list[dict]) -> bool:
        """A complete run is being skipped: log what never reached this logger (the process was killed
        before it logged the summary) from the local ``summary`` and ``records``. True if it logged anything."""
        return False


class NoLogger(Logger):
    """Logs nothing; never imports wandb."""

    name = "no logger"

    def __init__(self, run_dir: str | Path | None = None, **_: Any) -> None:
        self.run_dir = run_dir


class WandbLogger(Logger):
    """Weights & Biases logger, offline by default (works with no network).

    Logs the resolved config, one series of accepted drafts per decoding step
    (``step/accepted_drafts``), per-prompt metrics (``prompt/*``), summary metrics in
    ``run.summary`` and the acceptance rate by depth as a bar chart.

    The W&B run id is kept in ``run_dir/wandb_run.json``: a resumed run continues its own W&B run,
    and a skipped complete run whose summary never reached W&B gets it (:meth:`backfill`). Where the run has offline
    parts (offline runs that share an id replace each other when synced), the new part is sent the kept records
    again and the earlier parts' files move to ``run_dir/wandb/superseded`` (:func:`experiments.wandb_run.set_aside`). Online, a
    server that does not answer within ``init_timeout`` seconds costs one warning and the run is
    logged offline (:func:`experiments.wandb_run.start_wandb`).

    Args:
        run_dir: the Hydra run directory; W&B writes its files under ``run_dir/wandb``.
        mode: ``offline`` (default), ``online`` or ``disabled``.
        project, entity, group, tags, run_name: passed to ``wandb.init``.
        init_timeout: seconds an online start may take before logging goes offline.
    """

    name = "W&B"

    def __init__(
        self,
        run_dir: str | Path,
        mode: str = "offline",
        project: str = "specdec",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        init_timeout: float = DEFAULT_INIT_TIMEOUT,
    ) -> None:
        check_mode(mode)
        self.run_dir = Path(run_dir)
        self.init_timeout = float(init_timeout)
        self.init_kwargs = {
            "mode": mode,
            "project": project,
            "entity": entity,
            "group": group,
            "tags": tag_list(tags),
            "name": run_name,
        }
        self.run = None
        self.state: RunState | None = None
        self._step = 0
        self._summary_logged = False

    def log_config(self, config: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = RunState.load(self.run_dir)
        earlier = offline_parts(self.run_dir, self.state.run_id) if self.state.existed else []
        self.run = start_wandb({"dir": str(self.run_dir), "config": config, "reinit": "finish_previous",
                                "id": self.state.run_id, "resume": "allow", **self.init_kwargs}, self.init_timeout)
        self.state.save()
        if set_aside(earlier):  # once this part has started: a part that fails to start leaves them where they were
            self.state.existed, self.state.steps = False, 0  # this part is sent everything: whole alone
        self._step = self.state.steps  # a resumed W&B run: its decode_step series goes on after what it has
        # per-step and per-prompt series stay out of the run summary: W&B would put the last prompt's
        # values there under names that read as the run's (its figures are log_summary's)
        self.run.define_metric("decode_step", summary="none")
        self.run.define_metric("step/*", step_metric="decode_step", summary="none")
        self.run.define_metric("prompt_index", summary="none")
        self.run.define_metric("prompt/*", step_metric="prompt_index", summary="none")

    def log_prompt(self, index: int, record: dict) -> None:
        stats = record.get("stats", {})
        method = record.get("method", "speculative")
        metrics = {f"prompt/{method}/{key}": value for key, value in defined(stats).items() if key in _SCALAR_KEYS}
        self.run.log({"prompt_index": index, **metrics})
        if method != "speculative":
            return
        steps = list(zip(stats.get("accepted_per_step", []), stats.get("proposed_per_step", [])))
        if self.state is not None:  # counted before they are sent: a resume goes on after them, even if cut here
            self.state.steps = self._step + len(steps)
            self.state.save()
        for accepted, proposed in steps:
            self._step += 1
            self.run.log({"decode_step": self._step, "step/accepted_drafts": accepted,
                          "step/proposed_drafts": proposed, "step/prompt_index": index})

    def log_resumed(self, records: list[dict], question_ids: list | tuple = ()) -> None:
        """Go on after the resumed records' steps, or after every step the W&B run was sent (its state counts
        them: records decoded again, a batch that lost a row, were sent too), whichever is more. A W&B run that
        is new (the records were made with another logger, or the earlier run was set aside with prompts this run
        leaves out) is sent the records first."""
        if self.state is not None and not self.state.existed:
            self._log_records(records, question_ids)
            return
        kept = sum(len(r.get("stats", {}).get("accepted_per_step", [])) for r in records
                   if r.get("method", "speculative") == "speculative")
        self._step = max(self._step, kept)

    def log_summary(self, summary: dict) -> None:
        import wandb

        metrics = summary.get("metrics", {})
        self.run.summary.update(flatten({k: defined(v) if isinstance(v, dict) else v for k, v in metrics.items()}))
        rates = summary.get("metrics", {}).get("speculative", {}).get("acceptance_rate_by_depth") or []
        if rates:
            table = wandb.Table(columns=["depth", "acceptance_rate"], data=[[d + 1, r] for d, r in enumerate(rates)])
            chart = wandb.plot.bar(table, "depth", "acceptance_rate", title="Acceptance rate by depth")
            self.run.log({"acceptance_rate_by_depth": chart})
        self._summary_logged = True

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
            if self._summary_logged and self.state is not None:  # it reached W&B (or its offline files)
                self.state.summary_logged = True
                self.state.save()

    def backfill(self, summary: dict, records: list[dict]) -> bool:
        """Log the summary to this directory's W&B run if it never got it; a W&B run that did not exist
        yet (the run was made with another logger) also gets the per-prompt records."""
        if RunState.load(self.run_dir).summary_logged:
            return False
        self.log_config(summary.get("config") or {})
        if not self.state.existed:  # a new W&B run, or a new offline part (log_config)
            self._log_records(records, summary.get("question_ids") or [])
        self.log_summary(summary)
        self.finish()
        return True

    def _log_records(self, records: list[dict], question_ids: list | tuple) -> None:
        """Send ``records`` as :meth:`log_prompt` would have, each at its prompt's index in ``question_ids``."""
        index = {qid: i for i, qid in enumerate(question_ids)}
        for position, record in enumerate(records):
            self.log_prompt(index.get(record.get("question_id"), position), record)


def defined(stats: dict) -> dict:
    """A method's metrics less a ``draft_acceptance_rate`` that is no rate
    (:func:`experiments.results.acceptance_rate`)."""
    from experiments.results import acceptance_rate

    return stats if acceptance_rate(stats) is not None else {k: v for k, v in stats.items()
                                                             if k != "draft_acceptance_rate"}


_SCALAR_KEYS = ("tau", "mean_accepted_drafts", "mean_proposed_drafts", "draft_acceptance_rate", "tokens_per_s",
                "new_tokens", "target_forwards", "time_total")


class GuardedLogger(Logger):
    """Wraps a logger so that its first exception is reported once and the logger is switched off.

    The message reads ``"<name> logging failed: <error>; local results are in <dir>"``.
    """

    def __init__(self, inner: Logger, results_dir: str | Path, stream: Any = None) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.results_dir = str(results_dir)
        self.stream = stream
        self.failed: str | None = None

    def _call(self, method: str, *args: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            return getattr(self.inner, method)(*args)
        except Exception as exc:  # any logger failure: report once, keep running
            self.failed = f"{type(exc).__name__}: {exc}"
            stream = self.stream or sys.stderr
            print(f"{self.name} logging failed: {self.failed}; local results are in {self.results_dir}", file=stream)
            self._try_finish()
            return None

    def _try_finish(self) -> None:
        try:
            self.inner.finish()
        except Exception:  # already reported the first failure; a second one adds nothing
            pass

    def log_config(self, config: dict) -> None:
        self._call("log_config", config)

    def log_prompt(self, index: int, record: dict) -> None:
        self._call("log_prompt", index, record)

    def log_resumed(self, records: list[dict], question_ids: list | tuple = ()) -> None:
        self._call("log_resumed", records, question_ids)

    def log_summary(self, summary: dict) -> None:
        self._call("log_summary", summary)

    def finish(self) -> None:
        self._call("finish")

    def backfill(self, summary: dict, records: list[dict]) -> bool:
        return bool(self._call("backfill", summary, records))


def check_mode(mode: Any) -> None:
    """``logger.mode`` is one of :data:`WANDB_MODES`, else a :class:`ConfigError` naming it."""
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={mode!r} is unknown; choose one of {', '.join(WANDB_MODES)}")


def check_logger_node(node: Any) -> None:
    """The run's ``logger`` node: where it makes a :class:`WandbLogger` (or a subclass), its ``mode`` is known,
    checked before anything loads (its constructor checks it again)."""
    module, _, name = str((node or {}).get("_target_") or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return  # a _target_ that does not resolve is named by experiments.instantiate.check_arguments
    if isinstance(cls, type) and issubclass(cls, WandbLogger):
        check_mode(node.get("mode", "offline"))


def tag_list(tags: Any) -> list[str]:
    """W&B tags from ``logger.tags``: a list, or one tag as a plain value (``logger.tags=mine``), not its letters."""
    if isinstance(tags, (str, int, float, bool)):  # Hydra reads logger.tags=2024 as a number
        return [str(tags)]
    return [str(tag) for tag in tags or []]


def flatten(tree: dict, prefix: str = "", sep: str = "/") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; lists are kept as values."""
    flat: dict = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------- training entry points


def training_wandb_settings(cfg: Any, run_dir: Path, job_type: str, tags: Sequence[str] = (),
                            name: str | None = None, group: str | None = None) -> dict | None:
    """``wandb.init`` arguments for a training entry point from its ``logger`` group, or None (``logger=none``).
    ``group``: the W&B group of every invocation of one training (a resumed one's runs share it; each invocation is
    a run of its own: offline runs that share an id replace each other when synced)."""
    from omegaconf import OmegaConf

    logger = cfg.get("logger") or {}
    if "wandb" not in str(logger.get("_target_", "")).lower():
        return None
    return {"mode": logger.get("mode", "offline"), "project": logger.get("project", "specdec"),
            "entity": logger.get("entity"), "tags": tag_list(logger.get("tags")) + [job_type, *tags],
            "name": name, "dir": str(run_dir), "job_type": job_type, "group": group,
            "config": OmegaConf.to_container(cfg, resolve=True)}


class TrainingLog:
    """Training metrics to ``<run_dir>/train_log.jsonl`` and to W&B (started lazily).

    A W&B failure is reported once, then logging goes on locally only; it never stops training.
    """

    def __init__(self, run_dir: Path, wandb_init: dict | None) -> None:
        self.path = Path(run_dir) / "train_log.jsonl"
        self.wandb_init, self.run = wandb_init, None

    def __call__(self, metrics: dict, step: int) -> None:
        import json

        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self._wandb(lambda run: run.log(metrics, step=step))

    def summary(self, metrics: dict) -> None:
        """Final metrics into the W&B run summary (only if a run was started)."""
        if self.run is not None:
            self._wandb(lambda run: run.summary.update(metrics))

    def finish(self) -> None:
        """Close the W&B run, if any."""
        if self.run is not None:
            self._wandb(lambda run: run.finish())

    def _wandb(self, action) -> None:
        if self.wandb_init is None:
            return
        try:
            if self.run is None:
                self.run = start_wandb(self.wandb_init)
            action(self.run)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            print(f"W&B logging failed ({type(exc).__name__}: {exc}); local logs stay in {self.path}", file=sys.stderr)
            self.wandb_init, self.run = None, None
