"""Local results of a decode run: ``records.jsonl`` and ``summary.json``, written as the run goes.

Every prompt decoded by every method appends one JSON line to ``records.jsonl`` (flushed
at once), and ``summary.json`` is rewritten atomically after each prompt, so an
interrupted run keeps everything it computed. Aggregation uses
:meth:`specdec.stats.DecodeStats.merge`; the metric names are the ones of the README's Metrics table.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.files import atomic_write_json, atomic_write_text
from specdec.stats import TIME_FIELDS, DecodeStats

SPECULATIVE = "speculative"
BASELINE = "baseline"
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"

#: Per-step lists are kept in records.jsonl, not repeated in the summary.
_PER_STEP_KEYS = ("accepted_per_step", "proposed_per_step")


@dataclass
class MethodResults:
    """What one method (speculative or baseline) produced so far."""

    stats: list[DecodeStats] = field(default_factory=list)
    outputs: dict[Any, list[int]] = field(default_factory=dict)  # question_id -> generated token ids
    batches: dict[Any, dict] = field(default_factory=dict)  # batch id -> its shared record entry (batched runs)
    ids: list = field(default_factory=list)  # the question id of each entry of ``stats``
    batch_of: dict[Any, Any] = field(default_factory=dict)  # question_id -> its batch's id (batched runs)

    def add(self, question_id: Any, stats: DecodeStats, new_ids: list[int], batch: dict | None = None) -> None:
        self.stats.append(stats)
        self.ids.append(question_id)
        self.outputs[question_id] = new_ids
        if batch is not None:
            self.batches[batch["id"]] = batch
            self.batch_of[question_id] = batch["id"]

    def members(self) -> dict[Any, set]:
        """Batch id -> the question ids decoded in that batch (batched runs; empty otherwise)."""
        out: dict[Any, set] = {}
        for qid, batch_id in self.batch_of.items():
            out.setdefault(batch_id, set()).add(qid)
        return out

    def restricted(self, question_ids: set) -> MethodResults | None:
        """These results over ``question_ids`` only; None where a batch holds prompts both inside and outside
        them (a batch's time is its rows' together and cannot be divided)."""
        if any(qids & question_ids and not qids <= question_ids for qids in self.members().values()):
            return None
        out = MethodResults()
        for qid, stats in zip(self.ids, self.stats):
            if qid in question_ids:
                out.add(qid, stats, self.outputs[qid], self.batches.get(self.batch_of.get(qid)))
        return out

    def cut_batches(self) -> list:
        """Ids of batches missing rows: fewer of their rows are here than they decode (a continuous batch cut
        mid-pass; a record lost from a file). Their wall time covers the missing rows' work too, so tokens/s
        over it is an underestimate."""
        return [b for b, qids in self.members().items() if len(qids) < (batch_rows(self.batches[b]) or 0)]

    def metrics(self) -> dict:
        """Merged stats (``DecodeStats.to_dict`` minus per-step lists) plus the time split.

        In a batched run the times are the batches' (wall time, phases, compiling), so ``tokens_per_s`` is
        the aggregate throughput and ``steps`` the batches' steps; per-prompt counts (tau, acceptance by
        depth) come from the rows."""
        merged = DecodeStats.merge(self.stats)
        if self.batches:
            for name in (*TIME_FIELDS, "time_compile", "batch_steps"):  # the last two: absent in older records
                setattr(merged, name, sum(b.get(name) or 0 for b in self.batches.values()))  # null: not timed
        out = {k: v for k, v in merged.to_dict().items() if k not in _PER_STEP_KEYS}
        out["num_prompts"] = len(self.stats)
        out["time_split"] = time_split(merged)
        out = untimed_phases_nulled(out)
        if self.batches:
            out["batch_size"] = max(b["size"] for b in self.batches.values())
        return out


def batch_rows(batch: dict) -> int | None:
    """The rows a batch entry of a record decoded (a continuous batch's ``rows``, a static one's ``size``; None
    in records written before continuous batches kept ``rows``)."""
    rows = batch.get("rows") if batch.get("mode") == "continuous" else batch.get("size")
    return rows if isinstance(rows, int) else None


def steps_of(metrics: dict) -> int:
    """A method's verify forwards from its summary metrics: the batches' steps in a batched run (``steps``;
    summaries written before it existed: ``target_forwards``)."""
    return metrics.get("steps") or metrics.get("target_forwards") or 0


def steps_split(metrics: dict) -> bool:
    """Whether a method's steps were timed phase by phase (``metrics``: a summary's, or a batch-1 run's
    ``DecodeStats.to_dict``: a batched record's row times no phase of its own, its ``batch`` entry does).
    The fixed-shape step (``compile=static|graph|inductor``) runs draft, verify and accept as one captured
    call and times none of them apart."""
    return not (metrics.get("target_forwards") and not metrics.get("time_verify"))


#: The step's phase times, which the fixed-shape step does not take apart (:func:`steps_split`): null in its
#: records and summary, not 0 s (a trial read ``time_verify: 0.0`` as verification costing nothing).
STEP_PHASE_TIMES = ("time_draft", "time_verify", "time_accept", "time_other")


def phases_timed(stats: DecodeStats) -> bool:
    """:func:`steps_split` of a :class:`DecodeStats` (a run's, a row's or a batch's aggregate)."""
    return steps_split({"target_forwards": stats.target_forwards, "time_verify": stats.time_verify})


def untimed_phases_nulled(stats: dict) -> dict:
    """``stats`` (a ``DecodeStats.to_dict`` or a summary's metrics) with :data:`STEP_PHASE_TIMES` null where its
    steps were not timed phase by phase; unchanged otherwise."""
    return stats if steps_split(stats) else {**stats, **dict.fromkeys(STEP_PHASE_TIMES)}


def time_split(stats: DecodeStats) -> dict:
    """Fractions of ``time_total`` spent in prefill, draft, verify, accept+commit and other; the step's
    phases are None where they were not timed apart (:func:`steps_split`): not 0, and not all "other"."""
    total = stats.time_total
    parts = {
        "prefill": stats.time_prefill,
        "draft": stats.time_draft,
        "verify": stats.time_verify,
        "accept_commit": stats.time_accept,
        "other": stats.time_other,
    }
    split = {name: (value / total if total > 0 else 0.0) for name, value in parts.items()}
    if not phases_timed(stats):
        split.update(dict.fromkeys(("draft", "verify", "accept_commit", "other")))
    return split


def speedup(ours: dict, baseline: dict) -> float | None:
    """Ours tokens/s over baseline tokens/s, or None when the baseline has no throughput."""
    base = baseline.get("tokens_per_s") or 0.0
    return ours["tokens_per_s"] / base if base > 0 else None


def keep_whole(batches: Iterable[tuple[int | None, set]], question_ids: set) -> set:
    """The prompts of ``question_ids`` whose batches lie whole inside them. ``batches``: each batch's
    ``(rows it decoded or None, the question ids it holds)``; a batch's time is its rows' together, so one
    straddling the set, or missing rows, takes all its prompts out (until nothing changes: a prompt taken out
    of one method's batch splits the other method's batch holding it)."""
    batches = list(batches)
    kept = set(question_ids)
    changed = True
    while changed:
        changed = False
        for rows, qids in batches:
            if qids & kept and (not qids <= kept or (isinstance(rows, int) and len(qids) < rows)):
                kept -= qids
                changed = True
    return kept


def paired_speedup(ours: MethodResults, baseline: MethodResults) -> tuple[float | None, str | None]:
    """:func:`speedup` over the prompts both methods decoded, and a warning where that is not all of them (a run
    cut between the methods: a continuous batch decodes every prompt with one method, then with the other)."""
    ours_ids, base_ids = set(ours.outputs), set(baseline.outputs)
    if ours_ids == base_ids:
        return speedup(ours.metrics(), baseline.metrics()), None
    members = [(None, qids) for res in (ours, baseline) for qids in res.members().values()]
    common = keep_whole(members, ours_ids & base_ids)  # in whole batches only: a batch's time cannot be divided
    decoded = f"speculative decoded {len(ours_ids)} prompt(s), the baseline {len(base_ids)}"
    if not common:
        return None, f"speedup not given: {decoded}, and no whole batches of the same prompts to compare"
    pair = [results.restricted(common) for results in (ours, baseline)]
    return (speedup(pair[0].metrics(), pair[1].metrics()),
            f"speedup over the {len(common)} prompt(s) both decoded in whole batches ({decoded})")


def mismatches(ours: MethodResults, baseline: MethodResults) -> list:
    """Question ids decoded by both methods whose generated tokens differ."""
    return [qid for qid, ids in ours.outputs.items() if qid in baseline.outputs and baseline.outputs[qid] != ids]


def build_summary(
    results: dict[str, MethodResults],
    *,
    greedy: bool,
    status: str,
    num_prompts: int,
    extra: dict | None = None,
) -> dict:
    """The content of ``summary.json``.

    ``metrics.matches_baseline`` is true/false for greedy runs with a baseline (the drafter's
    outputs equal the autoregressive ones token for token), else null.
    """
    metrics = {name: res.metrics() for name, res in results.items() if res.stats}
    summary: dict = {"status": status, "num_prompts": num_prompts, "metrics": metrics}
    warnings = [f"{name}: a batch is missing rows (a continuous batch cut mid-pass, or a lost record), so its "
                "tokens_per_s counts the present rows' tokens over time that also went to the missing rows (an "
                "underestimate)"
                for name, res in results.items() if res.cut_batches()]
    if SPECULATIVE in metrics and BASELINE in metrics:
        metrics["speedup"], warning = paired_speedup(results[SPECULATIVE], results[BASELINE])
        warnings += [warning] if warning else []
        differing = mismatches(results[SPECULATIVE], results[BASELINE])
        metrics["matches_baseline"] = (not differing) if greedy else None
        summary["mismatched_question_ids"] = differing
    if warnings:
        summary["warnings"] = warnings
    summary.update(extra or {})
    return summary


class ResultsWriter:
    """Writes ``records.jsonl`` (line by line, flushed) and ``summary.json`` (atomically) in ``run_dir``."""

    def __init__(self, run_dir: str | Path, keep: list[dict] | None = None) -> None:
        """Start ``records.jsonl`` afresh, or, with ``keep`` (a resumed run), rewrite it atomically
        with those records and append after them."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.records_path = self.run_dir / RECORDS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        if keep is None:
            self._records = self.records_path.open("w", encoding="utf-8")
            return
        atomic_write_text(self.records_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in keep))
        self._records = self.records_path.open("a", encoding="utf-8")

    def add_record(self, record: dict) -> None:
        """Append one JSON line and flush it to disk."""
        self._records.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._records.flush()
        os.fsync(self._records.fileno())

    def write_summary(self, summary: dict) -> None:
        """Replace ``summary.json`` atomically (a reader never sees a half-written file)."""
        atomic_write_json(self.summary_path, summary, ensure_ascii=False, default=str)

    def close(self) -> None:
        self._records.close()


def read_records(path: str | Path) -> tuple[list[dict], list[str]]:
    """The complete records of a ``records.jsonl`` and one message per line that is not one.

    A line cut mid-write (the process was killed) or otherwise not a JSON object is skipped and
    reported as ``"<path>:<line>: ..."``; every other line is kept.
    """
    records, problems = [], []
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "method" not in record or "stats" not in record:
                    raise ValueError("not a decode record (no 'method' and 'stats')")
            except ValueError as exc:
                cut = "" if line.endswith("\n") else " (cut mid-line)"
                problems.append(f"{path}:{number}: skipped an unreadable line{cut}: {str(exc)[:80]}: {line[:60]!r}")
                continue
            records.append(record)
    return records, problems


def stats_from_dict(data: dict) -> DecodeStats:
    """Rebuild :class:`DecodeStats` from a record's ``stats`` (derived metrics are recomputed)."""
    names = DecodeStats.__dataclass_fields__
    return DecodeStats(**{k: v for k, v in data.items() if k in names and v is not None})  # null: a batch's


def results_from_records(records: list[dict]) -> dict[str, MethodResults]:
    """``{method: MethodResults}`` rebuilt from ``records.jsonl`` lines, in file order.

    Outputs are the records' ``tokens`` (their ``text`` for records written before tokens were kept).
    """
    results: dict[str, MethodResults] = {}
    for record in records:
        output = record.get("tokens", record.get("text"))
        results.setdefault(record["method"], MethodResults()).add(record["question_id"],
                                                                  stats_from_dict(record["stats"]), output,
                                                                  record.get("batch"))
    return results


def acceptance_rate(metrics: dict) -> float | None:
    """A method's ``draft_acceptance_rate``; None where it proposed nothing (0 of 0 is no rate: the summary's 0.0
    would read, and chart, as every draft rejected) or has none. Shown ``-`` in the printed table, empty in the
    report, not sent to W&B."""
    if not metrics.get("mean_proposed_drafts", 1):
        return None
    return metrics.get("draft_acceptance_rate")


def format_table(summary: dict) -> str:
    """A short plain-text table of the summary's metrics, one row per method."""
    metrics = summary.get("metrics", {})
    header = f"{'method':<12} {'tau':>6} {'acc/step':>8} {'acc rate':>8} {'tok/s':>9} {'speedup':>8}   time split"
    lines = [header, "-" * len(header)]
    for name in (SPECULATIVE, BASELINE):
        m = metrics.get(name)
        if not m:
            continue
        up = metrics.get("speedup") if name == SPECULATIVE else 1.0
        if steps_split(m):
            split = " ".join(f"{k}={v:.0%}" for k, v in m["time_split"].items())
        else:
            split = f"prefill={m['time_split']['prefill']:.0%}, steps not split (fixed-shape step)"
        rate = acceptance_rate(m)
        rate = "-" if rate is None else f"{rate:.1%}"
        lines.append(
            f"{name:<12} {m['tau']:>6.2f} {m['mean_accepted_drafts']:>8.2f} {rate:>8} "
            f"{m['tokens_per_s']:>9.1f} {_fmt_speedup(up):>8}   {split}"
        )
    spec = metrics.get(SPECULATIVE, {})
    if spec.get("acceptance_rate_by_depth"):
        lines.append("acceptance by depth: " + " ".join(f"{r:.2f}" for r in spec["acceptance_rate_by_depth"])
                     + (f"; drafts proposed per step: {spec['mean_proposed_drafts']:.2f}"
                        if spec.get("mean_proposed_drafts") else ""))
    if spec.get("steps_by_source"):  # a drafter of several parts (drafter=hybrid)
        lines.append("steps drafted by: " + ", ".join(f"{k} {v}" for k, v in spec["steps_by_source"].items())
                     + f" (of {spec['target_forwards']} steps)")
    warm = summary.get("warmup_time_compile") or {}  # the warm-up decodes' (they compile first, at warmup >= 1)
    compiled = {name: (metrics.get(name, {}).get("time_compile") or 0.0) + warm.get(name, 0.0)
                for name in (SPECULATIVE, BASELINE)}
    if any(compiled.values()):  # compile=inductor|graph: compiling is not decoding
        lines.append(f"compiling the step (not in tok/s{'; warm-up included' if warm else ''}): "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in compiled.items() if v))
    if metrics.get("matches_baseline") is not None:
        lines.append(f"matches baseline: {metrics['matches_baseline']}")
    elif "matches_baseline" in metrics:  # sampled: the two outputs differ by design, token equality means nothing
        lines.append(f"matches baseline: not compared ({_sampled_note(summary)})")
    if "greedy_deficit" in metrics:  # a reduced-precision target (experiments.greedy_check)
        verdict = "greedy up to rounding" if metrics["greedy_up_to_rounding"] else "NOT greedy: a wrong token was emitted"
        lines.append(f"  reduced precision: the differing outputs' largest greedy deficit is "
                     f"{metrics['greedy_deficit']:.3f} logits (float32 recompute): {verdict}")
    return "\n".join(lines)


