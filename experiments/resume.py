"""Resuming decode runs: skip finished runs, continue interrupted ones, never lose results.

A run directory belongs to one config. With ``resume=true`` (the default) a decode run first looks
at what its directory already holds:

- ``summary.json`` with ``status: complete`` for the same config and the same prompts: nothing to
  do, the run is skipped;
- an interrupted, failed or killed run of the same config: the complete records of the prompts
  that every method finished are kept (a line cut mid-write and half-done prompts are dropped),
  those prompts are skipped, the rest are decoded with the same per-prompt seeds, and the
  aggregates are recomputed over all of them;
- results of another config, results without a summary, or ``resume=false``: the old files are
  moved to ``superseded-<time>/`` in the run directory (never deleted) and the run starts afresh;
- records of prompts this run does not decode (a rerun with fewer prompts): the old records and summary are
  copied to ``superseded-<time>/`` first, since the run's own files will hold only its prompts;
- a batched run's prompts are kept only with their whole batch (:func:`whole_batches`): a batch's wall time
  and phases are its rows' together, so a batch that lost a row (a prompt not in this run, a line cut, a
  continuous batch cut mid-pass) is decoded again (where it held prompts every method had finished, after the
  same copy).

"Same config" compares the resolved configs without the keys that do not change what is decoded
(``IGNORED_KEYS``): a run continued with more prompts keeps the ones it has.

The sweep presets (``conf/sweep/*.yaml``) give every config its own deterministic directory
(``multirun/<sweep>/<overrides>``), so rerunning a sweep skips the runs it finished.

A run directory is claimed by one process at a time (:func:`claim_run_dir`, a lock file in it): a
second identical command started meanwhile waits, then skips the finished run or resumes it.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from experiments.results import RECORDS_FILE, SUMMARY_FILE, batch_rows, keep_whole, read_records
from experiments.wandb_run import STATE_FILE as WANDB_STATE_FILE
from specdec.files import held_lock

log = logging.getLogger(__name__)

#: Top-level config keys that do not change what a run decodes.
IGNORED_KEYS = ("logger", "resume", "costs", "num_prompts")
#: ``(group, key)`` added to the config after runs were written, with the value that decodes as those runs did:
#: an earlier run's config without the key reads as having it (its results are this config's, not another's).
ADDED_KEYS = {("sampling", "min_p"): 0.0}


#: Files that belong to one config's results; set aside together when the config changes (``wandb``: the
#: directory of its W&B runs).
WANDB_FILES = (WANDB_STATE_FILE, "wandb")
RUN_FILES = (RECORDS_FILE, SUMMARY_FILE, *WANDB_FILES)
#: The lock file that claims a run directory for one process.
LOCK_FILE = ".run.lock"

#: Longest directory name made from overrides (file systems allow 255 bytes).
MAX_DIRNAME = 160


def safe_dirname(text: str) -> str:
    """A directory name from Hydra's ``override_dirname``: ``/`` (paths, nested config groups) becomes
    ``-``; a name longer than ``MAX_DIRNAME`` is cut and ends in a hash of the whole (still one per config)."""
    name = str(text).replace("/", "-") or "defaults"
    if len(name.encode()) > MAX_DIRNAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = name.encode()[: MAX_DIRNAME - 13].decode(errors="ignore") + "-" + digest
    return name


def register_resolvers() -> None:
    """``${safe_dirname:...}`` for the sweep presets' ``hydra.sweep.subdir`` (idempotent)."""
    if not OmegaConf.has_resolver("safe_dirname"):
        OmegaConf.register_new_resolver("safe_dirname", safe_dirname)


register_resolvers()


def comparable(config: dict) -> dict:
    """The parts of a resolved config that decide what a run decodes (keys added since read as their
    :data:`ADDED_KEYS` value where absent)."""
    out = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    for (group, key), value in ADDED_KEYS.items():
        if isinstance(out.get(group), dict) and key not in out[group]:
            out[group] = {**out[group], key: value}
    return out


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    diffs = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, name + ".")
        elif a != b:
            diffs.append(name)
    return diffs


