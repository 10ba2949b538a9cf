"""The failure contract of every command-line entry point.

- An error the user caused (config, keys, files, checkpoints, data, numerics, backend availability)
  ends as ONE line on stderr, ``error: <the problem, the file or key, the fix>``, and exit status 2.
- Anything else is a bug of ours: the traceback, then one line asking to report it; exit status 1.
- Ctrl-C and ``sys.exit`` pass through unchanged.

An argparse entry point wraps its ``main(argv) -> int`` in :func:`guard` (the wrapper returns 2 or 1
on failure); a Hydra app uses :func:`hydra_main` instead of ``@hydra.main``, which also rejects
unknown ``+key`` overrides and reports Hydra's own compose-time errors (unknown option, wrong type,
a key not in the config) the same way. Importing this module imports neither hydra, omegaconf nor
wandb (``experiments.bench`` uses it).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Errors a user causes, as ``module:Class``. Resolved only from modules already imported: a class whose
#: module was never imported cannot have been raised, and nothing here imports torch, hydra or the zoo.
INPUT_ERRORS = (
    "specdec.errors:SpecDecError",  # ConfigError, CheckpointError, PromptFileError, MedusaHeadsError, ...
    "specdec.errors:NonFiniteLogitsError",  # NaN/inf logits: the checkpoint or the dtype it runs in
    "builtins:ValueError",
    "builtins:FileNotFoundError",
    "builtins:PermissionError",
    "builtins:IsADirectoryError",
    "builtins:NotADirectoryError",
    "experiments.zoo.build:ZooError",
    "omegaconf.errors:MissingMandatoryValue",
    "omegaconf.errors:InterpolationResolutionError",
    "hydra.errors:CompactHydraException",  # compose time: unknown group option, wrong type, key not in the config
    "torch:OutOfMemoryError",  # the run's sizes do not fit the device: the fix is a smaller setting, not a bug report
)

from experiments.cli_args import (  # noqa: F401  (re-exported: the argparse entry points' argument types)
    ArgumentParser,
    _one_line,
    add_narrow_linears,
    int_at_least,
    ints_at_least,
    output_dir,
    output_file,
    temperature,
    temperatures,
    thresholds,
)
from experiments.cli_messages import GROUP_VALUE, misspelled_key, null_value, wrong_type

BUG_LINE = ("this is a bug in specdec, not a problem with your input: please report it with the command line "
            "and the traceback above")


def bug_line(exc: BaseException) -> str:
    """:data:`BUG_LINE`, after where the traceback ends in code of a project's own (not Python's library or an
    installed package): a drafter, rule or logger one wrote raises there, and then it is not specdec's bug."""
    where = where_raised(exc)  # in this project's packages too: a drafter one adds is often a module of drafters/
    return BUG_LINE if where is None else (f"the traceback ends in {where}: if that is code of your own (a drafter, "
                                           f"rule or logger you added), fix it there; otherwise {BUG_LINE}")


#: This project's package directories (a ValueError raised there is already worded for the user).
OUR_PACKAGES = tuple(str(Path(__file__).resolve().parent.parent / name) + os.sep
                     for name in ("specdec", "drafters", "verifier", "experiments", "specdec_kernels"))


def where_raised(exc: BaseException) -> str | None:
    """``file:line (function)`` of the innermost frame of ``exc``'s traceback outside the Python library and installed
    packages (a SyntaxError's: the file and line it names, ``file:line``), or None."""
    import site
    import sysconfig

    if isinstance(exc, SyntaxError) and exc.filename and not exc.filename.startswith("<"):
        return f"{os.path.realpath(exc.filename)}:{exc.lineno}"

    library = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    library |= {*getattr(site, "getsitepackages", list)(), site.getusersitepackages()}  # old virtualenvs lack one
    library = tuple(os.path.realpath(p) + os.sep for p in library)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = os.path.realpath(frame.filename)
        if not path.startswith(library) and not frame.filename.startswith("<"):
            return f"{path}:{frame.lineno} ({frame.name})"
    return None


