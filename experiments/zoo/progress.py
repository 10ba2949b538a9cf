"""A zoo build that goes on after Ctrl-C, a failure or a killed process instead of starting again.

The pair builds in ``<cache>/zoo/.<size>.partial/`` (under the entry's lock), kept when the build stops: the tokenizer
as soon as it is trained, and each training phase's model, optimizer, step and figures (``target.ckpt``,
``draft.ckpt``) every :data:`CHECKPOINT_S` seconds and at the phase's end (then the model alone). The next build with
the same :func:`build_key` (size, seed, device type, autocast dtype, the training code's :data:`FORMAT`, torch,
transformers, tokenizers and Python versions, a CPU build's instruction set) goes on from there with the batches after
the saved step, in the same seeded order: on a CPU with the same threads it ends with the very pair an uninterrupted
build makes (on a GPU, one trained on the same batches). A partial build of another key is removed with a warning, as
is one that ``force=true`` rebuilds. The manifest leaves out what only a partial build needs, which is removed just
before the directory is published as ``<cache>/zoo/<size>``.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import time
from pathlib import Path

import torch

from specdec.files import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

#: Seconds of training between a phase's checkpoints: a stopped build loses at most this much training.
CHECKPOINT_S = 60.0
#: The training code's version in :func:`build_key`: bump it when a change to the training would make a checkpoint of
#: the earlier code go on into a pair that neither version makes (schedule, loss, data, tokenizer settings).
FORMAT = 1
KEY_FILE = "build_key.json"
SESSIONS_FILE = "sessions.json"
CHECKPOINT_SUFFIX = ".ckpt"


def build_key(size: dict, seed: int, device_type: str, amp_dtype: object) -> dict:
    """What a partial build must match to be gone on from (as JSON reads it back)."""
    import tokenizers
    import transformers

    key = {"format": FORMAT, "size": size, "seed": seed, "device": device_type, "amp_dtype": str(amp_dtype),
           "torch": torch.__version__, "python": platform.python_version(),
           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}  # init, tokenizer training
    if device_type == "cpu":  # the kernels' instruction set changes the numerics (the same build on AVX2 and AVX-512)
        key["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return json.loads(json.dumps(key))


def partial_dir(parent: Path, name: str, key: dict, fresh: bool = False) -> tuple[Path, bool]:
    """``(<parent>/.<name>.partial, whether it holds a stopped build of ``key`` to go on from)``. One of another key
    (or ``fresh``) is removed first, with a warning. Call it holding the entry's lock."""
    path = parent / f".{name}.partial"
    if path.is_dir():
        try:
            found = json.loads((path / KEY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        if found == key and not fresh:
            _remove_temp_files(path)  # a save killed mid-write
            return path, True
        why = "force=true" if fresh else (
            "its settings differ: " + ", ".join(k for k in key if found.get(k) != key[k]) if isinstance(found, dict)
            else "it holds no readable build key")
        log.warning("zoo %s: removing the stopped build in %s (%s)", name, path, why)
        shutil.rmtree(path)
    path.mkdir(parents=True)
    atomic_write_json(path / KEY_FILE, key)
    return path, False


def _remove_temp_files(path: Path) -> None:
    for temp in path.glob(".*.tmp"):
        temp.unlink()


def earlier_sessions(path: Path) -> dict:
    """What the build's earlier sessions in ``path`` spent: ``{"seconds", "count", "tokenizer_s"}``."""
    try:
        return json.loads((path / SESSIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"seconds": 0.0, "count": 0, "tokenizer_s": None}


def note_session(path: Path, seconds: float = 0.0, tokenizer_s: float | None = None) -> None:
    """Add a stopped session's ``seconds`` (and the tokenizer's training time, once known) to ``path``'s record."""
    record = earlier_sessions(path)
    record["seconds"] += seconds
    record["count"] += 1 if seconds else 0
    if tokenizer_s is not None:
        record["tokenizer_s"] = tokenizer_s
    atomic_write_json(path / SESSIONS_FILE, record)


def partial_only(rel: str) -> bool:
    """Whether the file ``rel`` (relative to the build's dir) is one only a stopped build needs: the manifest leaves it
    out, :func:`finish` removes it."""
    name = Path(rel).name
    return "/" not in rel and (name.endswith(CHECKPOINT_SUFFIX) or name in (SESSIONS_FILE, KEY_FILE)
                               or (name.startswith(".") and name.endswith(".tmp")))


def finish(path: Path) -> None:
    """Remove what only a stopped build needs (:func:`partial_only`: checkpoints, temp files, sessions, the key last),
    after the manifest that leaves them out and just before the build is published: a build cut while its manifest
    is written goes on from its checkpoints."""
    files = [file for file in path.iterdir() if file.is_file() and partial_only(file.name)]
    for file in sorted(files, key=lambda file: file.name == KEY_FILE):
        file.unlink()


class PhaseCheckpoint:
    """One training phase's progress in ``path`` (None: nothing is saved or restored)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.saved = time.monotonic()

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float, float]:
        """Load the saved model (and optimizer, unless the phase ended) state; returns ``(steps done, seconds
        spent, last loss)``, or ``(0, 0.0, nan)`` when nothing (readable) was saved."""
        if self.path is None or not self.path.is_file():
            return 0, 0.0, math.nan
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (a truncated or foreign file: the phase starts again)
            log.warning("%s is unreadable (%s: %s); training this phase from its start", self.path,
                        type(exc).__name__, exc)
            self.path.unlink()
            return 0, 0.0, math.nan
        model.load_state_dict(state["model"])
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), float(state["elapsed"]), float(state["last"])

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, elapsed: float, last: float,
             final: bool = False) -> None:
        """Save after ``step`` steps if :data:`CHECKPOINT_S` seconds passed since the last save; ``final`` (the
        phase's last step): now, and the model alone (nothing trains it further)."""
        if self.path is None or (not final and time.monotonic() - self.saved < CHECKPOINT_S):
            return
        state = {"model": model.state_dict(), "step": step, "elapsed": elapsed, "last": last}
        if not final:
            state["optimizer"] = optimizer.state_dict()
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        self.saved = time.monotonic()


def checkpoint_of(out_dir: Path, phase: str) -> PhaseCheckpoint:
    """The checkpoint of training phase ``phase`` (``target``, ``draft``) of the build in ``out_dir``."""
    return PhaseCheckpoint(out_dir / f"{phase}{CHECKPOINT_SUFFIX}")