@dataclass
class ResumeState:
    """What a run directory already holds for this config.

    ``complete``: the finished summary (skip the run), else None. ``records``: complete records to
    keep, in file order. ``done``: question ids every method finished. ``messages``: what was
    found, skipped or set aside (one line each). ``models``: the earlier summary's ``models`` (what its process
    loaded, e.g. the draft dtype ``auto`` picked), where records are kept; ``drafter_shape``: its
    ``drafter_shape`` (e.g. the dtype an EAGLE head's ``dtype=auto`` picked), likewise.
    """

    complete: dict | None = None
    records: list[dict] = field(default_factory=list)
    done: set = field(default_factory=set)
    messages: list[str] = field(default_factory=list)
    models: dict = field(default_factory=dict)
    drafter_shape: dict = field(default_factory=dict)


def set_aside(run_dir: Path, reason: str, move: tuple[str, ...] = RUN_FILES, copy: tuple[str, ...] = ()) -> Path | None:
    """Move the run's files ``move`` (default :data:`RUN_FILES`) into ``run_dir/superseded-<time>/`` and copy those
    of ``copy`` there (a resume reads them where they are); return it (None if there was nothing). Moved, the W&B
    run goes with them, so the new results get a W&B run of their own."""
    present = [(run_dir / name, keep) for names, keep in ((move, False), (copy, True)) for name in names
               if (run_dir / name).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    target = run_dir / f"superseded-{stamp}"
    target.mkdir()
    for path, keep in present:
        if keep:
            shutil.copy2(path, target / path.name)
        else:
            shutil.move(str(path), str(target / path.name))
    (target / "REASON.txt").write_text(reason + "\n", encoding="utf-8")
    return target


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path, stream=None):
    """Hold ``run_dir`` for this process for the block (an exclusive ``flock`` on ``run_dir/.run.lock``).

    If another process holds it (the same command started twice: Hydra gives both the same
    directory), say so on one line and wait; afterwards :func:`prepare` finds that process's results
    and skips (complete) or resumes (interrupted) the run. The lock dies with its process, so a killed
    run never blocks its rerun.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def waiting(holder: str) -> str:
        return (f"waiting for {run_dir}: another process (pid {holder}) is running this config there; this one "
                "then skips the run if that one completed it, or resumes it")

    with held_lock(run_dir / LOCK_FILE, waiting, stream):
        yield


def _read_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def prepare(run_dir: str | Path, config: dict, methods: list[str], question_ids: list[Any],
            resume: bool = True) -> ResumeState:
    """Decide what a run in ``run_dir`` still has to do (see the module docstring).

    Args:
        run_dir: the run directory.
        config: the run's resolved config (``OmegaConf.to_container(cfg, resolve=True)``).
        methods: the methods every prompt is decoded with (``speculative``, ``baseline``).
        question_ids: the run's prompts, in order.
        resume: false sets any earlier results aside and starts afresh.
    """
    run_dir = Path(run_dir)
    state = ResumeState()
    summary_path, records_path = run_dir / SUMMARY_FILE, run_dir / RECORDS_FILE
    if not summary_path.exists() and not records_path.exists():
        return state

    summary = _read_summary(summary_path)
    if _nothing_decoded(run_dir, summary):  # a run that failed before its first prompt: no results to keep
        state.messages.append(f"an earlier run in {run_dir} ended before decoding any prompt (status "
                              f"{summary.get('status')!r}): its summary is replaced")
        return state
    reason = None
    if not resume:
        reason = "resume=false: earlier results set aside"
    elif summary is None:
        reason = "earlier records without a readable summary.json (their config is unknown)"
    elif not isinstance(summary.get("config"), dict):
        reason = "earlier summary.json records no config"
    else:
        diffs = config_differences(comparable(summary["config"]), comparable(config))
        if diffs:
            reason = f"earlier results are of another config (differs in {', '.join(diffs[:6])})"
    if reason is not None:
        moved = set_aside(run_dir, reason)
        state.messages.append(f"{reason}; moved to {moved}")
        return state

    if _is_complete(summary, methods, question_ids):
        state.complete = summary
        state.messages.append(f"skipping {run_dir}: complete results for this config are already there")
        return state

    records, problems = read_records(records_path) if records_path.exists() else ([], [])
    state.messages += problems
    wanted = set(question_ids)
    by_id: dict[Any, set] = {}
    for record in records:
        by_id.setdefault(record.get("question_id"), set()).add(record.get("method"))
    done = {qid for qid, done in by_id.items() if qid in wanted and set(methods) <= done}
    state.done = whole_batches(records, done)
    reasons = []  # the run's files will hold fewer records: keep a copy
    if dropped := [qid for qid in by_id if qid not in wanted]:
        reasons.append(f"{len(dropped)} earlier prompt(s) are not in this run (e.g. fewer num_prompts)")
    if split_up := done - state.done:
        reasons.append(f"{len(split_up)} earlier prompt(s) decoded in a batch that is not kept whole are decoded "
                       "again (a batch's time is its rows' together)")
    if unfinished := {qid for qid in by_id if qid in wanted and qid not in done}:
        reasons.append(f"{len(unfinished)} earlier prompt(s) that not every method finished (a run cut mid-prompt "
                       "or mid-batch) are decoded again")
    if reasons:  # prompts left out: their series leave the W&B run too (a new one gets the kept records)
        moved = [name for name in WANDB_FILES if dropped and (run_dir / name).exists()]
        copied = set_aside(run_dir, "; ".join(reasons), tuple(moved), (RECORDS_FILE, SUMMARY_FILE))
        state.messages.append(f"{'; '.join(reasons)}; the earlier records and summary are copied to {copied}"
                              + (" and their W&B run moved there (this run logs to a new one)" if moved else ""))
    seen: set = set()
    for record in records:  # one record per (prompt, method): the first complete one
        key = (record.get("question_id"), record.get("method"))
        if key[0] in state.done and key[1] in methods and key not in seen:
            seen.add(key)
            state.records.append(record)
    state.messages.append(f"resuming {run_dir} (status {summary.get('status')!r}): {len(state.done)} of "
                          f"{len(question_ids)} prompts already decoded by every method and kept, "
                          f"{len(question_ids) - len(state.done)} to decode")
    if state.records and isinstance(summary.get("models"), dict):
        state.models = summary["models"]
    if state.records and isinstance(summary.get("drafter_shape"), dict):
        state.drafter_shape = summary["drafter_shape"]
    return state


def _nothing_decoded(run_dir: Path, summary: dict | None) -> bool:
    """Whether ``run_dir`` holds only an unfinished run's summary: no record, no W&B run (nothing to set aside)."""
    records = run_dir / RECORDS_FILE
    return (summary is not None and summary.get("status") != "complete"
            and (not records.exists() or records.stat().st_size == 0)
            and not any((run_dir / name).exists() for name in WANDB_FILES))


