"""The one training stack for draft heads on a frozen target (Medusa's, EAGLE's): the target and
its tokenizer, the data (:mod:`experiments.head_data`: corpus rows, rows the target writes itself,
seeded batches that resume exactly, the draft vocabulary), the target's features on the fly, the
learning-rate schedule, atomic checkpoints, resume, logs and the training loop itself (:func:`train`).

A library: a head type is a :class:`HeadRecipe` (its head, loss, held-out evaluation and files,
e.g. ``experiments.medusa_training``); its entry point (``experiments.train_medusa``, ...) only
composes the config and calls :func:`train`.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from experiments.head_checkpoints import load_checkpoint, save_checkpoint, setting_changes
from experiments.head_data import (
    GENERATED_SOURCES,
    answer_settings,
    check_draft_vocab,
    draft_vocabulary,
    generated_training_rows,
    source_is_corpus,
    token_chunks,
    training_batches,
)
from specdec.errors import ConfigError, SpecDecError
from specdec.models import check_device, set_threads

log = logging.getLogger(__name__)


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
    return target, load_tokenizer(where["tokenizer"], elsewhere="tokenizer"), where


def _pretrained_names() -> set[str]:
    from experiments.pretrained import MODELS

    return set(MODELS)


# --------------------------------------------------------------------------- features, schedule, checkpoints


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- the training loop


#: Settings of every head type that a checkpoint must match to be resumed.
COMMON_RESUME_KEYS = ("precision", "steps", "batch_size", "context", "lr", "warmup_steps", "weight_decay", "grad_clip", "seed",
                      "train_chars", "generated_rows", "generated_fraction", "generated_prompt",
                      "generated_temperature")


class HeadRecipe:
    """One kind of draft head, as :func:`train` trains it: a subclass gives the head, its loss, its
    held-out evaluation and its files; everything else (data, schedule, checkpoints, resume, logs,
    progress bar) is :func:`train`'s.

    Attributes:
        name: the head's name (progress bar, W&B job type ``train_<name>``).
        resume_keys: its own settings a checkpoint must match (on top of :data:`COMMON_RESUME_KEYS`).
        betas: AdamW's betas.
        files: how its heads are stored (:class:`drafters.head_files.HeadFormat`): a finished head
            with the same settings is found there, not trained again.
    """

    name = "heads"
    resume_keys: tuple[str, ...] = ()
    betas = (0.9, 0.999)
    files = None

    def check(self, cfg: DictConfig) -> None:
        """Validate the head's own settings (ConfigError naming the key)."""

    def check_target(self, cfg: DictConfig, target) -> None:
        """Validate the settings that depend on the loaded target (e.g. a warm start's checkpoint fits it) before
        any training data is made (ConfigError naming the key)."""

    def build(self, cfg: DictConfig, target, draft_vocab: torch.Tensor | None = None) -> torch.nn.Module:
        """A new head for ``target``, on its device; ``draft_vocab``: the ids ``[Vd]`` its LM head scores,
        or None for the whole vocabulary (:mod:`drafters.draft_vocab`)."""
        raise NotImplementedError

    def loss(self, head: torch.nn.Module, target, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(loss, metrics to log)`` of one batch ``[B, T]``."""
        raise NotImplementedError

    def evaluate(self, head: torch.nn.Module, target, eval_chunks: torch.Tensor, cfg: DictConfig) -> dict:
        """The held-out report (``eval.json``)."""
        raise NotImplementedError

    def final_metrics(self, report: dict) -> dict:
        """The report's headline figures, logged at the end."""
        return {}

    def out_dir(self, cfg: DictConfig, fingerprint: dict) -> Path:
        """Where the trained head goes when ``cfg.out_dir`` is null."""
        raise NotImplementedError

    def save(self, head: torch.nn.Module, out_dir: Path, training: dict, report: dict) -> None:
        """Write the trained head and its report to ``out_dir``."""
        raise NotImplementedError

    def load(self, out_dir: Path) -> torch.nn.Module:
        """The head saved in ``out_dir``, loaded as decoding loads it (its format's error, or
        :class:`~specdec.checkpoints.CheckpointError` for NaN/inf weights, when it does not load)."""
        raise NotImplementedError


def target_dir_name(cfg: DictConfig, fingerprint: dict) -> str:
    """``<target dir name>-<fingerprint>``: a heads directory name for a target given by path."""
    if str(cfg.target) in _pretrained_names():  # target=smollm2: the converted model's directory
        from experiments.pretrained import model_dir

        name = model_dir(str(cfg.target), cfg.cache_dir).name
    else:
        name = Path(str(cfg.target)).expanduser().resolve().name or "target"
    return f"{name}-{fingerprint['sha256'][:10]}"


def check_settings(cfg: DictConfig, recipe: HeadRecipe) -> dict:
    """The settings a checkpoint must match, validated (the common ones here, the head's by ``recipe``)."""
    from experiments.zoo.build import PRECISIONS

    for key in ("steps", "batch_size", "context", "checkpoint_every", "log_every", "eval_batch_size", "eval_tokens"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r}: it must be an integer >= 1")
    if float(cfg.lr) <= 0:
        raise ConfigError(f"lr={cfg.lr} must be > 0")
    if cfg.precision not in PRECISIONS:  # before the target loads (on a fresh machine: after the pair's build)
        raise ConfigError(f"precision={cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    if cfg.generated_rows < 0 or not 0 <= float(cfg.generated_fraction) <= 1 or float(cfg.generated_temperature) < 0:
        raise ConfigError(f"generated_rows={cfg.generated_rows}, generated_fraction={cfg.generated_fraction}, "
                          f"generated_temperature={cfg.generated_temperature}: generated_rows must be >= 0, "
                          "generated_fraction in [0, 1], generated_temperature >= 0")
    source = cfg.get("generated_source", "corpus")
    if source not in GENERATED_SOURCES:
        raise ConfigError(f"generated_source={source!r}: use one of {GENERATED_SOURCES}")
    recipe.check(cfg)
    settings = {k: _plain(cfg[k]) for k in (*recipe.resume_keys, *COMMON_RESUME_KEYS)}  # JSON-ready (lists)
    if source != "corpus":  # recorded only when not the default, so older checkpoints still resume
        settings["generated_source"] = source
    settings |= answer_settings(cfg)
    if cfg.get("init_from"):  # a warm start changes the result: a checkpoint must have had the same one
        settings["init_from"] = str(cfg.init_from)
    size = cfg.get("draft_vocab") or 0
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"draft_vocab={size!r}: use 0 (the whole vocabulary) or the number of tokens to draft over")
    if size:
        settings["draft_vocab"] = size
    return settings


def check_context(context: int, target) -> None:
    """``context`` (the training rows' length) within the target's own context: positions past it were never
    trained and decoding refuses them (a :class:`ConfigError` naming both)."""
    from specdec.models import context_length

    limit = context_length(target)
    if limit is not None and context > limit:
        raise ConfigError(f"context={context}: the target reads at most {limit} positions "
                          f"(max_position_embeddings); use context <= {limit}")


def _plain(value):
    """A config value as plain Python (a ListConfig such as ``feature_layers=[0,1,1]`` as a list)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def autocast_dtype(cfg: DictConfig, device: torch.device, target) -> torch.dtype | None:
    """``cfg.precision``'s autocast dtype for the loss (None: fp32): ``auto`` is bf16 where the device has
    native bf16 matmuls and the target is wide enough to gain (the zoo's rule), ``fp32``, or ``bf16`` (checked by
    :func:`check_settings`)."""
    from experiments.zoo.build import resolve_amp
    from specdec.models import text_config

    return resolve_amp(str(cfg.precision), device, int(text_config(target).hidden_size))


def make_dir(path: Path, key: str) -> None:
    """``mkdir -p path``, or a :class:`ConfigError` naming ``key`` when it cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}: cannot create {path} ({err.strerror}); give a writable directory") from None


