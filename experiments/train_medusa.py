"""Train Medusa heads on a frozen target by self-distillation on the standard-library corpus.

Run ``python -m experiments.train_medusa`` (defaults in ``conf/train_medusa.yaml``), e.g.::

    python -m experiments.train_medusa                          # the embedded default pair's target
    python -m experiments.train_medusa zoo_size=micro steps=100 threads=2
    python -m experiments.train_medusa target=/path/to/model out_dir=/path/to/heads loss=hard

Labels are the target's own predictions on the corpus' training split: head ``i`` at position
``t`` learns the target's distribution at position ``t + i + 1`` (``loss=soft``, KL) or its argmax
(``loss=hard``, cross-entropy); head ``i``'s loss is weighted by ``head_decay ** i``. With
``generated_rows`` > 0, a ``generated_fraction`` of every batch is text the target wrote itself
(training prompts continued by it, Medusa-2-style self-distillation data): decoding feeds the heads
the target's own output, which teacher-forced corpus text does not show. AdamW with a linear
warm-up then cosine decay. Every ``checkpoint_every`` steps a checkpoint (heads + optimizer)
is written atomically to ``<out_dir>/checkpoint.pt``; a rerun with the same settings resumes from
it (``resume=false`` starts over). At the end the heads go to ``<out_dir>`` (``drafters.medusa_heads``
format) with ``eval.json``: per-head top-1 / top-5 / per-rank accuracy on held-out text, measured
against the target's own greedy predictions, and (``generated``) the same on held-out prompts
continued greedily by the target: the greedy decode regime, whose rank accuracies shape the
default tree. Losses go to ``train_log.jsonl`` in the Hydra run directory and to W&B (offline by
default; a failure is reported and training carries on).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from drafters.medusa_heads import (MedusaHeads, default_heads_dir, save_heads, target_fingerprint,
                                   write_json)
from experiments import cli
from experiments.loggers import TrainingLog, training_wandb_settings
from specdec.errors import ConfigError

log = logging.getLogger(__name__)

LOSSES = ("soft", "hard")
RANKS = 10  # per-rank accuracies kept in eval.json (they shape the default tree)
#: Settings that must match for a checkpoint to be resumed.
RESUME_KEYS = ("num_heads", "num_blocks", "loss", "head_decay", "steps", "batch_size", "context", "lr", "warmup_steps",
               "weight_decay", "grad_clip", "seed", "train_chars", "generated_rows", "generated_fraction",
               "generated_prompt", "generated_temperature")


# --------------------------------------------------------------------------- target and data


def load_target(cfg: DictConfig):
    """``(target, tokenizer, description)``: ``cfg.target`` (any HF causal LM dir) or the zoo pair's target."""
    from specdec.models import load_causal_lm, load_tokenizer

    if cfg.target:
        where = {"target": str(cfg.target), "tokenizer": str(cfg.tokenizer or cfg.target)}
    else:
        from experiments.zoo import ensure_pair

        pair = ensure_pair(size=cfg.zoo_size, cache_dir=cfg.cache_dir)
        where = {"zoo_size": cfg.zoo_size, "target": pair.target_dir, "tokenizer": str(cfg.tokenizer or pair.tokenizer_dir)}
    target = load_causal_lm(where["target"], dtype=cfg.dtype, device="cpu", role="target")
    return target, load_tokenizer(where["tokenizer"]), where


def resolve_out_dir(cfg: DictConfig, fingerprint: dict) -> Path:
    """``cfg.out_dir``, else ``<cache>/medusa/zoo-<size>`` (zoo) or ``<cache>/medusa/<name>-<fingerprint>``."""
    if cfg.out_dir:
        return Path(str(cfg.out_dir)).expanduser()
    if not cfg.target:
        return default_heads_dir(cfg.zoo_size, cfg.cache_dir)
    name = Path(str(cfg.target)).expanduser().resolve().name or "target"
    return default_heads_dir("x", cfg.cache_dir).parent / f"{name}-{fingerprint['sha256'][:10]}"


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def token_chunks(tokenizer, split: str, max_chars: int, context: int) -> torch.Tensor:
    """``[R, context]`` rows of one corpus split: each file's ids after a BOS (or EOS) token, concatenated."""
    from experiments import corpus
    from experiments.zoo.tokenizer import iter_texts

    files = corpus.hash_order(corpus.corpus_files(split=split))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
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


# --------------------------------------------------------------------------- loss and evaluation