#: What to do about a file system error, by errno (:func:`error_message`); a full, read-only or over-quota disk
#: is the machine's state, not a bug: one error line (:func:`report_failure`).
OS_FIXES = {
    errno.ENOENT: "that path (or a directory on it) does not exist, or cannot be made there: check it, or pick a path "
                  "in a directory you can write",
    errno.EACCES: "you may not read or write there: pick a path you can",
    errno.EPERM: "you may not read or write there: pick a path you can",
    errno.ENOSPC: "the disk is full: free some space, or write elsewhere (hydra.run.dir=, out_dir=, cache_dir=)",
    errno.EROFS: "a read-only file system: write elsewhere (hydra.run.dir=, out_dir=, cache_dir=)",
    errno.EDQUOT: "over the disk quota: free some space, or write elsewhere (hydra.run.dir=, out_dir=, cache_dir=)",
}
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def input_error_types(extra: tuple = ()) -> tuple[type, ...]:
    """The classes of :data:`INPUT_ERRORS` whose modules are imported, plus ``extra``."""
    found = []
    for spec in INPUT_ERRORS:
        module, name = spec.split(":")
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found) + tuple(extra)


def _join_lines(lines: list[str]) -> str:
    """Message lines as one: sentences joined with '. ', an indented list after a ':' with ', '."""
    out, listing = "", False
    for raw in lines:
        line = " ".join(raw.split())
        if raw[:1].isspace() and (listing or out.endswith(":")):
            out += (", " if listing else " ") + line
            listing = True
            continue
        listing = False
        out += ("" if not out else " " if out.endswith((".", ":", ";", ",")) else ". ") + line
    return out


def error_message(exc: BaseException) -> str:
    """``exc`` as one line: the problem, the key or file, the fix."""
    full_key = getattr(exc, "full_key", None)
    if type(exc).__name__ == "MissingMandatoryValue" and full_key:
        return f"{full_key} is required and has no value: set {full_key}=<value> on the command line"
    if type(exc).__name__ == "OverrideParseException":
        lines = [line for line in str(exc).splitlines() if line.strip() and line.strip() != "^"]
        text = _one_line(" ".join(line for line in lines if not line.startswith("See ")))
        override = getattr(exc, "override", None)
        said = text if not override or override in text else f"{override}: {text}"  # the override named once
        if override and re.search(r"\s\S+=", override):  # several overrides in one quoted argument
            return f"{said}: Hydra cannot parse this override; give each key=value as its own argument"
        if "LexerNoViableAlt" not in text:  # not a character the grammar rejects: Hydra's words are the best
            return f"{said}: Hydra cannot parse this override (key=value; see its override grammar)"
        return (f"{text}: Hydra cannot parse this override; a value with characters such as ~ ( ) or spaces "
                f"needs Hydra quotes inside shell quotes, e.g. \"drafter.heads='~/my heads'\"")
    if type(exc).__module__.startswith(("omegaconf", "hydra")):
        text = str(exc).split("Config search path:")[0]  # Hydra lists its search path after the options
        lines = [line for line in text.splitlines()
                 if line.strip() and not line.strip().startswith(("full_key:", "object_type=", "reference_type="))]
        cause = exc.__cause__
        if cause is not None and type(cause).__module__.startswith("omegaconf") and str(cause).strip():
            lines.append(str(cause).strip().splitlines()[0])
        text = _join_lines(lines) or type(exc).__name__
        return misspelled_key(text, cause) or wrong_type(text) or null_value(text) or text
    if isinstance(exc, OSError) and exc.strerror and (exc.filename or exc.errno in OS_FIXES):
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)  # os.replace names both
        return ": ".join(part for part in (exc.strerror, paths, OS_FIXES.get(exc.errno, "check the path")) if part)
    text = _one_line(str(exc)) or type(exc).__name__
    if type(exc).__name__ == "OutOfMemoryError":
        first = ". ".join(text.split(". ")[:2])  # what ran out and the request; torch goes on about the allocator
        return (f"out of device memory ({first}): lower the batch size, max_new_tokens, the draft size or the "
                f"prompt length, or load the models in bfloat16 (decode: model.dtype=bfloat16)")
    if text.startswith("Config group override must be a string"):  # Hydra's, for e.g. tree=null
        text += ": a config group takes one of its option names (e.g. tree=none, not tree=null)"
    return text


