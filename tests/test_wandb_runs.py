"""W&B can only cost what it is worth, and no work is done twice.

- An unreachable server (``logger.mode=online``) costs one warning per run and the runs are logged
  offline: a sweep finishes about as fast as an offline one (a bound of 15 s, against ~100 s per run
  before; a hang guard, not a speed claim).
- kill -9 in the middle of a run, then kill -9 after ``summary.json`` says complete but before W&B got
  the summary, then a rerun: one W&B run id for the config across all three processes, its summary
  back-filled from the local records, and tokens and tau equal to an uninterrupted run.
- A second identical command while the first runs: it waits, then skips the finished run.

W&B runs offline here; the tests read the offline run files (``run-<id>.wandb``).
"""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiments.schema  # noqa: F401  (registers base_config)
from experiments import decode
from experiments.loggers import WandbLogger
from experiments.wandb_run import STATE_FILE, RunState, server_problem
from tests import repo_env
from tests.test_experiments import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "num_threads=1", "warmup=0", "costs=false", "max_new_tokens=6"]
#: Kills this process (SIGKILL) at a chosen moment of a decode run, then runs the real entry point.
KILLER = """
import os, signal, sys
from experiments import decode
from experiments.loggers import WandbLogger

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "second_prompt":  # after both methods' records of the first prompt are on disk
    original, calls = decode.decode_group, []
    def decode_group(*args, **kwargs):
        calls.append(1)
        return die() if len(calls) == 3 else original(*args, **kwargs)
    decode.decode_group = decode_group
else:  # "wandb_summary": summary.json already says complete, W&B has not got the summary
    WandbLogger.log_summary = die
sys.argv = ["experiments.decode", "--config-path=" + os.path.join(os.getcwd(), "conf"), *sys.argv[2:]]
decode.main()
"""


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path_factory.getbasetemp() / "specdec-cache"))


def env(**extra: str) -> dict:
    return repo_env(OMP_NUM_THREADS="1", WANDB_SILENT="true", HYDRA_FULL_ERROR="0", **extra)


