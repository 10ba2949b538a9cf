"""A local Spec-Bench-style prompt suite for chat targets, built from this machine's Python installation.

Six categories (Spec-Bench's layout), 16 prompts each, 96 in all, in a fixed order:

- ``coding``: a function's signature and docstring from a *held-out* standard-library file
  (:mod:`experiments.corpus` split by path hash) -> "write this function";
- ``summarization``: a section of Python's documentation topics (``pydoc_data.topics``) -> summarise it;
- ``rag``: a documentation section as context plus a question about it (retrieval-style);
- ``qa``: a closed-book question about a documentation topic (its title, no context);
- ``math_reasoning``: arithmetic word problems generated from a fixed seed (answers known);
- ``multi_turn``: two-turn chats: a question, a fixed correct assistant reply, a follow-up.

Each record is Spec-Bench JSONL (``question_id``, ``category``, ``turns``: the user turns) plus
``messages`` (the chat, assistant replies included) and ``source``. The chat is formatted with the
target's chat template when the prompts are encoded (:func:`experiments.data.prompt_text`), so one
cached file serves every target.

Held out from training: the code prompts come only from held-out corpus files, which no training
set reads; ``pydoc_data`` is excluded from every training set built for a real target
(:data:`SUITE_SOURCES`; :func:`training_chats` draws its prompts from module and class docstrings of
training-split files instead), and the training chats' word problems use another seed and skip any
problem of the suite. (The embedded zoo pair predates the suite and its corpus includes
``pydoc_data/topics.py``; the suite is meant for chat targets.)
"""
from __future__ import annotations

import ast
import inspect
import os
import random
import sys
from pathlib import Path

from experiments import corpus
from experiments.data import Prompt, writable_cache_dir, write_prompts
from specdec.errors import SpecDecError

SUITE_FORMAT = 1  # in the cached file's name
PER_CATEGORY = 16
CATEGORIES = ("coding", "summarization", "rag", "qa", "math_reasoning", "multi_turn")
SUITE_SEED = 20240
#: Corpus files the suite reads besides held-out ones: left out of training sets for real targets.
SUITE_SOURCES = ("pydoc_data/",)
CONTEXT_CHARS = 1400  # documentation excerpts are cut at a paragraph boundary below this
DOCSTRING_CHARS = (60, 700)  # docstrings outside this length make poor code prompts


class SuiteError(SpecDecError):
    """The prompt suite cannot be built on this machine."""


# --------------------------------------------------------------------------- sources


def doc_topics() -> dict[str, str]:
    """``pydoc_data.topics.topics``: Python's documentation sections by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise SuiteError(
            "dataset=suite needs Python's documentation topics (the pydoc_data package), which this Python "
            f"installation ({sys.executable}) lacks; install the full standard library (e.g. the distribution's "
            "python3 docs/pydoc package), or use dataset=stdlib or dataset=spec_bench dataset.path=<question.jsonl>"
        ) from exc
    return dict(topics)


def excerpt(text: str, limit: int = CONTEXT_CHARS) -> str:
    """The leading paragraphs of ``text`` that fit in ``limit`` characters (at least the first)."""
    paragraphs, out, size = text.strip().split("\n\n"), [], 0
    for para in paragraphs:
        if out and size + len(para) > limit:
            break
        out.append(para)
        size += len(para) + 2
    return "\n\n".join(out)[: limit * 2]


def topic_title(text: str) -> str:
    """A section's title: its first line, e.g. ``The "assert" statement``."""
    return text.strip().splitlines()[0].strip()


def documented_functions(files: list[Path], kinds=(ast.FunctionDef,)) -> list[tuple[str, str, str]]:
    """``(source, signature, docstring)`` of public documented definitions in ``files``, round-robin over files.

    Functions give ``name(args)``; classes (``kinds`` with ``ast.ClassDef``) give ``class Name``.
    """
    per_file = []
    root = corpus.default_corpus_root()
    for path in files:
        try:
            tree = ast.parse(corpus.read_text(path))
        except (SyntaxError, ValueError):
            continue
        found = []
        for node in ast.walk(tree):
            if not isinstance(node, kinds) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or not DOCSTRING_CHARS[0] <= len(doc) <= DOCSTRING_CHARS[1]:
                continue
            sig = f"class {node.name}" if isinstance(node, ast.ClassDef) else f"{node.name}({ast.unparse(node.args)})"
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
            found.append((f"{rel}:{node.lineno}", sig, inspect.cleandoc(doc)))
        per_file.append(sorted(found, key=lambda item: int(item[0].rsplit(":", 1)[1])))
    out = []
    for i in range(max((len(f) for f in per_file), default=0)):
        out.extend(f[i] for f in per_file if i < len(f))
    return out


