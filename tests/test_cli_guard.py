"""The failure contract at the command line, continued (see tests/test_cli_contract.py): an attention backend
that cannot run here fails before anything runs, with one line naming the fix; our own bugs get the traceback and
a line asking to report them; file-system errors and Ctrl-C are one line.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import cli
from specdec.errors import ConfigError, SpecDecError
from tests.test_cli_contract import ROOT, TINY, _isolated_cache, error_line, run_cli  # noqa: F401  (the fixture)

# --------------------------------------------------------------------------- attention backend availability


def test_triton_on_cpu_without_the_interpreter_fails_before_decoding(tmp_path):
    proc = run_cli(*TINY, "attn_backend=triton", f"hydra.run.dir={tmp_path}", env_drop=("TRITON_INTERPRET",))
    error_line(proc.stderr, 2, proc.returncode, "attn_backend=triton", "TRITON_INTERPRET=1", "attn_backend=sdpa")
    assert not (tmp_path / "summary.json").exists()


def test_triton_not_installed(monkeypatch):
    from verifier import availability

    monkeypatch.setattr(availability.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="attn_backend=triton needs the triton package.*pip install triton"):
        availability.check_attn_backend("triton", "cpu")
    availability.check_attn_backend("sdpa", "cpu")


def test_an_interpreter_that_cannot_run_with_this_numpy(monkeypatch):
    """triton < 3.7's interpreter fails on numpy >= 2.4 (triton issue 9171): one error naming the fix,
    before anything runs, instead of an InterpreterError from inside the first launch."""
    from verifier import availability

    ta = importlib.import_module("specdec_kernels.tree_attention")  # the module, not the function it exports
    numpy = {"version": "2.4.6"}
    monkeypatch.setattr(ta.triton, "__version__", "3.6.0")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: numpy["version"])
    monkeypatch.setattr(availability, "triton_interpreted", lambda: True)
    assert "pip install 'triton>=3.7'" in ta.interpreter_problem()
    with pytest.raises(ConfigError, match=r"attn_backend=triton on the CPU: triton 3.6.0's interpreter .* 2.4.6"):
        availability.check_attn_backend("triton", "cpu")
    numpy["version"] = "2.3.5"
    assert ta.interpreter_problem() is None
    numpy["version"] = "2.4.6"
    monkeypatch.setattr(ta.triton, "__version__", "3.7.0")
    assert ta.interpreter_problem() is None
    availability.check_attn_backend("triton", "cpu")


def test_verify_curve_backends_are_checked_before_the_run(monkeypatch, capsys):
    """The benchmark's --verify-curve runs after every method: a backend that cannot run here fails first, and
    by default the curve times only the backends that run here."""
    from experiments import bench
    from verifier import availability

    monkeypatch.setattr(availability, "triton_interpreted", lambda: False)
    monkeypatch.setattr(bench, "load_pair", lambda args: pytest.fail("models loaded before the backends were checked"))
    assert bench.main(["--device", "cpu", "--verify-curve", "--backends", "sdpa,triton"]) == 2
    error_line(capsys.readouterr().err, 2, 2, "attn_backend=triton", "TRITON_INTERPRET=1", "out of --backends")
    assert availability.usable_backends(None, "cpu") == ["sdpa"]
    monkeypatch.setattr(availability, "triton_interpreted", lambda: True)
    monkeypatch.setattr(importlib.import_module("specdec_kernels.tree_attention"), "interpreter_problem", lambda: None)
    assert availability.usable_backends(None, "cpu") == ["sdpa", "triton"]
    assert availability.usable_backends(["triton"], "cpu") == ["triton"]


# --------------------------------------------------------------------------- our own bugs


def test_a_bug_gets_a_traceback_and_a_report_line(capsys):
    @cli.guard()
    def buggy() -> int:
        raise RuntimeError("internal invariant broken")

    assert buggy() == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: internal invariant broken" in err
    assert err.strip().endswith(cli.BUG_LINE) and "error:" not in err


def test_a_failure_in_code_of_ones_own_says_where(capsys):
    """A drafter or rule of one's own that fails: the bug line names the file, line and function where the
    traceback ends (not Python's library or an installed package), so its author is not told it is specdec's;
    a bare ValueError it raises (one line, as input errors are) says where it was raised."""
    def propose(max_depth):
        return [][max_depth]  # a plugin's IndexError

    def check(value):
        raise ValueError(f"my drafter wants a list, got {value}")

    assert cli.guard()(lambda: propose(3))() == 1
    err = capsys.readouterr().err
    assert f"the traceback ends in {__file__}:" in err and "(propose): if that is code of your own" in err
    assert err.strip().endswith(cli.BUG_LINE)
    assert cli.guard()(lambda: check(2))() == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: my drafter wants a list, got 2 (ValueError raised at " + __file__ + ":")
    assert line.endswith("(check))") and "Traceback" not in line


def test_input_errors_are_one_line_whatever_their_text(capsys):
    @cli.guard()
    def failing() -> int:
        raise SpecDecError("first line\n  second line")

    assert failing() == 2
    assert capsys.readouterr().err == "error: first line second line\n"


def test_file_system_errors_are_one_line_with_the_fix(capsys):
    """A path that is not there names the path and the fix; a full disk is the machine's state, not a bug."""
    import errno

    for exc, fragment in ((FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/nope"),
                           "No such file or directory: /proc/nope: that path (or a directory on it) does not exist"),
                          (OSError(errno.ENOSPC, "No space left on device", "/data/run/records.jsonl"),
                           "No space left on device: /data/run/records.jsonl: the disk is full"),
                          (OSError(errno.ENOSPC, "No space left on device"),  # a write() names no file
                           "No space left on device: the disk is full"),
                          (FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/a.tmp", None, "/r/x/a"),
                           "No such file or directory: /r/a.tmp -> /r/x/a: that path")):
        @cli.guard()
        def failing(exc=exc) -> int:
            raise exc

        assert failing() == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {fragment}") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("when", ["importing", "running"])
def test_ctrl_c_while_a_command_starts_is_one_line(when, tmp_path):
    """Ctrl-C while the command's modules still import (once torch's library is loaded: its import takes seconds
    more; a fixed delay could land before the interpreter reached the package on a loaded machine) or once it runs
    (its first output): exit status 130 and one line, never a traceback through the imports."""
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.decode", "model=tiny_random", "logger=none",
                             "num_prompts=50", "max_new_tokens=200", "costs=false", f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if when == "importing":
        maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and "libtorch" not in maps.read_text():
            time.sleep(0.01)
    else:  # once the run has started: its first log line
        while (line := proc.stderr.readline()) and "decoding" not in line:
            pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted (Ctrl-C)" in err
    records = tmp_path / "records.jsonl"
    if when == "running" and records.is_file() and records.stat().st_size:  # a plain rerun would start afresh
        assert (f"\ninterrupted (Ctrl-C); a decode run keeps the prompts it finished in {tmp_path}: rerun with "
                f"hydra.run.dir={tmp_path} to go on") in err, err[-2000:]
    elif when == "running":  # cut in its first prompt (or while models loaded): nothing to go on from
        assert f"\ninterrupted (Ctrl-C); no prompt was finished, so nothing in {tmp_path} to go on from" in err, err
    # the run's own handling (it keeps what it wrote) once it runs; the one-line exit of the imports before
    assert ("while the command was starting" in err) == (when == "importing"), err[-2000:]


def test_ctrl_c_says_what_the_entry_point_keeps():
    """One line, exit status 130: a decode run says it resumes, training that it goes on from its checkpoint, any
    other command no more than that it was interrupted (a trial's train_medusa told of a decode run)."""
    import contextlib
    import io

    from experiments import cli

    def stopped(argv=None):
        raise KeyboardInterrupt

    for kept, line in (("", "interrupted (Ctrl-C)\n"), ("training goes on", "interrupted (Ctrl-C); training goes on\n")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli.guard(interrupted=kept)(stopped)() == cli.INTERRUPTED
        assert err.getvalue() == line
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # a note that depends on the run (its directory) is asked for then
        assert cli.guard(interrupted=lambda: "kept in /x")(stopped)() == cli.INTERRUPTED
    assert err.getvalue() == "interrupted (Ctrl-C); kept in /x\n"
    for module in ("train_medusa", "train_eagle"):
        source = (Path(cli.__file__).parent / f"{module}.py").read_text()
        assert 'interrupted="training goes on from its last checkpoint' in source


def test_a_failure_under_a_progress_bar_starts_a_line_of_its_own():
    """The ``error:`` line came straight after a progress bar's ``\r decoding: 0%|...`` (a bar ends its line only
    when it closes), so a script's ``grep '^error:'`` missed it; a Ctrl-C line likewise."""
    import contextlib
    import io

    from tqdm import tqdm

    from experiments import cli
    from specdec.errors import ConfigError

    for raised, line in ((ConfigError("drafter.merge=true needs ..."), "\nerror: drafter.merge=true needs ...\n"),
                         (KeyboardInterrupt(), "\ninterrupted (Ctrl-C)\n")):
        err, bars = io.StringIO(), []  # the bar held, as a loop's frame holds it while the error is reported

        def failing(raised=raised, err=err, bars=bars):
            bars.append(tqdm(total=3, desc="decoding", file=err))
            bars[-1].update(1)
            raise raised

        with contextlib.redirect_stderr(err):
            assert cli.guard()(failing)() in (2, cli.INTERRUPTED)
        assert line in err.getvalue() and "decoding:" in err.getvalue()


@pytest.mark.parametrize("text, error, where", [("x = 1\ny = undefined_name\n", "NameError", "mine.py:2 (<module>)"),
                                               ("x = 1\ndef f(:\n", "SyntaxError", "mine.py:2")])
def test_a_mistake_in_a_module_imported_before_the_guard_still_gets_the_bug_line(text, error, where, tmp_path):
    """A module of one's own that a command imports at start (a drafter added to ``drafters/`` with a NameError
    or a syntax error in it, imported by a package's ``__init__``) fails before :func:`cli.guard` runs: the
    traceback is followed by the guard's line naming where it was raised, exit status 1 (it was a bare
    traceback)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from pkg.mine import *  # noqa\n")
    (tmp_path / "pkg" / "mine.py").write_text(text)
    code = f"import sys; sys.argv = ['-m']; import experiments; sys.path.insert(0, {str(tmp_path)!r}); import pkg"
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[0].startswith("Traceback") and error in lines[-2], proc.stderr
    here = os.path.realpath(tmp_path / "pkg")
    assert lines[-1].startswith(f"the traceback ends in {here}/{where}: if that is code of your own"), proc.stderr


def test_a_jobs_error_note_is_its_last_commands(tmp_path, monkeypatch, capsys):
    """A failed job leaves its error line in its directory; a later command there that succeeds or is cut by Ctrl-C
    removes it (the report said an interrupted run's last command failed, with an older command's error)."""
    from experiments import cli
    from specdec.errors import ConfigError

    monkeypatch.setattr(cli, "_job_dir", lambda: tmp_path)

    def job(outcome):
        def task():
            if outcome == "error":
                raise ConfigError("k=0: it must be >= 1")
            if outcome == "ctrl-c":
                raise KeyboardInterrupt
        return cli._job(cli.guard(on_failure=cli._note_job_error)(task))
    note = tmp_path / cli.JOB_ERROR_FILE
    for outcome, status in (("error", 2), ("ctrl-c", cli.INTERRUPTED)):
        with pytest.raises(SystemExit) as exit_:
            job("error")()
        assert exit_.value.code == 2 and note.read_text() == "error: k=0: it must be >= 1\n"
        with pytest.raises(SystemExit) as exit_:
            job(outcome)()
        assert exit_.value.code == status and note.is_file() == (outcome == "error")
    with pytest.raises(SystemExit):
        job("error")()
    job("ok")()
    assert not note.exists()


# --------------------------------------------------------------------------- Hydra's flags among the overrides


@pytest.mark.parametrize("args", [
    ["a=1", "-m", "b=2,3"], ["a=1", "--cfg", "job", "b=2"], ["a=1", "-c", "job", "-p", "drafter", "~b", "+c=1"],
    ["a=1", "--info"], ["a=1", "-i", "config", "b=2"], ["-cn", "config", "a=1", "--info"],
    ["--cfg=job", "a=1", "--multirun", "-m", "++c=2", "key=-1"], ["a=1", "b=2"], ["-m", "a=1"],
])
def test_hydra_flags_go_after_the_overrides_meaning_what_they_meant(args):
    """Hydra's parser reads the reordered arguments as argparse's intermixed reading of the given ones, where Hydra's
    own stopped at a usage dump (an override after a flag); a repeated -m is kept once. The first version moved the
    flags first, which made a bare ``--info`` take the next override as its value."""
    from hydra._internal.utils import get_args_parser

    from experiments.overrides import hydra_flags_last

    parser = get_args_parser()
    meant = vars(parser.parse_intermixed_args(args))
    assert vars(parser.parse_args(hydra_flags_last(args))) == meant
    # argparse itself takes b=2 for --info's value (an invalid choice): an override it is, as --info takes no other
    assert hydra_flags_last(["a=1", "--info", "b=2"]) == ["a=1", "b=2", "--info"]


@pytest.mark.parametrize("args", [["a=1", "--cf", "job", "b=2"], ["a=1", "-cjob"], ["a=1", "--config-n", "x"]])
def test_an_abbreviated_flag_leaves_the_arguments_as_given(args):
    """argparse reads abbreviations, and which argument is their value is its business (moving ``job`` of ``--cf
    job`` to the overrides broke a command that ran before)."""
    from experiments.overrides import hydra_flags_last

    assert hydra_flags_last(args) == args


def test_a_flag_after_the_overrides_runs_instead_of_a_usage_dump(tmp_path):
    """``key=a --cfg job key=b`` stopped at Hydra's usage dump ("unrecognized arguments")."""
    proc = run_cli("num_prompts=1", "--cfg", "job", "drafter.num_speculative_tokens=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "num_prompts: 1" in proc.stdout and "num_speculative_tokens: 3" in proc.stdout
    assert not (tmp_path / "records.jsonl").exists()  # --cfg prints the config and runs nothing
