"""Training the target, distilling the draft from it, and evaluating the pair.

Token data is one stream per split: every file's ids preceded by ``<|endoftext|>``,
cut into ``[num_chunks, context]`` rows. Training shuffles the rows with a seeded
generator; evaluation uses the first rows of the held-out split in order.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiments.zoo.progress import PhaseCheckpoint
from experiments.zoo.sizes import ZooSize

LogFn = Callable[[dict, int], None]  # (metrics, step)


@dataclass
class TrainSettings:
    """Where and how to run: device, autocast dtype (None = fp32), progress bars, logger."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    progress: bool = True
    log: LogFn | None = None


# --------------------------------------------------------------------------- data


def encode_stream(tokenizer, texts: Iterable[str], bos_id: int) -> torch.Tensor:
    """All texts as one id stream, each preceded by ``bos_id``: ``[N]`` int64."""
    backend = tokenizer.backend_tokenizer
    texts = list(texts)
    ids: list[int] = []
    for enc in backend.encode_batch(texts, add_special_tokens=False):
        ids.append(bos_id)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)  # [N]


def chunk_stream(stream: torch.Tensor, context: int) -> torch.Tensor:
    """Cut a ``[N]`` stream into ``[N // context, context]`` rows (the tail is dropped)."""
    rows = stream.numel() // context
    if rows == 0:
        raise ValueError(f"only {stream.numel()} tokens, fewer than one context of {context}")
    return stream[: rows * context].view(rows, context)  # [R, T]


def shuffled_batches(chunks: torch.Tensor, batch_size: int, steps: int, seed: int, offset: int = 0):
    """``steps`` batches ``[B, T]`` from a seeded permutation of the rows, starting at batch ``offset``.

    Epoch ``e`` uses the permutation seeded with ``seed + e``; batches wrap across epochs.
    """
    rows = chunks.shape[0]
    perms: dict[int, torch.Tensor] = {}

    def perm(epoch: int) -> torch.Tensor:
        if epoch not in perms:
            perms[epoch] = torch.randperm(rows, generator=torch.Generator().manual_seed(seed + epoch))  # [R]
        return perms[epoch]

    for step in range(offset, offset + steps):
        epoch, pos = divmod(step * batch_size, rows)
        idx = torch.cat([perm(epoch), perm(epoch + 1)])[pos : pos + batch_size]  # [B]
        yield chunks[idx]  # [B, T]


# --------------------------------------------------------------------------- helpers


def amp_context(settings: TrainSettings):
    """Autocast to ``settings.amp_dtype`` on the device, or a no-op for fp32."""
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.amp_dtype)


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``floor * peak``."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def next_token_logits(model, batch: torch.Tensor) -> torch.Tensor:
    """Float32 logits at every position: ``[B, T, V]``."""
    return model(input_ids=batch).logits.float()  # [B, T, V]


def distill_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor, kl_weight: float):
    """``kl_weight * KL(target || draft) + (1 - kl_weight) * CE(draft, labels)`` and its parts.

    ``draft_logits``/``target_logits``: ``[B, T-1, V]``; ``labels``: ``[B, T-1]``.
    """
    vocab = draft_logits.shape[-1]
    d_logp = F.log_softmax(draft_logits.reshape(-1, vocab), dim=-1)  # [B*(T-1), V]
    t_logp = F.log_softmax(target_logits.reshape(-1, vocab), dim=-1)  # [B*(T-1), V]
    kl = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean")
    ce = F.nll_loss(d_logp, labels.reshape(-1))
    return kl_weight * kl + (1 - kl_weight) * ce, kl, ce


