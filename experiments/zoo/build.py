"""Building the embedded pair into the cache, and finding (or building) it: ``ensure_pair``.

Layout: ``<cache_dir>/zoo/<size>/{tokenizer,target,draft}/`` plus ``COMPLETE.json``
(see ``experiments.zoo.cache``). The models are plain ``save_pretrained`` checkpoints
(safetensors) loaded with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from experiments import corpus
from experiments.data import writable_cache_dir
from experiments.zoo import cache, progress
from experiments.zoo.sizes import ENDOFTEXT, ZooSize, get_size, llama_config
from experiments.zoo.tokenizer import iter_texts, train_tokenizer
from experiments.zoo.training import (
    LogFn,
    TrainSettings,
    chunk_stream,
    count_params,
    distill_draft,
    encode_stream,
    evaluate_pair,
    init_draft_from_target,
    train_target,
)
from specdec.models import has_native_bf16

log = logging.getLogger(__name__)

ON_CORRUPT = ("rebuild", "error")


class ZooError(RuntimeError):
    """The embedded pair is missing or corrupt and was not (re)built."""


@dataclass(frozen=True)
class ZooPair:
    """Paths of a built pair (load them with ``from_pretrained``) and its manifest metrics."""

    size: str
    root: str
    target_dir: str
    draft_dir: str
    tokenizer_dir: str
    metrics: dict = field(default_factory=dict)

    def load(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        """``(tokenizer, target, draft)`` through the Auto classes, in eval mode."""
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        target = AutoModelForCausalLM.from_pretrained(self.target_dir, dtype=dtype).to(device).eval()
        draft = AutoModelForCausalLM.from_pretrained(self.draft_dir, dtype=dtype).to(device).eval()
        return tokenizer, target, draft


# --------------------------------------------------------------------------- environment


def seed_everything(seed: int) -> None:
    """Seed Python, torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None -> cuda if available else cpu; anything else as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from specdec.models import check_device

    return check_device(device, "device")


#: Training precisions: ``auto`` (bf16 where it pays, see :func:`resolve_amp`), ``fp32``, ``bf16``.
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_amp(precision: str, device: torch.device, hidden_size: int = 512) -> torch.dtype | None:
    """Autocast dtype for ``precision`` (``auto``, ``fp32``, ``bf16``); None means fp32.

    ``auto`` picks bf16 on GPUs that support it, and on CPUs with native bf16 for models
    wide enough (hidden >= 256) to gain from it.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    wide = device.type == "cuda" or hidden_size >= 256  # a narrow model gains nothing on a CPU
    return torch.bfloat16 if wide and has_native_bf16(device) else None


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Use ``threads`` torch CPU threads inside the block (None: leave as is)."""
    from specdec.models import set_threads

    previous = torch.get_num_threads()
    set_threads(threads, "threads")
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- building


def _generation_config() -> GenerationConfig:
    return GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _save_model(model: LlamaForCausalLM, path: Path) -> None:
    model.generation_config = _generation_config()
    model.save_pretrained(path)


def _token_chunks(tokenizer, size: ZooSize, split: str, max_chars: int) -> torch.Tensor:
    """``[R, context]`` rows of one corpus split."""
    texts = iter_texts(corpus.hash_order(corpus.corpus_files(split=split)), max_chars)
    return chunk_stream(encode_stream(tokenizer, texts, tokenizer.convert_tokens_to_ids(ENDOFTEXT)), size.context)