def _device(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(cfg.device, "device")


def train(cfg: DictConfig, run_dir: str | Path, recipe: HeadRecipe, on_step=None) -> dict:
    """Train (or resume training) a head as ``cfg`` and ``recipe`` say; returns the eval report written next to it.

    ``on_step(step)`` is called after every optimizer step (tests interrupt training from it).
    """
    from drafters.head_files import target_fingerprint
    from experiments.loggers import TrainingLog, training_wandb_settings
    from experiments.wandb_run import new_run_id
    from specdec.files import atomic_write_json

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = check_settings(cfg, recipe)
    set_threads(cfg.threads, "threads")
    device = _device(cfg)  # an absent GPU fails before the target loads
    torch.manual_seed(cfg.seed)
    target, tokenizer, where = load_target(cfg)
    target = target.to(device).eval().requires_grad_(False)
    fingerprint = target_fingerprint(target)
    settings["target_sha256"] = fingerprint["sha256"]
    out_dir = Path(str(cfg.out_dir)).expanduser() if cfg.out_dir else recipe.out_dir(cfg, fingerprint)
    amp = autocast_dtype(cfg, device, target)
    # what the head and its eval.json depend on beyond the checkpoint's settings: where it ran, its evaluation
    made = {**settings, **where, "device": str(device), "autocast": str(amp),
            **{str(k): _plain(v) for k, v in cfg.items() if str(k).startswith("eval_")}}
    if (report := finished_report(out_dir, made, recipe, bool(cfg.get("force")))) is not None:
        atomic_write_json(run_dir / "eval.json", report)
        return report
    check_draft_vocab(cfg, target)  # before any data is made
    recipe.check_target(cfg, target)
    check_context(cfg.context, target)
    from experiments.suite import SUITE_SOURCES

    exclude = SUITE_SOURCES if cfg.target else ()  # a real target is benchmarked on the suite: keep its sources out
    train_chunks = token_chunks(tokenizer, "train", cfg.train_chars, cfg.context, exclude)
    eval_rows = max(1, cfg.eval_tokens // cfg.context)
    eval_chunks = token_chunks(tokenizer, "heldout", cfg.eval_tokens * 8, cfg.context)[:eval_rows]
    ckpt, start, elapsed, group = out_dir / "checkpoint.pt", 0, 0.0, None
    state = load_checkpoint(ckpt, settings) if cfg.resume and ckpt.is_file() else None  # other settings: before any rows
    kept = state.get("generated_rows") if state is not None and source_is_corpus(cfg) else None  # a resume's rows
    extra_rows = kept if kept is not None else generated_training_rows(cfg, target, tokenizer, where["target"], train_chunks)
    head = recipe.build(cfg, target, draft_vocabulary(cfg, target, train_chunks, extra_rows))
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=tuple(recipe.betas))
    make_dir(out_dir, "out_dir" if cfg.out_dir else "cache_dir")  # after the head is built: a bad setting leaves none
    if state is not None:
        head.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed, group = int(state["step"]), float(state["elapsed_s"]), state.get("wandb_group")
        print(f"resuming from {ckpt} at step {start}/{cfg.steps}" + (f" (W&B group {group})" if group else ""),
              file=sys.stderr)
    group = group or f"{recipe.name}-{new_run_id()}"  # every invocation of this training logs to this W&B group
    train_log = TrainingLog(run_dir, training_wandb_settings(cfg, run_dir, f"train_{recipe.name}", group=group))
    log.info("training %s for %s: steps %d-%d, %d training rows; head -> %s", recipe.name, where["target"], start,
             cfg.steps, train_chunks.shape[0], out_dir)
    bar = tqdm(total=cfg.steps, initial=start, desc=recipe.name, unit="step", disable=not cfg.progress, file=sys.stderr)
    head.train()
    try:
        t0 = time.perf_counter() - elapsed
        for step, batch in zip(range(start, cfg.steps), training_batches(train_chunks, extra_rows, cfg, start)):
            loss, metrics = _optimizer_step(recipe, head, target, batch.to(device), optimizer, cfg, step, amp)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                train_log(metrics, done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(ckpt, done, head, optimizer, settings, time.perf_counter() - t0, group,
                                generated_rows=extra_rows if source_is_corpus(cfg) else None)
            if on_step is not None:
                on_step(done)
        bar.close()
        train_s = time.perf_counter() - t0
        head.eval()
        report = recipe.evaluate(head, target, eval_chunks.to(device), cfg)
        report.update({"steps": cfg.steps, "train_s": train_s, "train_tokens": cfg.steps * cfg.batch_size * cfg.context,
                       "precision": str(amp or torch.float32).replace("torch.", ""),
                       "threads": torch.get_num_threads(), "device": str(device), "out_dir": str(out_dir), **where})
        final = recipe.final_metrics(report)
        train_log(final, cfg.steps)
        train_log.summary(final)
    finally:
        bar.close()
        train_log.finish()
    recipe.save(head, out_dir, {**made, "train_s": train_s}, report)
    atomic_write_json(run_dir / "eval.json", report)
    ckpt.unlink(missing_ok=True)  # finished: the head is saved
    return report


def finished_report(out_dir: Path, settings: dict, recipe: HeadRecipe, force: bool) -> dict | None:
    """The ``eval.json`` of a head already trained in ``out_dir`` with exactly ``settings`` (the same target,
    data and schedule: training is seeded, so a rerun would write the same head), or None: train. Says which."""
    from drafters.head_files import EVAL_FILE, read_eval

    try:
        training = json.loads((out_dir / recipe.files.config_file).read_text(encoding="utf-8")).get("training") or {}
    except (OSError, ValueError, AttributeError):
        return None  # no finished head there (or an unreadable one: training replaces it)
    changed = setting_changes(training, settings)
    report = read_eval(out_dir)
    if report is None:
        changed.append(f"no {EVAL_FILE}")
    elif problem := unreadable(recipe, out_dir):
        changed.append(problem)
    if changed:
        print(f"{out_dir} holds {recipe.files.label} trained with other settings or unfinished ({', '.join(changed)}): "
              "this run replaces it when it finishes", file=sys.stderr)
        return None
    if force:
        print(f"force=true: training again the {recipe.files.label} at {out_dir} (same settings)", file=sys.stderr)
        return None
    print(f"{out_dir} already holds {recipe.files.label} trained with these settings on this target: nothing to do "
          f"(its eval.json follows; force=true trains it again, out_dir=<dir> trains another)", file=sys.stderr)
    return {**report, "reused": True}


def unreadable(recipe: HeadRecipe, out_dir: Path) -> str | None:
    """Why the finished head in ``out_dir`` does not load as decoding loads it (a missing or truncated weights file,
    a missing tensor, a wrong shape, NaN weights), or None: a rerun that called such a head finished would leave
    decoding's error ("retrain") with nothing to retrain."""
    try:
        recipe.load(out_dir)
    except SpecDecError as exc:
        return f"the head does not load: {exc}"
    return None


def train_from_hydra(cfg: DictConfig, recipe: HeadRecipe, format_report) -> dict:
    """An entry point's task: train into the Hydra run directory, print ``format_report(report)``."""
    from hydra.core.hydra_config import HydraConfig

    report = train(cfg, HydraConfig.get().runtime.output_dir, recipe)
    print(format_report(report))
    return report


def _optimizer_step(recipe: HeadRecipe, head, target, batch, optimizer, cfg: DictConfig, step: int,
                    amp: torch.dtype | None):
    """One AdamW step at the scheduled learning rate, the loss under autocast to ``amp`` (None: fp32);
    ``(loss value, metrics to log)``."""
    lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # a step's draws (EAGLE-2's feature noise) as a resume repeats them
    with torch.autocast(batch.device.type, dtype=amp, enabled=amp is not None):
        loss, metrics = recipe.loss(head, target, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in head.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    value = loss.item()
    return value, {"train/loss": value, "train/lr": lr, **metrics}
