"""Edges of the results and logging layers that no other test pinned (mutation pass 9; the config and command-line
layers' are in ``test_mutation9_config.py``).

What reaches W&B (names, steps, run state), records and summaries, prompt files and chats, chat-row generation and
Medusa tree presets. Fakes stand in for W&B and the models: every test takes well under a second. Two tests pin
fixes of this pass (unique question ids, a string tag).
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from experiments import chat_data, data, loggers, suite, wandb_run
from experiments import results as res
from experiments.loggers import GuardedLogger, Logger, TrainingLog, WandbLogger, training_wandb_settings
from experiments.wandb_run import STATE_FILE, RunState
from specdec.errors import ConfigError, SpecDecError
from specdec.stats import DecodeStats
from tests.test_metrics_logged import FakeRun


@pytest.fixture
def fake_wandb(monkeypatch):
    """start_wandb and the wandb module replaced; the list of started runs."""
    started: list[FakeRun] = []
    monkeypatch.setattr(loggers, "start_wandb", lambda init, timeout=None: started.append(FakeRun(**init)) or started[-1])
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(Table=lambda columns, data: {"data": data},
                                                              plot=SimpleNamespace(bar=lambda table, *a, **k: table)))
    return started


def test_the_wandb_run_gets_its_name_group_mode_and_depths_from_one(tmp_path, fake_wandb):
    """run_name names the run, group groups it, a bad mode is refused; the acceptance chart counts depths from 1."""
    with pytest.raises(ConfigError, match="logger.mode='onlin'"):
        WandbLogger(tmp_path, mode="onlin")
    logger = WandbLogger(tmp_path, run_name="k4", group="sweep-a", tags=["x"])
    logger.log_config({"seed": 0})
    assert [fake_wandb[0].init[k] for k in ("name", "group", "tags")] == ["k4", "sweep-a", ["x"]]
    logger.log_summary({"metrics": {"speculative": {"tau": 2.5, "acceptance_rate_by_depth": [0.8, 0.5]}}})
    assert [data["acceptance_rate_by_depth"]["data"] for data, _ in fake_wandb[0].logged] == [[[1, 0.8], [2, 0.5]]]
    assert fake_wandb[0].summary["speculative/tau"] == 2.5


def test_the_state_says_summary_logged_only_after_a_summary_was_logged(tmp_path, fake_wandb):
    """A run that finished without its summary is back-filled by the next command; one with it is not."""
    for summary in (None, {"metrics": {}}):
        logger = WandbLogger(tmp_path)
        logger.log_config({})
        if summary is not None:
            logger.log_summary(summary)
        logger.finish()
        assert json.loads((tmp_path / STATE_FILE).read_text())["summary_logged"] is (summary is not None)
    assert fake_wandb[0].init["id"] == fake_wandb[1].init["id"]  # one W&B run for the directory


def test_backfilled_records_keep_their_prompts_index_in_the_run(tmp_path, fake_wandb):
    """A back-filled record is logged at its prompt's place in question_ids, not at its line in records.jsonl."""
    record = {"method": "baseline", "question_id": 7, "stats": {"tau": 1.0}}
    assert WandbLogger(tmp_path).backfill({"config": {}, "question_ids": [5, 7], "metrics": {}}, [record])
    assert [data["prompt_index"] for data, _ in fake_wandb[0].logged] == [1]


def test_one_tag_given_as_a_string_is_one_tag(tmp_path):
    """logger.tags=baseline tags the run 'baseline', not b, a, s, ... (needs this pass's fix in loggers.py)."""
    assert WandbLogger(tmp_path, tags="baseline").init_kwargs["tags"] == ["baseline"]
    assert WandbLogger(tmp_path, tags=["a", "b"]).init_kwargs["tags"] == ["a", "b"]
    assert WandbLogger(tmp_path, tags=2024).init_kwargs["tags"] == ["2024"]  # Hydra reads logger.tags=2024 as an int
    cfg = OmegaConf.create({"logger": {"_target_": "experiments.loggers.WandbLogger", "tags": "mine"}})
    assert training_wandb_settings(cfg, tmp_path, "train_medusa")["tags"] == ["mine", "train_medusa"]


