"""The embedded corpus: the running Python's standard-library source.

The corpus is every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` except test
packages and third-party packages. Files are split into ``train`` and ``heldout`` by a
sha256 hash of their POSIX path relative to the corpus root, so the split is stable
across machines and Python patch versions (a file keeps its split as long as its
relative path is unchanged).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

HELDOUT_PERCENT = 5  # about 5% of files are held out
SPLITS = ("train", "heldout")

_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class CorpusError(ValueError):
    """The corpus directory is missing or holds no usable Python files."""


def default_corpus_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_excluded(rel_path: str) -> bool:
    """True for test files, test packages and third-party packages (POSIX relative path)."""
    parts = rel_path.split("/")
    if any(part in _EXCLUDED_DIRS for part in parts[:-1]):
        return True
    return parts[-1].startswith("test_")


def sha256_hex(text: str) -> str:
    """Hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(rel_path: str) -> str:
    """``"heldout"`` or ``"train"`` for a POSIX relative path; deterministic everywhere."""
    bucket = int(sha256_hex(rel_path)[:16], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _all_python_files(root: Path) -> list[tuple[str, Path]]:
    """Sorted (relative POSIX path, absolute path) of every included ``*.py`` under root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune, never descend
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if name.endswith(".py") and not is_excluded(rel) and path.is_file():
                found.append((rel, path))
    found.sort(key=lambda item: item[0])
    return found


def corpus_files(root: str | Path | None = None, split: str = "train") -> list[Path]:
    """Absolute paths of the corpus files in ``split`` ("train" or "heldout"), sorted.

    Raises ``CorpusError`` naming the directory if it does not exist or holds no
    included Python files, and ``ValueError`` for an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; use one of {SPLITS}")
    root = Path(root) if root is not None else default_corpus_root()
    if not root.is_dir():
        raise CorpusError(f"corpus directory {str(root)!r} does not exist or is not a directory")
    files = _all_python_files(root)
    if not files:
        raise CorpusError(
            f"corpus directory {str(root)!r} holds no Python (*.py) files outside test and "
            "site-packages directories; point the corpus root at a Python source tree"
        )
    return [path for rel, path in files if split_of(rel) == split]


def read_text(path: Path) -> str:
    """A corpus file's text (UTF-8, undecodable bytes replaced), '' if unreadable."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def top_level_module(path: Path, root: str | Path | None = None) -> str:
    """The top-level module name of a corpus file, e.g. ``json`` for ``json/decoder.py``."""
    root = Path(root) if root is not None else default_corpus_root()
    first = path.relative_to(root).parts[0]
    return first.removesuffix(".py")


def hash_order(files: list[Path], root: str | Path | None = None) -> list[Path]:
    """``files`` in a deterministic pseudo-random order (sha256 of the relative path)."""
    root = Path(root) if root is not None else default_corpus_root()
    return sorted(files, key=lambda path: sha256_hex("order:" + path.relative_to(root).as_posix()))
