"""Training data for draft heads on a frozen target (:mod:`experiments.head_training`'s): corpus rows,
rows the target writes itself (corpus prompts it continues, or its cached answers to training chats),
seeded batches that resume exactly, and the draft vocabulary taken from those rows."""
from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from specdec.errors import ConfigError

#: Where the rows the target writes itself come from (``generated_source``).
GENERATED_SOURCES = ("corpus", "chats")
#: The answers' length for ``generated_source=chats`` unless ``generated_max_new_tokens`` says otherwise.
DEFAULT_ANSWER_TOKENS = 128


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def token_chunks(tokenizer, split: str, max_chars: int, context: int, exclude: tuple[str, ...] = ()) -> torch.Tensor:
    """``[R, context]`` rows of one corpus split: each file's ids after a separator token, concatenated.

    The separator is the tokenizer's BOS, or its EOS when there is none or the BOS is a chat-turn
    marker (SmolLM2's ``<|im_start|>``). ``exclude``: corpus paths starting with these are left out
    (the prompt suite's sources, :data:`experiments.suite.SUITE_SOURCES`).
    """
    from experiments import corpus
    from experiments.zoo.tokenizer import iter_texts

    root = corpus.default_corpus_root()
    files = [f for f in corpus.hash_order(corpus.corpus_files(split=split))
             if not f.relative_to(root).as_posix().startswith(tuple(exclude))]
    bos = tokenizer.bos_token_id
    if bos is None or "im_start" in str(tokenizer.bos_token):
        bos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in _encode(tokenizer, list(iter_texts(files, max_chars))):
        stream.extend(([bos] if bos is not None else []) + ids)
    rows = len(stream) // context
    if rows == 0:
        raise ConfigError(f"the {split} split gave {len(stream)} tokens, fewer than context={context}: "
                          "raise train_chars or lower context")
    return torch.tensor(stream[: rows * context], dtype=torch.long).view(rows, context)  # [R, T]


@torch.no_grad()
def generate_rows(target, source_rows: torch.Tensor, count: int, prompt: int, temperature: float, seed: int,
                  progress: bool = False, batch: int = 32) -> torch.Tensor:
    """``[count, T]`` rows the target writes itself (Medusa-2-style self-distillation data).

    Each row is the first ``prompt`` tokens of a random row of ``source_rows [R, T]``, continued by the
    target to ``T`` tokens: greedily (``temperature=0``, the text greedy decoding produces) or sampled. Seeded.
    """
    context = source_rows.shape[1]
    if not 0 < prompt < context:
        raise ConfigError(f"generated_prompt={prompt}: it must be between 1 and context - 1 = {context - 1}")
    device = next(target.parameters()).device
    pick = torch.randperm(source_rows.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    pad = target.generation_config.pad_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    rows = []
    for i, start in enumerate(tqdm(range(0, len(pick), batch), desc="generating rows", disable=not progress,
                                   file=sys.stderr)):
        ids = source_rows[pick[start : start + batch], :prompt].to(device)  # [b, prompt]
        torch.manual_seed(seed + i)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=context - prompt,
                              min_new_tokens=context - prompt, pad_token_id=pad if pad is not None else 0, **sampling)
        rows.append(out[:, :context].cpu())  # [b, T]
    return torch.cat(rows)  # [count, T]


def chat_windows(rows, context: int) -> torch.Tensor:
    """``[R, context]`` windows of chat rows (:class:`experiments.chat_data.ChatRows`): each row's last
    ``context`` tokens (its answer and the end of its prompt), right-padded when shorter."""
    out = torch.full((rows.ids.shape[0], context), rows.pad_id, dtype=torch.long)  # [R, T]
    for i, length in enumerate(rows.lengths.tolist()):
        window = rows.ids[i, max(0, length - context) : length]
        out[i, : len(window)] = window
    return out


