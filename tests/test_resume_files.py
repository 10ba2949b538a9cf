"""Resuming from the files a run leaves: what is set aside when the config or the prompts change, which records a
resume keeps (one per prompt and method, whole batches only), and records that are not decode records. The sweeps
that resume end to end are in tests/test_sweeps.py."""
from __future__ import annotations

import json


def test_set_aside_moves_a_changed_configs_files_and_copies_those_a_resume_keeps(tmp_path):
    """A changed config's files (W&B state included) leave the run directory, so its new results start their own;
    a rerun with fewer prompts copies the records and summary aside and leaves them where the resume reads them."""
    from experiments.resume import RECORDS_FILE, SUMMARY_FILE, WANDB_STATE_FILE, set_aside

    for name in (RECORDS_FILE, SUMMARY_FILE, WANDB_STATE_FILE):
        (tmp_path / name).write_text(name)
    moved = set_aside(tmp_path, "another config")
    assert not any((tmp_path / name).exists() for name in (RECORDS_FILE, SUMMARY_FILE, WANDB_STATE_FILE))
    assert (moved / WANDB_STATE_FILE).read_text() == WANDB_STATE_FILE
    assert "another config" in (moved / "REASON.txt").read_text()
    for name in (RECORDS_FILE, SUMMARY_FILE):
        (tmp_path / name).write_text(name)
    copied = set_aside(tmp_path, "fewer prompts", (), (RECORDS_FILE, SUMMARY_FILE))
    assert copied != moved
    for name in (RECORDS_FILE, SUMMARY_FILE):
        assert (tmp_path / name).read_text() == name and (copied / name).read_text() == name


def test_a_resume_keeps_one_record_per_prompt_and_method(tmp_path):
    """A records file holding a (prompt, method) twice (two writers, a copy appended): the resume keeps the first,
    so the recomputed aggregates count each prompt once."""
    from experiments.resume import prepare

    config = {"seed": 0, "drafter": {"k": 2}}
    (tmp_path / "summary.json").write_text(json.dumps({"status": "interrupted", "config": config}))
    records = [{"question_id": 0, "method": "speculative", "stats": {"new_tokens": 1}},
               {"question_id": 0, "method": "baseline", "stats": {}},
               {"question_id": 0, "method": "speculative", "stats": {"new_tokens": 2}},
               {"question_id": 1, "method": "speculative", "stats": {}}]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    state = prepare(tmp_path, config, ["speculative", "baseline"], [0, 1])
    assert state.complete is None and state.done == {0}
    assert state.records == records[:2]


def test_records_without_a_method_or_stats_are_skipped_and_reported(tmp_path):
    from experiments.results import read_records

    good = {"question_id": 0, "method": "speculative", "stats": {}}
    lines = [good, {"question_id": 1, "method": "baseline"}, {"question_id": 2, "stats": {}}, [1, 2]]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, problems = read_records(path)
    assert records == [good]
    assert len(problems) == 3 and all("not a decode record" in p for p in problems[:2])


def _batched(qid, method, batch_id, size, mode=None, rows=None):
    batch = {"id": batch_id, "size": size, "time_total": 1.0}
    if mode:
        batch.update(mode=mode, rows=rows)
    return {"question_id": qid, "method": method, "stats": {"new_tokens": 4}, "batch": batch}


def test_a_batch_is_resumed_only_whole():
    """A batched record carries its batch's time (its rows' together): a batch missing a row would credit that
    time to fewer tokens (a rerun with fewer prompts read 83 tok/s for 100), so its prompts are decoded again."""
    from experiments.resume import whole_batches

    static = [_batched(q, m, q // 4, 4 if q < 4 else 2) for m in ("speculative", "baseline") for q in range(6)]
    assert whole_batches(static, set(range(6))) == set(range(6))
    assert whole_batches(static, set(range(5))) == {0, 1, 2, 3}  # num_prompts=5: batch 1 (4, 5) split up
    cut = [r for r in static if (r["question_id"], r["method"]) != (3, "baseline")]  # a line cut mid-write
    assert whole_batches(cut, {0, 1, 2, 4, 5}) == {4, 5}  # batch 0 lost a row: its 3 others are decoded again
    assert whole_batches([{"question_id": q, "method": "speculative", "stats": {}} for q in range(3)], {0, 2}) == {0, 2}
    continuous = [_batched(q, "speculative", 0, 2, "continuous", 4) for q in range(4)]
    assert whole_batches(continuous[:3], {0, 1, 2}) == set()  # cut mid-pass: its time covered unfinished rows
    assert whole_batches(continuous, set(range(4))) == set(range(4))
    spec = [_batched(q, "speculative", 0, 2, "continuous", 4) for q in range(4)]
    base = [_batched(q, "baseline", 5 + q // 2, 2) for q in range(4)]  # the other method's batches: (0, 1), (2, 3)
    assert whole_batches(spec[1:] + base, {1, 2, 3}) == set()  # 0 missing splits spec's batch, which holds 2, 3
    assert whole_batches(spec + base[:2] + base[3:], {0, 1, 3}) == set()  # chain: 2 splits (2, 3), then spec's


def test_a_rerun_with_fewer_prompts_decodes_a_split_batch_again(tmp_path):
    """batch_size=4 over 6 prompts, rerun with num_prompts=5: prompt 4's batch held prompt 5, so 4 is decoded
    again in a batch of its own and the earlier files are copied aside; batch 0 is kept."""
    from experiments.resume import prepare

    config = {"seed": 0, "batch_size": 4}
    (tmp_path / "summary.json").write_text(json.dumps({"status": "complete", "config": config, "num_prompts": 6}))
    records = [_batched(q, m, q // 4, 4 if q < 4 else 2) for q in range(6) for m in ("speculative", "baseline")]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    state = prepare(tmp_path, config, ["speculative", "baseline"], list(range(5)))
    assert state.done == {0, 1, 2, 3} and state.records == records[:8]
    assert any("1 earlier prompt(s) decoded in a batch that is not kept whole" in m for m in state.messages)
    assert len(list(tmp_path.glob("superseded-*"))) == 1  # one copy, for prompt 5 and the split batch
