"""Decoding a run's prompts, one at a time or in batches, into ``records.jsonl`` lines.

A library for :mod:`experiments.decode`. With ``batch_size`` > 1 the prompts are grouped in their
order and each group is decoded with :meth:`specdec.SpeculativeDecoder.generate_batch`; every prompt
still gets its own record (its own tokens, seed and :class:`~specdec.stats.DecodeStats`), and the
records of one batch share a ``batch`` entry (its id, size, wall time and time split), from which the
summary computes the aggregate throughput. With ``batch_mode=continuous`` all prompts go through one
``generate_batch(..., max_rows=batch_size)`` (a finished row's place goes to the next prompt) and each
record is written as soon as its row finishes, its ``batch`` entry holding the batch's aggregate so
far (the last record's is the whole run's). Prompt ``index`` is decoded with seed ``seed + index``
whatever the batch size or mode, so a batched run emits the same tokens as an unbatched one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from experiments.results import STEP_PHASE_TIMES, MethodResults, phases_timed, untimed_phases_nulled

#: A batched row's stats that are its batch's, not its own: null in its record (``record["batch"]`` has the phases).
ROW_UNTIMED = ("time_prefill", *STEP_PHASE_TIMES)
#: What a batch's records share of its aggregate stats (the batch's wall time and its split).
BATCH_KEYS = ("new_tokens", "time_total", "time_prefill", "time_draft", "time_verify", "time_accept", "time_compile",
              "batch_steps")


@dataclass
class EncodedPrompt:
    """A prompt and its token ids ``[1, T]`` (already cut to ``dataset.max_prompt_tokens``)."""

    question_id: Any
    category: str
    input_ids: Any


def groups(items: list, size: int) -> list[list]:
    """``items`` in consecutive groups of ``size`` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def decode_group(decoder: Any, group: list[tuple[int, EncodedPrompt]], method: str, drafter_name: str,
                 max_new_tokens: int, seed: int, tokenizer: Any, results: MethodResults, batch_id: int | None) -> list[dict]:
    """Decode ``group`` (``(index, prompt)`` pairs) with one method, add them to ``results`` and return
    their records: one ``generate`` for a lone prompt outside a batch, else one ``generate_batch``."""
    seeds = [seed + index for index, _ in group]
    if batch_id is None:
        (_, prompt), = group
        out = decoder.generate(prompt.input_ids, max_new_tokens=max_new_tokens, seed=seeds[0])
        pairs, batch = [(out.sequences, out.stats)], None
    else:
        out = decoder.generate_batch([p.input_ids for _, p in group], max_new_tokens=max_new_tokens, seeds=seeds)
        pairs = list(zip(out.sequences, out.row_stats))
        batch = {"id": batch_id, "size": len(group), **batch_times(out.stats)}
    records = []
    for (index, prompt), (seq, stats) in zip(group, pairs):
        record = _record(index, prompt, seq, stats, method, drafter_name, seed, tokenizer, batch)
        results.add(prompt.question_id, stats, record["tokens"], batch)
        records.append(record)
    return records


def decode_continuous(decoder: Any, pending: list[tuple[int, EncodedPrompt]], method: str, drafter_name: str,
                      max_new_tokens: int, seed: int, tokenizer: Any, results: MethodResults, max_rows: int,
                      batch_id: int, emit) -> None:
    """Decode every prompt of ``pending`` with one method in one continuous batch (``batch_id``) of at
    most ``max_rows`` rows; ``emit(index, record)`` for each prompt as soon as its row finishes."""
    seeds = [seed + index for index, _ in pending]

    def on_row(i: int, seq, stats, so_far) -> None:
        index, prompt = pending[i]
        batch = {"id": batch_id, "size": max_rows, "mode": "continuous", "rows": len(pending),
                 **batch_times(so_far)}
        record = _record(index, prompt, seq, stats, method, drafter_name, seed, tokenizer, batch)
        results.add(prompt.question_id, stats, record["tokens"], batch)
        emit(index, record)

    decoder.generate_batch([p.input_ids for _, p in pending], max_new_tokens=max_new_tokens, seeds=seeds,
                           max_rows=max_rows, on_row=on_row)


def batch_times(stats: Any) -> dict:
    """A batch's :data:`BATCH_KEYS` from its aggregate ``stats``; the phase times null where the fixed-shape step
    did not time them apart (as in the summary: :func:`experiments.results.untimed_phases_nulled`)."""
    times = {k: getattr(stats, k) for k in BATCH_KEYS}
    if not phases_timed(stats):
        times.update(dict.fromkeys(set(BATCH_KEYS) & set(STEP_PHASE_TIMES)))
    return times


def _record(index: int, prompt: EncodedPrompt, seq, stats, method: str, drafter_name: str, seed: int, tokenizer: Any,
            batch: dict | None) -> dict:
    """One ``records.jsonl`` line: prompt ``index``'s new tokens, text and stats."""
    prompt_len = prompt.input_ids.shape[1]
    new_ids = seq[0, prompt_len:].tolist()  # [new]
    record = {"question_id": prompt.question_id, "category": prompt.category, "method": method,
              "drafter": drafter_name, "seed": seed + index, "prompt_tokens": prompt_len,
              "new_tokens": len(new_ids), "tokens": new_ids, "stats": untimed_phases_nulled(stats.to_dict()),
              "text": tokenizer.decode(new_ids, skip_special_tokens=True)}
    if batch is not None:  # the phases ran for the whole batch (in ``batch``): a row has none of its own to show
        record["batch"] = batch
        record["stats"].update(dict.fromkeys(ROW_UNTIMED))
    return record
