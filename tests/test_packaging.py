"""Our top-level packages must not shadow another distribution's import name.

Everything runs from the repository root (``python -m pytest``, ``python -m experiments.decode``), where
the working directory comes first on ``sys.path``: a folder there named like an installed package
replaces that package for every library that imports it. transformers 5.25 made Hugging Face's
``kernels`` distribution a hard dependency and imports it at load time, so a top-level ``kernels/`` of
ours broke every run on a fresh install (``cannot import name 'CUDAProperties' from 'kernels'``);
our Triton kernels live in ``specdec_kernels/`` for that reason.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _our_top_level_packages() -> list[str]:
    """The import names pyproject.toml ships (its ``packages.find`` include patterns, wildcards dropped)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    return [p.rstrip("*").rstrip(".") for p in patterns]


def test_our_packages_exist_at_the_root():
    for name in _our_top_level_packages():
        assert (ROOT / name / "__init__.py").is_file(), name


def test_no_top_level_package_shadows_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()  # import name -> distributions providing it
    clashes = {name: sorted(set(owners.get(name, [])) - {"specdec"}) for name in _our_top_level_packages()}
    clashes = {name: dists for name, dists in clashes.items() if dists}
    assert not clashes, f"our top-level packages shadow installed distributions: {clashes}; rename ours"


def test_transformers_imports_its_hub_kernels_from_the_repo_root():
    """The failure the rename fixed, as a user meets it: transformers' own ``kernels`` import, run with
    the repository root first on ``sys.path`` (passes trivially where Hugging Face's ``kernels`` is absent)."""
    code = "import transformers.integrations.hub_kernels, specdec_kernels, verifier"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