def test_a_logger_that_fails_is_finished_once_and_then_left_alone(tmp_path):
    """The first failure is reported and the inner logger closed; later calls never reach it."""
    class Failing(Logger):
        name = "fake"

        def __init__(self):
            self.calls = []

        def log_prompt(self, index, record):
            self.calls.append("log_prompt")
            raise ConnectionError("gone")

        def finish(self):
            self.calls.append("finish")
    inner, stream = Failing(), io.StringIO()
    guarded = GuardedLogger(inner, tmp_path, stream=stream)
    guarded.log_prompt(0, {})
    guarded.log_prompt(1, {})
    guarded.log_summary({})
    guarded.finish()
    assert inner.calls == ["log_prompt", "finish"]
    assert stream.getvalue() == f"fake logging failed: ConnectionError: gone; local results are in {tmp_path}\n"


def test_a_training_log_whose_wandb_fails_warns_once_and_stops_trying(tmp_path, monkeypatch, capsys):
    """After one W&B failure training logs locally only: no second start, no second warning."""
    starts = []

    def refuse(init):
        starts.append(init)
        raise RuntimeError("no network")
    monkeypatch.setattr(loggers, "start_wandb", refuse)
    log = TrainingLog(tmp_path, {"mode": "online"})
    log({"loss": 2.0}, 1)
    log({"loss": 1.0}, 2)
    assert len(starts) == 1 and capsys.readouterr().err.count("W&B logging failed") == 1
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 2


def test_run_state_adopts_the_newest_run_by_start_time_and_ignores_a_damaged_file(tmp_path):
    """An offline run started after an online one is the newer; wandb_run.json without an id gives a fresh run."""
    for name in ("run-20240101_100000-aaaa", "offline-run-20240301_100000-cccc"):
        (tmp_path / "a" / "wandb" / name).mkdir(parents=True)
    assert RunState.load(tmp_path / "a").run_id == "cccc"
    for text in ('{"summary_logged": true}', "[1, 2]", "not json"):
        (tmp_path / STATE_FILE).write_text(text)
        state = RunState.load(tmp_path)
        assert not state.existed and not state.summary_logged and len(state.run_id) == 12


