"""Prompt sets in Spec-Bench's JSONL format, and the default held-out prompt set.

A Spec-Bench ``question.jsonl`` holds one JSON object per line::

    {"question_id": 81, "category": "writing", "turns": ["first prompt", "follow-up"]}

Only the first turn is used as the prompt. The default prompt set is built from the
held-out split of the embedded corpus (see ``experiments.corpus``): each prompt is the
first lines of a held-out file, and its category is the file's top-level module.

A default prompt ends at the end of its last line, without that line's newline: the BPE
tokenizer of the embedded pair merges a newline with the next line's indentation
(``"\n    "`` is one token), so a prompt ending in a bare newline token tells the model
"the next line is not indented", a boundary it rarely saw in training, and sends small
models into ``#\n#\n...`` loops (the token-boundary problem).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from experiments import corpus
from specdec.errors import SpecDecError
from specdec.files import atomic_write_text

DEFAULT_NUM_PROMPTS = 32
PROMPT_LINES = 24  # at most this many lines per prompt
PROMPT_MAX_CHARS = 1200  # and at most this many characters, cut at a line boundary
MIN_PROMPT_LINES = 8  # a window shorter than this is not a prompt
CONTINUATION_LINES = 10  # the file must go on for at least this many lines after it
WINDOW_STRIDE = 200  # later windows of a file start this many lines apart
PROMPT_FORMAT = 2  # in the cached file's name; 2: prompts end before their last newline


class PromptFileError(SpecDecError):
    """A prompt file is missing or not valid Spec-Bench JSONL."""


class CacheDirError(SpecDecError):
    """The cache directory cannot be created or written."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: Spec-Bench ``question_id``, ``category`` and the first turn's ``text``."""

    question_id: int | str
    category: str
    text: str
    source: str | None = None  # where the prompt came from (e.g. a corpus file), if known
    messages: list | None = None  # a chat ([{"role", "content"}, ...]) to format with the target's chat template
    turns: list | None = None  # every user turn, if more than ``text`` (Spec-Bench's multi-turn records)


# --------------------------------------------------------------------------- cache dir


