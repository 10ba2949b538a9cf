"""Every command the README, BENCHMARKS.md and the configs' comments give a researcher to copy parses as its entry
point would parse it (:func:`tests.commands.check_command`: argparse options and the checks made before anything
loads, each job of a Hydra sweep composed, pytest's test files): a renamed option, config key or preset fails here,
not in the hands of the first reader. Templates (``<dir>``, ``...``, ``a|b`` alternatives, ``[--optional flags]``) are left out."""
from __future__ import annotations

import re
import shlex

import pytest

from tests.commands import ROOT, check_command

DOCS = ("README.md", "BENCHMARKS.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "conf").rglob("*.yaml"))),
        *(str(p.relative_to(ROOT)) for part in ("experiments", "specdec_kernels", "drafters", "specdec", "verifier")
          for p in sorted((ROOT / part).rglob("*.py"))))
MODULES = ("experiments.", "specdec_kernels.", "pytest")
#: A command run beside the README's example drafter's own files (``my_conf/``, its test file): checked in their
#: directory by :mod:`tests.test_readme_drafter`.
README_EXAMPLE = re.compile(r"\bmy_conf\b|\bmy_drafters\.|tests/test_echo_drafter\.py")
TEMPLATE = re.compile(r"<[^>]*>|\[-|[{}]|\.\.\.|\w\|\w|\$|\bNAME\b|\bDIR\b|…")  # a placeholder, not a value


def doc_commands(text: str) -> list[str]:
    """The ``python -m MODULE ARGS`` commands of a Markdown, YAML or Python text: in fenced blocks and on lines of
    their own (continued lines joined, ``&&`` / ``;`` / pipes split, ``#`` comments dropped) and in inline code
    spans."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"\\{1,2}\n[ #]*", " ", re.sub(r"```.*?```", "", text, flags=re.DOTALL))  # a docstring's \\
    lines += re.findall(r"^[ #]*(python3? -m .*)$", prose, re.MULTILINE)
    lines += [span.replace("\n", " ") for span in re.findall(r"`(python3? -m [^`]+)`", text)]
    commands = []
    for line in lines:
        for part in re.split(r"&&|;|\s\|\s|\s&\s", line):
            found = re.search(r"python3? -m (\S.*)", part)
            if found and found.group(1).startswith(MODULES):
                commands.append(found.group(1).strip())
    return commands


def _cases() -> list:
    cases = []
    for doc in DOCS:
        for command in dict.fromkeys(doc_commands((ROOT / doc).read_text())):
            command = command.replace("$HOME", "/home/researcher")
            if not TEMPLATE.search(command) and not README_EXAMPLE.search(command):
                cases.append(pytest.param(command, id=f"{doc}:{command[:70]}"))
    return cases


CASES = _cases()


def test_the_docs_give_commands_to_check():
    """The extraction finds the documents' commands (a change of format that hid them would pass every case)."""
    modules = {c.values[0].split()[0] for c in CASES}
    assert len(CASES) >= 60, len(CASES)
    assert {"experiments.decode", "experiments.bench", "experiments.report", "experiments.train_eagle",
            "experiments.bench_drafters", "pytest"} <= modules, modules


@pytest.mark.parametrize("command", CASES)
def test_a_documented_command_parses(command):
    check_command(shlex.split(command, comments=True))


@pytest.mark.parametrize("text, found", [
    ("```bash\npython -m experiments.decode a=1 \\\n  b=2  # c\n```", ["experiments.decode a=1    b=2  # c"]),
    ("run `python -m experiments.bench\n--k 4` then", ["experiments.bench --k 4"]),
    ("```\npip install x && python -m pytest -q | tail\n```", ["pytest -q"]),
    ("```\npython -m venv v\n```", []),
    ("text\n#   python -m experiments.decode a=1 \\\n#       b=2\n", ["experiments.decode a=1  b=2"]),
])
def test_the_extraction(text, found):
    assert doc_commands(text) == found


def test_a_sweep_is_checked_job_by_job():
    """Each value of a sweep is composed (a typo in its last value fails), a config's own sweep params expand
    unless the command line sweeps the same key, and comma-separated values without ``-m`` fail as in Hydra."""
    from hydra.errors import HydraException

    from tests.commands import hydra_jobs

    jobs = hydra_jobs("config", ["-m", "drafter=draft_model,ngram", "drafter.num_speculative_tokens=2,4"])
    assert sorted((j.drafter._target_, j.drafter.num_speculative_tokens) for j in jobs) == [
        ("drafters.DraftModelDrafter", 2), ("drafters.DraftModelDrafter", 4), ("drafters.NGramDrafter", 2),
        ("drafters.NGramDrafter", 4)]
    assert len(hydra_jobs("config", ["sweep=tree_shape"])) == 5
    assert len(hydra_jobs("config", ["sweep=tree_shape", "sweep/shape=chain,binary"])) == 2
    with pytest.raises(HydraException, match="nosuch"):
        hydra_jobs("config", ["-m", "drafter=draft_model,ngram,nosuch"])
    with pytest.raises(HydraException, match="sweep only with -m"):
        hydra_jobs("config", ["drafter.num_speculative_tokens=2,4"])


@pytest.mark.parametrize("command, error", [
    ("experiments.decode num_prompt=2", "num_prompt"),
    ("experiments.bench --model smollm2 --per-categry 2", "unrecognized arguments: --per-categry 2"),
    ("experiments.report runs --tolerance 2", "2.0 is not a share between 0 and 1"),
    ("pytest tests/test_doc_commands.py::test_nothing", "test_nothing"),
    ("pytest tests/test_doc_commands.py::TestNone::test_nothing", "test_nothing"),
    ("experiments.train_eagle verison=eagle3", "verison"),
])
def test_a_stale_command_fails(command, error, capsys):
    """A renamed key or option, a report flag out of its range, a test that is not there: each fails the check,
    naming it (argparse exits 2 with the message on stderr)."""
    with pytest.raises((Exception, SystemExit)) as info:  # Hydra's, argparse's exit, an assertion
        check_command(shlex.split(command))
    assert error in (capsys.readouterr().err if isinstance(info.value, SystemExit) else str(info.value))
