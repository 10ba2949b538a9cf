"""Edges of the prompt-set, config-schema, argument-type and batched-verify layers that no other test pinned
(mutation pass 22). Fakes and the tiny llama pair only: the whole file runs in seconds.

Mutants that survived the existing tests and that these tests kill:

- ``experiments.data``: a boolean ``question_id`` accepted (``isinstance(question_id, bool)`` dropped);
  ``heldout_prompts_path`` ignoring ``rebuild``.
- ``experiments.datasets``: ``StdlibHeldout`` dropping its ``corpus_root`` or its ``cache_dir``; its default
  ``max_prompt_tokens`` (256) changed; ``Suite`` dropping its ``cache_dir``.
- ``experiments.suite``: ``excerpt`` without its at-least-the-first-paragraph guard, without the 2 characters of a
  paragraph break, without its ``limit * 2`` cut; wrong word-problem answers (kinds 0 and 2);
  ``documented_functions`` keeping private names, ignoring or shifting the docstring-length bounds, not sorting by
  line; the 400-character section filter dropped; the two-turn reply taking the section's title; ``suite_path``
  ignoring ``rebuild``.
- ``experiments.schema``: a typed scalar (``top_k``, ``top_p``, ``min_p``, ``num_prompts``, ``costs``, ``resume``)
  loosened to ``Any``; a default (``max_new_tokens``, ``warmup``, ``batch_mode``) drifting from conf/config.yaml.
- ``experiments.cli_args``: ``int_at_least`` refusing its own bound; ``ints_at_least`` taking an empty list or
  empty parts; ``thresholds`` taking 1 or refusing 0.
- ``verifier.batch``: ``verify_rows`` without its ``check_finite``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from experiments import cli_args, data, datasets, suite
from tests import tiny_models
from verifier import batch as verifier_batch

FAKE_HELDOUT = "fnmatch.py"  # corpus.split_of("fnmatch.py") == "heldout" (sha256 of the path: stable everywhere)


def fake_corpus(root):
    """A corpus tree whose only held-out file is long enough for one prompt window (and its continuation)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"x{i} = {i}\n" for i in range(data.PROMPT_LINES + data.CONTINUATION_LINES + 5)]
    (root / FAKE_HELDOUT).write_text("".join(lines))
    return root


# --------------------------------------------------------------------------- experiments.data


@pytest.mark.parametrize("qid", ["true", "false"])
def test_a_boolean_question_id_is_refused(tmp_path, qid):
    """JSON ``true`` is a Python int subclass: it must not pass as question 1."""
    path = tmp_path / "q.jsonl"
    path.write_text(f'{{"question_id": {qid}, "turns": ["a"]}}\n')
    with pytest.raises(data.PromptFileError, match="is not an integer or a string"):
        data.load_prompts(path)


def test_rebuild_rewrites_a_cached_prompt_file(tmp_path):
    root = fake_corpus(tmp_path / "corpus")
    path = data.heldout_prompts_path(cache_dir=tmp_path / "cache", num_prompts=1, corpus_root=root)
    built = path.read_text()
    assert [p.source for p in data.load_prompts(path)] == [f"{FAKE_HELDOUT}:1"]
    path.write_text(json.dumps({"question_id": 0, "turns": ["stale"]}) + "\n")
    assert data.heldout_prompts_path(cache_dir=tmp_path / "cache", num_prompts=1, corpus_root=root) == path
    assert data.load_prompts(path)[0].text == "stale"  # without rebuild the cache is kept
    data.heldout_prompts_path(cache_dir=tmp_path / "cache", num_prompts=1, corpus_root=root, rebuild=True)
    assert path.read_text() == built


# --------------------------------------------------------------------------- experiments.datasets


def test_stdlib_heldout_passes_its_corpus_root_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "env_cache"))
    root = fake_corpus(tmp_path / "corpus")
    prompt_set = datasets.StdlibHeldout(cache_dir=tmp_path / "cache", corpus_root=root)
    path = prompt_set.path(1)
    assert path.is_relative_to(tmp_path / "cache") and not (tmp_path / "env_cache").exists()
    [prompt] = prompt_set.load(1)
    assert prompt.source == f"{FAKE_HELDOUT}:1" and prompt.text.startswith("x0 = 0\n")


