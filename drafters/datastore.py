"""A REST-style datastore (He et al. 2024, arXiv 2311.08252) for the n-gram drafter: text the target wrote
before, looked up by the context's suffix when the context itself holds no earlier occurrence.

:class:`Datastore` counts, for every n-gram of ``min_ngram .. max_ngram`` tokens in its rows, the tokens that
followed it, and keeps each n-gram's most frequent next token with its share. :meth:`Datastore.chain` then
drafts greedily: the longest known suffix of the context picks the next token, that token joins the context,
and so on, for as long as the chosen continuation is frequent enough (``min_count``) and dominant enough
(``min_share``). A chain is a function of the committed tokens only, so drafting from it is lossless at any
temperature, as prompt lookup is.

The natural rows are the target's own answers to training chats (:mod:`experiments.chat_data`'s
``rows.safetensors``, answers only): the prompt suite's sources are never among them.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from specdec.errors import ConfigError, positive_int

MIN_NGRAM, MAX_NGRAM, MIN_SHARE = 3, 4, 0.5  # the n-gram drafter's datastore settings unless its config says otherwise


class Datastore:
    """Next-token statistics of ``rows`` (lists of token ids) for n-grams of ``min_ngram .. max_ngram`` tokens.

    Args:
        rows: token sequences; a row's n-grams never span into another row.
        min_ngram, max_ngram: the suffix lengths looked up (longest first).
        min_count: a continuation seen fewer times than this is not drafted.
        min_share: nor one that followed its n-gram in less than this share of its occurrences.
    """

    def __init__(self, rows: list[list[int]], min_ngram: int = MIN_NGRAM, max_ngram: int = MAX_NGRAM, min_count: int = 2,
                 min_share: float = MIN_SHARE):
        for name, value in (("min_ngram", min_ngram), ("max_ngram", max_ngram), ("min_count", min_count)):
            positive_int(value, f"datastore {name}")  # 2.5 was truncated to 2 without a word
        if min_ngram > max_ngram:
            raise ConfigError(f"datastore n-gram sizes need 1 <= min_ngram <= max_ngram (got {min_ngram}, {max_ngram})")
        check_share(min_share, "datastore min_share")
        self.min_ngram, self.max_ngram, self.min_count, self.min_share = min_ngram, max_ngram, min_count, float(min_share)
        self.tokens = sum(len(r) for r in rows)
        self.max_token = max((max(r) for r in rows if r), default=-1)  # the vocabulary its rows were written in
        self.best = self._index(rows)
        self.source, self.key = None, "datastore"  # the rows it was built from and the setting that named them

    def check_vocab(self, vocab_size: int) -> None:
        """ConfigError naming the setting that gave the rows if they hold token ids past a target vocabulary of
        ``vocab_size`` ids: they were written with another model's tokenizer, and its drafts would be another
        vocabulary's ids."""
        if self.max_token >= vocab_size:
            where = f"={self.source}" if self.source else ""
            raise ConfigError(f"{self.key}{where}: its rows hold token id {self.max_token}, outside the target's "
                              f"vocabulary of {vocab_size} ids: they were written by a model with another tokenizer; "
                              f"give the rows this target wrote ({WRITTEN_BY}), or leave the datastore out")

    def _index(self, rows: list[list[int]]) -> dict[tuple[int, ...], int]:
        """n-gram -> its most frequent next token, for those that pass ``min_count`` and ``min_share``."""
        follow: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for row in rows:
            for end in range(1, len(row)):
                for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                    follow[tuple(row[end - n : end])][row[end]] += 1
        best = {}
        for key, counts in follow.items():
            token, count = counts.most_common(1)[0]
            if count >= self.min_count and count >= self.min_share * sum(counts.values()):
                best[key] = token
        return best

    def __len__(self) -> int:
        return len(self.best)

    def next_token(self, context: list[int]) -> int | None:
        """The drafted next token after ``context`` (its longest suffix the datastore knows), or None."""
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            token = self.best.get(tuple(context[-n:]))
            if token is not None:
                return token
        return None

    def chain(self, context: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens drafted greedily after ``context`` (fewer where no known suffix continues)."""
        tail, out = list(context[-self.max_ngram :]), []
        while len(out) < k:
            token = self.next_token(tail)
            if token is None:
                break
            out.append(token)
            tail = (tail + [token])[-self.max_ngram :]
        return out

    @classmethod
    def from_chat_rows(cls, path: str | os.PathLike, key: str = "datastore", **kwargs) -> Datastore:
        """A datastore of the answers in a :mod:`experiments.chat_data` rows file (or its directory), each with
        the ``max_ngram`` prompt tokens before it (the answer's first tokens follow the prompt's end). ``key``: the
        setting that gave ``path``, as errors name it."""
        from experiments.chat_data import load_rows

        file = rows_file(path, key)
        try:
            rows = load_rows(file)
        except Exception as exc:  # noqa: BLE001 - an unreadable or foreign file
            raise ConfigError(f"{key}={path}: {file} is not a chat-rows file ({exc})") from None
        before = positive_int(kwargs.get("max_ngram", MAX_NGRAM), "datastore max_ngram")  # the prompt tail kept
        seqs = [rows.ids[i, max(0, p - before) : n].tolist()
                for i, (p, n) in enumerate(zip(rows.prompt_lengths.tolist(), rows.lengths.tolist()))]
        store = cls(seqs, **kwargs)
        store.source, store.key = str(path), key
        return store


#: The command that writes a target's answers to training chats, a datastore's rows.
WRITTEN_BY = "`python -m experiments.train_medusa target=<model> generated_source=chats ...`"


def rows_file(path: str | os.PathLike, key: str = "datastore") -> Path:
    """The chat-rows file ``path`` names (the file, or ``rows.safetensors`` in the directory); a ConfigError naming
    ``key`` and the command that writes one if there is none."""
    from experiments.chat_data import ROWS_FILE

    file = Path(path).expanduser()
    file = file / ROWS_FILE if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"{key}={path}: no {ROWS_FILE} there; the target's answers to training chats are "
                          f"written by {WRITTEN_BY} (experiments.chat_data), or give such a file")
    return file


def check_settings(min_ngram, min_share, key: str = "drafter.datastore") -> None:
    """ConfigError naming ``<key>_min_ngram`` / ``<key>_min_share`` (the n-gram drafter's settings) unless
    ``min_ngram`` is an integer >= 1 and ``min_share`` a number in [0, 1]."""
    positive_int(min_ngram, f"{key}_min_ngram")
    check_share(min_share, f"{key}_min_share")


def check_share(min_share, name: str) -> None:
    """ConfigError naming ``name`` unless ``min_share`` is a number in [0, 1]."""
    if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) or not 0 <= min_share <= 1:
        raise ConfigError(f"{name}={min_share!r}: it must be a number in [0, 1] (the least share of an "
                          "n-gram's occurrences its drafted continuation followed)")


@lru_cache(maxsize=4)
def load_datastore(path: str, min_ngram: int = MIN_NGRAM, min_share: float = MIN_SHARE, key: str = "drafter.datastore") -> Datastore:
    """:meth:`Datastore.from_chat_rows`, built once per setting (drafters and their per-row copies share it).
    ``min_ngram`` and ``min_share`` are checked first (:func:`check_settings`)."""
    check_settings(min_ngram, min_share, key)
    return Datastore.from_chat_rows(path, key=key, min_ngram=min_ngram, max_ngram=max(MAX_NGRAM, min_ngram),
                                    min_share=float(min_share))
