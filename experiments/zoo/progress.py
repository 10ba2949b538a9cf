"""A zoo build that goes on after Ctrl-C (or a killed process) instead of starting again.

The pair builds in ``<cache>/zoo/.<size>.partial/``, kept when the build is interrupted: the tokenizer as soon as it
is trained, and each training phase's model, optimizer, step and figures (``target.ckpt``, ``draft.ckpt``) every
:data:`CHECKPOINT_S` seconds and at the phase's end. The next build of the same size, seed, device type and autocast
dtype (its ``build_key.json``) goes on from there, the batches after the saved step in the same seeded order, so it
ends with the pair an uninterrupted build makes; a partial build of other settings is removed. The checkpoints are
removed before the manifest is written and the directory is published as ``<cache>/zoo/<size>``.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from specdec.files import atomic_write, atomic_write_json

#: Seconds of training between a phase's checkpoints: an interrupted build loses at most this much training.
CHECKPOINT_S = 60.0
KEY_FILE = "build_key.json"
CHECKPOINT_SUFFIX = ".ckpt"


def partial_dir(parent: Path, name: str, key: dict) -> tuple[Path, bool]:
    """``(<parent>/.<name>.partial, whether it holds an interrupted build of ``key`` to go on from)``; a partial
    build of another key (or with an unreadable one) is removed first. Call it holding the entry's lock."""
    path, key = parent / f".{name}.partial", json.loads(json.dumps(key))  # as the file holds it (lists, not tuples)
    if path.is_dir():
        try:
            if json.loads((path / KEY_FILE).read_text(encoding="utf-8")) == key:
                return path, True
        except (OSError, ValueError):
            pass  # not a partial build this code can go on from
        shutil.rmtree(path)
    path.mkdir(parents=True)
    atomic_write_json(path / KEY_FILE, key)
    return path, False


def finish(path: Path) -> None:
    """Remove what only an interrupted build needs (key, checkpoints) before the manifest lists the files."""
    (path / KEY_FILE).unlink(missing_ok=True)
    for checkpoint in path.glob(f"*{CHECKPOINT_SUFFIX}"):
        checkpoint.unlink()


class PhaseCheckpoint:
    """One training phase's progress in ``path`` (None: nothing is saved or restored)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.saved = time.monotonic()

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float, float]:
        """Load the saved model and optimizer state; returns ``(steps done, seconds spent, last loss)``, or
        ``(0, 0.0, nan)`` when nothing was saved."""
        if self.path is None or not self.path.is_file():
            return 0, 0.0, math.nan
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), float(state["elapsed"]), float(state["last"])

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, elapsed: float, last: float,
             force: bool = False) -> None:
        """Save after ``step`` steps if :data:`CHECKPOINT_S` seconds passed since the last save (or ``force``)."""
        if self.path is None or (not force and time.monotonic() - self.saved < CHECKPOINT_S):
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
                 "last": last}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        self.saved = time.monotonic()


def checkpoint_of(out_dir: Path, phase: str) -> PhaseCheckpoint:
    """The checkpoint of training phase ``phase`` (``target``, ``draft``) of the build in ``out_dir``."""
    return PhaseCheckpoint(out_dir / f"{phase}{CHECKPOINT_SUFFIX}")