# --------------------------------------------------------------------------- prompt makers


def coding_chat(sig: str, doc: str) -> list[dict]:
    return [{"role": "user", "content": f"Write a Python function `{sig}` that does the following:\n\n{doc}\n\n"
                                        "Reply with the code and a one-sentence explanation."}]


def summary_chat(text: str) -> list[dict]:
    return [{"role": "user", "content": f"Summarize this section of the Python documentation in two or three "
                                        f"sentences.\n\n{text}"}]


def rag_chat(title: str, text: str) -> list[dict]:
    return [{"role": "user", "content": f"Context:\n{text}\n\nUsing only the context above, answer: what is "
                                        f"{title.lower()} for, and how is it used? Give a short example."}]


def qa_chat(title: str) -> list[dict]:
    return [{"role": "user", "content": f"In Python, what is {title.lower()}? Explain it in a few sentences."}]


_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mo", "Nia")
_ITEMS = ("apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "coins")


def word_problem(rng: random.Random) -> tuple[str, int]:
    """One arithmetic word problem and its answer, drawn from ``rng``."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(12, 90), rng.randint(3, 40), rng.randint(2, 11)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{name} has {a} {item}, buys {b} more and gives away {c}. How many {item} does {name} have now?", a + b - c
    if kind == 1:
        return f"A train travels at {a} km per hour for {c} hours. How many kilometres does it travel?", a * c
    if kind == 2:
        return f"A box holds {c} rows of {b} {item}. {name} takes out {c + 1}. How many {item} are left?", c * b - c - 1
    if kind == 3:
        spent = rng.randint(1, b * c - 1)
        return (f"{name} saves {b} dollars a week for {c} weeks, then spends {spent} dollars. "
                f"How many dollars are left?"), b * c - spent
    total = c * b
    return f"{total} {item} are shared equally among {c} children. How many {item} does each child get?", b


def math_chat(question: str) -> list[dict]:
    return [{"role": "user", "content": f"{question} Think step by step, then give the final answer."}]


def two_turn_chat(kind: int, rng: random.Random, topics: list[tuple[str, str]], functions: list) -> list[dict]:
    """A question, a short correct assistant reply, and a follow-up (three kinds, by ``kind % 3``)."""
    if kind % 3 == 0:
        question, answer = word_problem(rng)
        return [{"role": "user", "content": question}, {"role": "assistant", "content": f"The answer is {answer}."},
                {"role": "user", "content": "Explain how you got that answer, step by step."}]
    if kind % 3 == 1:
        title, text = topics[kind % len(topics)]
        first = text.split("\n\n")[1] if text.count("\n\n") else text
        return [{"role": "user", "content": f"What is {title.lower()} in Python?"},
                {"role": "assistant", "content": " ".join(first.split())},
                {"role": "user", "content": "Can you show me a short code example of it?"}]
    _, sig, doc = functions[kind % len(functions)]
    return [{"role": "user", "content": f"What does a Python function `{sig}` typically do?"},
            {"role": "assistant", "content": doc.split("\n\n")[0]},
            {"role": "user", "content": "Write that function in Python."}]


def _prompt(qid: int, category: str, messages: list[dict], source: str) -> Prompt:
    turns = [m["content"] for m in messages if m["role"] == "user"]
    return Prompt(qid, category, turns[0], source, messages=messages, turns=turns if len(turns) > 1 else None)


# --------------------------------------------------------------------------- the suite


def suite_prompts() -> list[Prompt]:
    """The 96 suite prompts (6 categories x 16), deterministic for a given Python installation."""
    topics = doc_topics()
    names = sorted(topics, key=lambda k: corpus.sha256_hex("suite-topic:" + k))
    sections = [(k, topic_title(topics[k]), excerpt(topics[k])) for k in names if len(topics[k]) > 400]
    if len(sections) < 4 * PER_CATEGORY:
        raise SuiteError(f"pydoc_data.topics holds only {len(sections)} sections of documentation; "
                         f"the suite needs {4 * PER_CATEGORY}")
    heldout = [p for p in corpus.corpus_files(split="heldout") if not _is_suite_source(p)]
    functions = documented_functions(heldout)
    if len(functions) < 2 * PER_CATEGORY:
        raise SuiteError(f"the held-out standard-library files hold only {len(functions)} documented functions; "
                         f"the suite needs {2 * PER_CATEGORY}")
    rng = random.Random(SUITE_SEED)
    n, prompts = PER_CATEGORY, []

    def add(category: str, messages: list[dict], source: str) -> None:
        prompts.append(_prompt(len(prompts), category, messages, source))

    for src, sig, doc in functions[:n]:
        add("coding", coding_chat(sig, doc), src)
    for key, _, text in sections[:n]:
        add("summarization", summary_chat(text), f"pydoc_data.topics:{key}")
    for key, title, text in sections[n : 2 * n]:
        add("rag", rag_chat(title, text), f"pydoc_data.topics:{key}")
    for key, title, _ in sections[2 * n : 3 * n]:
        add("qa", qa_chat(title), f"pydoc_data.topics:{key}")
    for i in range(n):
        add("math_reasoning", math_chat(word_problem(rng)[0]), f"seed {SUITE_SEED}, problem {i}")
    mt_topics = [(title, text) for _, title, text in sections[3 * n : 4 * n]]
    for i in range(n):
        add("multi_turn", two_turn_chat(i, rng, mt_topics, functions[n:]), f"seed {SUITE_SEED}, chat {i}")
    return prompts


def _is_suite_source(path: Path) -> bool:
    rel = path.relative_to(corpus.default_corpus_root()).as_posix() if path.is_relative_to(
        corpus.default_corpus_root()) else path.name
    return rel.startswith(SUITE_SOURCES)


def training_files() -> list[Path]:
    """The training split of the corpus without the suite's sources (for training sets of real targets)."""
    return [p for p in corpus.corpus_files(split="train") if not _is_suite_source(p)]


def suite_path(cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> Path:
    """Path of the cached suite (Spec-Bench JSONL), built once atomically.

    ``<cache_dir>/prompts/suite-py<major><minor>-f<format>.jsonl`` (``cache_dir`` defaults to
    ``$SPECDEC_CACHE`` or ``~/.cache/specdec``); it depends only on this Python installation.
    """
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = writable_cache_dir(cache_dir) / "prompts" / f"suite-{tag}-f{SUITE_FORMAT}.jsonl"
    if rebuild or not path.is_file():
        write_prompts(path, suite_prompts())
    return path


# --------------------------------------------------------------------------- training chats


def training_chats(count: int, seed: int = 1) -> list[tuple[str, list[dict]]]:
    """``count`` ``(category, messages)`` chats of the suite's kinds from sources the suite never uses.

    Code prompts from functions of training-split files; summaries, questions with context and
    closed-book questions from module and class docstrings of training-split files (not
    ``pydoc_data``); word problems from ``SUITE_SEED + 1000 seed``, redrawn when a chat opens like
    one of the suite's. Round-robin over the six kinds, deterministic. Reads only as many files
    (in hash order) as ``count`` needs.
    """
    need = count // len(CATEGORIES) + 1
    files = corpus.hash_order(training_files())
    functions, classes, used = [], [], 0
    while (len(functions) < 2 * need or len(classes) < need) and used < len(files):
        batch, used = files[used : used + 20], used + 20
        functions += documented_functions(batch)
        classes += [c for c in documented_functions(batch, kinds=(ast.ClassDef,)) if len(c[2]) >= 200]
    if not functions or not classes:
        raise SuiteError("the training split holds no documented functions or classes to build training chats from")
    suite_firsts = {p.messages[0]["content"] for p in suite_prompts()}
    rng = random.Random(SUITE_SEED + 1000 * seed)
    chats: list[tuple[str, list[dict]]] = []
    for i in range(count):
        kind = CATEGORIES[i % len(CATEGORIES)]
        messages = _training_chat(kind, i // len(CATEGORIES), rng, functions, classes)
        while messages[0]["content"] in suite_firsts:
            messages = _training_chat(kind, i // len(CATEGORIES), rng, functions, classes)  # a new word problem
        chats.append((kind, messages))
    return chats


def _training_chat(kind: str, j: int, rng: random.Random, functions: list, classes: list) -> list[dict]:
    """The ``j``-th training chat of ``kind`` (word problems drawn from ``rng``)."""
    _, sig, doc = functions[j % len(functions)]
    src, cls_sig, cls_doc = classes[j % len(classes)]
    module = src.split(":")[0].removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    title = f"the {cls_sig.split()[1]} class of the {module} module"
    if kind == "coding":
        return coding_chat(sig, doc)
    if kind == "summarization":
        return summary_chat(cls_doc)
    if kind == "rag":
        return rag_chat(title, cls_doc)
    if kind == "qa":
        return qa_chat(title)
    if kind == "math_reasoning":
        return math_chat(word_problem(rng)[0])
    return two_turn_chat(j, rng, [(title, cls_doc)], functions[j:] or functions)
