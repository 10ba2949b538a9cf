"""A run on a busy machine says its timings are not the machine's (a trial's loaded 2-core machine showed 2.03x for
a drafter that drafts nothing, and nothing said so)."""
from __future__ import annotations

import json
from itertools import count

import pytest

from experiments import decode, machine_load
from experiments.machine_load import busy_machine_warnings
from tests.test_experiments import smoke_cfg


@pytest.fixture
def spec_bench(tmp_path):
    path = tmp_path / "question.jsonl"
    rows = [{"question_id": i, "category": "code", "turns": [f"def f{i}(x):\n    return x + {i}\n"]} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_rule_waits_for_a_cpu_and_without_pressure_files_reads_the_load():
    assert busy_machine_warnings(0.2, None, 2, 2) == [] and busy_machine_warnings(None, None, 2, 2) == []
    (said,) = busy_machine_warnings(0.5, 0.1, 2, 2)
    assert said.startswith("the machine was busy: work waited for a CPU 50% of the decoding's time; timings")
    assert busy_machine_warnings(None, 2.4, 2, 2) == []  # the run's own two threads on two cores
    assert busy_machine_warnings(None, 2.6, 2, 2)[0].startswith("the machine was busy: load average 2.6 on 2 cores")
    (said,) = busy_machine_warnings(None, 4.0, 4, 2)  # its own threads oversubscribe the cores
    assert said.startswith("the machine was busy (more torch threads than cores): load average 4.0")
    assert said.endswith("rerun on an idle machine (num_threads=1 also steadies them)")
    assert busy_machine_warnings(0.5, None, 1, 2)[0].endswith("rerun on an idle machine")  # one thread already


def test_the_stall_total_is_read_from_the_first_pressure_file_there(tmp_path, monkeypatch):
    cgroup, system = tmp_path / "cpu.pressure", tmp_path / "cpu"
    system.write_text("some avg10=0.15 avg60=0.23 avg300=2.22 total=8994194966\nfull avg10=0.00 total=0\n")
    monkeypatch.setattr(machine_load, "_PRESSURE_FILES", (cgroup, system))
    assert machine_load.cpu_stall_us() == 8994194966  # no cgroup file: the system's
    cgroup.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n")
    assert machine_load.cpu_stall_us() == 42
    monkeypatch.setattr(machine_load, "_PRESSURE_FILES", (tmp_path / "none",))
    assert machine_load.cpu_stall_us() is None


def test_a_decode_that_waited_for_a_cpu_warns_and_keeps_the_share(spec_bench, tmp_path, monkeypatch, capsys):
    stalls = count(0, 10**9)  # 1000 s of waiting between the two readings: far over any run's wall time
    monkeypatch.setattr(machine_load, "cpu_stall_us", lambda: next(stalls))
    summary = decode.run(smoke_cfg(spec_bench, "drafter=ngram", "logger=none"), tmp_path)
    assert summary["cpu_wait_share"] > 1 and summary["cpu_cores"] >= 1
    assert any(w.startswith("the machine was busy: work waited for a CPU") for w in summary["warnings"])
    assert "warning: the machine was busy" in capsys.readouterr().err
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["cpu_wait_share"] == summary["cpu_wait_share"]
    monkeypatch.setattr(machine_load, "cpu_stall_us", lambda: 7)  # no waiting: no warning
    quiet = decode.run(smoke_cfg(spec_bench, "drafter=ngram", "logger=none"), tmp_path / "quiet")
    assert quiet["cpu_wait_share"] == 0  # (a cost curve timed on a busy machine warns on its own: not this warning)
    assert not any(w.startswith("the machine was busy") for w in quiet.get("warnings", []))