def build_pair(size: ZooSize, out_dir: Path, seed: int, settings: TrainSettings) -> dict:
    """Train tokenizer, target and draft into ``out_dir`` (going on from a stopped build's checkpoints there:
    :mod:`experiments.zoo.progress`); returns the metrics (no manifest), times summed over the build's sessions."""
    start = time.perf_counter()
    seed_everything(seed)
    earlier = progress.earlier_sessions(out_dir)
    loaded = (out_dir / "tokenizer" / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "tokenizer") if loaded else _train_tokenizer(size, out_dir)
    train_chunks = _token_chunks(tokenizer, size, "train", size.corpus_chars)  # [R, T]
    eval_rows = max(1, size.eval_tokens // size.context)
    eval_chunks = _token_chunks(tokenizer, size, "heldout", 0)[:eval_rows]  # [E, T]
    tokenizer_s = earlier["tokenizer_s"] if loaded and earlier["tokenizer_s"] is not None else time.perf_counter() - start
    if not loaded:
        progress.note_session(out_dir, tokenizer_s=tokenizer_s)
    log.info("zoo %s: tokenizer %s, %d training tokens, in %.0fs", size.name,
             "of the stopped build" if loaded else "trained", train_chunks.numel(), tokenizer_s)

    target = LlamaForCausalLM(llama_config(size, size.target))
    metrics = train_target(target, train_chunks, size, seed, settings, progress.checkpoint_of(out_dir, "target"))
    seed_everything(seed + 1)
    draft = LlamaForCausalLM(llama_config(size, size.draft))
    if size.draft_init_from_target:
        init_draft_from_target(draft, target)
    metrics |= distill_draft(draft, target, train_chunks, size, seed, settings, progress.checkpoint_of(out_dir, "draft"))
    eval_start = time.perf_counter()
    metrics |= evaluate_pair(target, draft, eval_chunks, settings.device)
    metrics["eval_s"] = time.perf_counter() - eval_start
    _save_model(target.float().cpu(), out_dir / "target")
    _save_model(draft.float().cpu(), out_dir / "draft")
    return {
        "target_params": count_params(target),
        "draft_params": count_params(draft),
        "vocab_size": len(tokenizer),
        "train_corpus_tokens": train_chunks.numel(),
        "tokenizer_s": tokenizer_s,
        **metrics,
        "build_s": time.perf_counter() - start + earlier["seconds"],
        "build_sessions": earlier["count"] + 1,
        "device": str(settings.device),
        "amp_dtype": str(settings.amp_dtype).replace("torch.", "") if settings.amp_dtype else "float32",
        "threads": torch.get_num_threads(),
    }


def _train_tokenizer(size: ZooSize, out_dir: Path):
    """The pair's tokenizer, trained now and saved in ``out_dir/tokenizer`` (a stopped build's next session loads it)."""
    files = corpus.hash_order(corpus.corpus_files(split="train"))
    tokenizer = train_tokenizer(iter_texts(files, size.tokenizer_chars), size.vocab_size)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    return tokenizer


def _manifest_info(size: ZooSize, seed: int, metrics: dict, key: dict) -> dict:
    """The manifest's own fields; ``versions``: the build key's software versions and CPU instruction set."""
    versions = {k: key[k] for k in ("python", "torch", "transformers", "tokenizers", "cpu_capability") if k in key}
    return {"size": size.name, "seed": seed, "config": size.to_dict(), "metrics": metrics, "versions": versions}


def _pair_from_manifest(dest: Path, manifest: dict) -> ZooPair:
    return ZooPair(
        size=manifest["size"],
        root=str(dest),
        target_dir=str(dest / "target"),
        draft_dir=str(dest / "draft"),
        tokenizer_dir=str(dest / "tokenizer"),
        metrics=dict(manifest.get("metrics", {})),
    )


def _build_and_publish(parent: Path, size: ZooSize, seed: int, settings: TrainSettings, force: bool = False) -> dict:
    """Build into the partial build's dir (going on from a stopped one unless ``force``:
    :mod:`experiments.zoo.progress`), write the manifest last, rename into place; returns the manifest. A build
    stopped by Ctrl-C or a failure keeps its partial build for the next one (unless stopped while publishing)."""
    key = progress.build_key(size.to_dict(), seed, settings.device.type, settings.amp_dtype)
    staging, resumed = progress.partial_dir(parent, size.name, key, fresh=force)
    if resumed:
        log.info("zoo %s: going on from the build stopped in %s", size.name, staging)
    start = time.perf_counter()
    try:
        metrics = build_pair(size, staging, seed, settings)
        manifest = cache.write_manifest(staging, _manifest_info(size, seed, metrics, key), skip=progress.partial_only)
        progress.finish(staging)
        cache.publish(staging, parent / size.name)
    except BaseException:
        if staging.is_dir() and (staging / progress.KEY_FILE).is_file():
            progress.note_session(staging, time.perf_counter() - start)
            log.info("zoo %s: stopped; the next build goes on from what %s keeps", size.name, staging)
        else:  # stopped while publishing (after finish: a moment): its checkpoints are gone already
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _check_existing(dest: Path, checksums: bool) -> tuple[dict | None, str | None]:
    """``(manifest, None)`` for a valid entry, ``(None, reason)`` otherwise (reason None if absent)."""
    if not dest.exists():
        return None, None
    try:
        return cache.verify_entry(dest, checksums=checksums), None
    except cache.CacheEntryError as exc:
        return None, str(exc)


def ensure_pair(
    size: str = "default",
    cache_dir: str | None = None,
    build_if_missing: bool = True,
    *,
    force: bool = False,
    on_corrupt: str = "rebuild",
    checksums: bool = True,
    seed: int = 0,
    device: str | None = "auto",
    precision: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    log_fn: LogFn | None = None,
) -> ZooPair:
    """The embedded target/draft pair of ``size``, built and cached on first use.

    The cache is ``<cache_dir>/zoo/<size>`` (``cache_dir`` defaults to ``$SPECDEC_CACHE``
    or ``~/.cache/specdec``). A cached pair is used only if its ``COMPLETE.json``
    matches every file (sizes, and sha256 with ``checksums``). An invalid entry
    (interrupted build, corrupt checkpoint) is rebuilt with a warning, or reported as a
    ``ZooError`` when ``on_corrupt="error"``. ``force`` rebuilds unconditionally;
    ``build_if_missing=False`` raises ``ZooError`` instead of building.
    ``seed``, ``device``, ``precision``, ``threads`` (torch CPU threads during the build),
    ``progress`` and ``log_fn`` only affect builds.
    """
    spec = get_size(size)
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt={on_corrupt!r}; use one of {ON_CORRUPT}")
    parent = writable_cache_dir(cache_dir) / "zoo"
    parent.mkdir(exist_ok=True)
    dest = parent / spec.name
    manifest, problem = (None, None) if force else _check_existing(dest, checksums)
    if manifest is not None:
        log.info("zoo %s: already built at %s", spec.name, dest)
        return _pair_from_manifest(dest, manifest)
    _refuse_or_warn(spec, dest, problem, on_corrupt, build_if_missing)
    with cache.entry_lock(parent, spec.name):
        manifest, _ = (None, None) if force else _check_existing(dest, checksums)  # built meanwhile?
        if manifest is None:
            for stale in cache.remove_stale(parent, spec.name):
                log.info("zoo %s: removed %s left by an interrupted build", spec.name, stale)
            dev = resolve_device(device)
            settings = TrainSettings(dev, resolve_amp(precision, dev, spec.target.hidden_size), progress, log_fn)
            log.info("zoo %s: building at %s on %s; takes %s", spec.name, dest, dev, spec.build_time)
            with torch_threads(threads):
                manifest = _build_and_publish(parent, spec, seed, settings, force)
            log.info("zoo %s: built in %.0fs: %s", spec.name, manifest["metrics"]["build_s"], _summary(manifest["metrics"]))
    return _pair_from_manifest(dest, manifest)


def _refuse_or_warn(spec: ZooSize, dest: Path, problem: str | None, on_corrupt: str, build_if_missing: bool) -> None:
    """Raise ``ZooError`` if the pair must not be built now; warn when an invalid entry is replaced."""
    command = f"python -m experiments.build_zoo size={spec.name}"
    if problem is not None and on_corrupt == "error":
        raise ZooError(f"zoo {spec.name} at {dest} is invalid: {problem}. Rebuild it with `{command} force=true` or delete {dest}")
    if problem is None and not build_if_missing:
        raise ZooError(f"zoo {spec.name} is not built at {dest}; build it with `{command}` (or allow build_if_missing)")
    if problem is not None:
        if not build_if_missing:
            raise ZooError(f"zoo {spec.name} at {dest} is invalid: {problem}; rebuild it with `{command}`")
        log.warning("zoo %s at %s is invalid (%s); rebuilding it", spec.name, dest, problem)


def _summary(metrics: dict) -> str:
    keys = ("target_params", "draft_params", "target_heldout_loss", "draft_heldout_loss", "alpha")
    return ", ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)
