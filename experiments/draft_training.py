"""A distilled draft model for a real target, trained on the target's own answers (build_zoo-style, cached).

The draft is a Llama of the target's width with its first ``layers`` layers, final norm and (tied)
embeddings copied from the target (:func:`experiments.zoo.training.init_draft_from_target`); the
embeddings / LM head stay frozen, so the draft speaks in the target's output space from the start.
It is trained with cross-entropy on the target's greedy answers to training chats
(:mod:`experiments.chat_data`; sequence-level distillation: every label is the target's argmax),
only at answer positions, with the LM head applied to those positions alone. Written with
``save_pretrained`` (safetensors) into ``<cache>/models/<target entry>-draft`` atomically with a
checksummed manifest; ``model=smollm2`` picks it up as ``model.draft=distilled``.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.zoo import cache

log = logging.getLogger(__name__)

BUILD_COMMAND = "python -m experiments.build_draft"


@dataclass(frozen=True)
class DraftSettings:
    """Everything that defines a distilled draft (recorded in its manifest)."""

    layers: int = 4
    chats: int = 192  # training chats answered by the target
    max_new_tokens: int = 96  # tokens of each answer
    heldout_chats: int = 24  # the last chats: evaluation only
    steps: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        from specdec.errors import ConfigError

        for key in ("layers", "chats", "max_new_tokens", "heldout_chats", "steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r}: it must be an integer >= 1")
        if self.heldout_chats >= self.chats:
            raise ConfigError(f"heldout_chats={self.heldout_chats} leaves no training chat of chats={self.chats}: "
                              "give heldout_chats < chats")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r}: the learning rate must be > 0")


def draft_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    from experiments.pretrained import get_spec, models_dir

    return models_dir(cache_dir) / f"{get_spec(name).entry}-draft"


def find_draft(name: str, cache_dir: str | Path | None = None) -> tuple[str | None, str | None]:
    """``(path, None)`` for a built and intact draft of ``name``, else ``(None, why + the build command)``."""
    path = draft_dir(name, cache_dir)
    command = f"{BUILD_COMMAND} target={name}" + (f" cache_dir={cache_dir}" if cache_dir else "")  # built where looked for
    if not path.exists():
        return None, f"the distilled draft of {name} is not built: build it once with `{command}` (about 20-30 minutes on 2 CPU cores)"
    try:
        cache.verify_entry(path)
    except cache.CacheEntryError as exc:
        return None, f"the distilled draft of {name} is invalid ({exc}): rebuild it with `{command} force=true`"
    return str(path), None


def check_layers(layers: int, target) -> None:
    """ConfigError unless the draft keeps fewer layers than ``target`` has (more would add random layers the target's
    weights never initialise; as many is the target itself, at no saving)."""
    from specdec.errors import ConfigError

    have = target.config.num_hidden_layers
    if layers >= have:
        raise ConfigError(f"layers={layers}: the draft keeps the target's first layers, and it has {have}; give "
                          f"1..{have - 1} (default {DraftSettings.layers})")


def init_draft(target, layers: int):
    """A ``layers``-layer copy of ``target``'s architecture holding its first layers, final norm and embeddings."""
    import copy

    from experiments.zoo.training import init_draft_from_target

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    draft = type(target)(config)
    init_draft_from_target(draft, target)
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft


