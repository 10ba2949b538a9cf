"""The shared stack for training draft heads on a frozen target (Medusa's, EAGLE's): the target and
its tokenizer, corpus rows and rows the target writes itself, seeded batches that resume exactly,
the target's features on the fly, the learning-rate schedule and atomic checkpoints.

A library: the entry points (``experiments.train_medusa``, ...) build on it and add their head's
loss, evaluation and output format.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from specdec.errors import ConfigError
from specdec.files import atomic_write


# --------------------------------------------------------------------------- target and data


def load_target(cfg: DictConfig):
    """``(target, tokenizer, description)``: ``cfg.target`` (any HF causal LM dir) or the zoo pair's target."""
    from specdec.models import load_causal_lm, load_tokenizer

    if cfg.target and str(cfg.target) in _pretrained_names():  # target=smollm2: fetched and converted once
        from experiments.pretrained import ensure_model

        path = str(ensure_model(str(cfg.target), cache_dir=cfg.cache_dir))
        where = {"target": path, "tokenizer": str(cfg.tokenizer or path), "pretrained": str(cfg.target)}
    elif cfg.target:
        where = {"target": str(cfg.target), "tokenizer": str(cfg.tokenizer or cfg.target)}
    else:
        from experiments.zoo import ensure_pair

        pair = ensure_pair(size=cfg.zoo_size, cache_dir=cfg.cache_dir)
        where = {"zoo_size": cfg.zoo_size, "target": pair.target_dir, "tokenizer": str(cfg.tokenizer or pair.tokenizer_dir)}
    target = load_causal_lm(where["target"], dtype=cfg.dtype, device="cpu", role="target")
    return target, load_tokenizer(where["tokenizer"]), where


def _pretrained_names() -> set[str]:
    from experiments.pretrained import MODELS

    return set(MODELS)


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


# --------------------------------------------------------------------------- features, schedule, checkpoints


@torch.no_grad()
def teacher(target, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target on ``batch [B, T]``: last hidden state ``[B, T, H]`` and logits ``[B, T, V]`` (float32)."""
    out = target(input_ids=batch, output_hidden_states=True)
    return out.hidden_states[-1].float(), out.logits.float()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, step: int, heads: torch.nn.Module, optimizer, settings: dict, elapsed: float) -> None:
    """Write the heads, optimizer state and progress to ``path`` atomically."""
    state = {"step": step, "heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "settings": settings,
             "elapsed_s": elapsed}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, settings: dict) -> dict:
    """The checkpoint at ``path``; :class:`ConfigError` if it was written with other settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise ConfigError(f"checkpoint {path} is unreadable ({exc}); delete it or pass resume=false") from exc
    diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"checkpoint {path} was written with other settings ({detail}); pass resume=false to start "
                          f"over, or out_dir=<another dir>")
    return state