def test_online_starts_tear_down_a_failed_init_and_disabled_never_calls_the_server(tmp_path, monkeypatch, capsys):
    """wandb.init raising online: torn down, then offline with one warning; mode=disabled skips the server check."""
    calls = []

    def init(**kwargs):
        calls.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise TimeoutError("init timed out")
        return kwargs
    fake = SimpleNamespace(setup=lambda: SimpleNamespace(settings=SimpleNamespace(base_url="https://w.test")),
                           init=init, Settings=dict, teardown=lambda: calls.append("teardown"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(wandb_run, "_UNREACHABLE", {})
    monkeypatch.setattr(wandb_run, "server_problem", lambda url, timeout: calls.append("check"))
    assert wandb_run.start_wandb({"mode": "online", "dir": str(tmp_path)}, timeout=0.1)["mode"] == "offline"
    assert calls == ["check", "online", "teardown", "offline"]
    assert "TimeoutError: init timed out" in capsys.readouterr().err
    calls.clear()
    assert wandb_run.start_wandb({"mode": "disabled"}) == {"mode": "disabled"} and calls == ["disabled"]


def test_a_record_is_on_disk_as_soon_as_it_is_added(tmp_path):
    """records.jsonl holds each record before the writer closes (a killed run keeps it)."""
    writer = res.ResultsWriter(tmp_path)
    writer.add_record({"method": "baseline", "question_id": 0})
    assert json.loads((tmp_path / "records.jsonl").read_text()) == {"method": "baseline", "question_id": 0}
    writer.close()


def test_a_summary_compares_only_the_prompts_both_methods_decoded():
    """Mid-run a prompt the baseline has not decoded yet is no mismatch; a differing one is."""
    def results(outputs: dict) -> res.MethodResults:
        out = res.MethodResults()
        for qid, ids in outputs.items():
            out.add(qid, DecodeStats(new_tokens=len(ids), target_forwards=1, time_total=1.0), ids)
        return out
    spec, base = results({0: [1, 2], 1: [3]}), results({0: [1, 2]})
    summary = res.build_summary({"speculative": spec, "baseline": base}, greedy=True, status="running", num_prompts=2)
    assert summary["metrics"]["matches_baseline"] is True and summary["mismatched_question_ids"] == []
    base.add(1, DecodeStats(), [4])
    summary = res.build_summary({"speculative": spec, "baseline": base}, greedy=True, status="complete", num_prompts=2)
    assert summary["metrics"]["matches_baseline"] is False and summary["mismatched_question_ids"] == [1]


def test_records_are_read_back_by_their_tokens_and_by_text_only_when_old():
    """A record's output is its tokens; only a record from before tokens were kept gives its text."""
    records = [{"method": "baseline", "question_id": 0, "stats": {}, "tokens": [7, 8], "text": "ab"},
               {"method": "baseline", "question_id": 1, "stats": {}, "text": "c"}]
    assert res.results_from_records(records)["baseline"].outputs == {0: [7, 8], 1: "c"}


def test_a_batched_runs_steps_and_compile_time_are_its_batches():
    """Rows' null times are defaults; steps and compile time of a batched run come from its batch entries."""
    batch = {"id": 0, "size": 2, "time_total": 2.0, "batch_steps": 3, "time_compile": 0.5}
    records = [{"method": "speculative", "question_id": q, "tokens": [1, 2],
                "stats": {"new_tokens": 4, "target_forwards": 2, "time_total": None}, "batch": batch} for q in (0, 1)]
    metrics = res.results_from_records(records)["speculative"].metrics()
    assert (metrics["steps"], metrics["target_forwards"], metrics["time_compile"]) == (3, 4, 0.5)
    assert metrics["tokens_per_s"] == pytest.approx(4.0) and res.steps_of(metrics) == 3
    assert res.steps_of({"target_forwards": 10}) == 10


class Tokenizer:
    """Records what it tokenizes; its chat template (if any) gives '<chat>'."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, chat_template=None):
        self.chat_template, self.seen = chat_template, []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<chat>"

    def __call__(self, text, return_tensors, add_special_tokens, verbose):
        self.seen.append((text, add_special_tokens))
        return {"input_ids": torch.tensor([[5 + len(text) % 7, 9]])}


def test_prompt_sets_chats_and_their_tokens(tmp_path, monkeypatch):
    """Limits and files kept as given; a chat without a template is role: lines; special tokens only untemplated."""
    from experiments.datasets import PromptSet, StdlibHeldout

    with pytest.raises(ConfigError, match="max_prompt_tokens=True"):
        PromptSet(max_prompt_tokens=True)
    assert StdlibHeldout(path=str(tmp_path / "q.jsonl")).path(3) == tmp_path / "q.jsonl"
    chat = data.Prompt(4, "chat", "hi", messages=[{"role": "user", "content": "hi"}], turns=["hi", "more"])
    assert data.load_prompts(data.write_prompts(tmp_path / "q.jsonl", [chat])) == [chat]
    (tmp_path / "q.jsonl").write_text('{"turns": ["a"], "messages": []}\n')
    with pytest.raises(data.PromptFileError, match="non-empty list"):
        data.load_prompts(tmp_path / "q.jsonl")
    for prompt, template, seen in ((chat, None, ("user: hi\n\nassistant:", True)), (chat, "t", ("<chat>", False)),
                                   (data.Prompt(1, "c", "plain"), "t", ("plain", True))):
        tok = Tokenizer(template)
        data.prompt_ids(prompt, tok)
        assert tok.seen == [seen]
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(data.CacheDirError, match="is not writable"):
        data.writable_cache_dir(tmp_path / "cache")
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        data.heldout_prompts_path(tmp_path, num_prompts=0)


@pytest.mark.parametrize("lines, fragment", [
    (['{"question_id": 1, "turns": ["a"]}', '{"question_id": 1, "turns": ["b"]}'], r"q.jsonl:2: question_id 1 is also line 1's"),
    (['{"turns": ["a"]}', '{"question_id": 1, "turns": ["b"]}'], r"q.jsonl:2: question_id 1 is also line 1's"),
    (['{"question_id": [1], "turns": ["a"]}'], r"q.jsonl:1: question_id \[1\] is not an integer or a string"),
    (['{"question_id": 1.5, "turns": ["a"]}'], r"q.jsonl:1: question_id 1.5 is not an integer or a string"),
    (['{"question_id": 7, "turns": ["a"]}', '{"question_id": 7.0, "turns": ["b"]}'], r"question_id 7 is also line 1's"),
])
def test_question_ids_are_unique_scalars(tmp_path, lines, fragment):
    """A repeated question_id (lost on resume) or a list (a traceback) is a file error (needs this pass's data.py fix)."""
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.PromptFileError, match=fragment):
        data.load_prompts(tmp_path / "q.jsonl")


class AnsweringTarget(torch.nn.Module):
    """Answers every prompt 3, <eos>, 4 and records the seed each batch was generated under."""

    def __init__(self):
        super().__init__()
        self.w, self.seeds = torch.nn.Parameter(torch.zeros(1)), []

    def generate(self, ids, attention_mask, max_new_tokens, pad_token_id, **sampling):
        self.seeds.append(torch.initial_seed())
        return torch.cat([ids, torch.tensor([[3, 1, 4]]).expand(ids.shape[0], 3)], 1)


CHATS = [[{"role": "user", "content": text}] for text in ("a", "bb", "ccc")]


def test_chat_rows_keep_the_end_of_turn_and_seed_each_batch_apart():
    """An answer ends with its end-of-turn token (what comes after is cut); batch b samples under seed + b."""
    target = AnsweringTarget()
    rows = chat_data.generate_chat_rows(target, Tokenizer(), CHATS, 3, temperature=0.8, seed=10, batch=1, progress=False)
    assert sorted(target.seeds) == [10, 11, 12]
    assert rows.lengths.tolist() == [4, 4, 4] and rows.ids[:, 2:].tolist() == [[3, 1]] * 3


def test_cached_chat_rows_are_kept_apart_by_seed(tmp_path, monkeypatch):
    """Generations of another seed are another cache entry, not the first seed's rows again."""
    monkeypatch.setattr(chat_data, "_fingerprint", lambda target: "f" * 64)
    monkeypatch.setattr(suite, "training_chats", lambda count, seed: [("code", chat) for chat in CHATS[:count]])
    target = AnsweringTarget()
    for seed in (1, 2):
        _, manifest = chat_data.ensure_generations(target, Tokenizer(), "t", count=2, max_new_tokens=3, seed=seed,
                                                   cache_dir=tmp_path, progress=False)
        assert manifest["seed"] == seed
    assert len(target.seeds) == 2
    assert not list((tmp_path / "selfdistill").glob("*partial*"))  # the answers so far go once the entry is cached


def test_medusa_tree_presets_from_a_report(tmp_path):
    """At least one node; auto takes the generated accuracies and says so; a file the tool did not write is kept."""
    from experiments.medusa_tree import derive

    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "eval.json").write_text(json.dumps({"rank_accuracy": [[0.6, 0.2], [0.4, 0.1]],
                                                 "generated": {"rank_accuracy": [[0.7, 0.2], [0.5, 0.1]]}}))
    with pytest.raises(SpecDecError, match="--nodes 0"):
        derive(heads, 0, "m0", out_dir=tmp_path)
    out, _ = derive(heads, 3, "m3", out_dir=tmp_path)
    assert "on held-out prompts continued greedily by the target" in out.read_text()
    (tmp_path / "mine.yaml").write_text("paths: [[0]]\n")
    with pytest.raises(SpecDecError, match="was not written by this tool"):
        derive(heads, 3, "mine", out_dir=tmp_path)
    assert (tmp_path / "mine.yaml").read_text() == "paths: [[0]]\n"


def test_medusa_tree_refuses_a_depth_below_one_a_path_as_name_and_never_writes_a_bad_preset(tmp_path, monkeypatch):
    """``--max-depth 0`` overwrote a good preset with ``paths: []`` before saying it was empty (and -1 sliced off
    the last head); ``--name ../x`` wrote outside ``--out-dir``; a preset that does not read back now never
    replaces the one there."""
    from experiments import medusa_tree

    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "eval.json").write_text(json.dumps({"rank_accuracy": [[0.6, 0.2], [0.4, 0.1], [0.3, 0.1]]}))
    out, _ = medusa_tree.derive(heads, 4, "m4", out_dir=tmp_path)
    good = out.read_text()
    for depth in (0, -1):
        with pytest.raises(ConfigError, match=f"max_depth={depth}: it must be an integer >= 1"):
            medusa_tree.derive(heads, 4, "m4", out_dir=tmp_path, max_depth=depth)
    for name in ("../x", "a/b", ".."):
        with pytest.raises(SpecDecError, match="give a preset name, not a path"):
            medusa_tree.derive(heads, 4, name, out_dir=tmp_path)
    monkeypatch.setattr(medusa_tree, "preset_yaml", lambda *args: f"{medusa_tree.MARKER}\npaths: []\n")
    with pytest.raises(SpecDecError, match="empty"):
        medusa_tree.derive(heads, 4, "m4", out_dir=tmp_path)
    assert out.read_text() == good and sorted(p.name for p in tmp_path.iterdir()) == ["heads", "m4.yaml"]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # --out-dir . (a one-part temporary name was looked up as a preset name)
    assert medusa_tree.derive(heads, 4, "m5", out_dir=Path("."))[0].read_text().startswith(medusa_tree.MARKER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads", "m4.yaml", "m5.yaml"]


def test_medusa_tree_keeps_a_preset_derived_from_other_heads(tmp_path, monkeypatch):
    """A preset the tool derived from other heads (the shipped medusa32 from the default heads; a trial's micro
    heads overwrote it; two targets' heads both in a directory called ``heads``) is kept unless ``--force``; the same
    directory, or an embedded pair's of the same name (retrained, or at another home), replaces it."""
    from experiments.medusa_tree import derive

    report = json.dumps({"rank_accuracy": [[0.6, 0.2], [0.4, 0.1]]})
    default, micro, elsewhere = (tmp_path / d for d in ("a/zoo-default", "b/zoo-micro", "c/zoo-default"))
    for heads in (default, micro, elsewhere):
        heads.mkdir(parents=True)
        (heads / "eval.json").write_text(report)
    out, _ = derive(default, 3, "m3", out_dir=tmp_path)
    shipped = out.read_text()
    with pytest.raises(SpecDecError, match=r"m3.yaml was derived from the heads at .*a/zoo-default, not .*zoo-micro: "
                                           r"pick another --name .* or pass --force"):
        derive(micro, 3, "m3", out_dir=tmp_path)
    assert out.read_text() == shipped
    assert derive(elsewhere, 3, "m3", out_dir=tmp_path)[0] == out and "c/zoo-default" in out.read_text()
    derive(micro, 3, "m3", out_dir=tmp_path, force=True)
    assert "b/zoo-micro" in out.read_text()
    mine, theirs = tmp_path / "x/heads", tmp_path / "y/heads"
    for heads in (mine, theirs):
        heads.mkdir(parents=True)
        (heads / "eval.json").write_text(report)
    derive(mine, 3, "h3", out_dir=tmp_path)
    assert derive(mine, 3, "h3", out_dir=tmp_path)[0].name == "h3.yaml"  # the same heads again
    with pytest.raises(SpecDecError, match="was derived from the heads at .*x/heads"):
        derive(theirs, 3, "h3", out_dir=tmp_path)
    monkeypatch.chdir(tmp_path / "x")  # a relative path is recorded as the heads' own: from elsewhere it still is
    assert f"# from the heads at {mine}:" in derive(Path("heads"), 3, "r3", out_dir=tmp_path)[0].read_text()
    monkeypatch.chdir(tmp_path / "y")
    with pytest.raises(SpecDecError, match="was derived from the heads at .*x/heads"):
        derive(Path("heads"), 3, "r3", out_dir=tmp_path)  # y/heads are other heads


def test_a_sampled_runs_note_and_a_lossless_rules_mismatch_warning_follow_its_rule():
    """A sampled run names what vouches for its rule (the chi-square tests for the built-in rules; none for a lossy
    rule or a rule of one's own); a rule that declares itself lossless and differs from the greedy baseline is
    warned about, unless a reduced-precision target's rounding explains it."""
    from experiments.results import format_table, lossless_warnings

    def table(**extra):
        return format_table({"metrics": {"matches_baseline": None}, **extra})

    assert "the exactness of the sampled rules is the chi-square tests'" in table(acceptance="rejection", lossless=True)
    said = table(acceptance="topm", lossless=False)
    assert "acceptance=topm, a rule not declared lossless: its outputs need not follow the target's distribution" in said
    assert "acceptance=mine declares itself lossless: a chi-square test" in table(acceptance="mine", lossless=True)
    mismatch = {"acceptance": "mine", "lossless": True, "mismatched_question_ids": [3],
                "metrics": {"matches_baseline": False}}
    assert lossless_warnings(mismatch) == [("acceptance=mine is lossless, yet the greedy outputs of prompts [3] differ "
                                            "from the baseline's: a bug in the drafter or the rule (or logits that tie "
                                            "to within rounding)")]
    assert lossless_warnings({**mismatch, "lossless": False}) == []
    assert lossless_warnings({**mismatch, "metrics": {"matches_baseline": None}}) == []
    assert lossless_warnings({**mismatch, "metrics": {"matches_baseline": False, "greedy_up_to_rounding": True}}) == []
