"""``scripts/gpu_check.sh`` runs on a machine lent for minutes: every command in it must parse before it gets
there. Each ``python3 -m`` command of every mode is taken from the script as bash would run it (its defaults
for the ``${NAME:-value}`` limits, ``$W`` a folder) and checked here without a GPU: an argparse entry point's
``parse_args``, a Hydra entry point's composed config, pytest's test files."""
from __future__ import annotations

import re
import shlex

import pytest
from hydra.errors import HydraException

from specdec.errors import SpecDecError
from tests.commands import ROOT, check_command

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
GPU_TESTS = re.search(r"^GPU_TESTS=\((.*)\)$", SCRIPT.read_text(), re.MULTILINE).group(1)  # the script's own array
BASH_WORDS = {  # the script's array expansions and loop variables, as bash expands them
    '"${GPU_TESTS[@]}"': GPU_TESTS,
    '"${GPU_TESTS[@]:1}"': GPU_TESTS.split(" ", 1)[1],
    '"${GPU_TESTS[@]/#/--ignore=}"': " ".join(f"--ignore={t}" for t in GPU_TESTS.split()),
    '"$flush"': "write", "$flush": "write", '"$@"': "",
}


def script_commands(text: str) -> list[list[str]]:
    """Every ``python3 -m MODULE ARGS`` of the script, as argument lists (``MODULE`` first)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#") or "python3 -m " not in line:
            continue
        command = line.split("python3 -m ", 1)[1]
        if command.startswith("pip "):  # the wheels' install
            continue
        command = re.split(r"\s&(\s|$)|\s\|\s", command)[0]  # a background job or a pipe ends it
        for word, value in BASH_WORDS.items():
            command = command.replace(word, value)
        command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command).replace("$W", "/tmp/gpu_check")
        assert "$" not in command, f"an expansion this test does not know: {command}"
        commands.append(shlex.split(command, comments=True))
    return commands


COMMANDS = script_commands(SCRIPT.read_text())


def test_every_mode_is_read():
    modules = [c[0] for c in COMMANDS]
    assert {"pytest", "specdec_kernels.bench", "specdec_kernels.tune", "experiments.bench",
            "experiments.step_profile", "experiments.decode", "experiments.build_zoo"} <= set(modules)
    assert len(COMMANDS) >= 20, modules


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c[0]}:{' '.join(c[1:])[:60]}")
def test_the_command_parses(command):
    check_command(command)


@pytest.mark.parametrize("command, error, says", [
    (["specdec_kernels.bench", "--no-flexx"], SystemExit, "2"), (["experiments.bench", "--compile", "grph"], SystemExit, "2"),
    (["experiments.decode", "compile=grph"], SpecDecError, "compile='grph' is unknown"),
    (["experiments.decode", "num_prompt=5"], HydraException, "Could not override 'num_prompt'"),
    (["experiments.decode", "drafter.tree_sampling=sometimes"], SpecDecError, "drafter.tree_sampling='sometimes'"),
    (["experiments.build_zoo", "sise=default"], HydraException, "Could not override 'sise'"),
    (["pytest", "-v", "tests/test_nothing_here.py"], AssertionError, "tests/test_nothing_here.py"),
    (["experiments.bench", "--compile", "inductor", "--context", "512"], SpecDecError,
     "--context applies to the --verify-curve timing"),
], ids=["argparse_option", "argparse_choice", "decode_choice", "decode_key", "drafter_choice", "zoo_key", "test_file",
        "bench_unread_option"])
def test_a_mistake_in_a_command_fails_the_check(command, error, says):
    """Each kind of mistake fails the check the way its entry point would (argparse's exit status 2, Hydra's
    composition error, our config error, a test file that is not there), naming what is wrong."""
    with pytest.raises(error) as info:
        check_command(command)
    assert says in str(info.value)
