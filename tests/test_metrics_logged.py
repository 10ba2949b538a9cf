"""Decode statistics, summaries and what the loggers send: hand-made counts and a recording stand-in for a W&B
run (no wandb process, no network)."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from experiments import loggers, wandb_run
from experiments.loggers import TrainingLog, WandbLogger, training_wandb_settings
from experiments.results import BASELINE, SPECULATIVE, MethodResults, format_table, time_split
from experiments.wandb_run import STATE_FILE, RunState
from specdec.stats import DecodeStats

# --------------------------------------------------------------------------- DecodeStats


def test_steps_are_the_batches_own_when_batched_and_merge_adds_them():
    rows = DecodeStats(target_forwards=12, batch_steps=3)
    assert rows.steps == 3 and DecodeStats(target_forwards=12).steps == 12
    merged = DecodeStats.merge([rows, DecodeStats(target_forwards=8, batch_steps=2, time_compile=1.5),
                                DecodeStats(time_compile=0.5)])
    assert (merged.batch_steps, merged.steps, merged.target_forwards) == (5, 5, 20)
    assert merged.time_compile == pytest.approx(2.0)


def test_time_other_is_never_negative():
    """Phases timed apart can add up to a little more than the total (clock reads): other is 0 then."""
    stats = DecodeStats(time_prefill=0.4, time_draft=0.3, time_verify=0.3, time_accept=0.1, time_total=1.0)
    assert stats.time_other == 0.0
    assert DecodeStats(time_prefill=0.5, time_total=1.0).time_other == pytest.approx(0.5)


def test_a_source_depth_counts_the_levels_that_source_drafted():
    """A merged hybrid tree 5 deep whose model-drafted part is 2 levels: 2 draft forwards for that source."""
    stats = DecodeStats()
    stats.record_step(7, 5, 3, source="draft_model", source_depth=2)
    stats.record_step(3, 3, 3, source="draft_model")
    assert stats.depth_by_source == {"draft_model": 2 + 3} and stats.steps_by_source == {"draft_model": 2}
    assert stats.depth_proposed == [2, 2, 2, 1, 1]


# --------------------------------------------------------------------------- summaries


def test_time_split_names_each_phase():
    stats = DecodeStats(time_prefill=0.1, time_draft=0.2, time_verify=0.3, time_accept=0.15, time_total=1.0)
    assert time_split(stats) == pytest.approx({"prefill": 0.1, "draft": 0.2, "verify": 0.3, "accept_commit": 0.15,
                                               "other": 0.25})


def test_time_split_of_a_fixed_shape_step_is_none_where_no_phase_was_timed():
    """compile=static|graph|inductor: summary.json, W&B and the report's split_* read null for the step's phases,
    not 0 for draft and verify with the whole step under "other"."""
    static = DecodeStats(target_forwards=5, time_prefill=0.2, time_total=1.0)
    assert time_split(static) == {"prefill": pytest.approx(0.2), "draft": None, "verify": None,
                                  "accept_commit": None, "other": None}
    baseline = DecodeStats(target_forwards=5, time_prefill=0.2, time_verify=0.7, time_total=1.0)  # no draft phase
    assert time_split(baseline)["draft"] == 0.0 and time_split(baseline)["other"] == pytest.approx(0.1)
    assert time_split(DecodeStats())["verify"] == 0.0  # nothing decoded yet: shares of nothing


def test_a_fixed_shape_steps_phase_times_are_null_in_its_records_and_summary_not_0():
    """A trial read a compile=static run's ``time_verify: 0.0`` as verification costing nothing: the phase times
    the step did not take apart are null in its record, in a batch's entry and in the summary's metrics; a split
    step keeps them, and a record read back counts them as 0 again."""
    import torch

    from experiments.decoding import _record, batch_times
    from experiments.results import STEP_PHASE_TIMES, stats_from_dict

    prompt = SimpleNamespace(question_id=0, category="c", input_ids=torch.tensor([[1, 2]]))
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "")
    static = DecodeStats(new_tokens=5, target_forwards=5, time_prefill=0.2, time_total=1.0)
    eager = DecodeStats(new_tokens=5, target_forwards=5, time_prefill=0.2, time_verify=0.7, time_total=1.0)
    for stats, nulled in ((static, True), (eager, False)):
        record = _record(0, prompt, torch.tensor([[1, 2, 3]]), stats, SPECULATIVE, "d", 0, tokenizer, None)
        assert all((record["stats"][key] is None) == nulled for key in STEP_PHASE_TIMES), record["stats"]
        assert record["stats"]["time_prefill"] == 0.2 and record["stats"]["time_total"] == 1.0
        assert stats_from_dict(record["stats"]) == stats
        results = MethodResults()
        results.add(0, stats, [3], None)
        metrics = results.metrics()
        assert all((metrics[key] is None) == nulled for key in STEP_PHASE_TIMES), metrics
        assert metrics["time_total"] == 1.0 and (metrics["time_split"]["verify"] is None) == nulled
        batch = {"id": 0, "size": 2, **batch_times(stats)}  # a batch's entry, in each of its records
        assert all((batch[key] is None) == nulled for key in STEP_PHASE_TIMES if key in batch), batch
        batched = MethodResults()
        for qid in (0, 1):
            batched.add(qid, DecodeStats(new_tokens=5, target_forwards=5), [3], batch)
        metrics = batched.metrics()  # summed over the batches: null counts as not timed, never a TypeError
        assert metrics["time_total"] == 1.0 and all((metrics[key] is None) == nulled for key in STEP_PHASE_TIMES)


def test_a_batched_runs_batch_size_is_its_largest_batch():
    """The last batch of a run may be a remainder (2 of 4 rows): the run's batch size is 4."""
    results = MethodResults()
    for qid, batch in ((0, {"id": 0, "size": 4, "time_total": 1.0}), (1, {"id": 1, "size": 2, "time_total": 0.5})):
        results.add(qid, DecodeStats(new_tokens=4, target_forwards=2), [1, 2], batch)
    assert results.metrics()["batch_size"] == 4