def pinned_model(model_cfg: Any, state: ResumeState) -> tuple[Any, str | None]:
    """``model_cfg`` for a resumed run: with ``draft_dtype=auto``, the dtype the kept records were drafted in (auto
    decides per process by a timing, and under sampling another draft dtype draws other tokens: a resumed run would
    mix two drafts), and a line saying so; unchanged (and None) otherwise."""
    earlier = state.models.get("draft_dtype")
    if model_cfg.get("draft_dtype") != "auto" or not isinstance(earlier, str):
        return model_cfg, None
    pinned = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    pinned["draft_dtype"] = earlier
    return pinned, (f"model.draft_dtype=auto: drafting in {earlier}, as the kept records were (auto decides per "
                    "process; the same draft keeps a resumed run's tokens those of an uninterrupted one)")


def pinned_drafter(drafter_cfg: Any, state: ResumeState) -> tuple[Any, str | None]:
    """``drafter_cfg`` for a resumed run: a head drafted with ``dtype=auto`` (an EAGLE head; a hybrid's second
    part, the one its summary describes) pinned to the dtype the kept records' head ran in (the earlier summary's
    ``drafter_shape.draft_dtype``; auto decides per process on a CPU by a timing), and a line saying so; unchanged
    (and None) otherwise. A copy: the caller's config is left as it was; interpolations still resolve in the run's."""
    from experiments.drafter_config import drafter_parts

    earlier = state.drafter_shape.get("draft_dtype")
    if not isinstance(earlier, str) or state.drafter_shape.get("draft_module") != "probe":
        return drafter_cfg, None  # no head ran (a draft model's dtype is model.draft_dtype's: pinned_model)
    part = "second" if "second" in drafter_parts(drafter_cfg) else None
    node = drafter_cfg[part] if part else drafter_cfg
    if node.get("dtype") != "auto":
        return drafter_cfg, None
    pinned = copy.deepcopy(drafter_cfg)  # a DictConfig keeps its parent: interpolations still resolve in the run's
    with open_dict(pinned) if OmegaConf.is_config(pinned) else contextlib.nullcontext():
        (pinned[part] if part else pinned)["dtype"] = earlier
    key = f"drafter.{part}.dtype" if part else "drafter.dtype"
    return pinned, (f"{key}=auto: the head drafts in {earlier}, as the kept records' did (auto decides per process; "
                    "the same head keeps a resumed run's tokens those of an uninterrupted one)")