def default_cache_dir() -> Path:
    """``$SPECDEC_CACHE`` if set, else ``~/.cache/specdec``."""
    env = os.environ.get("SPECDEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specdec"


def writable_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Create (if needed) and return the cache directory; raise ``CacheDirError`` if unwritable."""
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    fix = "choose another one with cache_dir=... (Hydra override) or the SPECDEC_CACHE environment variable"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CacheDirError(f"cache directory {str(path)!r} is not writable ({exc.strerror or exc}); {fix}") from exc
    return path


# --------------------------------------------------------------------------- Spec-Bench JSONL


def _parse_line(path: Path, lineno: int, line: str) -> Prompt:
    """One JSONL line -> Prompt; ``PromptFileError`` naming file and line on any defect."""
    where = f"{path}:{lineno}"
    fix = 'each line must be a JSON object like {"question_id": 1, "category": "x", "turns": ["prompt"]}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{where}: invalid JSON ({exc.msg}); {fix}") from exc
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}; {fix}")
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
        raise PromptFileError(f"{where}: missing or empty 'turns' (a list of prompt strings); {fix}")
    question_id = record.get("question_id", lineno)
    if isinstance(question_id, float) and question_id.is_integer():
        question_id = int(question_id)  # 81.0 is question 81
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
        raise PromptFileError(f"{where}: question_id {question_id!r} is not an integer or a string; {fix}")
    messages = record.get("messages")
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
        raise PromptFileError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects')
    more_turns = turns if messages is not None and len(turns) > 1 else None  # kept with the chat they belong to
    return Prompt(question_id, str(record.get("category", "default")), turns[0], record.get("source"), messages,
                  more_turns)


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[Prompt]:
    """Read the prompts of a Spec-Bench ``question.jsonl`` (first turn of each record).

    Blank lines are skipped. ``limit`` keeps only the first ``limit`` prompts. Raises
    ``PromptFileError`` naming the file (and line number) if the file is missing, empty
    or not valid Spec-Bench JSONL.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise PromptFileError(f"prompt file {str(path)!r} {problem}; pass the path of a Spec-Bench question.jsonl")
    prompts, first_line = [], {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                prompt = _parse_line(path, lineno, line)
                if prompt.question_id in first_line:  # results, comparisons and resuming go by question_id
                    raise PromptFileError(f"{path}:{lineno}: question_id {prompt.question_id!r} is also line "
                                          f"{first_line[prompt.question_id]}'s; give every prompt its own question_id")
                first_line[prompt.question_id] = lineno
                prompts.append(prompt)
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts; add one JSON object per line with 'turns'")
    return prompts


def prompts_to_jsonl(prompts: list[Prompt]) -> str:
    """Spec-Bench JSONL text for ``prompts`` (one record per line)."""
    lines = []
    for prompt in prompts:
        record = {"question_id": prompt.question_id, "category": prompt.category, "turns": prompt.turns or [prompt.text]}
        if prompt.source is not None:
            record["source"] = prompt.source
        if prompt.messages is not None:
            record["messages"] = prompt.messages
        lines.append(json.dumps(record, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def prompt_text(prompt: Prompt, tokenizer) -> str:
    """The text to tokenize for ``prompt``: its chat through the tokenizer's chat template (generation
    prompt added) when the record has ``messages``, else the first turn as it is. A tokenizer without a
    chat template gets the chat as ``role: content`` lines ending in ``assistant:``."""
    if prompt.messages is None:
        return prompt.text
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in prompt.messages) + "assistant:"


def prompt_ids(prompt: Prompt, tokenizer):
    """``prompt`` as token ids ``[1, T]`` (a LongTensor): :func:`prompt_text` tokenized, with the tokenizer's
    special tokens only where no chat template put its own in the text. No length warning: a prompt longer than the
    model's context is the decoder's one error."""
    templated = prompt.messages is not None and bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(prompt_text(prompt, tokenizer), return_tensors="pt", add_special_tokens=not templated,
                     verbose=False)["input_ids"]


def write_prompts(path: str | os.PathLike, prompts: list[Prompt]) -> Path:
    """Write ``prompts`` as Spec-Bench JSONL to ``path`` (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, prompts_to_jsonl(prompts))
    return path


# --------------------------------------------------------------------------- held-out prompts


def prompt_window(lines: list[str], start: int) -> str | None:
    """The prompt text starting at line ``start``, or None if the file is too short there.

    At most ``PROMPT_LINES`` lines and ``PROMPT_MAX_CHARS`` characters (cut at a line
    boundary, the last line's newline left out: see the module docstring); the file must
    continue for ``CONTINUATION_LINES`` more lines.
    """
    if len(lines) < start + PROMPT_LINES + CONTINUATION_LINES:
        return None
    taken, size = [], 0
    for line in lines[start : start + PROMPT_LINES]:
        if size + len(line) > PROMPT_MAX_CHARS:
            break
        taken.append(line)
        size += len(line)
    if len(taken) < MIN_PROMPT_LINES:
        return None
    return "".join(taken).rstrip("\r\n")


def heldout_prompts(num_prompts: int = DEFAULT_NUM_PROMPTS, corpus_root: str | os.PathLike | None = None) -> list[Prompt]:
    """The default prompt set: windows of held-out corpus files, in a deterministic order.

    The first window (the first lines) of every long-enough held-out file comes first,
    in path order; if more prompts are asked for, later windows (``WINDOW_STRIDE`` lines
    apart) follow. Raises ``ValueError`` if the held-out split has too few windows.
    """
    root = Path(corpus_root) if corpus_root is not None else corpus.default_corpus_root()
    files = corpus.corpus_files(root, split="heldout")
    texts = [corpus.read_text(path).splitlines(keepends=True) for path in files]
    prompts: list[Prompt] = []
    max_windows = max((len(lines) for lines in texts), default=0) // WINDOW_STRIDE + 1
    for window in range(max_windows):
        for path, lines in zip(files, texts):
            text = prompt_window(lines, window * WINDOW_STRIDE)
            if text is None:
                continue
            source = f"{path.relative_to(root).as_posix()}:{window * WINDOW_STRIDE + 1}"
            prompts.append(Prompt(len(prompts), corpus.top_level_module(path, root), text, source))
            if len(prompts) == num_prompts:
                return prompts
    raise ValueError(f"the held-out split of {str(root)!r} yields only {len(prompts)} prompts; ask for num_prompts<={len(prompts)}")


def heldout_prompts_path(
    cache_dir: str | os.PathLike | None = None,
    num_prompts: int = DEFAULT_NUM_PROMPTS,
    corpus_root: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> Path:
    """Path of the cached default prompt set (Spec-Bench JSONL), built once atomically.

    The file lives at ``<cache_dir>/prompts/stdlib-heldout-py<major><minor>-f<format>-n<num>.jsonl``
    (``cache_dir`` defaults to ``$SPECDEC_CACHE`` or ``~/.cache/specdec``). A custom
    ``corpus_root`` gets its own file name. ``rebuild=True`` rewrites it.
    """

    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    cache = writable_cache_dir(cache_dir)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    if corpus_root is not None:
        tag = "root" + corpus.sha256_hex(str(Path(corpus_root).resolve()))[:10]
    path = cache / "prompts" / f"stdlib-heldout-{tag}-f{PROMPT_FORMAT}-n{num_prompts}.jsonl"
    if rebuild or not path.is_file():
        write_prompts(path, heldout_prompts(num_prompts, corpus_root))
    return path