@torch.no_grad()
def teacher(target, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target on ``batch [B, T]``: last hidden state ``[B, T, H]`` and logits ``[B, T, V]`` (float32)."""
    out = target(input_ids=batch, output_hidden_states=True)
    return out.hidden_states[-1].float(), out.logits.float()


def medusa_loss(head_logits: torch.Tensor, target_logits: torch.Tensor, mode: str, decay: float):
    """Weighted loss over heads and each head's loss.

    Head ``i``'s logits at position ``t`` (``head_logits [K, B, T, V]``) are trained towards the
    target's prediction at ``t + i + 1`` (``target_logits [B, T, V]``): KL(target || head) for
    ``soft``, cross-entropy on the target's argmax for ``hard``.
    """
    total, per_head = head_logits.new_zeros(()), []
    seq = target_logits.shape[1]
    for i in range(head_logits.shape[0]):
        n = seq - i - 1  # positions t with a teacher at t + i + 1 inside the window
        if n <= 0:
            break
        logq = F.log_softmax(head_logits[i, :, :n], dim=-1)  # [B, n, V]
        teach = target_logits[:, i + 1 :]  # [B, n, V]
        if mode == "soft":
            logp = F.log_softmax(teach, dim=-1)  # [B, n, V]
            loss = (logp.exp() * (logp - logq)).sum(-1).mean()
        else:
            loss = F.nll_loss(logq.reshape(-1, logq.shape[-1]), teach.argmax(-1).reshape(-1))
        total = total + decay**i * loss
        per_head.append(loss.detach())
    return total, per_head


@torch.no_grad()
def evaluate(heads: MedusaHeads, target, chunks: torch.Tensor, batch_size: int = 8, ranks: int = RANKS,
             start: int = 0) -> dict:
    """Held-out accuracy of each head against the target's own greedy predictions.

    For head ``i`` at position ``t >= start`` the label is the target's argmax at ``t + i + 1``. Reports top-1,
    top-5, the share of positions where the label is the head's rank-``r`` token (``rank_accuracy``,
    r < ``ranks``), and two baselines: always predicting the most frequent label (``majority_top1``)
    and the target's own next-token prediction at ``t`` (``next_token_top1``, what an untrained head does).
    """
    heads.eval()
    k, vocab = heads.num_heads, heads.vocab_size
    hits = torch.zeros(k, ranks, dtype=torch.float64)
    top5 = torch.zeros(k, dtype=torch.float64)
    base_next = torch.zeros(k, dtype=torch.float64)
    label_counts = torch.zeros(k, vocab, dtype=torch.float64)
    positions = torch.zeros(k, dtype=torch.float64)
    for row in range(0, chunks.shape[0], batch_size):
        batch = chunks[row : row + batch_size]
        hidden, t_logits = teacher(target, batch)  # [B, T, H], [B, T, V]
        greedy = t_logits.argmax(-1)  # [B, T]
        logits = heads(hidden[:, start:].to(next(heads.parameters()).dtype)).float()  # [K, B, T - start, V]
        for i in range(k):
            n = batch.shape[1] - start - i - 1  # positions t = start .. T - i - 2
            lab = greedy[:, start + i + 1 :]  # [B, n]
            z = logits[i, :, :n]  # [B, n, V]
            rank = (z > z.gather(-1, lab[..., None])).sum(-1)  # [B, n] how many tokens score above the label
            hits[i] += torch.stack([(rank == r).sum() for r in range(ranks)]).double()
            top5[i] += (rank < 5).sum()
            base_next[i] += (greedy[:, start : start + n] == lab).sum()
            label_counts[i] += torch.bincount(lab.reshape(-1), minlength=vocab).double()
            positions[i] += lab.numel()
    acc = hits / positions[:, None]  # [K, R]
    per_head = [{"head": i + 1, "depth": i + 1, "top1": float(acc[i, 0]), "top5": float(top5[i] / positions[i]),
                 "majority_top1": float(label_counts[i].max() / positions[i]),
                 "next_token_top1": float(base_next[i] / positions[i]), "positions": int(positions[i])}
                for i in range(k)]
    return {"per_head": per_head, "rank_accuracy": acc.tolist(), "chance_top1": 1.0 / vocab,
            "heldout_tokens": int(chunks.numel())}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, step: int, heads: MedusaHeads, optimizer, settings: dict, elapsed: float) -> None:
    """Write heads, optimizer state and progress to ``path`` atomically (temp file + ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"step": step, "heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "settings": settings,
                "elapsed_s": elapsed}, tmp)
    os.replace(tmp, path)


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


# --------------------------------------------------------------------------- logging


# --------------------------------------------------------------------------- training


