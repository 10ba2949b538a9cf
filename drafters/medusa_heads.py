"""Medusa heads (Cai et al. 2024, arXiv 2401.10774): extra decoding heads over the target's last hidden state.

Head ``i`` (0-based) reads the target's final hidden state ``h_t`` (after the final norm) at the
position of the last accepted token ``x_t`` and predicts the token ``i + 1`` positions past the
next one: the target's own LM head on ``h_t`` gives ``x_{t+1}`` (the tree's root), head 0 gives
``x_{t+2}`` (tree depth 1), head ``i`` gives ``x_{t+2+i}`` (tree depth ``i + 1``).

Each head is ``num_blocks`` residual blocks ``x + SiLU(W x + b)`` followed by its own LM head
(initialised from the target's output embedding). Residual blocks start at zero, so an untrained
head predicts what the target's LM head predicts from ``h_t``.

On disk a heads directory holds ``medusa_heads.safetensors`` (the tensors), ``medusa_config.json``
(shape and the target the heads were trained for) and, after training, ``eval.json`` (held-out
accuracy per head and per rank, which picks the default tree).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from drafters.draft_vocab import DraftVocabHead, check_ids
from drafters.head_files import (  # noqa: F401
    EVAL_FILE,
    HeadFormat,
    cache_root,
    load_into,
    read_config,
    read_eval,
    same_target,
    save_files,
    target_fingerprint,
    target_options,
)
from drafters.head_files import check_target as check_heads_target
from specdec.errors import SpecDecError
from specdec.files import atomic_write_json

WEIGHTS_FILE = "medusa_heads.safetensors"
CONFIG_FILE = "medusa_config.json"
FORMAT = 1
TRAIN_COMMAND = "python -m experiments.train_medusa"


class MedusaHeadsError(SpecDecError):
    """Medusa heads are missing, incomplete, or do not belong to the target."""


FILES = HeadFormat(label="Medusa heads", weights_file=WEIGHTS_FILE, config_file=CONFIG_FILE, format=FORMAT,
                   train_command=TRAIN_COMMAND, error=MedusaHeadsError,
                   required=("num_heads", "num_blocks", "hidden_size", "vocab_size"))


# --------------------------------------------------------------------------- the module


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``; zero-initialised so that it starts as the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    """Residual blocks then an LM head: ``[..., H] -> [..., V]`` (over a draft vocabulary of
    ``draft_vocab`` tokens when it is not 0: :class:`drafters.draft_vocab.DraftVocabHead`)."""

    def __init__(self, hidden_size: int, vocab_size: int, num_blocks: int, draft_vocab: int = 0):
        super().__init__()
        self.blocks = nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_blocks)])
        self.lm_head = (DraftVocabHead(vocab_size, draft_vocab, hidden_size) if draft_vocab
                        else nn.Linear(hidden_size, vocab_size, bias=False))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.blocks(hidden))


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads over a target's last hidden state.

    Args:
        hidden_size, vocab_size: the target's hidden width and output vocabulary.
        num_heads: how many heads (head ``i`` drafts tree depth ``i + 1``).
        num_blocks: residual blocks per head.
        target: the target's fingerprint (:func:`target_fingerprint`), recorded for load-time checks.
        source: where the heads were loaded from (for error messages), if anywhere.
        draft_vocab: 0, or the size of the heads' draft vocabulary (:mod:`drafters.draft_vocab`).
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_blocks: int = 1,
                 target: dict | None = None, source: str | None = None, draft_vocab: int = 0):
        super().__init__()
        for name, value, low in (("num_heads", num_heads, 1), ("num_blocks", num_blocks, 0),
                                 ("hidden_size", hidden_size, 1), ("vocab_size", vocab_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MedusaHeadsError(f"{name}={value!r}: it must be an integer >= {low}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_blocks = num_blocks
        self.draft_vocab = int(draft_vocab)
        self.heads = nn.ModuleList(MedusaHead(hidden_size, vocab_size, num_blocks, self.draft_vocab)
                                   for _ in range(num_heads))
        self.target_info = dict(target or {})
        self.source = source

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """Logits ``[K, ..., V]`` of the first ``num_heads`` heads (all by default) on ``hidden [..., H]``."""
        heads = self.heads[: num_heads or self.num_heads]
        return torch.stack([head(hidden) for head in heads])

    @classmethod
    def for_target(cls, target, num_heads: int, num_blocks: int = 1, init: str = "zero",
                   seed: int = 0, draft_vocab: torch.Tensor | None = None) -> MedusaHeads:
        """Heads shaped for ``target``; every LM head starts as a copy of the target's output embedding
        (its rows ``draft_vocab [Vd]`` when a draft vocabulary is given).

        ``init="zero"`` (Medusa's): residual blocks are the identity, so each head starts by predicting
        the target's next token. ``init="random"``: random residual blocks (seeded), for tests.
        """
        if init not in ("zero", "random"):
            raise MedusaHeadsError(f"init={init!r}: use 'zero' (Medusa's) or 'random'")
        out_emb = target.get_output_embeddings().weight  # [V, H]
        vocab, hidden = int(out_emb.shape[0]), int(out_emb.shape[1])
        heads = cls(hidden, vocab, num_heads, num_blocks, target=target_fingerprint(target))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for head in heads.heads:
                head.lm_head.weight.copy_(out_emb.detach().float().cpu())
                if init == "random":
                    for block in head.blocks:
                        block.linear.weight.copy_(torch.randn(hidden, hidden, generator=gen) / hidden**0.5)
                        block.linear.bias.copy_(torch.randn(hidden, generator=gen) * 0.1)
        return heads.use_draft_vocab(draft_vocab) if draft_vocab is not None else heads

    def use_draft_vocab(self, ids: torch.Tensor) -> MedusaHeads:
        """From now on every head scores only the tokens ``ids [Vd]``, keeping its LM head's rows for them
        (:mod:`drafters.draft_vocab`; also training-free, on trained heads)."""
        if self.draft_vocab:
            raise MedusaHeadsError("these heads already draft over a draft vocabulary")
        for head in self.heads:
            try:
                head.lm_head = DraftVocabHead.over(ids, self.vocab_size, self.hidden_size, head.lm_head.weight)
            except ValueError as exc:
                raise MedusaHeadsError(str(exc)) from exc
        self.draft_vocab = int(ids.numel())
        return self

    def config(self) -> dict:
        """The ``medusa_config.json`` content (without training details)."""
        return {"format": FORMAT, "num_heads": self.num_heads, "num_blocks": self.num_blocks,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "target": self.target_info,
                "draft_vocab": self.draft_vocab}


def check_target(heads: MedusaHeads, target, fix: str | None = None) -> None:
    """Raise :class:`MedusaHeadsError` unless ``heads`` were trained for ``target`` (``fix``: the error's advice)."""
    check_heads_target(FILES, heads.hidden_size, heads.vocab_size, heads.target_info, heads.source, target, fix)


# --------------------------------------------------------------------------- saving and loading


def default_heads_dir(zoo_size: str = "default", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``experiments.train_medusa`` puts the heads of the embedded pair's target:
    ``<cache>/medusa/zoo-<size>`` (cache: ``$SPECDEC_CACHE`` or ``~/.cache/specdec``)."""
    return cache_root(cache_dir) / "medusa" / f"zoo-{zoo_size}"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file + ``os.replace``)."""
    atomic_write_json(path, data)


def save_heads(heads: MedusaHeads, directory: str | os.PathLike, training: dict | None = None,
               evaluation: dict | None = None) -> Path:
    """Write ``heads`` to ``directory`` (created if needed): tensors, then eval report, then config (last).

    Each file is replaced atomically, so a reader never sees a half-written file.
    """
    config = {k: v for k, v in heads.config().items() if k != "format"}
    return save_files(FILES, heads, {**config, "training": training or {}}, directory, evaluation)


HOW_TO_TRAIN = (f"`{TRAIN_COMMAND}` (the embedded default target; `zoo_size=micro` or `target=<dir>` for others)")


def read_heads_config(directory: str | os.PathLike) -> dict:
    """The parsed ``medusa_config.json`` of a heads directory (:class:`MedusaHeadsError` if absent or bad)."""
    return read_config(FILES, directory, HOW_TO_TRAIN)


def load_heads(directory: str | os.PathLike, num_heads: int | None = None) -> MedusaHeads:
    """Load the first ``num_heads`` heads (all by default) saved in ``directory``.

    Raises:
        MedusaHeadsError: the directory, config or tensor file is missing; the file lacks a tensor
            or has one of the wrong shape; or ``num_heads`` exceeds the heads trained.
    """
    directory = Path(directory).expanduser()
    config = read_heads_config(directory)
    trained = int(config["num_heads"])
    if num_heads is None:
        num_heads = trained
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise MedusaHeadsError(f"drafter.num_heads={num_heads!r}: it must be an integer >= 1 (or null for all heads)")
    if num_heads > trained:
        raise MedusaHeadsError(
            f"drafter.num_heads={num_heads} but the heads at {str(directory)!r} were trained with {trained}: use "
            f"drafter.num_heads<={trained}, or train more with `{TRAIN_COMMAND} num_heads={num_heads}"
            f"{target_options(config.get('training') or {})}`")
    heads = MedusaHeads(int(config["hidden_size"]), int(config["vocab_size"]), num_heads, int(config["num_blocks"]),
                        target=config.get("target"), source=str(directory), draft_vocab=int(config.get("draft_vocab") or 0))
    note = f"{trained} heads with {config['num_blocks']} residual block(s) each"
    if heads.draft_vocab:
        note += f" over a {heads.draft_vocab}-token draft vocabulary"
    load_into(FILES, heads, directory, note, HOW_TO_TRAIN)
    for head in heads.heads if heads.draft_vocab else ():
        if problem := check_ids(head.lm_head.ids, heads.vocab_size):
            raise MedusaHeadsError(f"{directory / WEIGHTS_FILE}: {problem}; {FILES.retrain()}")
    return heads
