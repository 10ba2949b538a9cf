"""Files that a reader never sees half-written: write a temp file beside the target, then rename.

One home for every atomic write of the project (results, summaries, cost curves, prompt files,
checkpoints, heads and their JSON), so a process killed mid-write leaves the old file or the new
one, never a mix, and no stray temp file when the write fails.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` with the name of a new temp file beside ``path``, then move it onto ``path``.

    The temp file is removed if ``write`` (or the move) fails; ``path`` is then unchanged. ``path`` gets the
    permissions a plain write would leave: a new file the umask's (or the directory's default ACL's), a rewritten
    one its own (a temp file made as ``mkstemp`` makes them, 0600, left every result, summary and cache file of a
    shared directory unreadable by the others).
    """
    path = Path(path)
    tmp = _new_temp(path)
    try:
        write(tmp)
        # a rewritten file keeps its bits; a new one (nothing to stat) the umask's; a file system without them, its own
        with contextlib.suppress(OSError):
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_temp(path: Path) -> str:
    """A new empty file ``.<name>.<random>.tmp`` beside ``path``, made with mode 0666 so that the kernel applies
    the umask (or a default ACL) as it does to a plain ``open(path, "w")``."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> None:
    """Replace ``path`` with ``data`` as JSON atomically (``dump_kwargs`` go to :func:`json.dumps`)."""
    atomic_write_text(path, json.dumps(data, **{"indent": 2, **dump_kwargs}) + "\n")


@contextlib.contextmanager
def held_lock(path: str | os.PathLike, waiting: Callable[[str], str], stream=None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` for the block; the file records the holder's pid.

    If another process holds it, print ``waiting(pid)`` on one line (to ``stream``, default stderr) and wait
    for it. The lock dies with its process (SIGKILL too), so a killed holder never blocks the next one. Where
    there is no ``fcntl`` (not POSIX) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            print(waiting(handle.read().strip() or "?"), file=stream or sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
