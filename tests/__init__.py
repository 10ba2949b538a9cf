"""specdec's tests. :func:`repo_env` is the environment of a test's subprocess."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_env(**extra: str) -> dict:
    """``os.environ`` with the repository first on ``PYTHONPATH``, ahead of what was there (packages carried
    to a machine as wheels, e.g. ``scripts/gpu_wheels.sh``'s /tmp/site), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