def test_the_summary_table_shows_the_baseline_at_1x():
    """... and no acceptance rate where nothing was proposed (the baseline: "-", not a 0.0% that reads as
    every draft rejected); a drafter whose drafts were all rejected shows 0.0%."""
    spec = DecodeStats(new_tokens=8, target_forwards=4, time_total=1.0, proposed_per_step=[2] * 4).to_dict()
    base = DecodeStats(new_tokens=8, target_forwards=8, time_total=2.0).to_dict()
    for m in (spec, base):
        m["time_split"] = time_split(DecodeStats(time_total=1.0))
    table = format_table({"metrics": {SPECULATIVE: spec, BASELINE: base, "speedup": 2.0}})
    speculative, baseline = table.splitlines()[2:4]
    assert speculative.split()[:6] == ["speculative", "2.00", "1.00", "0.0%", "8.0", "2.00x"]
    assert baseline.split()[:6] == ["baseline", "1.00", "0.00", "-", "4.0", "1.00x"]


def test_steps_by_source_are_counted_against_the_rows_steps_in_a_batched_run():
    """A batched hybrid run counts each row's steps by source, so the table sets them against the rows' steps
    (target_forwards: 6), not the batch's (3)."""
    spec = DecodeStats(new_tokens=12, target_forwards=6, batch_steps=3, time_total=1.0,
                       steps_by_source={"a": 4, "b": 2}).to_dict()
    spec["time_split"] = time_split(DecodeStats(time_total=1.0))
    assert "steps drafted by: a 4, b 2 (of 6 steps)" in format_table({"metrics": {SPECULATIVE: spec}})


# --------------------------------------------------------------------------- what the W&B logger logs