def whole_batches(records: list[dict], done: set) -> set:
    """The prompts of ``done`` whose batches are all kept whole: a batched record carries its batch's wall time
    and phases (shared by its rows), so a batch missing a row (a prompt not in this run, a method unfinished, a
    line cut mid-write, a continuous batch cut mid-pass) would credit its time to fewer tokens. Batch-1 records
    (no ``batch``) are whole on their own."""
    members: dict[tuple, tuple[int | None, set]] = {}  # (method, batch id) -> (rows it decoded, question ids)
    for record in records:
        batch = record.get("batch")
        if not isinstance(batch, dict) or "id" not in batch:
            continue
        key = (record.get("method"), batch["id"])
        members.setdefault(key, (batch_rows(batch), set()))[1].add(record.get("question_id"))
    return keep_whole(members.values(), done)


def _is_complete(summary: dict, methods: list[str], question_ids: list[Any]) -> bool:
    """Complete, for every method, over exactly these prompts (by id when the summary lists them)."""
    if summary.get("status") != "complete" or summary.get("num_prompts") != len(question_ids):
        return False
    if any(m not in summary.get("metrics", {}) for m in methods):
        return False
    ids = summary.get("question_ids")
    return ids is None or list(ids) == list(question_ids)


def interrupted_note() -> str:
    """What a decode run cut by Ctrl-C keeps, and the command that goes on from it: a plain run writes to a new
    ``outputs/<date>/<time>/`` each time (a sweep without a preset to a new ``multirun/<date>/<time>/``), so it is
    continued only by naming its directory."""
    from hydra.core.hydra_config import HydraConfig

    from experiments.overrides import in_multirun

    keeps = "a decode run keeps the prompts it finished"
    again = " (a batch cut mid-way, as a continuous run's single batch, is decoded again)"
    if not HydraConfig.initialized():  # cut while Hydra composed the config: no run directory, nothing decoded
        return "it stopped before the run began: nothing was decoded, so run the command again"
    hc = HydraConfig.get()
    if in_multirun():  # a sweep without a fixed directory writes to a new multirun/<date>/<time>/
        return (f"{keeps}: rerun the same sweep with hydra.sweep.dir={hc.sweep.dir} to go on (its finished runs are "
                f"skipped){again}")
    out = Path(hc.runtime.output_dir)
    if not (out / RECORDS_FILE).is_file() or not (out / RECORDS_FILE).stat().st_size:  # cut while models loaded
        return f"no prompt was finished, so nothing in {out} to go on from: run the command again"
    return f"{keeps} in {out}: rerun with hydra.run.dir={out} to go on{again}"
