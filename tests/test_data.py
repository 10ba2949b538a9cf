"""The corpus split and the Spec-Bench prompt files (experiments.corpus, experiments.data)."""

import json

import pytest

from experiments import corpus, data


@pytest.fixture(scope="module")
def splits():
    return corpus.corpus_files(split="train"), corpus.corpus_files(split="heldout")


def test_split_is_stable_for_known_paths():
    # sha256 of the relative POSIX path: identical on every machine and Python version
    assert corpus.split_of("fnmatch.py") == "heldout"
    assert corpus.split_of("pprint.py") == "heldout"
    assert corpus.split_of("json/decoder.py") == "train"
    assert corpus.split_of("asyncio/tasks.py") == "train"


def test_split_is_deterministic_disjoint_and_about_five_percent(splits):
    train, heldout = splits
    assert corpus.corpus_files(split="train") == train
    assert not set(train) & set(heldout)
    assert train and heldout
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.10


def test_no_test_or_third_party_files(splits):
    root = corpus.default_corpus_root()
    for path in splits[0] + splits[1]:
        parts = path.relative_to(root).parts
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts), path
        assert not parts[-1].startswith("test_"), path
        assert path.suffix == ".py"


def test_exclusion_rules_on_a_fake_tree(tmp_path):
    for rel in ["a.py", "pkg/b.py", "test/c.py", "pkg/tests/d.py", "idlelib/idle_test/e.py",
                "test_f.py", "site-packages/g.py", "dist-packages/h.py", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    found = corpus.corpus_files(tmp_path, "train") + corpus.corpus_files(tmp_path, "heldout")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in found) == ["a.py", "pkg/b.py"]


def test_empty_corpus_dir_error_names_the_directory(tmp_path):
    (tmp_path / "readme.txt").write_text("no python here")
    with pytest.raises(corpus.CorpusError, match=str(tmp_path)):
        corpus.corpus_files(tmp_path)
    with pytest.raises(corpus.CorpusError, match="does not exist"):
        corpus.corpus_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="split"):
        corpus.corpus_files(split="validation")


# --------------------------------------------------------------------------- Spec-Bench JSONL


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_valid_spec_bench_file(tmp_path):
    records = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
        {"question_id": 82, "category": "math", "turns": ["2 + 2?"], "reference": ["4"]},
        {"question_id": 83, "category": "qa", "turns": ["Why?"]},
    ]
    path = _write_lines(tmp_path / "question.jsonl", [json.dumps(r) for r in records[:2]] + ["", json.dumps(records[2])])
    prompts = data.load_prompts(path)
    assert [p.question_id for p in prompts] == [81, 82, 83]
    assert prompts[0] == data.Prompt(81, "writing", "Write a poem.")
    assert len(data.load_prompts(path, limit=2)) == 2


def test_write_then_load_round_trip(tmp_path):
    prompts = [data.Prompt(0, "json", "import json\n", "json/__init__.py:1"), data.Prompt("q1", "x", "é ü\n")]
    path = data.write_prompts(tmp_path / "sub" / "p.jsonl", prompts)
    assert data.load_prompts(path) == prompts


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"turns": ["ok"]}', '{"turns": ["ok"]}', "{not json"], r"p\.jsonl:3: invalid JSON"),
        (['{"turns": ["ok"]}', '{"question_id": 2, "category": "x"}'], r"p\.jsonl:2: missing or empty 'turns'"),
        (['{"turns": []}'], r"p\.jsonl:1: missing or empty 'turns'"),
        (['["a list"]'], r"p\.jsonl:1: expected a JSON object"),
        ([], "holds no prompts"),
    ],
)
def test_invalid_spec_bench_file_names_file_and_line(tmp_path, lines, expected):
    path = _write_lines(tmp_path / "p.jsonl", lines)
    with pytest.raises(data.PromptFileError, match=expected) as info:
        data.load_prompts(path)
    assert str(path) in str(info.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(data.PromptFileError, match="does not exist"):
        data.load_prompts(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- held-out prompt set


def test_heldout_prompt_set_is_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    path = data.heldout_prompts_path(num_prompts=12)
    assert path.is_relative_to(tmp_path / "cache")
    first = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    assert data.heldout_prompts_path(num_prompts=12) == path and path.stat().st_mtime_ns == mtime
    assert data.heldout_prompts_path(num_prompts=12, rebuild=True).read_bytes() == first
    prompts = data.load_prompts(path)
    assert len(prompts) == 12 and [p.question_id for p in prompts] == list(range(12))
    heldout = {p.relative_to(corpus.default_corpus_root()).as_posix() for p in corpus.corpus_files(split="heldout")}
    for prompt in prompts:
        rel = prompt.source.rsplit(":", 1)[0]
        assert rel in heldout
        assert prompt.category == rel.split("/")[0].removesuffix(".py")
        # Whole lines, the last one without its newline (the token-boundary rule in experiments.data).
        assert not prompt.text.endswith("\n") and len(prompt.text) <= data.PROMPT_MAX_CHARS
        assert prompt.text.count("\n") >= data.MIN_PROMPT_LINES - 1
        source = corpus.read_text(corpus.default_corpus_root() / rel)
        assert prompt.text + "\n" in source


def test_too_many_prompts_and_unwritable_cache(tmp_path):
    with pytest.raises(ValueError, match="num_prompts"):
        data.heldout_prompts_path(cache_dir=tmp_path, num_prompts=100_000)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(data.CacheDirError, match="SPECDEC_CACHE") as info:
        data.heldout_prompts_path(cache_dir=blocker / "cache")
    assert str(blocker / "cache") in str(info.value) and "cache_dir=" in str(info.value)
