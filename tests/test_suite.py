"""The local prompt suite (dataset=suite): size, categories, held-out sources, chat formatting, errors."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from experiments import corpus, suite
from experiments.data import Prompt, load_prompts, prompt_ids, prompt_text
from tests import repo_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts():
    return suite.suite_prompts()


def test_size_categories_and_spec_bench_records(prompts, tmp_path):
    counts = Counter(p.category for p in prompts)
    assert len(prompts) >= 80 and len(counts) >= 5 and min(counts.values()) >= 16
    assert [p.question_id for p in prompts] == list(range(len(prompts)))
    path = suite.suite_path(cache_dir=tmp_path)
    again = load_prompts(path)
    assert again == prompts  # the cached JSONL round-trips, chats included
    two_turn = [p for p in again if p.category == "multi_turn"]
    assert all(len(p.turns) == 2 and [m["role"] for m in p.messages] == ["user", "assistant", "user"] for p in two_turn)
    assert suite.suite_prompts() == prompts  # deterministic


def test_code_prompts_come_from_held_out_files_only(prompts):
    sources = [p.source.split(":")[0] for p in prompts if p.category == "coding"]
    assert sources and all(corpus.split_of(src) == "heldout" for src in sources)
    assert all(not s.startswith(suite.SUITE_SOURCES) for s in sources)


def test_training_chats_share_no_prompt_and_no_source_with_the_suite(prompts):
    firsts = {p.messages[0]["content"] for p in prompts}
    chats = suite.training_chats(192)
    assert {kind for kind, _ in chats} == set(suite.CATEGORIES)
    assert not firsts & {chat[0]["content"] for _, chat in chats}  # no training chat opens like a suite prompt
    files = suite.training_files()
    root = corpus.default_corpus_root()
    assert all(corpus.split_of(f.relative_to(root).as_posix()) == "train" for f in files)
    assert not any(f.relative_to(root).as_posix().startswith(suite.SUITE_SOURCES) for f in files)


def test_chats_are_formatted_with_the_targets_chat_template():
    from specdec.models import byte_tokenizer

    tok = byte_tokenizer()
    prompt = Prompt(0, "qa", "hi", messages=[{"role": "user", "content": "hi"}])
    assert prompt_text(prompt, tok) == "user: hi\n\nassistant:"  # no template: a plain transcript
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert prompt_text(prompt, tok) == "<user>hi<assistant>"
    assert tok.decode(prompt_ids(prompt, tok)[0]) == "<user>hi<assistant>"
    assert prompt_text(Prompt(1, "x", "raw text"), tok) == "raw text"  # plain records stay as they are


def test_chats_given_to_a_target_without_a_chat_template_are_warned_of(capsys):
    """A trial's ``dataset=suite`` on the code-only default pair decoded '\\n#\\n#' answers at 1.38x with no word
    that the chats went in as a plain transcript."""
    from experiments.decode import encode_prompts
    from specdec.models import byte_tokenizer

    tok = byte_tokenizer()
    chat, plain = Prompt(0, "qa", "hi", messages=[{"role": "user", "content": "hi"}]), Prompt(1, "x", "raw text")
    for prompts, template, warned in (([plain], None, False), ([plain, chat], None, True), ([chat], "t", False)):
        tok.chat_template = template
        encode_prompts(prompts, tok, None, "cpu")
        assert ("warning: the target's tokenizer has no chat template" in capsys.readouterr().err) == warned


def test_without_pydoc_data_dataset_suite_is_one_error_line(tmp_path):
    code = ("import runpy, sys; sys.modules['pydoc_data'] = None; sys.modules['pydoc_data.topics'] = None\n"
            "sys.argv = ['decode', *sys.argv[1:]]; runpy.run_module('experiments.decode', run_name='__main__')")
    args = ["model=tiny_random", "dataset=suite", f"dataset.cache_dir={tmp_path}", "logger=none", "costs=false",
            f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=repo_env(), check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pydoc_data" in lines[0], result.stderr