class FakeRun:
    """Records ``log`` calls and ``summary`` updates as a W&B run would receive them."""

    def __init__(self, **init):
        self.init, self.logged, self.summary = init, [], {}

    def log(self, data, step=None):
        self.logged.append((data, step))

    def define_metric(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def _record(method: str, accepted: list[int], proposed: list[int], tau: float = 2.0) -> dict:
    return {"method": method, "question_id": 0,
            "stats": {"tau": tau, "new_tokens": 8, "accepted_per_step": accepted, "proposed_per_step": proposed}}


def test_log_prompt_sends_prompt_metrics_and_the_speculative_steps(tmp_path):
    logger = WandbLogger(tmp_path)
    logger.run = FakeRun()
    logger.log_resumed([_record("speculative", [1, 1], [2, 2]), _record("baseline", [0] * 5, [0] * 5)])
    logger.log_prompt(3, _record("speculative", [2, 0], [3, 2]))
    logger.log_prompt(3, _record("baseline", [0, 0], [0, 0], tau=1.0))
    logged = [data for data, _ in logger.run.logged]
    assert logged[0] == {"prompt_index": 3, "prompt/speculative/tau": 2.0, "prompt/speculative/new_tokens": 8}
    assert logged[1:3] == [  # resumed after 2 speculative steps (a baseline's steps are none of these)
        {"decode_step": 3, "step/accepted_drafts": 2, "step/proposed_drafts": 3, "step/prompt_index": 3},
        {"decode_step": 4, "step/accepted_drafts": 0, "step/proposed_drafts": 2, "step/prompt_index": 3}]
    assert logged[3:] == [{"prompt_index": 3, "prompt/baseline/tau": 1.0, "prompt/baseline/new_tokens": 8}]


def test_a_prompt_that_proposed_nothing_sends_no_acceptance_rate(tmp_path, monkeypatch):
    """0 accepted of 0 proposed is no rate: the prompt's (and the summary's) other metrics go to W&B, a 0.0 rate
    (a point at zero on the chart) does not; a prompt whose drafts were all rejected sends its 0.0."""
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace())
    logger = WandbLogger(tmp_path)
    logger.run = FakeRun()
    for proposed in (0.0, 2.0):
        stats = {"tau": 1.0, "mean_proposed_drafts": proposed, "draft_acceptance_rate": 0.0}
        logger.log_prompt(0, {"method": "baseline", "stats": stats})
    (none, rejected), _ = zip(*logger.run.logged)
    assert none == {"prompt_index": 0, "prompt/baseline/tau": 1.0, "prompt/baseline/mean_proposed_drafts": 0.0}
    assert rejected["prompt/baseline/draft_acceptance_rate"] == 0.0
    logger.log_summary({"metrics": {"baseline": {"tau": 1.0, "mean_proposed_drafts": 0.0, "draft_acceptance_rate": 0.0},
                                    "speculative": {"mean_proposed_drafts": 2.0, "draft_acceptance_rate": 0.0},
                                    "speedup": 1.5}})
    assert logger.run.summary == {"baseline/tau": 1.0, "baseline/mean_proposed_drafts": 0.0, "speedup": 1.5,
                                  "speculative/mean_proposed_drafts": 2.0, "speculative/draft_acceptance_rate": 0.0}


def test_a_resumed_wandb_run_goes_on_after_every_step_it_was_sent(tmp_path, monkeypatch):
    """The W&B run's state counts the decode steps it was sent, as they go: a resume that decodes a prompt again
    (a batch that lost a row, an unfinished prompt) does not send decode_step values the run already has, and a
    state written before the count existed falls back to the kept records' steps."""
    started = []
    monkeypatch.setattr(loggers, "start_wandb", lambda init, timeout: started.append(FakeRun(**init)) or started[-1])
    first = WandbLogger(tmp_path)
    first.log_config({"seed": 0})
    first.log_prompt(0, _record("speculative", [1, 1, 0], [2, 2, 2]))
    first.log_prompt(1, _record("speculative", [2], [2]))  # then killed: prompt 1 is decoded again on resume
    assert RunState.load(tmp_path).steps == 4

    resumed = WandbLogger(tmp_path)
    resumed.log_config({"seed": 0})
    resumed.log_resumed([_record("speculative", [1, 1, 0], [2, 2, 2])])  # prompt 0 kept: 3 steps
    resumed.log_prompt(1, _record("speculative", [2], [2]))
    steps = [data["decode_step"] for data, _ in started[-1].logged if "decode_step" in data]
    assert steps == [5] and started[-1].init["id"] == started[0].init["id"]

    class CutRun(FakeRun):  # killed while the steps go out: they were counted before they were sent
        def log(self, data, step=None):
            if "decode_step" in data:
                raise KeyboardInterrupt
            super().log(data, step)
    cut = WandbLogger(tmp_path)
    cut.log_config({"seed": 0})
    cut.run = CutRun()
    with pytest.raises(KeyboardInterrupt):
        cut.log_prompt(2, _record("speculative", [1, 1], [2, 2]))
    assert RunState.load(tmp_path).steps == 7
    damaged = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / STATE_FILE).write_text(json.dumps({**damaged, "steps": "3.5"}))
    assert RunState.load(tmp_path).run_id == damaged["id"] and RunState.load(tmp_path).steps == 0  # id kept

    (tmp_path / STATE_FILE).write_text(json.dumps({"id": "abc123", "summary_logged": False}))  # an older state
    old = WandbLogger(tmp_path)
    old.log_config({"seed": 0})
    old.log_resumed([_record("speculative", [1, 1, 0], [2, 2, 2])])
    old.log_prompt(1, _record("speculative", [2], [2]))
    assert [data["decode_step"] for data, _ in started[-1].logged if "decode_step" in data] == [4]