def training_batches(corpus_rows: torch.Tensor, extra_rows: torch.Tensor | None, cfg: DictConfig, start: int):
    """Batches ``[B, T]`` for steps ``start..steps-1``: corpus rows plus, with generated rows, a
    ``generated_fraction`` share of each batch drawn from those (each stream seeded, so resuming is exact)."""
    from experiments.zoo.training import shuffled_batches

    n_gen = round(cfg.batch_size * cfg.generated_fraction) if extra_rows is not None else 0
    n_corpus, steps = cfg.batch_size - n_gen, cfg.steps - start
    corpus = shuffled_batches(corpus_rows, n_corpus, steps, cfg.seed, offset=start) if n_corpus else None
    extra = shuffled_batches(extra_rows, n_gen, steps, cfg.seed + 1, offset=start) if n_gen else None
    for _ in range(steps):
        yield torch.cat([next(s) for s in (corpus, extra) if s is not None])


def source_is_corpus(cfg: DictConfig) -> bool:
    """Whether the generated rows are corpus prompts the target continues (not its cached answers to chats)."""
    return cfg.get("generated_source", "corpus") == "corpus"


def answer_settings(cfg: DictConfig) -> dict:
    """The checkpoint setting the chats' answer length adds (none at the default, so older checkpoints resume),
    validated."""
    tokens = cfg.get("generated_max_new_tokens", DEFAULT_ANSWER_TOKENS)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"generated_max_new_tokens={tokens!r}: it must be an integer >= 1")
    return {"generated_max_new_tokens": tokens} if not source_is_corpus(cfg) and tokens != DEFAULT_ANSWER_TOKENS else {}


def generated_training_rows(cfg: DictConfig, target, tokenizer, target_dir: str, train_chunks: torch.Tensor):
    """``[R, context]`` rows the target wrote itself, or None: corpus prompts it continued
    (``generated_source=corpus``), or its cached answers to training chats (``chats``, for chat targets:
    :mod:`experiments.chat_data`; ``generated_rows`` chats)."""
    if not cfg.generated_rows:
        return None
    if cfg.get("generated_source", "corpus") == "chats":
        from experiments.chat_data import ensure_generations

        rows, _ = ensure_generations(target, tokenizer, target_dir, count=cfg.generated_rows,
                                     max_new_tokens=cfg.get("generated_max_new_tokens", DEFAULT_ANSWER_TOKENS),
                                     cache_dir=cfg.cache_dir, progress=cfg.progress)
        return chat_windows(rows, cfg.context)
    return generate_rows(target, train_chunks, cfg.generated_rows, cfg.generated_prompt,
                         float(cfg.generated_temperature), cfg.seed, cfg.progress)


def draft_vocabulary(cfg: DictConfig, target, train_chunks: torch.Tensor, extra_rows: torch.Tensor | None):
    """``cfg.draft_vocab``'s most frequent tokens of the training rows (corpus and the target's own rows
    weighted equally; the target's EOS tokens always in), ascending ``[Vd]``, or None for the whole vocabulary."""
    from drafters.draft_vocab import frequent_tokens
    from specdec.decoder import eos_token_ids

    size, vocab = check_draft_vocab(cfg, target)
    if not size:
        return None
    return frequent_tokens([train_chunks, extra_rows], size, vocab, always=eos_token_ids(target))


def check_draft_vocab(cfg: DictConfig, target) -> tuple[int, int]:
    """``(draft vocabulary size, target vocabulary)``; ConfigError unless the size is below the target's."""
    from specdec.models import text_config

    size, vocab = int(cfg.get("draft_vocab") or 0), int(text_config(target).vocab_size)
    if size < 0:
        raise ConfigError(f"draft_vocab={size} is negative: use 0 for the whole vocabulary, or a size below {vocab}")
    if size >= vocab:
        raise ConfigError(f"draft_vocab={size} is not below the target's vocabulary of {vocab} tokens: use 0 for the "
                          "whole vocabulary, or fewer tokens")
    return size, vocab
