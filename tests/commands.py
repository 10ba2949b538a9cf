"""Checking a written-down command without running it: ``check_command`` parses a ``python -m MODULE ARGS`` as its
entry point would (an argparse entry point's ``parse_args`` and the option checks it makes before loading anything,
a Hydra entry point's composed config for every job of a sweep, pytest's test files). Shared by the checks of
``scripts/gpu_check.sh`` (``test_gpu_script.py``) and of the commands the README and BENCHMARKS.md give
(``test_doc_commands.py``)."""
from __future__ import annotations

import importlib
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from experiments.overrides import MULTIRUN_FLAGS

ROOT = Path(__file__).resolve().parents[1]
HYDRA_CONFIGS = {"experiments.decode": "config", "experiments.build_zoo": "build_zoo",
                 "experiments.build_draft": "build_draft", "experiments.train_medusa": "train_medusa",
                 "experiments.train_eagle": "train_eagle"}


def _expanded(overrides: list[str]) -> list[list[str]]:
    """The jobs a sweep's ``overrides`` stand for (one job for overrides without a sweep), as Hydra's basic sweeper
    expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def hydra_jobs(config_name: str, args: list[str]) -> list:
    """The composed config of each job ``python -m ... ARGS`` runs: a sweep (``-m``, or a config that sets
    ``hydra.mode: MULTIRUN``) is expanded over its command-line values and its config's ``hydra.sweeper.params``;
    comma-separated values outside a sweep raise as Hydra would."""
    from experiments import schema  # noqa: F401  (registers base_config)

    overrides = [a for a in args if a not in MULTIRUN_FLAGS]
    jobs = _expanded(overrides)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        first = compose(config_name, overrides=jobs[0], return_hydra_config=True)
        multirun = any(a in MULTIRUN_FLAGS for a in args) or str(first.hydra.mode) == "RunMode.MULTIRUN"
        if len(jobs) > 1 and not multirun:
            raise HydraException(f"{' '.join(overrides)}: comma-separated values sweep only with -m")
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        params = [f"{key}={value}" for key, value in (first.hydra.sweeper.get("params") or {}).items()
                  if key not in given] if multirun else []
        return [compose(config_name, overrides=job, return_hydra_config=True)
                for job in (_expanded(overrides + params) if params else jobs)]


def _check_decode(cfg) -> None:
    """The checks ``experiments.decode`` makes before anything loads, less the device's."""
    from experiments.drafter_config import check_before_loading
    from experiments.instantiate import check_arguments
    from specdec.static_shape import check_compile

    check_before_loading(cfg)
    check_compile(cfg.compile)
    check_arguments(cfg.drafter, "drafter")


def _check_bench(module: str, args: list[str]) -> None:
    """``experiments.bench``'s two command lines: ``--model`` (the suite, :mod:`experiments.bench_suite`) or not."""
    if any(a == "--model" or a.startswith("--model=") for a in args):  # its rows' checks need the models
        from experiments import bench_suite

        bench_suite.parse_args(args)
        return
    from experiments.bench_inputs import check_flags

    check_flags(importlib.import_module(module).parse_args(args))  # an option the chosen table would not read


def _config_dirs_searched(args: list[str], root: Path) -> list[str]:
    """``args`` with Hydra's ``--config-dir DIR`` (or ``--config-dir=DIR``, ``-cd DIR``; relative to ``root``) as the
    ``hydra.searchpath`` override it amounts to (a config group file there is found beside the built-in ones)."""
    out, it = [], iter(args)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            out.append(f"hydra.searchpath=[file://{(root / (value if eq else next(it))).resolve()}]")
        else:
            out.append(arg)
    return out


def check_command(command: list[str], root: Path = ROOT) -> None:
    """Raise (or exit, as argparse does) unless ``command`` (``MODULE ARGS...``) parses as its entry point would
    parse it, run from ``root`` (the repository's; the README's example drafter's own directory)."""
    module, args = command[0], command[1:]
    if module == "pytest":
        named = [a for a in args if a.startswith("tests/")] + [a.split("=", 1)[1] for a in args
                                                               if a.startswith("--ignore=")]
        for path, _, test in (a.partition("::") for a in named):  # tests/x.py or tests/x.py::test_y[param]
            assert (root / path).exists(), path
            name = test.split("::")[-1].split("[")[0]  # tests/x.py::TestClass::test_y[param]: test_y
            assert not name or f"def {name}(" in (root / path).read_text(), f"{path}::{test}"
    elif module in HYDRA_CONFIGS:
        for cfg in hydra_jobs(HYDRA_CONFIGS[module], _config_dirs_searched(args, root)):
            if module == "experiments.decode":
                _check_decode(cfg)
    elif module == "experiments.bench":
        _check_bench(module, args)
    else:
        importlib.import_module(module).parse_args(args)  # an argparse error exits