def answer_loss(draft, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the draft on the next token at the ``mask`` positions, and its argmax there.

    ``ids``, ``mask``: ``[B, T]``; the LM head runs only on the ``M`` masked positions.
    """
    hidden = draft.model(input_ids=ids).last_hidden_state  # [B, T, H]
    logits = draft.lm_head(hidden[:, :-1][mask[:, :-1]])  # [M, V]
    labels = ids[:, 1:][mask[:, :-1]]  # [M]
    return F.cross_entropy(logits.float(), labels), logits.argmax(-1) == labels


def _batch(rows, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = int(rows.lengths[idx].max())
    return rows.ids[idx, :width], rows.response_mask()[idx, :width]  # [B, W], [B, W]


def train(draft, rows, settings: DraftSettings, progress: bool = True) -> dict:
    """Train ``draft``'s layers and final norm on the training rows; returns losses and times."""
    from tqdm.auto import tqdm

    from experiments.zoo.training import lr_at, shuffled_batches

    train_rows = rows.ids.shape[0] - settings.heldout_chats
    draft.requires_grad_(False)
    params = [p for n, p in draft.named_parameters() if n.startswith(("model.layers.", "model.norm."))]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.arange(train_rows)[:, None]  # [R, 1]: shuffled_batches draws rows of this
    start, loss_value = time.perf_counter(), float("nan")
    draft.train()
    bar = tqdm(total=settings.steps, desc="distilled draft", disable=not progress)
    for step, batch in enumerate(shuffled_batches(order, settings.batch_size, settings.steps, settings.seed)):
        ids, mask = _batch(rows, batch[:, 0])
        loss, _ = answer_loss(draft, ids, mask)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.steps, settings.lr)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.update()
    bar.close()
    draft.eval().requires_grad_(False)
    return {"final_train_loss": loss_value, "train_s": time.perf_counter() - start, "train_rows": train_rows,
            "trainable_params": sum(p.numel() for p in params)}


@torch.no_grad()
def evaluate(draft, rows, settings: DraftSettings) -> dict:
    """Held-out chats: the draft's loss and its agreement with the target's greedy answer (alpha)."""
    held = torch.arange(rows.ids.shape[0] - settings.heldout_chats, rows.ids.shape[0])
    losses, hits = [], []
    for start in range(0, len(held), 8):
        ids, mask = _batch(rows, held[start : start + 8])
        loss, hit = answer_loss(draft, ids, mask)
        losses.append(float(loss) * hit.numel())
        hits.append(hit)
    hits = torch.cat(hits)
    return {"heldout_loss": sum(losses) / hits.numel(), "alpha": float(hits.float().mean()), "heldout_positions": hits.numel()}


def _warn_other_settings(dest: Path, built: dict, asked: dict) -> None:
    """Say so when the cached draft was built with other settings than this call's (it is reused)."""
    differ = [f"{k}={built[k]} (asked: {v})" for k, v in asked.items() if k in built and built[k] != v]
    if differ:
        log.warning("the cached draft at %s was built with %s; reusing it: pass force=true to build it with "
                    "this call's settings", dest, ", ".join(differ))


def build_draft(name: str, settings: DraftSettings, cache_dir: str | None = None, force: bool = False,
                progress: bool = True) -> tuple[Path, dict]:
    """Build (or find) the distilled draft of the pretrained target ``name``; ``(path, manifest)``."""
    from experiments.chat_data import ensure_generations
    from experiments.pretrained import ensure_model
    from specdec.models import load_causal_lm, load_tokenizer

    dest = draft_dir(name, cache_dir)
    if dest.exists() and not force:
        try:
            manifest = cache.verify_entry(dest)
            _warn_other_settings(dest, manifest.get("settings") or {}, asdict(settings))
            return dest, manifest
        except cache.CacheEntryError as exc:
            log.warning("the distilled draft at %s is invalid (%s); building it again", dest, exc)
    target_dir = str(ensure_model(name, cache_dir=cache_dir))
    target, tokenizer = load_causal_lm(target_dir, role="target"), load_tokenizer(target_dir)
    check_layers(settings.layers, target)  # before the expensive generation
    start = time.perf_counter()
    rows, rows_manifest = ensure_generations(target, tokenizer, target_dir, settings.chats, settings.max_new_tokens,
                                             cache_dir=cache_dir, progress=progress)
    with cache.entry_lock(dest.parent, dest.name):
        cache.remove_stale(dest.parent, dest.name)
        draft = init_draft(target, settings.layers)
        metrics = train(draft, rows, settings, progress)
        metrics |= evaluate(draft, rows, settings)
        metrics |= {"generate_s": rows_manifest.get("generate_s"), "build_s": time.perf_counter() - start,
                    "threads": torch.get_num_threads(),
                    "draft_params": sum(p.numel() for p in {id(p): p for p in draft.parameters()}.values())}
        staging = cache.staging_dir(dest.parent, dest.name)
        try:
            draft.save_pretrained(staging, safe_serialization=True)
            manifest = cache.write_manifest(staging, {"target": name, "target_dir": target_dir,
                                                      "settings": asdict(settings), "metrics": metrics})
            cache.publish(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest, manifest