def run_cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.decode", *args], cwd=ROOT, env=env(**extra_env),
                          capture_output=True, text=True, timeout=300, check=False)


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``.wandb`` file (LevelDB log format after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pos, chunk = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left  # both cases: skip to the next block
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def offline_summary(run_dir: Path) -> tuple[list[str], dict]:
    """(the run ids of every offline W&B run in ``run_dir``, the summary keys logged to the newest one)."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    summary = {}
    for record in wandb_records(next(runs[-1].glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return [path.name.rsplit("-", 1)[1] for path in runs], summary


def tokens_of(run_dir: Path) -> dict:
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    return {(r["question_id"], r["method"]): r["tokens"] for r in map(json.loads, lines)}


@pytest.mark.requires("wandb")
def test_unreachable_server_costs_one_warning_per_run(tmp_path):
    sweep = ["-m", *TINY, "num_prompts=1", "baseline=false", "logger=wandb", "drafter.num_speculative_tokens=1,2"]
    start = time.monotonic()
    offline = run_cli(*sweep, f"hydra.sweep.dir={tmp_path / 'offline'}")
    offline_s = time.monotonic() - start
    assert offline.returncode == 0, offline.stderr[-2000:]
    start = time.monotonic()
    online = run_cli(*sweep, "logger.mode=online", f"hydra.sweep.dir={tmp_path / 'online'}",
                     WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40)  # port 9: nothing listens
    online_s = time.monotonic() - start
    assert online.returncode == 0, online.stderr[-2000:]
    warnings = [line for line in online.stderr.splitlines() if line.startswith("warning: W&B could not start")]
    assert len(warnings) == 2 and all("http://127.0.0.1:9" in w and "offline" in w for w in warnings)
    assert online_s < offline_s + 15, (online_s, offline_s)
    for job in ("0", "1"):
        run_dir = tmp_path / "online" / job
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"
        ids, summary = offline_summary(run_dir)
        assert ids == [json.loads((run_dir / STATE_FILE).read_text())["id"]] and "speculative/tau" in summary
        # the per-prompt and per-step series are not in the summary (there they would read as the run's figures)
        assert not [k for k in summary if k.startswith(("prompt", "step/", "decode_step"))], sorted(summary)


def test_server_check_is_bounded():
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        problem = server_problem(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=0.5)
    assert problem is not None and "timed out" in problem and time.monotonic() - start < 5


def test_run_state_adopts_an_earlier_wandb_run_and_moves_aside_with_its_results(tmp_path):
    from experiments import resume

    fresh = RunState.load(tmp_path)
    assert not fresh.existed and not fresh.summary_logged and len(fresh.run_id) == 12
    (tmp_path / "wandb" / "offline-run-20260102_000000-second").mkdir(parents=True)
    (tmp_path / "wandb" / "run-20260101_000000-first").mkdir()
    adopted = RunState.load(tmp_path)  # logged before wandb_run.json existed: no second W&B run for it
    assert (adopted.run_id, adopted.existed, adopted.summary_logged) == ("second", True, True)
    RunState(tmp_path / STATE_FILE, "abc", summary_logged=False).save()
    assert RunState.load(tmp_path).run_id == "abc" and not RunState.load(tmp_path).summary_logged
    (tmp_path / "summary.json").write_text("{}")
    moved = resume.set_aside(tmp_path, "another config")
    assert {p.name for p in moved.iterdir()} == {"summary.json", STATE_FILE, "wandb", "REASON.txt"}
    assert not RunState.load(tmp_path).existed  # the new config gets a W&B run of its own


@pytest.mark.requires("wandb")
def test_killed_runs_keep_one_wandb_run_with_its_summary(tmp_path, capsys):
    """kill -9 mid-run, kill -9 between summary.json and W&B's summary, rerun: one W&B run, summary back-filled.
    Offline, each process's part is whole: it is sent the kept records again, and the earlier parts move to
    wandb/superseded (synced offline runs that share an id replace each other: the first part's series was lost)."""
    args = [*TINY, "num_prompts=2", "logger=wandb", f"hydra.run.dir={tmp_path}"]
    script = tmp_path.parent / f"{tmp_path.name}-killer.py"
    script.write_text(KILLER)
    for moment in ("second_prompt", "wandb_summary"):
        proc = subprocess.run([sys.executable, str(script), moment, *args], cwd=ROOT, env=env(), capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == -9, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["resumed_prompts"] == 1
    assert json.loads((tmp_path / STATE_FILE).read_text())["summary_logged"] is False

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "skipping" in rerun.stderr and "W&B: logged the summary" in rerun.stderr
    ids, logged = offline_summary(tmp_path)
    state = RunState.load(tmp_path)
    assert ids == [state.run_id] and state.summary_logged  # one W&B run, three processes: the last part holds it all
    aside = sorted((tmp_path / "wandb" / "superseded").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in aside] == [state.run_id] * 2
    assert logged["speculative/tau"] == pytest.approx(summary["metrics"]["speculative"]["tau"])
    last = next(next((tmp_path / "wandb").glob("offline-run-*")).glob("run-*.wandb"))
    sent = [json.loads(item.value_json) for r in wandb_records(last) if r.WhichOneof("record_type") == "history"
            for item in r.history.item if (item.key or "/".join(item.nested_key)) == "prompt_index"]
    assert sorted(sent) == [0, 0, 1, 1]  # both prompts, both methods, in the last part
    assert WandbLogger(tmp_path).backfill(summary, []) is False  # logged once; a further rerun adds nothing

    reference = tmp_path.parent / f"{tmp_path.name}-reference"  # the same config, never interrupted
    again = decode.run(compose_cfg(*TINY, "num_prompts=2", "logger=none"), reference)
    assert tokens_of(reference) == tokens_of(tmp_path)
    assert again["metrics"]["speculative"]["tau"] == summary["metrics"]["speculative"]["tau"]


def test_a_second_identical_command_waits_then_skips(tmp_path):
    """This process plays the first command (it holds the run directory and finishes the run); the
    second command, started meanwhile, says that it waits, then skips the finished run."""
    from experiments import resume

    overrides = [*TINY, "num_prompts=2"]
    log = tmp_path.parent / f"{tmp_path.name}-second.err"
    with resume.claim_run_dir(tmp_path), log.open("w") as err:
        second = subprocess.Popen([sys.executable, "-m", "experiments.decode", *overrides, f"hydra.run.dir={tmp_path}"],
                                  cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + 120
        while "waiting for" not in log.read_text() and second.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        decode.run(compose_cfg(*overrides), tmp_path)  # the first command's run, done while the second waits
    second.communicate(timeout=300)
    stderr = log.read_text()
    assert second.returncode == 0, stderr[-2000:]
    waited = [line for line in stderr.splitlines() if line.startswith("waiting for")]
    assert len(waited) == 1 and str(tmp_path) in waited[0] and "another process" in waited[0]
    assert f"skipping {tmp_path}" in stderr
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2 * 2  # decoded once


@pytest.mark.requires("wandb")
def test_a_rerun_with_fewer_prompts_logs_the_kept_ones_to_a_new_wandb_run(tmp_path, monkeypatch):
    """The earlier W&B run holds every prompt's series; logging the rerun's summary of fewer prompts into it mixed
    two runs. It moves aside with the earlier records, and the rerun's new W&B run gets the kept prompts' records
    (resumed, not decoded again) at their indices, then its own summary."""
    from experiments import loggers
    from tests.test_metrics_logged import FakeRun

    started = []
    monkeypatch.setattr(loggers, "start_wandb", lambda init, timeout: started.append(FakeRun(**init)) or started[-1])
    decode.run(compose_cfg(*TINY, "num_prompts=3"), tmp_path, logger=WandbLogger(tmp_path))
    first = started[-1].init["id"]
    again = decode.run(compose_cfg(*TINY, "num_prompts=2"), tmp_path, logger=WandbLogger(tmp_path))
    assert again["resumed_prompts"] == 2 and started[-1].init["id"] != first
    sent = [(d["prompt_index"], key) for d, _ in started[-1].logged if "prompt_index" in d for key in d
            if key.endswith("/tau")]
    assert sorted(sent) == [(0, "prompt/baseline/tau"), (0, "prompt/speculative/tau"), (1, "prompt/baseline/tau"),
                            (1, "prompt/speculative/tau")]
    assert started[-1].summary and RunState.load(tmp_path).run_id == started[-1].init["id"]
    aside = next(tmp_path.glob("superseded-*"))
    assert json.loads((aside / STATE_FILE).read_text())["id"] == first


def test_only_this_runs_offline_parts_step_aside_once_the_new_part_started(tmp_path, monkeypatch):
    """offline_parts finds ``offline-run-*-<id>`` only (not another id's, not an online run's). A resumed logger
    moves them aside only once its own part has started (a start cut by Ctrl-C left the kept records unsent and the
    earlier parts out of sync's way), whatever its mode (an online run that fell back offline has offline parts too),
    and is then sent the kept records again."""
    from experiments import loggers
    from experiments.wandb_run import offline_parts
    from tests.test_metrics_logged import FakeRun, _record

    for name in ("offline-run-20260101_000000-abc", "offline-run-20260102_000000-abc", "offline-run-20260101_000000-xyz",
                 "run-20260101_000000-abc"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert [p.name for p in offline_parts(tmp_path, "abc")] == ["offline-run-20260101_000000-abc",
                                                               "offline-run-20260102_000000-abc"]
    RunState(tmp_path / STATE_FILE, "abc", steps=3).save()

    def cut(init, timeout):
        raise KeyboardInterrupt
    monkeypatch.setattr(loggers, "start_wandb", cut)
    with pytest.raises(KeyboardInterrupt):
        WandbLogger(tmp_path, mode="online").log_config({})
    assert len(offline_parts(tmp_path, "abc")) == 2  # nothing moved
    started = []
    monkeypatch.setattr(loggers, "start_wandb", lambda init, timeout: started.append(FakeRun(**init)) or started[-1])
    resumed = WandbLogger(tmp_path, mode="online")
    resumed.log_config({})
    resumed.log_resumed([_record("speculative", [1, 1, 0], [2, 2, 2])], [0])
    assert offline_parts(tmp_path, "abc") == [] and started[-1].init["id"] == "abc"
    assert sorted(p.name for p in (tmp_path / "wandb").iterdir()) == [
        "offline-run-20260101_000000-xyz", "run-20260101_000000-abc", "superseded"]
    assert [d["decode_step"] for d, _ in started[-1].logged if "decode_step" in d] == [1, 2, 3]  # re-sent from 1
