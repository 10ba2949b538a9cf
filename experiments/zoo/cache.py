"""Atomic, verifiable cache entries: build in a temp dir, write a manifest last, rename.

An entry ``<parent>/<name>`` is valid only if it holds ``COMPLETE.json`` whose file list
(size and sha256 of every file) matches the directory. Builds happen in
``<parent>/.<name>.tmp-*`` under an exclusive lock on ``<parent>/.<name>.lock``, and are
published with ``os.replace``; a build killed midway leaves only a temp dir, which the
next build removes. (The zoo's pair builds in ``<parent>/.<name>.partial`` instead, which an interrupted build
keeps to go on from: :mod:`experiments.zoo.progress`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from specdec.files import atomic_write_json, held_lock

MANIFEST = "COMPLETE.json"
MANIFEST_FORMAT = 1


class CacheEntryError(RuntimeError):
    """A cache entry is missing, incomplete or corrupt."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_files(root: Path) -> list[str]:
    """POSIX paths (relative to ``root``) of every file under it except the manifest, sorted."""
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(rel for rel in rels if rel != MANIFEST)


def write_manifest(root: Path, info: dict, skip: Callable[[str], bool] | None = None) -> dict:
    """Write ``root/COMPLETE.json``: ``info`` plus size and sha256 of every file (but those ``skip`` names: files
    removed before ``root`` is published). Call it last."""
    files = {}
    for rel in (rel for rel in list_files(root) if skip is None or not skip(rel)):
        path = root / rel
        files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info, "files": files}
    atomic_write_json(root / MANIFEST, manifest, sort_keys=True)
    return manifest


def read_manifest(root: Path) -> dict:
    """The parsed manifest of ``root``; ``CacheEntryError`` if it is missing or unreadable."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CacheEntryError(f"{root} has no {MANIFEST} (an interrupted or foreign build)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheEntryError(f"{path} is unreadable or not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "files" not in manifest:
        raise CacheEntryError(f"{path} is not a format-{MANIFEST_FORMAT} manifest")
    return manifest


def verify_entry(root: Path, checksums: bool = True) -> dict:
    """Check ``root`` against its manifest and return the manifest.

    Raises ``CacheEntryError`` naming the first problem: no manifest, a missing file, a
    size mismatch, or (with ``checksums``) a sha256 mismatch.
    """
    if not root.is_dir():
        raise CacheEntryError(f"{root} does not exist")
    manifest = read_manifest(root)
    for rel, expected in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise CacheEntryError(f"{path} is listed in {MANIFEST} but missing")
        if path.stat().st_size != expected["bytes"]:
            raise CacheEntryError(f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']} (corrupt)")
        if checksums and file_sha256(path) != expected["sha256"]:
            raise CacheEntryError(f"{path} does not match its sha256 in {MANIFEST} (corrupt checkpoint)")
    return manifest


@contextlib.contextmanager
def entry_lock(parent: Path, name: str):
    """Exclusive lock for building ``parent/name`` (released even on SIGKILL). A process that finds another
    building it says so on one line (a first build of the embedded pair takes ~20 minutes) and waits."""

    def waiting(holder: str) -> str:
        return (f"waiting for {parent / name}: another process (pid {holder}) is building it (or checking it); "
                "this one uses it once that one is done")

    with held_lock(parent / f".{name}.lock", waiting):
        yield


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Delete leftover temp and old dirs of ``name`` (call while holding the lock)."""
    removed = []
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for path in parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def staging_dir(parent: Path, name: str) -> Path:
    """A fresh temp dir next to ``parent/name`` to build into."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))


def publish(staging: Path, dest: Path) -> None:
    """Move a finished ``staging`` dir to ``dest``, replacing an existing (invalid) one."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
