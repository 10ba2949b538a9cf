"""Argument types of the argparse entry points (``experiments.bench``, ``report``, ...): each turns a bad value into
argparse's error, which :class:`ArgumentParser` prints as one ``error:`` line with exit status 2 (the contract of
:mod:`experiments.cli`, which re-exports these names). Imports neither torch, hydra, omegaconf nor wandb."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the contract: a bad argument is one ``error:`` line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {_one_line(message)} (see {self.prog} --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}; give an integer >= {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def ints_at_least(low: int) -> Callable[[str], list[int]]:
    """An argparse ``type``: a comma-separated list of integers, each >= ``low`` (e.g. ``2,4,6``)."""
    one = int_at_least(low)

    def parse(text: str) -> list[int]:
        values = [one(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError("give at least one integer, e.g. 2,4")
        return values
    parse.__name__ = f"list of integers >= {low}"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def temperature(text: str) -> float:
    """An argparse ``type``: a sampling temperature (0: greedy)."""
    value = _number(text)
    if not 0 <= value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not a temperature: use 0 for greedy decoding or a finite value > 0")
    return value


def temperatures(text: str) -> list[float]:
    """An argparse ``type``: comma-separated temperatures (e.g. ``0,0.8``)."""
    values = [temperature(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one temperature, e.g. 0,0.8")
    return values


def thresholds(text: str) -> list[float]:
    """An argparse ``type``: comma-separated confidence thresholds, each in [0, 1) (e.g. ``0.3,0.5``)."""
    values = [_number(part) for part in text.split(",") if part.strip()]
    bad = [v for v in values if not 0 <= v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]} is not a confidence threshold: give values in [0, 1), "
                                         "e.g. 0.3,0.5 (a chain stops after a draft less likely than it)")
    return values


def output_dir(text: str) -> Path:
    """An argparse ``type``: a directory to write into, checked now (a typo fails before anything runs) and made by
    the command once its other input is known good (a failed command leaves no empty directory behind)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file: give a directory (it is made if missing)")
    parent = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot make {path} for {text} ({parent} is not a directory you can "
                                         "write): pick a path in a directory you can write")
    return path


def output_file(text: str) -> str:
    """An argparse ``type``: a file to write at the end of a run. Its directory is made now, so a typo
    fails before the run rather than losing its results after it."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give a file name in it")
    _make_dir(path.parent, text)
    return text


def _make_dir(path: Path, text: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot make {path} for {text} ({exc.strerror}): "
                                         "pick a path in a directory you can write") from None


def add_narrow_linears(parser: argparse.ArgumentParser) -> None:
    """``--narrow-linears``: the benchmarks' switch for :mod:`verifier.narrow_linear` (every method shares the model)."""
    from verifier.narrow_linear import MODES

    parser.add_argument("--narrow-linears", default="auto", choices=list(MODES),
                        help="multi-row linears through oneDNN's packed weights (packed) or as (W @ X^T)^T "
                             "(transposed): cheaper verifies on the CPU (auto: for float32 on the CPU, the product "
                             "timed faster than F.linear here, if one is; on: one anywhere); applied to the models "
                             "every method runs, "
                             "HF's included")
