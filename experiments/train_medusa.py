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
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from drafters.medusa_heads import (MedusaHeads, default_heads_dir, save_heads, target_fingerprint,
                                   write_json)
from experiments.head_training import (chat_windows, generate_rows, load_checkpoint, load_target, lr_at,
                                       save_checkpoint, teacher, token_chunks, training_batches)
from experiments.suite import SUITE_SOURCES
from experiments.loggers import TrainingLog, training_wandb_settings
from experiments.medusa_training import LOSSES, evaluate, medusa_loss
from specdec.errors import ConfigError
from experiments import cli

log = logging.getLogger(__name__)

GENERATED_SOURCES = ("corpus", "chats")

#: Settings that must match for a checkpoint to be resumed.
RESUME_KEYS = ("num_heads", "num_blocks", "loss", "head_decay", "steps", "batch_size", "context", "lr", "warmup_steps",
               "weight_decay", "grad_clip", "seed", "train_chars", "generated_rows", "generated_fraction",
               "generated_prompt", "generated_temperature")


# --------------------------------------------------------------------------- target and data


def resolve_out_dir(cfg: DictConfig, fingerprint: dict, target_dir: str | None = None) -> Path:
    """``cfg.out_dir``, else ``<cache>/medusa/zoo-<size>`` (zoo) or ``<cache>/medusa/<name>-<fingerprint>``."""
    if cfg.out_dir:
        return Path(str(cfg.out_dir)).expanduser()
    if not cfg.target:
        return default_heads_dir(cfg.zoo_size, cfg.cache_dir)
    name = Path(str(target_dir or cfg.target)).expanduser().resolve().name or "target"
    return default_heads_dir("x", cfg.cache_dir).parent / f"{name}-{fingerprint['sha256'][:10]}"


def generated_training_rows(cfg: DictConfig, target, tokenizer, target_dir: str, train_chunks: torch.Tensor):
    """``[R, context]`` rows the target wrote itself, or None: corpus prompts it continued
    (``generated_source=corpus``), or its cached answers to training chats (``chats``, for chat targets:
    :mod:`experiments.chat_data`; ``generated_rows`` chats)."""
    if not cfg.generated_rows:
        return None
    if cfg.generated_source == "chats":
        from experiments.chat_data import ensure_generations

        rows, _ = ensure_generations(target, tokenizer, target_dir, count=cfg.generated_rows,
                                     cache_dir=cfg.cache_dir, progress=cfg.progress)
        return chat_windows(rows, cfg.context)
    return generate_rows(target, train_chunks, cfg.generated_rows, cfg.generated_prompt,
                         float(cfg.generated_temperature), cfg.seed, cfg.progress)


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
    if cfg.generated_source not in GENERATED_SOURCES:
        raise ConfigError(f"generated_source={cfg.generated_source!r}: use one of {GENERATED_SOURCES}")
    if cfg.generated_rows < 0 or not 0 <= float(cfg.generated_fraction) <= 1 or float(cfg.generated_temperature) < 0:
        raise ConfigError("generated_rows must be >= 0, generated_fraction in [0, 1], generated_temperature >= 0")
    settings = {k: cfg[k] for k in RESUME_KEYS}
    if cfg.generated_source != "corpus":  # recorded only when not the default, so older checkpoints still resume
        settings["generated_source"] = cfg.generated_source
    return settings


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
    out_dir = resolve_out_dir(cfg, fingerprint, where["target"])
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
    exclude = SUITE_SOURCES if cfg.target else ()  # a real target is benchmarked on the suite: keep its sources out
    train_chunks = token_chunks(tokenizer, "train", cfg.train_chars, cfg.context, exclude)
    eval_rows = max(1, cfg.eval_tokens // cfg.context)
    eval_chunks = token_chunks(tokenizer, "heldout", cfg.eval_tokens * 8, cfg.context)[:eval_rows]
    extra_rows = generated_training_rows(cfg, target, tokenizer, where["target"], train_chunks)
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
