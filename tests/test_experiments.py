"""The Hydra decode entry point: config composition, every config group, runs, sweeps, loggers, bad input.

In-process runs use :func:`experiments.decode.run` on the tiny random pair; a few tests run
``python -m experiments.decode`` in a subprocess (one thread, a few prompts, few tokens).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

import experiments.schema  # noqa: F401  (registers base_config)
from experiments import decode
from experiments.instantiate import instantiate
from experiments.loggers import GuardedLogger, Logger, NoLogger, WandbLogger
from experiments.models_from_config import load_models
from experiments.results import time_split
from specdec import SamplingParams
from specdec.errors import ConfigError, SpecDecError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("model", "drafter", "acceptance", "dataset", "logger", "experiment", "sweep")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Prompt sets and zoo pairs go to a per-session temporary cache, never ~/.cache."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path_factory.getbasetemp() / "specdec-cache"))


@pytest.fixture()
def spec_bench(tmp_path) -> Path:
    """A small Spec-Bench question.jsonl."""
    path = tmp_path / "question.jsonl"
    rows = [{"question_id": i, "category": "code", "turns": [f"def f{i}(x):\n    return x + {i}\n" * 3]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory) -> dict:
    """The tiny random pair saved with save_pretrained: real directories for model=hf and model=zoo."""
    from specdec.models import tiny_random_pair

    root = tmp_path_factory.mktemp("pair")
    target, draft, tokenizer = tiny_random_pair()
    dirs = {"target": root / "target", "draft": root / "draft"}
    target.save_pretrained(dirs["target"])
    tokenizer.save_pretrained(dirs["target"])
    draft.save_pretrained(dirs["draft"])
    return {k: str(v) for k, v in dirs.items()}


def smoke_cfg(spec_bench_path: Path, *overrides: str):
    """The smoke experiment on a tmp Spec-Bench file: 2 prompts, 8 tokens, no logger."""
    return compose_cfg("experiment=smoke", "dataset=spec_bench", f"dataset.path={spec_bench_path}",
                       "num_prompts=2", "max_new_tokens=8", *overrides)


def run_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "experiments.decode", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def read_results(run_dir: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    return records, json.loads((run_dir / "summary.json").read_text())


def assert_sane(summary: dict, num_prompts: int) -> None:
    assert summary["status"] == "complete"
    metrics = summary["metrics"]
    for method in ("speculative", "baseline"):
        m = metrics[method]
        assert m["num_prompts"] == num_prompts
        assert m["tau"] >= 1.0 and m["mean_accepted_drafts"] == pytest.approx(m["tau"] - 1.0)
        assert 0.0 <= m["draft_acceptance_rate"] <= 1.0
        assert all(0.0 <= r <= 1.0 for r in m["acceptance_rate_by_depth"])
        assert m["tokens_per_s"] > 0
        assert sum(m["time_split"].values()) == pytest.approx(1.0, abs=1e-6)
    assert metrics["baseline"]["tau"] == 1.0
    assert metrics["speedup"] > 0
    assert metrics["matches_baseline"] is True


# --------------------------------------------------------------------------- composition


def test_default_composition():
    cfg = compose_cfg()
    assert cfg.model.source == "zoo" and cfg.model.size == "default" and cfg.drafter._target_ == "drafters.DraftModelDrafter"
    assert cfg.acceptance._target_ == "specdec.acceptance.GreedyAcceptance" and cfg.dataset._target_ == "experiments.datasets.StdlibHeldout"
    assert cfg.logger._target_ == "experiments.loggers.WandbLogger" and cfg.logger.mode == "offline"
    assert cfg.sampling.temperature == 0.0 and cfg.baseline is True
    assert cfg.drafter.attn_backend == cfg.attn_backend


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        compose_cfg(f"{group}={option}", hydra_cfg=group == "sweep")


def test_experiment_smoke_and_sweep_preset():
    cfg = compose_cfg("experiment=smoke")
    assert (cfg.model.source, cfg.num_prompts, cfg.max_new_tokens) == ("tiny_random", 3, 16)
    assert cfg.logger._target_.endswith("NoLogger")
    cfg = compose_cfg("sweep=draft_length", hydra_cfg=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params["drafter.num_speculative_tokens"] == "1,2,3,4,5,6,7,8"
    assert compose_cfg("model=zoo_micro").model.size == "micro"


@pytest.mark.parametrize("override", ["max_new_tokens=abc", "sampling.temperature=hot", "sampling.top_k=1.5",
                                      "baseline=maybe", "num_prompts=[1]"])
def test_wrong_type_fails_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(override)


@pytest.mark.parametrize("override", ["drafter=medusa_typo", "acceptance=lenient"])
def test_unknown_group_option_fails(override):
    with pytest.raises(MissingConfigException, match="Available options"):
        compose_cfg(override)


# --------------------------------------------------------------------------- instantiating every group


@pytest.mark.parametrize("option", options("drafter"))
def test_instantiate_every_drafter(option, saved_pair):
    models = load_models(compose_cfg("model=tiny_random").model)
    # the cross-tokenizer draft defaults to the embedded pair's (a build of minutes): a saved draft here
    draft = ([f"drafter.draft={saved_pair['draft']}", f"drafter.draft_tokenizer={saved_pair['target']}"]
             if option == "cross_tokenizer" else [])
    drafter = decode.build_drafter(compose_cfg(f"drafter={option}", *draft).drafter, models)
    assert type(drafter).__name__ == compose_cfg(f"drafter={option}").drafter._target_.split(".")[-1]


def test_draft_model_drafter_without_draft_model_fails(saved_pair):
    cfg = compose_cfg("model=hf", f"model.target={saved_pair['target']}")
    with pytest.raises(ConfigError, match="needs a draft model"):
        decode.build_drafter(cfg.drafter, load_models(cfg.model))


@pytest.mark.parametrize("option", options("acceptance"))
def test_instantiate_every_acceptance(option):
    rule = decode.build_acceptance(compose_cfg(f"acceptance={option}").acceptance, SamplingParams())
    assert rule.name == option
    if option == "typical":
        assert (rule.epsilon, rule.delta) == (0.09, 0.3)


def test_unknown_acceptance_name_and_bad_sampling_fail_before_decoding():
    with pytest.raises(ConfigError, match="cannot import _target_ 'specdec.acceptance.Lenient'"):
        decode.build_acceptance(compose_cfg("acceptance._target_=specdec.acceptance.Lenient").acceptance,
                                SamplingParams())
    with pytest.raises(ConfigError, match="temperature"):
        decode.build_acceptance(compose_cfg().acceptance, SamplingParams(temperature=0.7))


@pytest.mark.parametrize("option", options("logger"))
def test_instantiate_every_logger(option, tmp_path):
    logger = instantiate(compose_cfg(f"logger={option}").logger, "logger", run_dir=str(tmp_path))
    assert isinstance(logger, (WandbLogger, NoLogger))


def test_models_tiny_hf_and_zoo(saved_pair, monkeypatch):
    tiny = load_models(compose_cfg("model=tiny_random").model)
    assert tiny.draft is not None and tiny.tokenizer is not None
    hf = load_models(compose_cfg("model=hf", f"model.target={saved_pair['target']}",
                                 f"model.draft={saved_pair['draft']}").model)
    assert hf.draft is not None and hf.info["target"] == saved_pair["target"]
    import experiments.zoo

    class Pair:  # stands in for a built zoo pair; building one is experiments.zoo's own test
        target_dir, draft_dir, tokenizer_dir = saved_pair["target"], saved_pair["draft"], saved_pair["target"]

    monkeypatch.setattr(experiments.zoo, "ensure_pair", lambda size, cache_dir: Pair)
    zoo = load_models(compose_cfg("model=zoo_micro").model)
    assert zoo.info["source"] == "zoo" and zoo.draft is not None


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(SpecDecError, match="/nonexistent"):
        load_models(compose_cfg("model=hf", "model.target=/nonexistent").model)
    with pytest.raises(ConfigError, match="model.target"):
        load_models(compose_cfg("model=hf").model)


def test_datasets(spec_bench, tmp_path):
    prompts, keep = decode.load_dataset_prompts(compose_cfg("dataset=spec_bench", f"dataset.path={spec_bench}").dataset, 3)
    assert [p.question_id for p in prompts] == [0, 1, 2] and keep is None
    with pytest.raises(ConfigError, match=r"num_prompts=5 but the prompt set holds only 4 prompts; ask for num_prompts<=4"):
        decode.load_dataset_prompts(compose_cfg("dataset=spec_bench", f"dataset.path={spec_bench}").dataset, 5)
    stdlib, keep = decode.load_dataset_prompts(compose_cfg().dataset, 2)
    assert len(stdlib) == 2 and stdlib[0].text and keep == 256
    with pytest.raises(ConfigError, match="dataset.path"):
        decode.load_dataset_prompts(compose_cfg("dataset=spec_bench").dataset, 3)
    for bad_value in ("0", "many"):  # the prompt set is a config object: its constructor checks its arguments
        with pytest.raises(ConfigError, match=f"max_prompt_tokens='?{bad_value}"):
            decode.load_dataset_prompts(compose_cfg(f"dataset.max_prompt_tokens={bad_value}").dataset, 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(SpecDecError, match="bad.jsonl"):
        decode.load_dataset_prompts(compose_cfg("dataset=spec_bench", f"dataset.path={bad}").dataset, 3)


def test_max_prompt_tokens_keeps_the_last_tokens(spec_bench):
    models = load_models(compose_cfg("model=tiny_random").model)
    prompts, _ = decode.load_dataset_prompts(compose_cfg("dataset=spec_bench", f"dataset.path={spec_bench}").dataset, 1)
    full = decode.encode_prompts(prompts, models.tokenizer, None, "cpu")[0].input_ids
    cut = decode.encode_prompts(prompts, models.tokenizer, 5, "cpu")[0].input_ids
    assert cut.shape == (1, 5) and cut.tolist()[0] == full.tolist()[0][-5:]


# --------------------------------------------------------------------------- in-process runs and loggers


class RaisingLogger(Logger):
    name = "Flaky"

    def log_prompt(self, index, record):
        raise RuntimeError("service unavailable")


def test_failing_logger_keeps_local_results(spec_bench, tmp_path, capsys):
    summary = decode.run(smoke_cfg(spec_bench, "drafter=ngram"), tmp_path, logger=RaisingLogger())
    err = capsys.readouterr().err
    assert err.count("Flaky logging failed: RuntimeError: service unavailable") == 1
    assert f"local results are in {tmp_path}" in err
    records, on_disk = read_results(tmp_path)
    assert len(records) == 4 and on_disk["status"] == "complete" and summary["status"] == "complete"
    assert_sane(on_disk, num_prompts=2)


def test_interrupted_run_keeps_what_it_computed(spec_bench, tmp_path):
    class Interrupt(Logger):
        def log_prompt(self, index, record):
            if index == 1:
                raise KeyboardInterrupt  # not an Exception: the guard lets it through, like Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        decode.run(smoke_cfg(spec_bench), tmp_path, logger=Interrupt())
    records, summary = read_results(tmp_path)
    assert summary["status"] == "interrupted" and len(records) == 3  # prompt 0 twice, prompt 1 once
    assert summary["metrics"]["baseline"]["num_prompts"] == 1


def test_logger_none_works_without_wandb(spec_bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" raises ImportError
    cfg = smoke_cfg(spec_bench, "logger=none", "num_prompts=1", "acceptance=typical")
    assert decode.run(cfg, tmp_path)["status"] == "complete"


def test_wandb_import_failure_is_reported_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    guarded = GuardedLogger(WandbLogger(run_dir=tmp_path), tmp_path)
    guarded.log_config({"a": 1})
    guarded.log_prompt(0, {"stats": {}})
    guarded.log_summary({})
    guarded.finish()
    err = capsys.readouterr().err
    assert err.count("W&B logging failed") == 1 and str(tmp_path) in err


def test_time_split_sums_to_one():
    from specdec.stats import DecodeStats

    stats = DecodeStats(time_prefill=0.1, time_draft=0.2, time_verify=0.3, time_accept=0.1, time_total=1.0)
    split = time_split(stats)
    assert split["other"] == pytest.approx(0.3) and sum(split.values()) == pytest.approx(1.0)


def test_summary_table_states_compile_time_apart():
    """``compile=inductor|graph``: the time spent compiling is shown, and kept out of tok/s."""
    from experiments.results import format_table
    from specdec.stats import DecodeStats

    runs = [DecodeStats(new_tokens=10, target_forwards=5, time_total=1.0, time_compile=30.0),
            DecodeStats(new_tokens=20, target_forwards=9, time_total=1.0)]
    merged = DecodeStats.merge(runs)
    assert merged.time_compile == 30.0 and merged.tokens_per_s == 15.0
    row = {**merged.to_dict(), "time_split": time_split(merged)}
    table = format_table({"metrics": {"speculative": row, "baseline": {**row, "time_compile": 0.0}}})
    assert "compiling the step (not in tok/s): speculative 30.0 s" in table and "baseline 0" not in table
    assert "compiling" not in format_table({"metrics": {"baseline": {**row, "time_compile": 0.0}}})
    warmed = format_table({"metrics": {"speculative": {**row, "time_compile": 0.0}, "baseline": {**row, "time_compile": 0.0}},
                           "warmup_time_compile": {"speculative": 164.9, "baseline": 28.9}})
    assert "compiling the step (not in tok/s; warm-up included): speculative 164.9 s, baseline 28.9 s" in warmed
    assert "steps not split (fixed-shape step)" in table  # no phase was timed: no made-up 0% shares
    timed = DecodeStats(new_tokens=4, target_forwards=2, time_verify=0.5, time_total=1.0)
    table = format_table({"metrics": {"baseline": {**timed.to_dict(), "time_split": time_split(timed)}}})
    assert "verify=50%" in table and "not split" not in table
    sampled = format_table({"metrics": {"speculative": row, "baseline": row, "matches_baseline": None}})
    assert "matches baseline: not compared (sampled" in sampled and "None" not in sampled
    assert "matches baseline: False" in format_table({"metrics": {"baseline": row, "matches_baseline": False}})


# --------------------------------------------------------------------------- the command line


def test_cli_smoke_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=smoke", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records, summary = read_results(run_dir)
    assert len(records) == 2 * 3
    assert {r["method"] for r in records} == {"speculative", "baseline"}
    assert all(r["new_tokens"] == r["stats"]["new_tokens"] <= 16 and r["prompt_tokens"] > 0 for r in records)
    assert_sane(summary, num_prompts=3)
    assert "speculative" in proc.stdout and "matches baseline: True" in proc.stdout


def test_cli_sweep_draft_length(tmp_path):
    proc = run_cli("-m", "experiment=smoke", "num_prompts=1", "drafter.num_speculative_tokens=1,2",
                   f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lengths = []
    for job in ("0", "1"):
        _, summary = read_results(tmp_path / job)
        assert summary["status"] == "complete"
        lengths.append(summary["config"]["drafter"]["num_speculative_tokens"])
        assert len(summary["metrics"]["speculative"]["acceptance_rate_by_depth"]) == lengths[-1]
    assert lengths == [1, 2]


@pytest.mark.requires("wandb")
def test_cli_wandb_offline(tmp_path):
    proc = run_cli("experiment=smoke", "logger=wandb", "num_prompts=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging failed" not in proc.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert read_results(tmp_path)[1]["status"] == "complete"


@pytest.mark.parametrize("args, message", [
    (("model=hf", "model.target=/nonexistent"), "/nonexistent"),
    (("dataset=spec_bench", f"dataset.path={__file__}"), "invalid JSON"),
])
def test_cli_input_errors_exit_2_without_traceback(args, message, tmp_path):
    proc = run_cli("experiment=smoke", *args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") or "\nerror: " in proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_wrong_type_is_reported(tmp_path):
    proc = run_cli("max_new_tokens=abc", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "error: max_new_tokens='abc': max_new_tokens takes a whole number" in proc.stderr


def test_speedup_is_our_tokens_per_s_over_the_baseline_s():
    """``speedup`` = speculative tokens/s over the autoregressive baseline's (30 / 20 here, not 20 / 30); None when
    the baseline has no throughput."""
    from experiments.results import BASELINE, SPECULATIVE, MethodResults, build_summary, speedup
    from specdec.stats import DecodeStats

    spec, base = MethodResults(), MethodResults()
    spec.add(0, DecodeStats(new_tokens=30, target_forwards=10, time_total=1.0), [7] * 30)
    base.add(0, DecodeStats(new_tokens=30, target_forwards=30, time_total=1.5), [7] * 30)
    metrics = build_summary({SPECULATIVE: spec, BASELINE: base}, greedy=True, status="complete", num_prompts=1)["metrics"]
    assert metrics["speedup"] == pytest.approx(1.5) and metrics["matches_baseline"] is True
    assert speedup({"tokens_per_s": 30.0}, {"tokens_per_s": 0.0}) is None


def test_matches_baseline_is_a_greedy_verdict_only():
    """Greedy: differing outputs make ``matches_baseline`` false and are listed; sampled runs differ from the
    baseline by design, so theirs is null (never a false alarm), while the differing ids are still listed."""
    from experiments.results import BASELINE, SPECULATIVE, MethodResults, build_summary
    from specdec.stats import DecodeStats

    spec, base = MethodResults(), MethodResults()
    for qid, (ours, theirs) in enumerate([([1, 2], [1, 2]), ([3, 4], [3, 5])]):
        spec.add(qid, DecodeStats(new_tokens=2, target_forwards=1, time_total=1.0), ours)
        base.add(qid, DecodeStats(new_tokens=2, target_forwards=2, time_total=1.0), theirs)
    for greedy, verdict in ((True, False), (False, None)):
        summary = build_summary({SPECULATIVE: spec, BASELINE: base}, greedy=greedy, status="complete", num_prompts=2)
        assert summary["metrics"]["matches_baseline"] is verdict and summary["mismatched_question_ids"] == [1]
