"""Prompt-lookup (n-gram) drafting: continue the longest suffix that already occurred in the context (or, with
a datastore, in text the target wrote before: :mod:`drafters.datastore`)."""
from __future__ import annotations

import os

import torch

from drafters.datastore import MIN_NGRAM, MIN_SHARE, Datastore, check_settings, load_datastore, rows_file
from specdec.drafting import DraftContext, Drafter
from specdec.errors import ConfigError, positive_int
from specdec.models import vocab_size
from specdec.types import DraftTree


def check_ngram_sizes(min_ngram, max_ngram, where: str = "") -> None:
    """Both sizes integers >= 1 and ``min_ngram <= max_ngram``, else :class:`ConfigError` (keys under ``where``)."""
    if not positive_int(min_ngram, f"{where}min_ngram") <= positive_int(max_ngram, f"{where}max_ngram"):
        raise ConfigError(f"ngram sizes need 1 <= {where}min_ngram <= {where}max_ngram (got {min_ngram}, {max_ngram})")


class NGramDrafter(Drafter):
    """Deterministic proposals from earlier occurrences of the context's suffix.

    The longest suffix of ``max_ngram .. min_ngram`` tokens that occurred earlier wins; the
    ``num_speculative_tokens`` tokens that followed it are proposed as a chain. ``match`` picks the
    ``last`` (most recent) or ``first`` earlier occurrence. An index of every n-gram is kept up to
    date incrementally, so a lookup costs O(max_ngram) per step.

    ``datastore`` (a :class:`~drafters.datastore.Datastore`, or a chat-rows file or directory it is built from
    with ``datastore_min_ngram`` and ``datastore_min_share``): where the context holds no match, the chain is
    drafted from the datastore's statistics instead (REST-style retrieval; deterministic, so lossless).
    """

    name = "ngram"

    def __init__(self, num_speculative_tokens: int = 4, max_ngram: int = 3, min_ngram: int = 1, match: str = "last",
                 datastore: Datastore | str | None = None, datastore_min_ngram: int = MIN_NGRAM,
                 datastore_min_share: float = MIN_SHARE):
        super().__init__()
        positive_int(num_speculative_tokens, "drafter.num_speculative_tokens")
        check_ngram_sizes(min_ngram, max_ngram, "drafter.")
        if match not in ("last", "first"):
            raise ConfigError(f"drafter.match={match!r}: choose 'last' or 'first'")
        check_settings(datastore_min_ngram, datastore_min_share)  # also without a datastore: never silently ignored
        self.k, self.max_ngram, self.min_ngram, self.match = num_speculative_tokens, max_ngram, min_ngram, match
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0
        if datastore is not None and not isinstance(datastore, Datastore):
            datastore = load_datastore(str(datastore), datastore_min_ngram, datastore_min_share)
        self.datastore = datastore

    @classmethod
    def check_files(cls, config) -> None:
        """The datastore settings are in range (also without a datastore) and a ``datastore`` path ``config`` gives
        holds chat rows (before any model loads)."""
        check_settings(config.get("datastore_min_ngram", MIN_NGRAM), config.get("datastore_min_share", MIN_SHARE))
        datastore = config.get("datastore")
        if isinstance(datastore, (str, os.PathLike)):
            rows_file(datastore, "drafter.datastore")

    @property
    def max_nodes(self) -> int:
        return self.k

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        if self.datastore is not None and ctx.target is not None:  # another tokenizer's rows: one error now, not a
            # bad draft at the first step that drafts from it (a lookup runs no model: a test may start it without one)
            self.datastore.check_vocab(vocab_size(ctx.target))
        self._index, self._indexed = {}, 0

    def _update_index(self) -> None:
        """Index the n-grams ending at every position before the last (the suffix being looked up)."""
        toks = self.tokens
        for end in range(self._indexed, len(toks) - 1):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end + 1 >= n:
                    key = tuple(toks[end + 1 - n : end + 1])
                    if self.match == "last" or key not in self._index:
                        self._index[key] = end + 1  # where the continuation starts
        self._indexed = max(self._indexed, len(toks) - 1)

    def _continuation(self, start: int, k: int) -> list[int]:
        """The k tokens after an earlier match; a match that runs into the end repeats with its period."""
        toks, period = self.tokens, len(self.tokens) - start
        cont: list[int] = []
        for i in range(k):
            cont.append(toks[start + i] if start + i < len(toks) else cont[i - period])
        return cont

    def propose(self, max_depth: int) -> DraftTree:
        k = min(self.k, max_depth)
        if k <= 0:
            return DraftTree.empty()
        self._update_index()
        toks = self.tokens
        for n in range(min(self.max_ngram, len(toks)), self.min_ngram - 1, -1):
            start = self._index.get(tuple(toks[-n:]))
            if start is not None:
                return DraftTree.chain(torch.tensor(self._continuation(start, k), dtype=torch.long))
        if self.datastore is not None and (retrieved := self.datastore.chain(toks, k)):
            return DraftTree.chain(torch.tensor(retrieved, dtype=torch.long))
        return DraftTree.empty()


def prompt_lookup_like_hf(num_speculative_tokens: int, max_ngram: int) -> NGramDrafter:
    """The n-gram drafter the benchmarks set beside Hugging Face's prompt lookup decoding (their ``ours_ngram``): its
    rule, the earliest occurrence of the longest suffix of at most ``max_ngram`` tokens (``match="first"``)."""
    return NGramDrafter(num_speculative_tokens, max_ngram=max_ngram, match="first")