def _optimizer_step(model, optimizer, loss, lr: float) -> float:
    """Backward, clip to 1.0, step at ``lr``; returns the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _progress(steps: int, desc: str, settings: TrainSettings, done: int = 0):
    return tqdm(total=steps, initial=done, desc=desc, unit="step", disable=not settings.progress, dynamic_ncols=True)


# --------------------------------------------------------------------------- training


def train_target(model, chunks: torch.Tensor, size: ZooSize, seed: int, settings: TrainSettings,
                 checkpoint: PhaseCheckpoint | None = None) -> dict:
    """Train ``model`` with next-token cross-entropy for ``size.target_steps`` steps (going on from ``checkpoint``'s
    step, saving to it as it goes)."""
    model.to(settings.device).train()
    optimizer = make_optimizer(model, size.target_lr)
    checkpoint = checkpoint or PhaseCheckpoint(None)
    done, spent, loss_value = checkpoint.restore(model, optimizer)
    batches = shuffled_batches(chunks, size.batch_size, size.target_steps - done, seed, offset=done)
    start = time.perf_counter() - spent
    with _progress(size.target_steps, f"target ({size.name})", settings, done) as bar:
        for step, batch in enumerate(batches, done):
            batch = batch.to(settings.device)  # [B, T]
            with amp_context(settings):
                logits = next_token_logits(model, batch)  # [B, T, V]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            lr = lr_at(step, size.target_steps, size.target_lr)
            grad_norm = _optimizer_step(model, optimizer, loss, lr)
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.update()
            checkpoint.save(model, optimizer, step + 1, time.perf_counter() - start, loss_value,
                            final=step + 1 == size.target_steps)
            if settings.log:
                settings.log({"target/loss": loss_value, "target/lr": lr, "target/grad_norm": grad_norm}, step)
    model.eval()
    tokens = size.target_steps * size.batch_size * size.context
    return {"target_train_tokens": tokens, "target_final_train_loss": loss_value, "target_train_s": time.perf_counter() - start}


def init_draft_from_target(draft, target) -> list[str]:
    """Copy every target tensor whose name and shape the draft shares (embeddings, final norm,
    first layers); returns the copied names."""
    target_state = target.state_dict()
    copied = []
    with torch.no_grad():
        for name, tensor in draft.state_dict().items():
            source = target_state.get(name)
            if source is not None and source.shape == tensor.shape:
                tensor.copy_(source)
                copied.append(name)
    return copied


def distill_draft(draft, target, chunks: torch.Tensor, size: ZooSize, seed: int, settings: TrainSettings,
                  checkpoint: PhaseCheckpoint | None = None) -> dict:
    """Train ``draft`` towards the target's next-token distribution (KL, mixed with CE), going on from
    ``checkpoint``'s step and saving to it as it goes.

    Uses the rows after the ones the target trained on (same seeded order).
    """
    draft.to(settings.device).train()
    target.to(settings.device).eval()
    optimizer = make_optimizer(draft, size.draft_lr)
    checkpoint = checkpoint or PhaseCheckpoint(None)
    done, spent, kl_value = checkpoint.restore(draft, optimizer)
    batches = shuffled_batches(chunks, size.batch_size, size.draft_steps - done, seed, offset=size.target_steps + done)
    start = time.perf_counter() - spent
    with _progress(size.draft_steps, f"draft ({size.name})", settings, done) as bar:
        for step, batch in enumerate(batches, done):
            batch = batch.to(settings.device)  # [B, T]
            with torch.no_grad(), amp_context(settings):
                target_logits = next_token_logits(target, batch)[:, :-1]  # [B, T-1, V]
            with amp_context(settings):
                draft_logits = next_token_logits(draft, batch)[:, :-1]  # [B, T-1, V]
            loss, kl, ce = distill_loss(draft_logits, target_logits, batch[:, 1:], size.kl_weight)
            lr = lr_at(step, size.draft_steps, size.draft_lr)
            grad_norm = _optimizer_step(draft, optimizer, loss, lr)
            kl_value = kl.item()
            bar.set_postfix(kl=f"{kl_value:.3f}", ce=f"{ce.item():.3f}")
            bar.update()
            checkpoint.save(draft, optimizer, step + 1, time.perf_counter() - start, kl_value,
                            final=step + 1 == size.draft_steps)
            if settings.log:
                metrics = {"draft/loss": loss.item(), "draft/kl": kl_value, "draft/ce": ce.item(), "draft/lr": lr}
                settings.log({**metrics, "draft/grad_norm": grad_norm}, size.target_steps + step)
    draft.eval()
    tokens = size.draft_steps * size.batch_size * size.context
    return {"draft_train_tokens": tokens, "draft_final_train_kl": kl_value, "draft_train_s": time.perf_counter() - start}


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate_pair(target, draft, chunks: torch.Tensor, device: torch.device, batch_size: int = 4) -> dict:
    """Held-out losses and the draft's teacher-forced greedy agreement with the target (fp32).

    ``alpha`` = fraction of positions where ``argmax draft == argmax target``; also the
    target's and draft's top-1 accuracy on the real next token and KL(target || draft).
    """
    totals = dict.fromkeys(["target_nll", "draft_nll", "agree", "target_top1", "draft_top1", "kl"], 0.0)
    positions = 0
    for start in range(0, chunks.shape[0], batch_size):
        batch = chunks[start : start + batch_size].to(device)  # [B, T]
        labels = batch[:, 1:].reshape(-1)  # [B*(T-1)]
        t_logits = next_token_logits(target, batch)[:, :-1].reshape(labels.numel(), -1)  # [P, V]
        d_logits = next_token_logits(draft, batch)[:, :-1].reshape(labels.numel(), -1)  # [P, V]
        t_logp, d_logp = F.log_softmax(t_logits, -1), F.log_softmax(d_logits, -1)  # [P, V]
        t_top, d_top = t_logits.argmax(-1), d_logits.argmax(-1)  # [P]
        totals["target_nll"] += float(F.nll_loss(t_logp, labels, reduction="sum"))
        totals["draft_nll"] += float(F.nll_loss(d_logp, labels, reduction="sum"))
        totals["agree"] += float((t_top == d_top).sum())
        totals["target_top1"] += float((t_top == labels).sum())
        totals["draft_top1"] += float((d_top == labels).sum())
        totals["kl"] += float(F.kl_div(d_logp, t_logp, log_target=True, reduction="sum"))
        positions += labels.numel()
    return {
        "heldout_tokens": positions,
        "target_heldout_loss": totals["target_nll"] / positions,
        "draft_heldout_loss": totals["draft_nll"] / positions,
        "alpha": totals["agree"] / positions,
        "target_heldout_top1": totals["target_top1"] / positions,
        "draft_heldout_top1": totals["draft_top1"] / positions,
        "heldout_kl_target_draft": totals["kl"] / positions,
    }

