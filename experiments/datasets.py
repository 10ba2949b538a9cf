"""Prompt sets as config objects: the ``dataset`` group's ``_target_`` builds one of these.

Each class knows where its prompts come from; ``load(num_prompts)`` returns the first
``num_prompts`` of them as :class:`experiments.data.Prompt`. A new prompt set is a subclass
with a ``path(num_prompts)`` (or ``load``) and a ``conf/dataset/<name>.yaml`` naming it::

    _target_: experiments.datasets.SpecBench
    path: /data/question.jsonl
    max_prompt_tokens: null

``max_prompt_tokens`` (keep the last n prompt tokens; None keeps all) is read by the decode loop
when it tokenizes the prompts.
"""
from __future__ import annotations

import os
from pathlib import Path

from specdec.errors import ConfigError


class PromptSet:
    """A prompt set in Spec-Bench JSONL.

    Args:
        path: a ``question.jsonl``; None asks the subclass for its default file.
        max_prompt_tokens: keep the last n prompt tokens (None: all).
        cache_dir: where built prompt files are cached (None: ``$SPECDEC_CACHE`` or ``~/.cache/specdec``).
    """

    name = "prompts"

    def __init__(self, path: str | os.PathLike | None = None, max_prompt_tokens: int | None = None,
                 cache_dir: str | os.PathLike | None = None):
        if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int)
                                              or max_prompt_tokens < 1):
            raise ConfigError(f"dataset.max_prompt_tokens={max_prompt_tokens!r}: use a positive number or null")
        self.file, self.max_prompt_tokens, self.cache_dir = path, max_prompt_tokens, cache_dir

    def path(self, num_prompts: int) -> Path:
        """The JSONL file holding at least ``num_prompts`` prompts (built and cached if needed)."""
        if not self.file:
            raise ConfigError(f"dataset={self.name} needs dataset.path=<question.jsonl>")
        return Path(str(self.file)).expanduser()

    def load(self, num_prompts: int) -> list:
        """The first ``num_prompts`` prompts (:class:`experiments.data.Prompt`)."""
        from experiments.data import load_prompts

        if num_prompts < 1:
            raise ConfigError(f"num_prompts={num_prompts}: decode at least one prompt")
        return load_prompts(self.path(num_prompts), limit=num_prompts)


class SpecBench(PromptSet):
    """Any Spec-Bench ``question.jsonl`` (``dataset.path`` is required)."""

    name = "spec_bench"


class StdlibHeldout(PromptSet):
    """Held-out files of the standard-library corpus (:func:`experiments.data.heldout_prompts`), cached.

    Args:
        corpus_root: another Python source tree (None: this Python's standard library).
    """

    name = "stdlib"

    def __init__(self, path=None, max_prompt_tokens: int | None = 256, cache_dir=None,
                 corpus_root: str | os.PathLike | None = None):
        super().__init__(path, max_prompt_tokens, cache_dir)
        self.corpus_root = corpus_root

    def path(self, num_prompts: int) -> Path:
        from experiments.data import heldout_prompts_path

        if self.file:
            return super().path(num_prompts)
        return heldout_prompts_path(cache_dir=self.cache_dir, num_prompts=num_prompts, corpus_root=self.corpus_root)


class Suite(PromptSet):
    """The local Spec-Bench-style suite for chat targets (:mod:`experiments.suite`), cached."""

    name = "suite"

    def path(self, num_prompts: int) -> Path:
        from experiments.suite import suite_path

        return super().path(num_prompts) if self.file else suite_path(cache_dir=self.cache_dir)
