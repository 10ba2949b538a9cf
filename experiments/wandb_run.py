"""W&B runs that cannot cost a decode run: a bounded start with an offline fallback, one run per directory.

- :func:`start_wandb` starts a run. Online, it first checks that the server answers (one HTTP request
  bounded by ``timeout``) and bounds ``wandb.init`` by the same time; if either fails it prints ONE
  warning and logs the run offline instead (upload it later with ``wandb sync``). Local results are
  written before and independently of it (:mod:`experiments.results`).
- :class:`RunState` keeps a run directory's W&B run id in ``wandb_run.json``, so a resumed run, or a
  rerun that back-fills a missing summary, continues its own W&B run (``resume="allow"``), and
  records whether the summary reached it and how many decode steps it was sent (a resumed run's
  ``decode_step`` series goes on after them).

wandb is imported only inside the functions: everything here is used behind
:class:`experiments.loggers.GuardedLogger` or an equivalent guard.
"""
from __future__ import annotations

import json
import os
import secrets
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The W&B run of a run directory: ``{"id": ..., "summary_logged": bool, "steps": int}``.
STATE_FILE = "wandb_run.json"
#: Seconds an online start may take (server check, then ``wandb.init``) before logging goes offline.
DEFAULT_INIT_TIMEOUT = 10.0

#: Servers found unreachable in this process (base URL -> reason): later runs of a sweep go offline at once.
_UNREACHABLE: dict[str, str] = {}


@dataclass
class RunState:
    """The W&B run of one run directory. ``existed``: it was read from ``wandb_run.json`` (the W&B run
    already received this run's config and records), not made up now. ``steps``: the ``decode_step``s
    it was sent (0 in files written before they were counted)."""

    path: Path
    run_id: str
    summary_logged: bool = False
    existed: bool = False
    steps: int = 0

    @classmethod
    def load(cls, run_dir: str | Path) -> RunState:
        """The state in ``run_dir``; without ``wandb_run.json``, the newest W&B run already in ``run_dir/wandb``
        (a run logged before the state was kept, or killed before writing it), else a fresh id (not
        written until :meth:`save`)."""
        path = Path(run_dir) / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, str(data["id"]), bool(data.get("summary_logged")), existed=True,
                       steps=_count(data.get("steps")))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        earlier = sorted((p.name for p in (Path(run_dir) / "wandb").glob("*run-*-*") if not p.is_symlink()),
                         key=lambda name: name.split("run-", 1)[1])  # by start time: run-<time>-<id>
        if earlier:  # its summary state is unknown: count it as logged rather than make a second W&B run
            return cls(path, earlier[-1].rsplit("-", 1)[1], summary_logged=True, existed=True)
        return cls(path, new_run_id())

    def save(self) -> None:
        """Write ``wandb_run.json`` atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".wandb_run.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"id": self.run_id, "summary_logged": self.summary_logged, "steps": self.steps}, handle)
        os.replace(tmp, self.path)


def _count(value: Any) -> int:
    """A non-negative integer read from the state file, else 0 (a damaged count loses only the step offset)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


#: Where a resumed offline run's earlier offline files go (under ``run_dir/wandb``): out of ``offline-run-*``'s way.
SUPERSEDED_DIR = "superseded"


def offline_parts(run_dir: str | Path, run_id: str) -> list[Path]:
    """The offline W&B files of run ``run_id`` in ``run_dir/wandb`` (``offline-run-*-<id>``: logged offline, or online
    with a server that did not answer)."""
    return sorted(p for p in (Path(run_dir) / "wandb").glob(f"offline-run-*-{run_id}") if not p.is_symlink())


def set_aside(parts: list[Path]) -> list[Path]:
    """Move ``parts`` (:func:`offline_parts`) into their ``wandb`` directory's :data:`SUPERSEDED_DIR`; returns where
    they went. ``wandb sync`` of offline runs that share an id keeps the last one synced (wandb/wandb#3841), so a
    resumed run that had offline parts is sent everything again (its kept records first) and the earlier parts step
    aside, kept, out of ``wandb sync <run_dir>/wandb/offline-run-*``'s way (and unable to replace the new run)."""
    moved = []
    for path in parts:
        (path.parent / SUPERSEDED_DIR).mkdir(exist_ok=True)
        moved.append(path.parent / SUPERSEDED_DIR / path.name)
        os.replace(path, moved[-1])
    return moved


def new_run_id() -> str:
    """A fresh W&B run id: 12 lowercase letters and digits (the characters W&B uses)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(12))


def server_problem(base_url: str, timeout: float) -> str | None:
    """Why the W&B server at ``base_url`` cannot be reached within ``timeout`` seconds, or None when it answers
    (any HTTP status counts as an answer; proxies from the environment are used)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(base_url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return None


def start_wandb(init_kwargs: dict, timeout: float = DEFAULT_INIT_TIMEOUT, stream: Any = None):
    """``wandb.init(**init_kwargs)``, online within ``timeout`` seconds or else offline after one warning."""
    import wandb

    kwargs = dict(init_kwargs)
    if kwargs.get("mode") != "online":
        return wandb.init(**kwargs)
    url = str(wandb.setup().settings.base_url)
    problem = _UNREACHABLE.get(url) or server_problem(url, timeout)
    if problem is None:
        try:
            return wandb.init(**kwargs, settings=wandb.Settings(init_timeout=timeout))
        except Exception as exc:  # noqa: BLE001 - any failure to start online: fall back to offline
            problem = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            wandb.teardown()  # drop the half-started run, so that the offline one can take its id
    _UNREACHABLE[url] = problem
    where = Path(kwargs.get("dir") or ".") / "wandb"
    print(f"warning: W&B could not start online at {url} ({problem}; waited at most {timeout:g} s); logging this run "
          f"offline to {where} instead (upload later: wandb sync {where}/offline-run-*); local results are not "
          "affected", file=stream or sys.stderr, flush=True)
    return wandb.init(**{**kwargs, "mode": "offline"})
