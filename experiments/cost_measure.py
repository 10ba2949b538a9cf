"""Measuring forward costs: timed round-robin, cached per model and device (the predictions that use them:
:mod:`experiments.costs`).

``T_t(w)`` is the target's median forward time for ``w`` new tokens and ``T_d(1)`` the draft
model's for one, both after ``context`` cached tokens, where a decode run uses
``context = median prompt length + max_new_tokens / 2`` (:func:`run_context`); a run's curves are timed
round-robin (every width of every model once per round, ``REPS`` rounds), so load drifts skew them alike.
The target is timed at widths ``TARGET_WIDTHS`` (1..9, then 12, 16, 24, 32, 48, 64). Prefills (target and
draft model at the mean prompt length) are timed too, cold.

Curves are cached as JSON under ``$SPECDEC_CACHE/costs`` (default ``~/.cache/specdec/costs``),
one file per model, keyed by a fingerprint of the model config, dtype, device, torch threads,
context length, widths and attention backend (plus host and torch version), so a sweep measures
each model once. A curve in which fewer tokens cost far more than more tokens (:func:`implausible`: timed while the
machine was busy) is measured again and never cached. Importable without hydra or wandb.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from specdec.cache import SpecDecCache
from specdec.files import atomic_write_json
from specdec.models import synchronize, vocab_size
from verifier import tree_forward
from verifier.narrow_linear import narrow_product_of

log = logging.getLogger(__name__)

TARGET_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 48, 64)
DRAFT_WIDTHS = (1,)
#: Timed repetitions per width (two untimed warm-ups first); the median is kept.
REPS = 20
#: Changes when the way curves are measured changes (part of the fingerprint: old entries are not reused).
METHOD = "round-robin-warm-median/2"


# --------------------------------------------------------------------------- timing one forward


def _setup(model, context: int, widths: tuple[int, ...], backend: str) -> dict:
    """A cache holding ``context`` random tokens and the inputs of every width (one forward each)."""
    device = next(model.parameters()).device
    vocab = vocab_size(model)
    gen = torch.Generator().manual_seed(0)
    cache = SpecDecCache.for_model(model, context + max(widths))
    if context > 0:  # context 0 times a prefill of ``width`` tokens
        prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)  # [1, L]
        tree_forward(model, cache, prefix, backend=backend, logits_to_keep=1)  # causal
    # a verify-shaped forward (a chain's tree mask) after a context; a causal prefill without one
    inputs = {w: (torch.randint(0, vocab, (1, w), generator=gen).to(device),  # [1, w]
                  torch.ones(w, w, dtype=torch.bool, device=device).tril() if context > 0 else None,  # [w, w]
                  torch.arange(w, device=device))  # [w]
              for w in widths}
    return {"model": model, "device": device, "cache": cache, "context": context, "inputs": inputs}


@torch.no_grad()
def measure_interleaved(requests: list[tuple[Any, int, tuple[int, ...]]], reps: int = REPS,
                        backend: str = "sdpa") -> list[dict[int, float]]:
    """Median seconds of one forward for each ``(model, context, widths)`` request and width.

    A forward of ``w`` new tokens (causal) follows ``context`` cached tokens and keeps all logits, as
    in verification; ``context=0`` times a prefill (last position's logits only). Every request and
    width is timed once per round, round after round (two untimed warm-up rounds), so a machine
    whose speed drifts skews them all alike. Within a round a request starts with one untimed
    forward, so its weights are as warm as in decoding, where a model runs several forwards in a
    row (prefills, which run once per prompt, are timed cold). At a terminal a bar counts the rounds (a busy
    machine's measurement took minutes without a sign of life); it is cleared when done.
    """
    setups = [_setup(model, context, tuple(widths), backend) for model, context, widths in requests]
    samples: list[dict[int, list[float]]] = [{w: [] for w in widths} for _, _, widths in requests]
    for round_ in tqdm(range(reps + 2), desc="timing forwards", unit="round", leave=False,
                       disable=None if sys.stderr else True, file=sys.stderr):  # no stderr (None): no bar
        for setup, times in zip(setups, samples):
            first = next(iter(setup["inputs"]))
            order = ([None] if setup["context"] > 0 else []) + list(setup["inputs"])  # None: untimed warm-up
            for w in order:
                ids, mask, depth = setup["inputs"][first if w is None else w]
                setup["cache"].truncate(setup["context"])
                synchronize(setup["device"])
                t0 = time.perf_counter()
                tree_forward(setup["model"], setup["cache"], ids, mask, depth, backend,
                             logits_to_keep=1 if setup["context"] == 0 else 0)
                synchronize(setup["device"])
                if round_ >= 2 and w is not None:
                    times[w].append(time.perf_counter() - t0)
    return [{w: statistics.median(v) for w, v in times.items()} for times in samples]


def forward_cost(model, context: int, width: int, reps: int = 15, backend: str = "sdpa") -> float:
    """Median seconds of one forward of ``width`` new tokens (causal) after ``context`` cached tokens."""
    return measure_interleaved([(model, context, (width,))], reps, backend)[0][width]


def measure_costs(target, draft, context: int, ks: list[int], backend: str = "sdpa", reps: int = 15,
                  draft_probe=None) -> dict:
    """``{"target": {width: s}, "draft": s, "draft_transformers": s, "context": L}`` for widths 1 and k + 1 of
    every k (uncached).

    ``draft`` is timed at width 1 through transformers' forward (``"draft_transformers"``, as Hugging Face's
    assisted generation runs it), round-robin with the target; with ``draft_probe``
    (:func:`drafters.fast_decoder.lean_probe`: the draft as our chain runs it) ``"draft"`` is the probe's time,
    taken after those rounds (``reps`` calls back to back, so its weights stay warm: on a CPU a little below its
    cost between target forwards), else the same transformers time."""
    widths = tuple(sorted({1} | {k + 1 for k in ks}))
    requests = [(target, context, widths)] + ([(draft, context, (1,))] if draft is not None else [])
    curves = measure_interleaved(requests, reps=reps, backend=backend)
    plain = curves[1][1] if draft is not None else None
    ours = time_probe(draft_probe, reps) if draft_probe is not None else plain
    return {"context": context, "target": curves[0], "draft": ours, "draft_transformers": plain}


def draft_cost_note(costs: dict) -> str:
    """The header's draft cost: ours, and transformers' (HF's) where the lean forward made them differ."""
    ours, plain = costs["draft"] * 1e3, costs.get("draft_transformers")
    if plain is None or plain == costs["draft"]:
        return f"{ours:.2f} ms"
    return f"{ours:.2f} ms through our lean forward ({plain * 1e3:.2f} ms through transformers', as HF runs it)"


# --------------------------------------------------------------------------- cached curves


def costs_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>`` if given, else ``$SPECDEC_CACHE/costs`` (default ``~/.cache/specdec/costs``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from experiments.data import default_cache_dir

    return default_cache_dir() / "costs"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def fingerprint(model, context: int, widths: tuple[int, ...], backend: str, reps: int) -> dict:
    """What a cost curve depends on: the model's architecture (not its weights) and where and how it runs."""
    param = next(model.parameters())
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(volatile, None)
    fp = {"config": config, "dtype": str(param.dtype), "device": str(param.device),
            "device_name": _device_name(param.device), "threads": torch.get_num_threads(), "context": int(context),
            "widths": [int(w) for w in widths], "backend": backend, "reps": reps, "method": METHOD,
            "torch": torch.__version__,
            "host": platform.node()}
    product = narrow_product_of(model)
    if product is not None:  # other verify costs (verifier.narrow_linear); plain models keep their old keys
        fp["linears"] = "narrow" if product == "transposed" else f"narrow-{product}"
    return fp


def fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cache_path(fp: dict, cache_dir: str | os.PathLike | None) -> Path:
    return costs_dir(cache_dir) / f"{fingerprint_key(fp)}.json"


def _load(fp: dict, cache_dir: str | os.PathLike | None) -> dict[int, float] | None:
    try:
        stored = json.loads(_cache_path(fp, cache_dir).read_text(encoding="utf-8"))
        if json.loads(json.dumps(fp, default=str)) == stored["fingerprint"]:
            return {int(w): float(s) for w, s in stored["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _store(fp: dict, seconds: dict[int, float], cache_dir: str | os.PathLike | None) -> None:
    path = _cache_path(fp, cache_dir)
    entry = {"fingerprint": fp, "seconds": seconds,
             "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entry, indent=1, default=str)
    except OSError as exc:
        warnings.warn(f"could not cache forward costs in {path.parent} ({exc}); they will be measured again")


def cost_curves(requests: list[tuple[Any, int, tuple[int, ...]]], backend: str = "sdpa",
                cache_dir: str | os.PathLike | None = None, reps: int = REPS) -> list[tuple[dict[int, float], bool]]:
    """``[({width: median seconds}, cached)]`` per ``(model, context, widths)`` request.

    Each curve is measured once per fingerprint and cached; the missing ones are measured together
    (:func:`measure_interleaved`). An unreadable cache entry is measured again, and so is one that a spot check
    no longer confirms (:func:`_still_holds`) or that is :func:`implausible`; a curve measured implausible twice in a
    row is returned but not cached. An unwritable cache directory only costs a warning.
    """
    fps = [fingerprint(model, context, widths, backend, reps) for model, context, widths in requests]
    found = [_load(fp, cache_dir) for fp in fps]
    found = [curve if curve is None or (implausible(curve) is None and _still_holds(request, curve, backend))
             else None for request, curve in zip(requests, found)]
    missing = [i for i, curve in enumerate(found) if curve is None]
    if missing:
        measured = _measure_plausibly([requests[i] for i in missing], reps, backend)
        for i, seconds in zip(missing, measured):
            if implausible(seconds) is None:  # else measured again next run, not trusted from the cache
                _store(fps[i], seconds, cache_dir)
            found[i] = seconds
    return [(curve, i not in missing) for i, curve in enumerate(found)]


def in_cache(requests: list[tuple[Any, int, tuple[int, ...]]], backend: str = "sdpa",
             cache_dir: str | os.PathLike | None = None, reps: int = REPS) -> list[bool]:
    """Whether each ``(model, context, widths)`` request has a readable cache entry, before :func:`cost_curves`
    checks that it still holds (a request with an entry that comes back uncached was measured again)."""
    return [_load(fingerprint(model, context, widths, backend, reps), cache_dir) is not None
            for model, context, widths in requests]


#: A curve is implausible when a width costs more than this factor times a wider width's cost (and more than
#: :data:`SPOT_CHECK_FLOOR` seconds more): a forward of more tokens does the work of fewer and more. Seen on a machine
#: whose CPU time was throttled beside a test run: 280 ms at widths 2-5, 55 ms at widths 6-16.
MONOTONE_FACTOR = 1.5


def implausible(curve: dict[int, float]) -> str | None:
    """Why ``curve`` ({width: seconds}) cannot be a forward's cost (a narrower width far dearer than a wider one,
    :data:`MONOTONE_FACTOR`), or None."""
    widths = sorted(curve)
    for i, width in enumerate(widths[:-1]):
        wider = min(widths[i + 1:], key=curve.__getitem__)  # the cheapest wider width
        if curve[width] > MONOTONE_FACTOR * curve[wider] and curve[width] - curve[wider] > SPOT_CHECK_FLOOR:
            return (f"{width} tokens cost {curve[width] * 1e3:.2f} ms, more than {MONOTONE_FACTOR}x the "
                    f"{curve[wider] * 1e3:.2f} ms of {wider} tokens")
    return None


def _measure_plausibly(requests: list[tuple[Any, int, tuple[int, ...]]], reps: int, backend: str) -> list[dict]:
    """:func:`measure_interleaved`, then once more for the curves :func:`implausible` rejects (the machine was busy
    while they were timed); the second measurement is kept."""
    curves = measure_interleaved(requests, reps, backend)
    again = [i for i, curve in enumerate(curves) if implausible(curve) is not None]
    if again:
        for i, curve in zip(again, measure_interleaved([requests[i] for i in again], reps, backend)):
            curves[i] = curve
    return curves


#: A cached curve is measured again when its narrowest width, timed now, differs from it by more than this factor
#: and more than :data:`SPOT_CHECK_FLOOR` seconds: the curve was measured while the machine was busy (an entry
#: measured beside a test run said 46 ms for a 10.7 ms forward), or the machine is another one.
SPOT_CHECK_FACTOR = 2.0
SPOT_CHECK_FLOOR = 0.002


def _still_holds(request: tuple[Any, int, tuple[int, ...]], curve: dict[int, float], backend: str) -> bool:
    """Whether a cached per-step curve agrees with a spot check of its narrowest width (3 timed forwards after the
    context is filled). Prefill entries (``context`` 0, timed cold, once per run) are not checked."""
    model, context, _ = request
    if context == 0:
        return True
    width = min(curve)
    now, then = measure_interleaved([(model, context, (width,))], reps=3, backend=backend)[0][width], curve[width]
    return max(now, then) <= SPOT_CHECK_FACTOR * min(now, then) or abs(now - then) <= SPOT_CHECK_FLOOR


def cost_curve(model, context: int, widths: tuple[int, ...] = TARGET_WIDTHS, backend: str = "sdpa",
               cache_dir: str | os.PathLike | None = None, reps: int = REPS) -> tuple[dict[int, float], bool]:
    """``({width: median seconds}, cached)`` for one model (see :func:`cost_curves`)."""
    return cost_curves([(model, context, widths)], backend, cache_dir, reps)[0]


def run_context(prompt_lengths: list[int], max_new_tokens: int) -> int:
    """The context length a run's costs are measured at: median prompt length + max_new_tokens / 2."""
    return int(statistics.median(prompt_lengths)) + max_new_tokens // 2


def time_probe(probe, reps: int = REPS) -> float:
    """Median seconds of ``probe()`` (a draft forward of a module that is not a causal LM), two
    untimed calls first. Not cached: such probes are cheap."""
    device = None
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        out = probe()
        if isinstance(out, torch.Tensor):
            device = out.device
        if device is not None:
            synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_run_costs(target, shape, context: int, prompt_tokens: int | None = None, backend: str = "sdpa",
                      cache_dir: str | os.PathLike | None = None, skip_hint: str = "") -> dict:
    """The cost curves a run's predictions use: the target at ``TARGET_WIDTHS`` after ``context``
    tokens, and what drafts (``shape``: the drafter's :class:`specdec.drafting.StepShape`): a draft
    model at width 1 after ``context`` tokens, or one call of its probe (Medusa's heads); with
    ``prompt_tokens``, also the target's and the draft model's prefill of that many tokens. Curves not cached yet
    are announced first (a large model's take minutes), with ``skip_hint``: how the caller skips them."""
    draft = shape.draft_model
    requests = [("target", target, context, TARGET_WIDTHS)]
    if draft is not None and shape.draft_probe is None:  # a probe times the draft as it runs (a lean forward)
        requests.append(("draft", draft, context, DRAFT_WIDTHS))
    width = max(1, int(prompt_tokens)) if prompt_tokens else None
    if width:
        requests += [("prefill_target", target, 0, (width,))] + ([("prefill_draft", draft, 0, (width,))] if draft else [])
    roles, plain = [r[0] for r in requests], [r[1:] for r in requests]
    stored = dict(zip(roles, in_cache(plain, backend, cache_dir)))
    if new := [role for role in roles if not stored[role]]:
        log.info("measuring forward costs for the predicted speedup (%s, after %d tokens; cached per model and "
                 "device)%s", ", ".join(new), context, skip_hint)
    curves = dict(zip(roles, cost_curves(plain, backend, cache_dir)))
    costs = {"context": int(context), "target": curves["target"][0], "draft": None,
             "cached": {role: cached for role, (_, cached) in curves.items()},
             "remeasured": [role for role, (_, cached) in curves.items() if stored[role] and not cached],
             "implausible": {role: why for role, (curve, _) in curves.items() if (why := implausible(curve))}}
    if shape.draft_probe is not None:
        costs["draft"] = {1: time_probe(shape.draft_probe)}
    elif draft is not None:
        costs["draft"] = curves["draft"][0]
    if width:
        costs["prefill"] = {"tokens": width, "target": curves["prefill_target"][0][width],
                            "draft": curves["prefill_draft"][0][width] if draft is not None else None}
    return costs