def test_backfill_logs_the_records_only_to_a_new_wandb_run(tmp_path, monkeypatch):
    """A run made with another logger gets its config, records and summary; a W&B run that already has the
    records (its id in wandb_run.json, summary not logged) gets the summary alone."""
    started = []
    monkeypatch.setattr(loggers, "start_wandb", lambda init, timeout: started.append(FakeRun(**init)) or started[-1])
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace())  # log_summary imports it; no depth chart here
    summary = {"config": {"seed": 0}, "question_ids": [7], "metrics": {"speculative": {"tau": 2.0}}}
    records = [dict(_record("speculative", [1], [2]), question_id=7)]

    assert WandbLogger(tmp_path / "new").backfill(summary, records)
    assert [data.get("prompt_index") for data, _ in started[-1].logged if "prompt_index" in data] == [0]
    assert started[-1].summary == {"speculative/tau": 2.0}
    assert not WandbLogger(tmp_path / "new").backfill(summary, records)  # the summary got there: nothing to do

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / STATE_FILE).write_text(json.dumps({"id": "abc123", "summary_logged": False}))
    assert WandbLogger(tmp_path / "old").backfill(summary, records)
    assert started[-1].init["id"] == "abc123" and started[-1].logged == []
    assert started[-1].summary == {"speculative/tau": 2.0}


def test_training_logs_name_the_job_and_the_step(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"logger": {"_target_": "experiments.loggers.WandbLogger", "tags": ["mine"]}, "lr": 0.1})
    settings = training_wandb_settings(cfg, tmp_path, "train_medusa", tags=("extra",))
    assert settings["tags"] == ["mine", "train_medusa", "extra"] and settings["job_type"] == "train_medusa"
    assert training_wandb_settings(OmegaConf.create({"logger": None}), tmp_path, "train_medusa") is None

    runs = []
    monkeypatch.setattr(loggers, "start_wandb", lambda init: runs.append(FakeRun(**init)) or runs[-1])
    log = TrainingLog(tmp_path, settings)
    log({"train/loss": 1.5}, 10)
    log({"train/loss": 1.0}, 20)
    assert runs[0].logged == [({"train/loss": 1.5}, 10), ({"train/loss": 1.0}, 20)] and len(runs) == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [10, 20]


# --------------------------------------------------------------------------- W&B run ids and servers