def check_settings(cfg: DictConfig) -> dict:
    """The settings a checkpoint must match, validated."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss={cfg.loss!r}: use one of {LOSSES}")
    for key in ("num_heads", "steps", "batch_size", "context", "checkpoint_every", "log_every"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r}: it must be an integer >= 1")
    if not 0 < float(cfg.head_decay) <= 1 or float(cfg.lr) <= 0:
        raise ConfigError(f"head_decay={cfg.head_decay} must be in (0, 1] and lr={cfg.lr} > 0")
    if cfg.generated_rows < 0 or not 0 <= float(cfg.generated_fraction) <= 1 or float(cfg.generated_temperature) < 0:
        raise ConfigError("generated_rows must be >= 0, generated_fraction in [0, 1], generated_temperature >= 0")
    return {k: cfg[k] for k in RESUME_KEYS}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: DictConfig, run_dir: str | Path, on_step=None) -> dict:
    """Train (or resume training) heads as ``cfg`` says; returns the eval report written next to them.

    ``on_step(step)`` is called after every optimizer step (tests interrupt training from it).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = check_settings(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    target, tokenizer, where = load_target(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    target = target.to(device).eval().requires_grad_(False)
    fingerprint = target_fingerprint(target)
    settings["target_sha256"] = fingerprint["sha256"]
    out_dir = resolve_out_dir(cfg, fingerprint)
    out_dir.mkdir(parents=True, exist_ok=True)
    heads = MedusaHeads.for_target(target, cfg.num_heads, cfg.num_blocks).to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt, start, elapsed = out_dir / "checkpoint.pt", 0, 0.0
    if cfg.resume and ckpt.is_file():
        state = load_checkpoint(ckpt, settings)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed_s"])
        print(f"resuming from {ckpt} at step {start}/{cfg.steps}", file=sys.stderr)
    train_chunks = token_chunks(tokenizer, "train", cfg.train_chars, cfg.context)
    eval_rows = max(1, cfg.eval_tokens // cfg.context)
    eval_chunks = token_chunks(tokenizer, "heldout", cfg.eval_tokens * 8, cfg.context)[:eval_rows]
    extra_rows = None
    if cfg.generated_rows:
        extra_rows = generate_rows(target, train_chunks, cfg.generated_rows, cfg.generated_prompt,
                                   float(cfg.generated_temperature), cfg.seed, cfg.progress)
    train_log = TrainingLog(run_dir, training_wandb_settings(cfg, run_dir, "train_medusa"))
    log.info("training %d Medusa heads for %s: steps %d-%d, %d training rows; heads -> %s", cfg.num_heads,
             where["target"], start, cfg.steps, train_chunks.shape[0], out_dir)
    bar = tqdm(total=cfg.steps, initial=start, desc="medusa heads", unit="step", disable=not cfg.progress, file=sys.stderr)
    heads.train()
    try:
        t0 = time.perf_counter() - elapsed
        batches = training_batches(train_chunks, extra_rows, cfg, start)
        for step, batch in zip(range(start, cfg.steps), batches):
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            hidden, t_logits = teacher(target, batch.to(device))  # [B, T, H], [B, T, V]
            loss, per_head = medusa_loss(heads(hidden), t_logits, cfg.loss, cfg.head_decay)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(heads.parameters(), cfg.grad_clip)
            optimizer.step()
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                train_log({"train/loss": loss.item(), "train/lr": lr,
                           **{f"train/loss_head{i + 1}": float(x) for i, x in enumerate(per_head)}}, done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(ckpt, done, heads, optimizer, settings, time.perf_counter() - t0)
            if on_step is not None:
                on_step(done)
        bar.close()
        train_s = time.perf_counter() - t0
        report = evaluate(heads, target, eval_chunks.to(device), cfg.eval_batch_size)
        if cfg.eval_generated_rows:  # the decode regime: held-out prompts continued greedily by the target
            rows = generate_rows(target, eval_chunks, cfg.eval_generated_rows, cfg.generated_prompt, 0.0, cfg.seed)
            report["generated"] = evaluate(heads, target, rows.to(device), cfg.eval_batch_size,
                                           start=cfg.generated_prompt)
        report.update({"steps": cfg.steps, "train_s": train_s, "train_tokens": cfg.steps * cfg.batch_size * cfg.context,
                       "loss": cfg.loss, "out_dir": str(out_dir), **where})
        final = {f"eval/head{h['head']}_{m}": h[m] for h in report["per_head"] for m in ("top1", "top5")}
        final |= {f"eval_generated/head{h['head']}_{m}": h[m] for h in report.get("generated", {}).get("per_head", [])
                  for m in ("top1", "top5")}
        train_log(final, cfg.steps)
        train_log.summary(final)
    finally:
        bar.close()
        train_log.finish()
    save_heads(heads.cpu(), out_dir, training={**settings, **where, "train_s": train_s}, evaluation=report)
    write_json(run_dir / "eval.json", report)
    ckpt.unlink(missing_ok=True)  # finished: the heads are saved
    return report


def format_report(report: dict) -> str:
    """The per-head accuracy tables printed at the end of training."""
    lines = []
    for title, part in (("held-out text", report), ("held-out prompts continued greedily by the target",
                                                    report.get("generated"))):
        if not part:
            continue
        lines += [f"{title}:", f"{'head':>4} {'top-1':>7} {'top-5':>7} {'majority':>9} {'next-token':>11}"]
        for h in part["per_head"]:
            lines.append(f"{h['head']:>4} {h['top1']:7.3f} {h['top5']:7.3f} {h['majority_top1']:9.3f} "
                         f"{h['next_token_top1']:11.3f}")
    return "\n".join(lines)


@cli.hydra_main("train_medusa")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors follow :mod:`experiments.cli` (``error: ...``, exit status 2)."""
    from hydra.core.hydra_config import HydraConfig

    report = train(cfg, HydraConfig.get().runtime.output_dir)
    print(format_report(report))
    print(f"heads and eval.json written to {report['out_dir']}")


if __name__ == "__main__":
    main()
