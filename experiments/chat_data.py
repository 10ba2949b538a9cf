"""Training text for drafters of a chat target: the target's own answers to training chats, cached.

:func:`ensure_generations` formats :func:`experiments.suite.training_chats` (sources the prompt suite
never uses) with the target's chat template, lets the target answer them (HF ``generate``, batched,
greedy by default: the text greedy decoding produces) and caches the rows::

    <cache>/selfdistill/<target dir name>-<target sha256[:10]>-n<count>-m<max_new>-t<temperature>/
        rows.safetensors   ids [R, T] (right-padded), lengths [R], prompt_lengths [R]
        COMPLETE.json      settings, generation time, checksums (experiments.zoo.cache)

The distilled draft (:mod:`experiments.draft_training`) and Medusa heads (``train_medusa
train_data=chats``) train on these rows; positions past a row's prompt are the target's own argmax.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.data import writable_cache_dir
from experiments.zoo import cache

log = logging.getLogger(__name__)

ROWS_FILE = "rows.safetensors"


@dataclass(frozen=True)
class ChatRows:
    """Token rows of chats answered by the target: ``ids [R, T]`` right-padded with ``pad_id``."""

    ids: torch.Tensor  # [R, T]
    lengths: torch.Tensor  # [R]
    prompt_lengths: torch.Tensor  # [R]
    pad_id: int

    def response_mask(self) -> torch.Tensor:
        """``[R, T]`` True at positions whose *next* token is the target's answer (the labels to learn)."""
        pos = torch.arange(self.ids.shape[1])[None]  # [1, T]
        return (pos >= self.prompt_lengths[:, None] - 1) & (pos < self.lengths[:, None] - 1)  # [R, T]


def _fingerprint(target) -> str:
    from drafters.medusa_heads import target_fingerprint

    return target_fingerprint(target)["sha256"]


def generate_chat_rows(target, tokenizer, chats: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
                       seed: int = 0, batch: int = 32, progress: bool = True, partial: Path | None = None) -> ChatRows:
    """Let ``target`` answer ``chats`` (formatted with ``tokenizer``'s chat template); returns the rows.
    ``partial``: a file the answered rows are saved to after every batch and read back from at the start (each batch
    is seeded by its place, so a run cut by Ctrl-C goes on to the same rows)."""
    from experiments.data import Prompt, prompt_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(Prompt(i, "train", m[0]["content"], messages=m), tokenizer)[0] for i, m in enumerate(chats)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    rows, earlier = _load_partial(partial, len(prompts))
    began = time.perf_counter()
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    device = next(target.parameters()).device
    for b, start in enumerate(tqdm(range(0, len(order), batch), desc="target answers", disable=not progress,
                                   file=sys.stderr)):
        idx = order[start : start + batch]
        if all(i in rows for i in idx):  # answered before the run was cut
            continue
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)  # [b, P] left-padded
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = prompts[i]
            mask[r, width - len(prompts[i]) :] = 1
        torch.manual_seed(seed + b)
        with torch.inference_mode():
            out = target.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                  pad_token_id=pad, **sampling).cpu()  # [b, P + new]
        for r, i in enumerate(idx):
            answer = out[r, width:]
            stop = (answer == tokenizer.eos_token_id).nonzero()
            answer = answer[: int(stop[0]) + 1] if len(stop) else answer  # keep the end-of-turn token
            rows[i] = torch.cat([prompts[i], answer])
        _save_partial(rows, partial, earlier + time.perf_counter() - began)
    return _pack([rows[i] for i in range(len(prompts))], [len(p) for p in prompts], pad)


def _save_partial(rows: dict[int, torch.Tensor], path: Path | None, seconds: float) -> None:
    """The rows answered so far and the seconds they took, to ``path`` atomically (nothing when ``path`` is None)."""
    if path is None:
        return
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({f"row{i}": row.contiguous() for i, row in rows.items()}, str(tmp), metadata={"seconds": f"{seconds}"})
    tmp.replace(path)


def _load_partial(path: Path | None, count: int, quiet: bool = False) -> tuple[dict[int, torch.Tensor], float]:
    """The rows a cut run saved to ``path`` and the seconds they took (none when there is no file, or it is
    unreadable: those chats are answered again, with a warning unless ``quiet``)."""
    if path is None or not path.is_file():
        return {}, 0.0
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            rows = {int(key[3:]): handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            seconds = float((handle.metadata() or {}).get("seconds", 0.0))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a damaged file costs its rows only
        if not quiet:
            log.warning("the saved answers at %s are unreadable (%s); answering those chats again", path, exc)
        return {}, 0.0
    kept = {i: row for i, row in rows.items() if 0 <= i < count}
    if kept:
        print(f"target answers: {len(kept)} of {count} chats were answered before the run was cut; going on",
              file=sys.stderr)
    return kept, seconds


def _pack(rows: list[torch.Tensor], prompt_lengths: list[int], pad: int) -> ChatRows:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [R, T]
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ChatRows(ids, torch.tensor([len(r) for r in rows]), torch.tensor(prompt_lengths), pad)


def save_rows(rows: ChatRows, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"ids": rows.ids, "lengths": rows.lengths, "prompt_lengths": rows.prompt_lengths,
               "pad_id": torch.tensor([rows.pad_id])}, str(path))


def load_rows(path: Path) -> ChatRows:
    """Rows saved by :func:`save_rows`."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    return ChatRows(t["ids"], t["lengths"], t["prompt_lengths"], int(t["pad_id"][0]))


def ensure_generations(target, tokenizer, target_dir: str, count: int = 384, max_new_tokens: int = 128,
                       temperature: float = 0.0, seed: int = 1, cache_dir: str | None = None,
                       progress: bool = True) -> tuple[ChatRows, dict]:
    """The target's answers to ``count`` training chats, generated once and cached; ``(rows, manifest)``."""
    from experiments.suite import training_chats

    name = f"{Path(target_dir).name}-{_fingerprint(target)[:10]}-n{count}-m{max_new_tokens}-t{temperature:g}-s{seed}"
    parent = writable_cache_dir(cache_dir) / "selfdistill"
    parent.mkdir(exist_ok=True)
    dest = parent / name
    with cache.entry_lock(parent, name):
        try:
            manifest = cache.verify_entry(dest)
            return load_rows(dest / ROWS_FILE), manifest
        except cache.CacheEntryError as exc:
            if dest.exists():
                log.warning("self-distillation rows at %s are invalid (%s); generating them again", dest, exc)
        cache.remove_stale(parent, name)
        start = time.perf_counter()
        chats = [messages for _, messages in training_chats(count, seed)]
        partial = parent / f".{name}.partial.safetensors"  # answers so far: a cut run goes on from them
        start -= _load_partial(partial, 0, quiet=True)[1]  # generate_s counts the cut runs' seconds too
        rows = generate_chat_rows(target, tokenizer, chats, max_new_tokens, temperature, seed, progress=progress,
                                  partial=partial)
        staging = cache.staging_dir(parent, name)
        try:
            save_rows(rows, staging / ROWS_FILE)
            info = {"target_dir": str(target_dir), "count": count, "max_new_tokens": max_new_tokens,
                    "temperature": temperature, "seed": seed, "generate_s": time.perf_counter() - start,
                    "answer_tokens": int((rows.lengths - rows.prompt_lengths).sum()), "threads": torch.get_num_threads()}
            manifest = cache.write_manifest(staging, info)
            cache.publish(staging, dest)
            partial.unlink(missing_ok=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return rows, manifest