def _raised_in(exc: BaseException, path_end: str) -> bool:
    """Whether ``exc`` was raised in a file whose path ends with ``path_end`` (its innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.replace("\\", "/").endswith(path_end)


def report_failure(exc: Exception, extra_input_errors: tuple = ()) -> tuple[int, str]:
    """Print the one ``error:`` line (user errors, status 2) or the traceback and :data:`BUG_LINE` (status 1);
    returns the status and the line that sums the failure up (the ``error:`` line; for a bug ``bug: <type>: ...``)."""
    from specdec.errors import out_of_memory

    exc = out_of_memory(exc) or exc  # an OOM wrapped by the compiler or a failed capture is still one
    if isinstance(exc, input_error_types(extra_input_errors)) or (isinstance(exc, OSError) and exc.errno in DISK_ERRNOS):
        where = where_raised(exc) if type(exc) is ValueError else None  # a bare ValueError: maybe a plugin's own check
        note = f" (ValueError raised at {where})" if where and not where.startswith(OUR_PACKAGES) else ""
        line = f"error: {error_message(exc)}{note}"
        print(line, file=sys.stderr)
        return 2, line
    if isinstance(exc, TypeError) and _raised_in(exc, "hydra/_internal/defaults_list.py"):
        print(f"error: {GROUP_VALUE}", file=sys.stderr)  # Hydra's own TypeError on e.g. tree=[[0],[1]]
        return 2, f"error: {GROUP_VALUE}"
    traceback.print_exception(exc)
    print(bug_line(exc), file=sys.stderr)
    return 1, f"bug: {type(exc).__name__}: {_one_line(str(exc))} (its traceback went to stderr)"


def end_progress_bars() -> None:
    """Close the progress bars a failed command left drawn, so that what is printed next starts a line of its own
    (a bar's line has no newline until it closes)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a bar half torn down must not hide the failure
            bar.close()


def _restore_interrupts() -> None:
    """Python's own Ctrl-C handler (KeyboardInterrupt) again, in place of the one-line exit that
    ``experiments/__init__.py`` sets while a command's modules import."""
    from experiments import _interrupted_while_starting

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is _interrupted_while_starting):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def guard(*extra_input_errors: type[BaseException], interrupted: str | Callable[[], str] = "",
          on_failure: Callable[[str], None] | None = None) -> Callable:
    """Decorator for an argparse ``main(argv) -> int``: a failure becomes exit status 2 (user error, one
    line) or 1 (bug, traceback); ``extra_input_errors`` are the entry point's own user-error classes. Ctrl-C is
    one line (exit status 130) and ``interrupted``, what the entry point keeps of an interrupted run (or a function
    saying it, called then). ``on_failure(line)`` is given the failure's line (:func:`report_failure`) after it is
    printed. Either line starts a line of its own: progress bars still drawn are closed first."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _restore_interrupts()
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                end_progress_bars()
                note = interrupted() if callable(interrupted) else interrupted
                print("interrupted (Ctrl-C)" + (f"; {note}" if note else ""), file=sys.stderr)
                return INTERRUPTED
            except Exception as exc:  # SystemExit passes through
                end_progress_bars()
                status, line = report_failure(exc, extra_input_errors)
                if on_failure is not None:
                    on_failure(line)
                return status
        return wrapper
    return decorate


@contextlib.contextmanager
def _hydra_errors_raised() -> Iterator[None]:
    """Let exceptions out of ``@hydra.main`` instead of Hydra printing them (HYDRA_FULL_ERROR=1) while inside."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def hydra_main(config_name: str, *extra_input_errors: type[BaseException], config_path: str = "../conf",
               interrupted: str | Callable[[], str] = "") -> Callable:
    """``@hydra.main`` with the contract: use ``@cli.hydra_main("config")`` on a task ``main(cfg)``
    (``interrupted``: what the task keeps of a run cut by Ctrl-C, for its one line).

    The task runs after :func:`experiments.overrides.check_added_keys`; its failures and Hydra's
    compose-time errors (unknown option, wrong type, a key not in the config) follow the contract,
    and the process exits with 2 or 1. ``config_path`` is relative to the task's module, as for Hydra.
    """
    import hydra

    def decorate(task: Callable) -> Callable:
        @functools.wraps(task)
        def checked_task(cfg: Any) -> Any:
            from experiments.overrides import (
                check_added_keys,
                check_group_choices,
                check_value_types,
                primary_config_defaults,
            )

            check_group_choices()
            check_added_keys(cfg)
            check_value_types(cfg, primary_config_defaults())
            return task(cfg)

        guard_task = guard(*extra_input_errors, interrupted=interrupted)
        job_guard = guard(*extra_input_errors, interrupted=interrupted, on_failure=_note_job_error)
        guarded_task = _job(job_guard(checked_task))  # inside Hydra: no "Error executing job"
        app = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(guarded_task)
        guarded_app = _exiting(guard_task(app))

        @functools.wraps(app)
        def main() -> None:
            from experiments.overrides import hydra_flags_last

            sys.argv[1:] = hydra_flags_last(sys.argv[1:])
            with _failed_jobs() as failed, _hydra_errors_raised():  # compose-time errors reach guarded_app
                guarded_app()
                failures = sorted(json.loads(p.read_text()) for p in failed.glob("*.json"))
            if failures:  # a sweep whose other jobs ran on
                labels = ", ".join(label for _, label, _ in failures)
                print(f"error: {len(failures)} job(s) of this sweep failed ({labels}), each with its own error "
                      "line above; the other jobs ran, and rerunning the sweep skips the finished ones", file=sys.stderr)
                sys.exit(max(status for *_, status in failures))
        return main
    return decorate