def _sampled_note(summary: dict) -> str:
    """Why a sampled run's outputs are not compared with the baseline's, and what vouches for its rule."""
    rule = summary.get("acceptance")
    if summary.get("lossless") is False:
        return (f"sampled decoding with acceptance={rule}, a rule not declared lossless: its outputs need not follow "
                "the target's distribution")
    if rule in (None, "greedy", "rejection"):
        return "sampled decoding; the exactness of the sampled rules is the chi-square tests' in tests/test_distribution.py"
    return (f"sampled decoding; acceptance={rule} declares itself lossless: a chi-square test of its outputs, as "
            "tests/test_distribution.py's, would prove it")


def lossless_warnings(summary: dict) -> list[str]:
    """A warning when a rule that declares itself lossless gave greedy outputs that differ from the baseline's (not
    explained by a reduced-precision target's rounding, :mod:`experiments.greedy_check`)."""
    metrics = summary.get("metrics", {})
    if not summary.get("lossless") or metrics.get("matches_baseline") is not False or metrics.get("greedy_up_to_rounding"):
        return []
    return [(f"acceptance={summary.get('acceptance')} is lossless, yet the greedy outputs of prompts "
             f"{summary.get('mismatched_question_ids')} differ from the baseline's: a bug in the drafter or the rule "
             "(or logits that tie to within rounding)")]


def _fmt_speedup(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
