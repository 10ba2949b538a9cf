"""The README's whole example of a drafter of one's own ("Adding a drafter": ``my_drafters/echo.py``, its config
``my_conf/drafter/echo.yaml`` and its tests ``tests/test_echo_drafter.py``), run as written there: the three blocks
are read from the README into a directory of their own, the greedy test and a distribution cell of the example's
test file pass, a planted bug fails that cell, and a run with the example's config matches its baseline. A change
of the API the example uses fails here, not in the hands of the first reader."""
from __future__ import annotations

import importlib
import re
import sys

import pytest

from tests.commands import ROOT, check_command
from tests.test_doc_commands import README_EXAMPLE, doc_commands

FILES = ("my_drafters/echo.py", "my_conf/drafter/echo.yaml", "tests/test_echo_drafter.py")


def readme_blocks() -> dict[str, str]:
    """The README's fenced blocks that start with a ``# <path>`` comment, by that path."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", text, re.DOTALL)
    return {path: body for path, body in blocks}


@pytest.fixture()
def example(tmp_path, monkeypatch):
    """The example's files under ``tmp_path`` (the test file as module ``echo_tests``), on the import path."""
    blocks = readme_blocks()
    assert set(FILES) <= set(blocks), sorted(blocks)
    for path in FILES:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(blocks[path])
    (tmp_path / "echo_tests.py").write_text(blocks[FILES[2]])  # importable beside the repository's tests package
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(("my_drafters", "echo_tests"))]:
        del sys.modules[name]


def test_the_examples_greedy_test_passes(example):
    tests = importlib.import_module("echo_tests")
    tests.test_echo_equals_plain_greedy("llama")


def test_the_examples_distribution_cell_passes_and_a_planted_bug_fails_it(example):
    from tests.lossless import cells

    tests = importlib.import_module("echo_tests")
    real = next(cell for cell in cells(["ngram"]) if cell[2] == "rejection")
    tests.test_rejection_with_echo_drafts_is_lossless(*real)  # check_cell asserts: p above ALPHA, acceptance in band
    bug = next(cell for cell in cells(["ngram"]) if cell[2] != "rejection")
    tests.test_rejection_with_echo_drafts_is_lossless(*bug)  # for a planted bug, check_cell asserts that it fails


def test_a_run_with_the_examples_config_matches_its_baseline(example, monkeypatch, capsys):
    from tests.test_cli_contract import main_in_process

    out: list[str] = []
    code, err = main_in_process(monkeypatch, capsys, "--config-dir", str(example / "my_conf"), "experiment=smoke",
                                "drafter=echo", "num_prompts=1", "warmup=0", "costs=false",
                                f"hydra.run.dir={example / 'run'}", stdout=out)
    assert code == 0, err[-2000:]
    assert "matches baseline: True" in out[0] + err, (out[0] + err)[-2000:]


def test_the_commands_beside_the_example_parse_there(example):
    """The README's commands that use the example's files (its config directory, its test file) parse as their
    entry points would, run from the directory holding them (every other command: :mod:`tests.test_doc_commands`)."""
    import shlex

    commands = [c for c in doc_commands((ROOT / "README.md").read_text()) if README_EXAMPLE.search(c)]
    assert len(commands) >= 4, commands  # a run, a sweep, the tests, the benchmark
    for command in commands:
        check_command(shlex.split(command), root=example)


def test_the_side_by_side_benchmark_runs_the_example_with_drafter(example, capsys):
    """``bench_drafters --drafter my_drafters.echo.EchoDrafter`` (README step 7) adds ``ours_echo_k<k>`` at each
    ``--ks`` (behind lookup too with ``--hybrid``), equal to plain greedy; a class that is not a drafter, or one it
    cannot build, is one error line."""
    from experiments.bench_drafters import build_methods, parse_args
    from tests.lossless import NGRAM_PROMPT
    from tests.tiny_models import pair

    target, draft, _ = pair("llama")
    args = parse_args(["--drafter", "my_drafters.echo.EchoDrafter", "--ks", "2,3", "--hybrid", "2"])
    methods = {m.name: m for m in build_methods(target, draft, args, 0.0, {})}
    assert {"ours_echo_k2", "ours_echo_k3", "ours_ngram+echo_k2", "ours_ngram+echo_k3"} <= set(methods)
    seq, _ = methods["ours_echo_k3"].run(NGRAM_PROMPT)
    want = target.generate(NGRAM_PROMPT, do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=0)
    assert seq.tolist() == want.tolist()
    with pytest.raises(SystemExit):
        parse_args(["--drafter", "my_drafters.echo.DraftTree"])
    assert capsys.readouterr().err.startswith("error: argument --drafter: my_drafters.echo.DraftTree is not a subclass "
                                              "of specdec.drafting.Drafter; name a drafter class")
    with pytest.raises(SystemExit):
        parse_args(["--drafter", "my_drafters.echo.EchoDrafer"])
    assert "did you mean 'my_drafters.echo.EchoDrafter'?" in capsys.readouterr().err


def test_a_drafter_flag_that_cannot_build_or_clashes_is_one_error(example):
    """A class that needs an argument ``--drafter`` cannot give, or whose method name is taken, is a ConfigError
    (before it is built); a one-off ``ours_<name>`` starting with k is not taken for a chain."""
    from experiments.bench_batch import is_chain
    from experiments.bench_inputs import own_drafters
    from specdec.drafting import Drafter
    from specdec.errors import ConfigError

    echo = importlib.import_module("my_drafters.echo").EchoDrafter
    with pytest.raises(ConfigError, match="its method ours_echo_k2 is already in the table"):
        own_drafters(echo, [2], {"ours_echo_k2"})

    class Needy(Drafter):
        def __init__(self, model, num_speculative_tokens: int = 2):
            super().__init__()

    with pytest.raises(ConfigError, match="Needy: missing a required argument: 'model'; --drafter builds a drafter"):
        own_drafters(Needy, [2], set())
    assert not is_chain("ours_knn") and is_chain("ours_knn_k4") and is_chain("ours_draft_k12")