#: The exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130

#: The environment variable naming the directory where a sweep's failed jobs leave a note each: a launcher may
#: run jobs in other processes (joblib), so the sweep's process reads them from files.
FAILED_JOBS_ENV = "SPECDEC_FAILED_JOBS_DIR"


@contextlib.contextmanager
def _failed_jobs() -> Iterator[Path]:
    """A fresh directory for the failed jobs' notes, named in the environment for the jobs (and their workers)."""
    previous = os.environ.get(FAILED_JOBS_ENV)
    with tempfile.TemporaryDirectory(prefix="specdec-failed-jobs-") as directory:
        os.environ[FAILED_JOBS_ENV] = directory
        try:
            yield Path(directory)
        finally:
            if previous is None:
                os.environ.pop(FAILED_JOBS_ENV, None)
            else:
                os.environ[FAILED_JOBS_ENV] = previous


#: The file in a Hydra job's output directory holding the line its failure printed (removed when the next command
#: there starts): a run that failed before writing results still says why in ``experiments.report``.
JOB_ERROR_FILE = "error.txt"


def _job_dir() -> Path | None:
    """The running Hydra job's output directory (None outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def _note_job_error(line: str) -> None:
    """Keep a failed Hydra job's line in its directory (:data:`JOB_ERROR_FILE`); a disk that refuses it loses
    only the note (the line is on stderr)."""
    with contextlib.suppress(OSError):
        if (directory := _job_dir()) is not None and directory.is_dir():
            (directory / JOB_ERROR_FILE).write_text(line + "\n", encoding="utf-8")


def _job(guarded: Callable) -> Callable:
    """A Hydra job: its failure (already printed by :func:`guard`) ends a single run with its exit status; in a
    sweep (``-m``) it is noted and the sweep goes on to the next job, so one bad config loses no other job's work."""
    @functools.wraps(guarded)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(OSError):  # an earlier command's failure note: this command's outcome replaces it
            if (directory := _job_dir()) is not None:
                (directory / JOB_ERROR_FILE).unlink(missing_ok=True)
        result = guarded(*args, **kwargs)
        if not (isinstance(result, int) and result):
            return result
        from hydra.core.hydra_config import HydraConfig

        from experiments.overrides import in_multirun

        if not in_multirun() or result == INTERRUPTED:  # Ctrl-C ends a sweep
            sys.exit(result)
        hydra_cfg = HydraConfig.get()
        num, label = hydra_cfg.job.num, f"#{hydra_cfg.job.num} {hydra_cfg.job.override_dirname or '(no overrides)'}"
        if notes := os.environ.get(FAILED_JOBS_ENV):  # unset only where a task is run outside hydra_main's main
            Path(notes, f"{num}.json").write_text(json.dumps([num, label, result]))
        return None
    return wrapper


def _exiting(guarded: Callable) -> Callable:
    """Exit with the status a :func:`guard` ed function returns on failure (Hydra tasks return None)."""
    @functools.wraps(guarded)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = guarded(*args, **kwargs)
        if isinstance(result, int) and result:
            sys.exit(result)
        return result
    return wrapper