def test_stdlib_heldout_keeps_the_last_256_prompt_tokens_by_default():
    assert datasets.StdlibHeldout().max_prompt_tokens == 256  # as conf/dataset/stdlib.yaml says
    assert datasets.SpecBench("q.jsonl").max_prompt_tokens is None


def test_suite_passes_its_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "env_cache"))
    chat = [{"role": "user", "content": "hi"}]
    monkeypatch.setattr(suite, "suite_prompts", lambda: [data.Prompt(0, "qa", "hi", "here", messages=chat)])
    path = datasets.Suite(cache_dir=tmp_path / "cache").path(1)
    assert path.is_relative_to(tmp_path / "cache") and not (tmp_path / "env_cache").exists()
    assert datasets.Suite(cache_dir=tmp_path / "cache").load(1)[0].messages == chat


# --------------------------------------------------------------------------- experiments.suite


def test_excerpt_keeps_whole_paragraphs_that_fit_and_always_the_first():
    assert suite.excerpt("A" * 10 + "\n\n" + "B" * 10, limit=5) == "A" * 10  # the first even when over the limit
    assert suite.excerpt("A" * 4 + "\n\n" + "B" * 4, limit=9) == "A" * 4  # 4 + 2 (the blank line) + 4 > 9
    assert suite.excerpt("A" * 4 + "\n\n" + "B" * 4, limit=10) == "A" * 4 + "\n\n" + "B" * 4
    assert suite.excerpt("A" * 30, limit=5) == "A" * 10  # one huge paragraph is cut at twice the limit


