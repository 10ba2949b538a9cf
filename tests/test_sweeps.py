"""Sweeps: the presets, deterministic run directories, resuming interrupted sweeps, launchers.

In-process sweeps call the Hydra entry point ``experiments.decode.main`` with a patched argv (one
thread, tiny random pair, a few prompts and tokens, ``costs=false``); the launcher test runs
``python -m experiments.decode`` in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import experiments.schema  # noqa: F401  (registers base_config)
from experiments import decode, report
from experiments.models_from_config import load_models
from experiments.resume import safe_dirname
from specdec.errors import SpecDecError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Prompt sets and cost curves go to a per-session temporary cache, never ~/.cache."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path_factory.getbasetemp() / "specdec-cache"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    """Four short Spec-Bench prompts (one line each)."""
    path = tmp_path_factory.mktemp("prompts") / "question.jsonl"
    rows = [{"question_id": i, "category": "code", "turns": [f"def f{i}(x):\n    return x * {i} + 1\n" * 2]}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_args(prompts: Path, num_prompts: int = 3, tokens: int = 8) -> list[str]:
    """Overrides of a seconds-long run: tiny random pair, a few prompts and tokens, one thread, no logger."""
    return ["experiment=smoke", "dataset=spec_bench", f"dataset.path={prompts}", f"num_prompts={num_prompts}",
            f"max_new_tokens={tokens}", "num_threads=1", "warmup=0"]


def compose_cfg(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def hydra_main(monkeypatch, *args: str) -> None:
    """Run ``python -m experiments.decode <args>`` in this process (a sweep runs its jobs one by one)."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["experiments.decode", f"--config-path={CONF}", *args])
    try:
        decode.main()
    finally:
        GlobalHydra.instance().clear()


