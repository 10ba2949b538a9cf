"""Timing alternatives on this machine, for the settings that ``auto`` decides by measurement.

The alternatives take turns call by call and each call counts its fastest of ``reps``, so a machine that
is busy for a while slows them alike instead of the one that happened to run then.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import torch

#: The share of the current choice's time an alternative must stay under for ``auto`` to take it: a margin, so that
#: timing noise on a busy machine does not flip a setting between near-equal choices.
MARGIN = 0.85


def clearly_faster(seconds: float, than: float) -> bool:
    """Whether an alternative timed at ``seconds`` beats one timed at ``than`` by :data:`MARGIN`."""
    return seconds < MARGIN * than


def fastest_seconds(calls: dict[Hashable, Callable[[], object]], reps: int = 7) -> dict[Hashable, float]:
    """``{key: seconds}``: the fastest of ``reps`` timed runs of each call, after one untimed round (a first call
    may pack, allocate or compile). Runs under ``torch.inference_mode``."""
    best: dict[Hashable, float] = {}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                elapsed = time.perf_counter() - start
                if rep:
                    best[key] = min(best.get(key, elapsed), elapsed)
    return best
