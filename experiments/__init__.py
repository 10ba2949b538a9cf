"""Hydra entry points and experiment helpers (decode runs, sweeps, the embedded model zoo)."""
import signal
import sys


def _interrupted_while_starting(signum, frame):
    """Ctrl-C while a command's modules import (torch, transformers: seconds): one line and exit status 130,
    not a traceback through the import machinery. :func:`experiments.cli.guard` restores Python's own handler
    when the command starts, so a run's Ctrl-C is handled there (it keeps what the run wrote)."""
    print("interrupted (Ctrl-C) while the command was starting; nothing ran", file=sys.stderr)
    sys.exit(130)


def _bug_line_after(exc_type, exc, tb):
    """An exception no entry point caught (one raised while the command's modules import, before
    :func:`experiments.cli.guard` runs: a module of one's own added to ``drafters/`` with a mistake in it): its
    traceback, then the line the guard gives a bug, which names where the traceback ends."""
    sys.__excepthook__(exc_type, exc, tb)
    if isinstance(exc, Exception):
        try:
            from experiments.cli import bug_line

            print(bug_line(exc), file=sys.stderr)
        except Exception:  # noqa: BLE001, S110  (the traceback above is already out)
            pass


# only when a command of this package is being started (python -m experiments.<command>) and nobody set a handler
if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
if sys.argv[:1] == ["-m"] and sys.excepthook is sys.__excepthook__:
    sys.excepthook = _bug_line_after