def run_cli(*args: str, module: str = "experiments.decode", timeout: int = 300,
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def run_dirs(sweep_dir: Path) -> dict[str, Path]:
    """``{k: run dir}`` of a sweep over drafter.num_speculative_tokens (k from the job's overrides)."""
    dirs = {}
    for path in sweep_dir.iterdir():
        overrides = path / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            k = next(line.split("=")[1] for line in overrides.read_text().splitlines() if "num_speculative_tokens=" in line)
            dirs[k] = path
    return dirs


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


def file_state(run_dir: Path) -> dict:
    return {name: ((run_dir / name).stat().st_mtime_ns, (run_dir / name).read_bytes())
            for name in ("summary.json", "records.jsonl")}


def comparable_rows(sweep_dir: Path) -> list[dict]:
    """The report's rows without wall-clock columns (they differ between identical runs)."""
    rows = report.report(sweep_dir)["rows"]
    return sorted(({k: v for k, v in row.items() if k not in report.TIMING_COLUMNS} for row in rows),
                  key=lambda r: r["run"])


# --------------------------------------------------------------------------- presets


def test_sweep_presets_compose():
    cfg = compose_cfg("sweep=draft_length", hydra_cfg=True)
    assert cfg.hydra.sweeper.params["drafter.num_speculative_tokens"] == "1,2,3,4,5,6,7,8"
    cfg = compose_cfg("sweep=temperature", hydra_cfg=True)
    assert cfg.acceptance._target_.endswith("RejectionAcceptance") and cfg.hydra.sweeper.params["sampling.temperature"] == "0.0,0.7,1.0"
    cfg = compose_cfg("sweep=drafters", hydra_cfg=True)
    assert cfg.hydra.sweeper.params["drafter"] == "none,ngram,draft_model,hybrid_draft,layer_skip,medusa,eagle"
    for name in ("draft_length", "temperature", "drafters", "tree_shape", "custom"):
        cfg = compose_cfg(f"sweep={name}", hydra_cfg=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweep.dir == f"multirun/{name}"
        assert "override_dirname" in OmegaConf.to_container(cfg.hydra.sweep)["subdir"] and "sweep" in cfg.hydra.job.config.override_dirname.exclude_keys
    assert safe_dirname("sweep/shape=binary,k=2") == "sweep-shape=binary,k=2" and safe_dirname("") == "defaults"
    long = [safe_dirname("x" * 300 + str(i)) for i in range(2)]
    assert long[0] != long[1] and all(len(n) <= 160 for n in long)


def test_tree_shape_preset_builds_every_shape():
    """Every shape of sweep=tree_shape composes and builds the drafter it names (tiny random pair)."""
    params = compose_cfg("sweep=tree_shape", hydra_cfg=True).hydra.sweeper.params["sweep/shape"].split(",")
    assert params == ["chain", "binary", "sparse60", "dynamic30", "dynamic60"]
    models = load_models(compose_cfg("model=tiny_random").model)
    modes = {}
    for shape in params:
        cfg = compose_cfg("sweep=tree_shape", f"sweep/shape={shape}")
        drafter = decode.build_drafter(cfg.drafter, models, cfg.get("tree"))
        modes[shape] = (drafter.mode, drafter.max_nodes)
    assert modes == {"chain": ("chain", 4), "binary": ("static", 30), "sparse60": ("static", 60),
                     "dynamic30": ("dynamic", 30), "dynamic60": ("dynamic", 60)}


@pytest.mark.requires("hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher")
def test_launcher_presets_compose():
    joblib = compose_cfg("hydra/launcher=joblib_local", hydra_cfg=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2
    slurm = compose_cfg("hydra/launcher=slurm", hydra_cfg=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.max_num_timeout == 3 and slurm.gpus_per_node == 1
    local = compose_cfg("hydra/launcher=slurm_local", hydra_cfg=True).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")


def test_device_map_reaches_from_pretrained(tmp_path, monkeypatch):
    """model.device_map is passed to from_pretrained (which needs accelerate for it)."""
    from transformers import AutoModelForCausalLM

    from specdec.models import tiny_random_pair

    target, _, tokenizer = tiny_random_pair()
    target.save_pretrained(tmp_path / "t")
    tokenizer.save_pretrained(tmp_path / "t")
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.setdefault("calls", []).append(kwargs.get("device_map"))
        return original(path, **{k: v for k, v in kwargs.items() if k != "device_map"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    cfg = compose_cfg("model=hf", f"model.target={tmp_path / 't'}", "model.device_map=auto")
    models = load_models(cfg.model)
    assert seen["calls"] == ["auto"] and models.info["device_map"] == "auto"
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", original)
    try:  # the real call: loads with accelerate, or says that it needs it
        loaded = load_models(compose_cfg("model=hf", f"model.target={tmp_path / 't'}", "model.device_map=cpu").model)
    except SpecDecError as exc:
        assert "accelerate" in str(exc)
    else:
        assert loaded.info["device_map"] == "cpu" and next(loaded.target.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- resuming


def test_interrupted_sweep_resumes_without_redoing_finished_runs(prompts_file, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of run 2 of 3; the rerun leaves run 1 alone, keeps run 2's finished prompt,
    decodes the rest with the same seeds, and reports what an uninterrupted sweep reports."""
    args = ["sweep=custom", *tiny_args(prompts_file), "costs=false", "acceptance=rejection",
            "sampling.temperature=1.0", "drafter.num_speculative_tokens=1,2,4"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    hydra_main(monkeypatch, *args, f"hydra.sweep.dir={reference}")

    calls = {"n": 0}
    original = decode.decode_group

    def counting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == calls.get("fail_at"):
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(decode, "decode_group", counting)
    calls["fail_at"] = 10  # run 1: calls 1-6 (3 prompts x 2 methods); run 2: prompt 0, then prompt 1's speculative
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line, exit status 130, and the sweep ends there
        hydra_main(monkeypatch, *args, f"hydra.sweep.dir={resumed}")
    err = capsys.readouterr().err
    assert stopped.value.code == 130 and ("interrupted (Ctrl-C); a decode run keeps the prompts it finished: rerun "
                                          f"the same sweep with hydra.sweep.dir={resumed} to go on") in err
    dirs = run_dirs(resumed)
    assert set(dirs) == {"1", "2"}  # run 3 never started
    second = json.loads((dirs["2"] / "summary.json").read_text())
    assert second["status"] == "interrupted" and len(records_of(dirs["2"])) == 3
    partial = report.report(resumed)  # an incomplete sweep: reports what is there, names what is missing
    assert any("interrupted" in m for m in partial["missing"])
    assert any("never started" in m and "drafter.num_speculative_tokens=4" in m for m in partial["missing"])

    before = file_state(dirs["1"])
    kept_lines = (dirs["2"] / "records.jsonl").read_text().splitlines()[:2]
    calls.update(n=0, fail_at=None)
    capsys.readouterr()
    hydra_main(monkeypatch, *args, f"hydra.sweep.dir={resumed}")
    err = capsys.readouterr().err
    assert calls["n"] == 2 * 2 + 3 * 2  # run 2: prompts 1 and 2; run 3: all three; run 1: nothing
    assert "skipping" in err and "resuming" in err
    assert file_state(dirs["1"]) == before
    assert (dirs["2"] / "records.jsonl").read_text().splitlines()[:2] == kept_lines
    summary = json.loads((dirs["2"] / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["resumed_prompts"] == 1
    assert summary["metrics"]["speculative"]["num_prompts"] == 3

    assert comparable_rows(reference) == comparable_rows(resumed)
    for k, path in run_dirs(reference).items():  # seeded: the same tokens, run for run
        tokens = {(r["question_id"], r["method"]): r["tokens"] for r in records_of(path)}
        assert tokens == {(r["question_id"], r["method"]): r["tokens"] for r in records_of(run_dirs(resumed)[k])}

    # A deleted summary: only that run is redone; its old records are set aside, not lost.
    (run_dirs(resumed)["4"] / "summary.json").unlink()
    calls["n"] = 0
    hydra_main(monkeypatch, *args, f"hydra.sweep.dir={resumed}")
    assert calls["n"] == 3 * 2
    assert list(run_dirs(resumed)["4"].glob("superseded-*/records.jsonl"))
    assert comparable_rows(reference) == comparable_rows(resumed)


def test_resume_skips_a_cut_record_and_reruns_only_that_prompt(prompts_file, tmp_path, capsys):
    cfg = compose_cfg(*tiny_args(prompts_file), "costs=false")
    first = decode.run(cfg, tmp_path)
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed while writing the last line
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["status"] = "running"  # as left by a killed process
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    again = decode.run(cfg, tmp_path)
    err = capsys.readouterr().err
    assert "cut mid-line" in err and "2 of 3 prompts already decoded by every method and kept, 1 to decode" in err
    assert again["status"] == "complete" and len(records_of(tmp_path)) == 6
    assert again["metrics"]["speculative"]["tau"] == first["metrics"]["speculative"]["tau"]
    assert again["metrics"]["matches_baseline"] is True


def test_changed_config_sets_earlier_results_aside(prompts_file, tmp_path, capsys):
    decode.run(compose_cfg(*tiny_args(prompts_file, num_prompts=1), "costs=false"), tmp_path)
    capsys.readouterr()
    decode.run(compose_cfg(*tiny_args(prompts_file, num_prompts=1), "costs=false", "seed=5"), tmp_path)
    assert "another config (differs in seed)" in capsys.readouterr().err
    aside = list(tmp_path.glob("superseded-*"))
    assert len(aside) == 1 and (aside[0] / "summary.json").exists() and (aside[0] / "records.jsonl").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["seed"] == 5


def test_a_run_from_before_a_key_was_added_is_this_configs(prompts_file, tmp_path, capsys):
    """A summary written before ``sampling.min_p`` existed is the same config as min_p=0 (skipped, complete), and
    another one than min_p=0.1."""
    args = (*tiny_args(prompts_file, num_prompts=1), "costs=false")
    decode.run(compose_cfg(*args), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    del summary["config"]["sampling"]["min_p"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    decode.run(compose_cfg(*args), tmp_path)
    said = capsys.readouterr()
    assert "complete results for this config are already there" in said.err
    assert said.out.split()[:1] == ["method"] and "speculative" in said.out  # its table, as the run printed it
    assert f"results: {tmp_path / 'records.jsonl'}" in said.out
    del summary["metrics"]["speculative"]["time_split"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    decode.run(compose_cfg(*args), tmp_path)  # an older summary's layout: named, never a traceback
    assert "layout is older than this version's table" in capsys.readouterr().out
    decode.run(compose_cfg(*args, "sampling.temperature=1", "sampling.min_p=0.1", "acceptance=rejection"), tmp_path)
    assert "differs in acceptance._target_, sampling.min_p, sampling.temperature" in capsys.readouterr().err


def test_a_rerun_with_fewer_prompts_keeps_a_copy_of_the_earlier_records(prompts_file, tmp_path, capsys):
    """The rerun's own files hold its 2 prompts (resumed, nothing decoded again); the third prompt's records are not
    lost: the earlier records and summary are copied to ``superseded-*`` first."""
    decode.run(compose_cfg(*tiny_args(prompts_file, num_prompts=3), "costs=false"), tmp_path)
    earlier = records_of(tmp_path)
    capsys.readouterr()
    again = decode.run(compose_cfg(*tiny_args(prompts_file, num_prompts=2), "costs=false"), tmp_path)
    err = capsys.readouterr().err
    assert "1 earlier prompt(s) are not in this run" in err and "W&B run" not in err  # no W&B run here to move
    assert again["status"] == "complete" and len(records_of(tmp_path)) == 4
    aside = list(tmp_path.glob("superseded-*"))
    assert len(aside) == 1 and records_of(aside[0]) == earlier and len(earlier) == 6


# --------------------------------------------------------------------------- launchers and bad sweeps


@pytest.mark.requires("hydra_plugins.hydra_submitit_launcher")
def test_slurm_preset_runs_with_the_submitit_local_executor(prompts_file, tmp_path):
    proc = run_cli("sweep=custom", "hydra/launcher=slurm_local", *tiny_args(prompts_file, num_prompts=1),
                   "costs=false", "drafter.num_speculative_tokens=1,2", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = run_dirs(tmp_path)
    assert set(dirs) == {"1", "2"}
    for path in dirs.values():
        assert json.loads((path / "summary.json").read_text())["status"] == "complete"
    assert list((tmp_path / ".submitit").glob("*/*_log.out"))


def test_unknown_sweep_key_fails_naming_the_key_and_the_closest_one(tmp_path):
    proc = run_cli("sweep=custom", "experiment=smoke", "drafter.num_speculative_tokenz=1,2",
                   f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2
    assert ("error: drafter.num_speculative_tokenz is not a key of this config: did you mean "
            "drafter.num_speculative_tokens?") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("summary.json"))


def test_a_key_from_the_python_api_names_the_config_key_that_means_it():
    from experiments.cli import error_message

    with pytest.raises(Exception) as exc:  # whatever Hydra raises: its message is what is tested
        compose_cfg("experiment=smoke", "max_rows=2")
    assert "the rows decoded at once are batch_size" in error_message(exc.value)


@pytest.mark.parametrize(("overrides", "plus"), [(("drafter=layer_skip", "drafter.layer=6"), False),
                                                 (("drafter=ngram", "drafter.match=x"), True)])
def test_the_plus_hint_only_for_an_argument_the_target_takes(overrides, plus):
    """A trial's ``drafter.layer=6`` was told to add it with a leading +, which then failed: the hint is given only
    when the node's _target_ takes the key (NGramDrafter's ``match``, which its config file leaves out)."""
    from experiments.cli import error_message

    with pytest.raises(Exception) as exc:  # whatever Hydra raises: its message is what is tested
        compose_cfg("experiment=smoke", *overrides)
    said = error_message(exc.value)
    key = overrides[1].split("=")[0]
    assert said.startswith(f"{key} is not a key of this config: ") and (f"(+{key}=...)" in said) == plus, said