def _solve(question: str) -> int:
    """The answer of a word problem, worked out from its text alone."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "buys" in question:
        return n[0] + n[1] - n[2]
    if "km per hour" in question:
        return n[0] * n[1]
    if "rows of" in question:
        return n[0] * n[1] - n[2]
    if "saves" in question:
        return n[0] * n[1] - n[2]
    return n[0] // n[1]  # shared equally


def test_word_problem_answers_match_their_questions():
    rng = random.Random(0)
    problems = [suite.word_problem(rng) for _ in range(200)]
    assert {q.split()[1] for q, _ in problems} >= {"train", "box"}  # every kind drawn
    for question, answer in problems:
        assert answer == _solve(question), question


def test_documented_functions_filters_and_orders(tmp_path):
    ok = '"""' + "d" * 70 + '"""'
    (tmp_path / "a.py").write_text(
        f"class K:\n    def method(self):\n        {ok}\n\n"  # line 2, found by ast.walk after top_level
        f"def top_level(x, y=1):\n    {ok}\n\n"  # line 5
        f"def _private():\n    {ok}\n\n"
        f"def short():\n    '''too short'''\n\n"
        f"def long():\n    '''{'d' * 701}'''\n")
    (tmp_path / "b.py").write_text(f"def other():\n    {ok}\n\ndef another():\n    {ok}\n")
    (tmp_path / "broken.py").write_text("def (:\n")
    found = suite.documented_functions([tmp_path / "a.py", tmp_path / "broken.py", tmp_path / "b.py"])
    # round-robin over files, each file's in line order; private, too short and too long docstrings left out
    assert [(src, sig) for src, sig, _ in found] == [("a.py:2", "method(self)"), ("b.py:1", "other()"),
                                                     ("a.py:5", "top_level(x, y=1)"), ("b.py:4", "another()")]
    assert found[0][2] == "d" * 70
    low, high = suite.DOCSTRING_CHARS  # bounds kept: 60 and 700 characters are in, 59 and 701 out
    (tmp_path / "c.py").write_text("".join(f"def n{n}():\n    '''{'d' * n}'''\n\n" for n in (low - 1, low, high, high + 1)))
    assert [sig for _, sig, _ in suite.documented_functions([tmp_path / "c.py"])] == [f"n{low}()", f"n{high}()"]


def test_suite_sections_skip_short_topics(monkeypatch):
    topics = {f"t{i}": f"Title {i}\n\n" + "x" * (300 if i % 2 else 500) for i in range(200)}
    monkeypatch.setattr(suite, "doc_topics", lambda: topics)
    fns = [(f"f.py:{i}", f"f{i}()", "A function.\n\nMore.") for i in range(40)]
    monkeypatch.setattr(suite, "documented_functions", lambda files: fns)
    prompts = suite.suite_prompts()
    keys = [p.source.split(":")[1] for p in prompts if p.source.startswith("pydoc_data.topics:")]
    assert len(keys) == 3 * suite.PER_CATEGORY and all(len(topics[k]) > 400 for k in keys)


def test_two_turn_topic_reply_is_the_sections_body_not_its_title():
    chat = suite.two_turn_chat(1, random.Random(0), [("The X statement", "The X statement\n\nIt does  X.\n\nMore")], [])
    assert [m["role"] for m in chat] == ["user", "assistant", "user"]
    assert chat[1]["content"] == "It does X."  # the paragraph after the title line, whitespace collapsed


def test_suite_path_rebuild_rewrites_the_cached_suite(tmp_path, monkeypatch):
    texts = iter(["first", "second"])
    monkeypatch.setattr(suite, "suite_prompts", lambda: [data.Prompt(0, "qa", next(texts))])
    path = suite.suite_path(cache_dir=tmp_path)
    assert suite.suite_path(cache_dir=tmp_path) == path and data.load_prompts(path)[0].text == "first"
    suite.suite_path(cache_dir=tmp_path, rebuild=True)
    assert data.load_prompts(path)[0].text == "second"


# --------------------------------------------------------------------------- experiments.schema

TYPED = {"sampling.temperature": "hot", "sampling.top_k": "abc", "sampling.top_p": "abc", "sampling.min_p": "abc",
         "max_new_tokens": "abc", "seed": "abc", "num_prompts": "abc", "warmup": "abc", "batch_size": "abc",
         "num_threads": "many", "baseline": "maybe", "costs": "maybe", "resume": "maybe"}


def test_every_scalar_of_the_schema_is_typed_and_its_defaults_are_the_config_files():
    """A word where a number or a boolean belongs is refused by the schema itself (no compose needed); the
    schema's defaults are conf/config.yaml's, so the Python API and the command line start from the same values."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from experiments.schema import DecodeConfig

    for key, bad in TYPED.items():
        cfg = OmegaConf.structured(DecodeConfig)
        with pytest.raises(ValidationError):
            OmegaConf.update(cfg, key, bad)
    cfg = OmegaConf.structured(DecodeConfig)
    OmegaConf.update(cfg, "num_threads", None)  # the one count that may be null
    with pytest.raises(ValidationError):
        OmegaConf.update(cfg, "batch_size", None)
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "config.yaml")
    schema = OmegaConf.to_container(OmegaConf.structured(DecodeConfig))
    for key, value in OmegaConf.to_container(conf).items():
        if key != "defaults":
            assert schema[key] == value, key


# --------------------------------------------------------------------------- experiments.cli_args


def test_integer_types_take_their_bound_and_refuse_below_it():
    assert cli_args.int_at_least(1)("1") == 1 and cli_args.int_at_least(0)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="0 is below 1"):
        cli_args.int_at_least(1)("0")
    assert cli_args.ints_at_least(2)("2, 4,") == [2, 4]
    for text in (",", "", " , "):
        with pytest.raises(argparse.ArgumentTypeError, match="at least one integer"):
            cli_args.ints_at_least(1)(text)