def test_run_state_adopts_the_newest_earlier_wandb_run(tmp_path):
    for name in ("offline-run-20240101_100000-aaaa", "run-20240301_100000-cccc", "offline-run-20240201_100000-bbbb"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    state = RunState.load(tmp_path)
    assert (state.run_id, state.existed, state.summary_logged) == ("cccc", True, True)


def test_an_unreachable_server_is_checked_once_per_process(tmp_path, monkeypatch, capsys):
    checks, inits = [], []
    fake = SimpleNamespace(setup=lambda: SimpleNamespace(settings=SimpleNamespace(base_url="https://wandb.test")),
                           init=lambda **kw: inits.append(kw) or kw, Settings=dict, teardown=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(wandb_run, "_UNREACHABLE", {})
    monkeypatch.setattr(wandb_run, "server_problem", lambda url, timeout: checks.append(url) or "ConnectionRefused")
    for run in ("a", "b"):
        assert wandb_run.start_wandb({"mode": "online", "dir": str(tmp_path / run)}, timeout=0.1)["mode"] == "offline"
    assert checks == ["https://wandb.test"] and len(inits) == 2
    assert capsys.readouterr().err.count("could not start online") == 2


def test_a_server_that_answers_with_an_http_error_is_reachable(monkeypatch):
    import urllib.error
    import urllib.request

    def urlopen(url, timeout):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert wandb_run.server_problem("https://wandb.test", 0.1) is None


# --------------------------------------------------------------------------- a sweep's W&B run names


def test_a_sweeps_runs_are_named_by_their_own_overrides_short(tmp_path, monkeypatch):
    """Real Hydra multiruns (their jobs' decoding replaced by a recorder): each W&B run is named by its own
    overrides, ``k`` and ``T`` short, without the logger's keys or the sweep's excluded ones (``sweep``,
    ``resume``, ...), so a rerun or an extension of the sweep names each job as before; the group is the sweep."""
    from experiments import decode
    from tests.test_sweeps import hydra_main

    seen = []
    monkeypatch.setattr(decode, "run", lambda cfg, run_dir, hydra_info: seen.append(hydra_info))
    sweep = tmp_path / "multirun" / "k_by_t"
    hydra_main(monkeypatch, "-m", "logger=none", "num_prompts=2", "drafter.num_speculative_tokens=2,4",
               "sampling.temperature=0,0.7", "acceptance=rejection", f"hydra.sweep.dir={sweep}")
    assert sorted(info["run_name"] for info in seen) == [f"num_prompts=2 k={k} T={t} acceptance=rejection"
                                                         for k in (2, 4) for t in (0, 0.7)]
    assert {info["group"] for info in seen} == {"multirun/k_by_t"}
    seen.clear()  # a single run: its own directory, as experiments.report <dir> names the group of its report run
    hydra_main(monkeypatch, "logger=none", f"hydra.run.dir={tmp_path / 'outputs' / 'one'}")
    assert [(info["group"], info["run_name"]) for info in seen] == [("outputs/one", None)]
    seen.clear()  # a preset's sweep: its values from hydra.sweeper.params, its excluded keys left out
    hydra_main(monkeypatch, "sweep=temperature", "logger=none", "resume=false", "drafter.num_speculative_tokens=3",
               f"hydra.sweep.dir={sweep}2")
    assert sorted(info["run_name"] for info in seen) == [f"T={t} k=3" for t in ("0.0", "0.7", "1.0")]


def test_a_run_cut_between_the_methods_compares_only_the_prompts_both_decoded():
    """Interrupted in the baseline pass, the speedup divided the speculative throughput over every prompt by the
    baseline's over the few it finished: it is now over the prompts both decoded, or not given where a batch
    cannot be divided (a continuous batch holds every prompt), with a warning either way."""
    from experiments.results import build_summary, paired_speedup

    def method(ids, batch=None, tokens=8, seconds=1.0):
        results = MethodResults()
        for qid in ids:
            entry = None if batch is None else {**batch, "time_total": seconds * len(ids)}
            results.add(qid, DecodeStats(new_tokens=tokens, target_forwards=4, time_total=seconds), [qid], entry)
        return results

    ours, base = method([0, 1, 2, 3], tokens=8), method([0, 1], tokens=4, seconds=2.0)  # prompts 2, 3: fast ones
    ours.stats[2].time_total = ours.stats[3].time_total = 0.1
    speed, warning = paired_speedup(ours, base)
    assert speed == pytest.approx((16 / 2.0) / (8 / 4.0)) and "over the 2 prompt(s) both decoded" in warning
    resumed = method([0, 1], {"id": 0, "size": 2})  # batch 0 whole for both; batch 1: the baseline was cut in it
    resumed.add(2, DecodeStats(new_tokens=8, target_forwards=4, time_total=1.0), [2], {"id": 1, "size": 2})
    resumed.add(3, DecodeStats(new_tokens=8, target_forwards=4, time_total=1.0), [3], {"id": 1, "size": 2})
    cut_in_1 = method([0, 1], {"id": 0, "size": 2}, tokens=4)
    cut_in_1.add(2, DecodeStats(new_tokens=4, target_forwards=4, time_total=1.0), [2], {"id": 1, "size": 2})
    speed, warning = paired_speedup(resumed, cut_in_1)  # over batch 0 alone, not given up
    assert speed == pytest.approx(2.0) and "over the 2 prompt(s) both decoded in whole batches" in warning
    assert paired_speedup(method([0, 1]), method([0, 1])) == (pytest.approx(1.0), None)
    continuous = method([0, 1, 2, 3], {"id": 0, "size": 2, "mode": "continuous", "rows": 4})
    cut = method([0, 1], {"id": 1, "size": 2, "mode": "continuous", "rows": 4})  # 2 of its 4 rows finished
    speed, warning = paired_speedup(continuous, cut)
    assert speed is None and warning.startswith("speedup not given: speculative decoded 4 prompt(s), the baseline 2")
    assert continuous.cut_batches() == [] and cut.cut_batches() == [1]
    warnings = build_summary({"speculative": continuous, "baseline": cut}, greedy=True, status="interrupted",
                             num_prompts=4)["warnings"]
    assert warnings[0].startswith("baseline: a batch is missing rows (a continuous batch cut") and len(warnings) == 2
    assert cut_in_1.cut_batches() == [1] and resumed.cut_batches() == []  # a static batch's rows: its size
    assert paired_speedup(ours, MethodResults())[0] is None  # nothing in common
    summary = build_summary({"speculative": ours, "baseline": base}, greedy=True, status="interrupted", num_prompts=4)
    assert summary["metrics"]["speedup"] == pytest.approx(4.0) and len(summary["warnings"]) == 1
    assert summary["metrics"]["speculative"]["num_prompts"] == 4  # its own figures stay over all it decoded