def test_thresholds_are_in_zero_to_one_open_at_one():
    assert cli_args.thresholds("0,0.5,0.99") == [0.0, 0.5, 0.99]
    for text in ("1", "0.5,1.0", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a confidence threshold"):
            cli_args.thresholds(text)


def test_output_paths_refuse_a_file_a_directory_and_an_unwritable_parent(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        cli_args.output_dir(str(tmp_path / "f"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        cli_args.output_file(str(tmp_path))
    assert cli_args.output_file(str(tmp_path / "a" / "b" / "out.json")) == str(tmp_path / "a" / "b" / "out.json")
    assert (tmp_path / "a" / "b").is_dir() and not (tmp_path / "a" / "b" / "out.json").exists()  # only its directory
    monkeypatch.setattr(cli_args.os, "access", lambda path, mode: False)  # root may write anywhere: fake a read-only
    with pytest.raises(argparse.ArgumentTypeError, match="not a directory you can write"):
        cli_args.output_dir(str(tmp_path / "new"))


def test_a_parser_error_is_one_line_and_narrow_linears_default_to_auto(capsys):
    parser = cli_args.ArgumentParser(prog="bench")
    cli_args.add_narrow_linears(parser)
    assert parser.parse_args([]).narrow_linears == "auto"
    with pytest.raises(SystemExit) as info:
        parser.error("first line\n   second\tline")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: first line second line (see bench --help)\n"


# --------------------------------------------------------------------------- verifier.batch


def test_causal_block_pads_rows_on_the_right():
    ids, depth, mask = verifier_batch.causal_block([[1, 2, 3], [4]], "cpu")  # [2, 3] x2, [2, 3, 3]
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and depth.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert mask[0].tolist() == torch.ones(3, 3, dtype=torch.bool).tril().tolist()
    # padding sees the row's real tokens before it and itself, never another padding token
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, False, True]]


def test_only_one_token_of_one_row_goes_without_a_mask():
    from specdec.batch_cache import BatchCache

    target, _, _ = tiny_models.pair("llama")
    for batch, n, masked in ((1, 1, False), (2, 1, True), (1, 2, True)):
        cache = BatchCache.for_model(target, capacity=8, batch=batch)
        depth = torch.arange(n).expand(batch, n)  # [B, n]
        positions, mask = verifier_batch.begin_block(cache, depth, torch.ones(batch, n, n, dtype=torch.bool))
        assert torch.equal(positions, depth) and (mask is not None) == masked


def test_ragged_prefill_and_verify_match_each_rows_own_forward():
    """Rows of different lengths in one cache: prefill hidden states and verify logits are each row's own."""
    from specdec.batch_cache import BatchCache

    target, _, _ = tiny_models.pair("llama")
    rows, roots, drafts = [[5, 6, 7, 8], [9, 10], []], [11, 12, 13], [[14, 15], [16, 17], [18, 19]]
    cache = BatchCache.for_model(target, capacity=16, batch=3)
    assert verifier_batch.prefill_rows(target, BatchCache.for_model(target, 16, 2), [[], []]) is None
    hidden = verifier_batch.prefill_rows(target, cache, rows)  # [3, 4, H]
    assert cache.host_lengths == [4, 2, 0]
    tree = SimpleNamespace(tokens=torch.tensor(drafts), depth=torch.tensor([[1, 2]] * 3),  # [3, 2] each
                           mask=torch.ones(3, 3, 3, dtype=torch.bool).tril(), num_nodes=[2, 2, 2])  # [3, 3, 3]
    out = verifier_batch.verify_rows(target, cache, roots, tree, step=0)  # logits [3, 3, V]
    assert out.nodes == [2, 2, 2]
    with torch.no_grad():
        for b, row in enumerate(rows):
            full = target(input_ids=torch.tensor([row + [roots[b]] + drafts[b]]), output_hidden_states=True)
            torch.testing.assert_close(out.logits[b], full.logits[0, len(row):].float(), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(hidden[b, : len(row)], full.hidden_states[-1][0, : len(row)], atol=1e-4,
                                       rtol=1e-4)


def test_a_verify_with_nan_logits_names_its_step(monkeypatch):
    from specdec.errors import NonFiniteLogitsError

    nan = torch.full((1, 2, 4), float("nan"))  # [B, 1 + N, V]
    monkeypatch.setattr(verifier_batch, "block_forward", lambda *args, **kwargs: (nan, None))
    tree = SimpleNamespace(tokens=torch.tensor([[1]]), depth=torch.tensor([[1]]), mask=None, num_nodes=[1])  # [1, 1]
    cache = SimpleNamespace(lengths=torch.zeros(1, dtype=torch.long))  # [B]
    with pytest.raises(NonFiniteLogitsError, match="decode step 3"):
        verifier_batch.verify_rows(None, cache, [0], tree, step=3)
