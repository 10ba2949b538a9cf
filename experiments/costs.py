"""Measured forward costs (cached per model and device) and the speedups they predict.

Cost model (REFERENCES.md, "Expected gain"). One speculative step runs ``F_d`` draft-model
forwards and one target forward over the root plus the ``N`` draft nodes, so against our own
autoregressive loop (one width-1 target forward per token)::

    predicted speedup = tau * T_t(1) / (F_d * T_d(1) + T_t(N + 1))

- draft-model chain of k: ``F_d = k``, ``N = k`` (``tau * T_t(1) / (k T_d(1) + T_t(k + 1))``);
- n-gram lookup: ``F_d = 0`` (a dictionary lookup), ``N`` = the tokens it proposed;
- token trees: ``F_d`` = the tree's depth (one draft forward per level), ``N`` = its nodes.

``T_t(w)`` is the target's median forward time for ``w`` new tokens and ``T_d(1)`` the draft
model's for one, both after ``context`` cached tokens, where a decode run uses
``context = median prompt length + max_new_tokens / 2``; a run's curves are timed round-robin
(every width of every model once per round, ``REPS`` rounds), so load drifts skew them alike,
and read as measured (:func:`cost_at`; a wider forward may cost less on a CPU). The target is timed at widths
``TARGET_WIDTHS`` (1..9, then 12, 16, 24, 32, 48, 64; widths in between are interpolated
linearly, wider ones extrapolated from the last two). A run predicts with its measured per-step
proposals (mean over steps of ``F_d T_d(1) + T_t(n_i + 1)``), so steps cut short near
``max_new_tokens`` and n-gram steps with no match are costed as they ran. ``predicted_speedup``
also counts what the measured ``speedup`` counts, the prefills (target and draft model at the
mean prompt length, timed too): the baseline takes ``P_t + N T_t(1)`` for N tokens, speculation
``P_t + P_d + S * step`` for its S steps; ``predicted_step_speedup`` leaves them out.

Recommendation: ``alpha`` is fitted to the measured acceptance by depth (:func:`fit_alpha`),
``tau(k) = (1 - alpha^(k+1)) / (1 - alpha)``, and ``recommended_k`` is the k in 1..8 with the
largest predicted speedup for that alpha and the measured costs.

Curves are cached as JSON under ``$SPECDEC_CACHE/costs`` (default ``~/.cache/specdec/costs``),
one file per model, keyed by a fingerprint of the model config, dtype, device, torch threads,
context length, widths and attention backend (plus host and torch version), so a sweep measures
each model once. Importable without hydra or wandb.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from specdec.cache import SpecDecCache
from specdec.files import atomic_write_json
from specdec.models import vocab_size
from verifier import tree_forward

TARGET_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 48, 64)
DRAFT_WIDTHS = (1,)
#: Chain lengths the recommendation considers.
KS = tuple(range(1, 9))
#: Timed repetitions per width (two untimed warm-ups first); the median is kept.
REPS = 20
#: Changes when the way curves are measured changes (part of the fingerprint: old entries are not reused).
METHOD = "round-robin-warm-median/2"


# --------------------------------------------------------------------------- timing one forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    row (prefills, which run once per prompt, are timed cold).
    """
    setups = [_setup(model, context, tuple(widths), backend) for model, context, widths in requests]
    samples: list[dict[int, list[float]]] = [{w: [] for w in widths} for _, _, widths in requests]
    for round_ in range(reps + 2):
        for setup, times in zip(setups, samples):
            first = next(iter(setup["inputs"]))
            order = ([None] if setup["context"] > 0 else []) + list(setup["inputs"])  # None: untimed warm-up
            for w in order:
                ids, mask, depth = setup["inputs"][first if w is None else w]
                setup["cache"].truncate(setup["context"])
                _sync(setup["device"])
                t0 = time.perf_counter()
                tree_forward(setup["model"], setup["cache"], ids, mask, depth, backend,
                             logits_to_keep=1 if setup["context"] == 0 else 0)
                _sync(setup["device"])
                if round_ >= 2 and w is not None:
                    times[w].append(time.perf_counter() - t0)
    return [{w: statistics.median(v) for w, v in times.items()} for times in samples]


def forward_cost(model, context: int, width: int, reps: int = 15, backend: str = "sdpa") -> float:
    """Median seconds of one forward of ``width`` new tokens (causal) after ``context`` cached tokens."""
    return measure_interleaved([(model, context, (width,))], reps, backend)[0][width]


def cost_at(curve: Mapping[Any, float], width: float) -> float:
    """``curve[width]``, interpolated linearly between measured widths (extrapolated past the last two).

    Measured widths are read as measured, even where a wider forward costs less than a narrower
    one: on CPUs the BLAS library may run small matrix products on one thread and larger ones on
    all (on the 2-core development machine, width 3 costs more than width 5), so a monotone
    envelope would mispredict the narrower widths.
    """
    points = sorted((int(w), float(s)) for w, s in curve.items())
    if not points:
        raise ValueError("empty cost curve")
    if len(points) == 1 or width <= points[0][0]:
        return points[0][1]
    for (w0, s0), (w1, s1) in zip(points, points[1:]):
        if width <= w1:
            return s0 + (s1 - s0) * (width - w0) / (w1 - w0)
    (w0, s0), (w1, s1) = points[-2], points[-1]
    return s1 + (s1 - s0) * (width - w1) / (w1 - w0)


def cheap_widths(curve: Mapping[Any, float]) -> tuple[int, ...]:
    """The measured widths that no wider measured width undercuts: padding a verify block up to the next of
    these (``SpeculativeDecoder(verify_widths=...)``) never costs more by ``curve``. On the 2-core
    development machine widths 2, 3, 6 and 7 drop out (width 3 costs more than 4 and 5)."""
    keep, best = [], math.inf
    for width, seconds in sorted(((int(w), float(s)) for w, s in curve.items()), reverse=True):
        if seconds < best:
            keep.append(width)
            best = seconds
    return tuple(sorted(keep))


# --------------------------------------------------------------------------- bench API (experiments.bench)


def predicted_chain_speedup(tau: float, k: int, t_target: Mapping[Any, float], t_draft: float | None) -> float:
    """Speedup of a k-chain over autoregressive decoding: ``tau T_t(1) / (k T_d(1) + T_t(k + 1))``."""
    return tau * cost_at(t_target, 1) / (k * (t_draft or 0.0) + cost_at(t_target, k + 1))


def measure_costs(target, draft, context: int, ks: list[int], backend: str = "sdpa", reps: int = 15) -> dict:
    """``{"target": {width: s}, "draft": s, "context": L}`` for widths 1 and k + 1 of every k (uncached)."""
    widths = tuple(sorted({1} | {k + 1 for k in ks}))
    requests = [(target, context, widths)] + ([(draft, context, (1,))] if draft is not None else [])
    curves = measure_interleaved(requests, reps=reps, backend=backend)
    return {"context": context, "target": curves[0], "draft": curves[1][1] if draft is not None else None}


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
    return {"config": config, "dtype": str(param.dtype), "device": str(param.device),
            "device_name": _device_name(param.device), "threads": torch.get_num_threads(), "context": int(context),
            "widths": [int(w) for w in widths], "backend": backend, "reps": reps, "method": METHOD,
            "torch": torch.__version__,
            "host": platform.node()}


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
    (:func:`measure_interleaved`). An unreadable cache entry is measured again; an unwritable cache
    directory only costs a warning.
    """
    fps = [fingerprint(model, context, widths, backend, reps) for model, context, widths in requests]
    found = [_load(fp, cache_dir) for fp in fps]
    missing = [i for i, curve in enumerate(found) if curve is None]
    if missing:
        measured = measure_interleaved([requests[i] for i in missing], reps, backend)
        for i, seconds in zip(missing, measured):
            _store(fps[i], seconds, cache_dir)
            found[i] = seconds
    return [(curve, i not in missing) for i, curve in enumerate(found)]


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
            _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_run_costs(target, shape, context: int, prompt_tokens: int | None = None, backend: str = "sdpa",
                      cache_dir: str | os.PathLike | None = None) -> dict:
    """The cost curves a run's predictions use: the target at ``TARGET_WIDTHS`` after ``context``
    tokens, and what drafts (``shape``: the drafter's :class:`specdec.drafting.StepShape`): a draft
    model at width 1 after ``context`` tokens, or one call of its probe (Medusa's heads); with
    ``prompt_tokens``, also the target's and the draft model's prefill of that many tokens."""
    draft = shape.draft_model
    requests = [("target", target, context, TARGET_WIDTHS)]
    if draft is not None and shape.draft_probe is None:  # a probe times the draft as it runs (a lean forward)
        requests.append(("draft", draft, context, DRAFT_WIDTHS))
    width = max(1, int(prompt_tokens)) if prompt_tokens else None
    if width:
        requests += [("prefill_target", target, 0, (width,))] + ([("prefill_draft", draft, 0, (width,))] if draft else [])
    curves = dict(zip([r[0] for r in requests], cost_curves([r[1:] for r in requests], backend, cache_dir)))
    costs = {"context": int(context), "target": curves["target"][0], "draft": None,
             "cached": {role: cached for role, (_, cached) in curves.items()}}
    if shape.draft_probe is not None:
        costs["draft"] = {1: time_probe(shape.draft_probe)}
    elif draft is not None:
        costs["draft"] = curves["draft"][0]
    if width:
        costs["prefill"] = {"tokens": width, "target": curves["prefill_target"][0][width],
                            "draft": curves["prefill_draft"][0][width] if draft is not None else None}
    return costs


# --------------------------------------------------------------------------- predictions


def expected_tau(alpha: float, k: int) -> float:
    """Expected tokens per step of a k-chain with i.i.d. acceptance ``alpha``: (1 - a^(k+1)) / (1 - a)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def fit_alpha(depth_proposed: list[int], depth_accepted: list[int]) -> float | None:
    """Per-token acceptance ``alpha`` fitted to the measured acceptance by depth.

    ``r_d = depth_accepted[d] / depth_proposed[d]`` estimates ``alpha^(d+1)``; the pooled estimate
    ``alpha = sum_d accepted_d / sum_d (r_{d-1} * proposed_d)`` (with ``r_{-1} = 1``) weighs each
    depth by the steps that reached it. None without proposals.
    """
    accepted = trials = 0.0
    previous = 1.0
    for proposed, acc in zip(depth_proposed, depth_accepted):
        if proposed <= 0:
            break
        accepted += acc
        trials += previous * proposed
        previous = acc / proposed
    return min(1.0, accepted / trials) if trials > 0 else None


def _draft_cost(costs: dict) -> float:
    """Seconds of one draft forward (a draft model's width-1 forward or one heads call); 0 without drafts."""
    return cost_at(costs["draft"], 1) if costs.get("draft") else 0.0


def step_seconds(costs: dict, draft_forwards: float, verify_width: float) -> float:
    """Predicted seconds of one step: ``draft_forwards * T_d(1) + T_t(verify_width)``."""
    return draft_forwards * _draft_cost(costs) + cost_at(costs["target"], verify_width)


def draft_forwards_per_step(stats, shape: dict) -> float:
    """Mean draft forwards per step as the run proposed them: one per tree level (``per_level``:
    the depths of the steps' trees), one per step that proposed anything (``per_step``), or none."""
    steps = stats.target_forwards
    if shape["draft_forwards"] == "per_level":
        return sum(stats.depth_proposed) / steps
    if shape["draft_forwards"] == "per_step":
        return (stats.depth_proposed[0] if stats.depth_proposed else 0) / steps
    return 0.0


def predicted_step_seconds(stats, costs: dict, shape: dict) -> float:
    """Mean predicted seconds of the run's steps: ``F_d T_d(1) + T_t(n_i + 1)`` with its own proposals."""
    verify = statistics.fmean(cost_at(costs["target"], n + 1) for n in stats.proposed_per_step)
    return draft_forwards_per_step(stats, shape) * _draft_cost(costs) + verify


def predicted_speedups(stats, costs: dict, shape: dict, num_prompts: int) -> tuple[float | None, float | None]:
    """``(predicted_speedup, predicted_step_speedup)`` of a run from its stats and the cost curves.

    The step speedup is the decode loop's alone, ``tau T_t(1) / step``. The speedup adds what
    ``speedup`` also measures, the prefills: the baseline takes ``P_t + N T_t(1)`` per run of N
    tokens, speculation ``P_t + P_d + S * step`` for its S steps (``P``: measured prefill costs at
    the mean prompt length; equal to the step speedup when no prefill was measured).
    """
    steps = stats.target_forwards
    if not steps or not costs:
        return None, None
    if shape["kind"] == "none":
        return 1.0, 1.0
    step = predicted_step_seconds(stats, costs, shape)
    t1 = cost_at(costs["target"], 1)
    prefill = costs.get("prefill") or {}
    p_target = (prefill.get("target") or 0.0) * num_prompts
    p_draft = (prefill.get("draft") or 0.0) * num_prompts
    return ((p_target + stats.new_tokens * t1) / (p_target + p_draft + steps * step), stats.tau * t1 / step)


def chain_speedup_by_k(alpha: float, costs: dict, ks: tuple[int, ...] = KS,
                       tokens_per_prompt: float | None = None) -> dict[int, float]:
    """Predicted speedup of a k-chain for each k, with ``tau = expected_tau(alpha, k)``.

    Without ``tokens_per_prompt`` (or without measured prefills) the step speedup
    ``tau T_t(1) / (k T_d(1) + T_t(k + 1))``; with it, prefills included as in
    :func:`predicted_speedups` (the best k is the same either way).
    """
    t1 = cost_at(costs["target"], 1)
    prefill = costs.get("prefill") or {}
    p_target = prefill.get("target") or 0.0
    p_draft = prefill.get("draft") or 0.0
    n = tokens_per_prompt or 0.0
    out = {}
    for k in ks:
        tau, step = expected_tau(alpha, k), step_seconds(costs, k, k + 1)
        out[k] = (p_target + n * t1) / (p_target + p_draft + n / tau * step) if n else tau * t1 / step
    return out


def recommend_k(curve: Mapping[int, float]) -> int | None:
    """The k with the largest predicted speedup (the smallest such k on ties)."""
    return max(sorted(curve), key=lambda k: curve[k]) if curve else None


def draft_cost_warnings(costs: dict) -> list[str]:
    """One line when a draft forward costs more than a target forward: speculation cannot pay off
    then, and on a GPU it has meant a slow kernel path in the draft (cuDNN attention re-planning at
    every new length cost a bf16 draft ~30 ms per forward)."""
    t_draft, t_target = _draft_cost(costs), cost_at(costs["target"], 1)
    if t_draft <= t_target:
        return []
    return [f"a draft forward costs {t_draft * 1e3:.2f} ms, more than a target forward ({t_target * 1e3:.2f} ms): "
            "speculation cannot pay off; check the draft's dtype and device (model.draft_dtype) or use a "
            "smaller drafter"]


def cost_model(stats, costs: dict | None, shape: dict, measured_speedup: float | None,
               num_prompts: int = 1) -> tuple[dict, dict]:
    """``(metrics, cost_model)`` for the summary.

    ``metrics``: ``predicted_speedup`` (prefills included, like ``speedup``), ``efficiency``
    (measured / predicted) and ``recommended_k`` (chains only). ``cost_model``: the step shape,
    ``predicted_step_speedup`` (decode loop only), ``alpha``, expected tau and predicted speedup
    by k (prefills included), and the cost curves with their context length.
    """
    metrics = {"predicted_speedup": None, "efficiency": None, "recommended_k": None}
    if costs is None:
        return metrics, {"costs": None, "note": "cost measurement skipped (costs=false)"}
    model = {"drafter": shape, "costs": costs, "predicted_step_speedup": None, "alpha": None,
             "expected_tau_by_k": None, "predicted_speedup_by_k": None, "warnings": draft_cost_warnings(costs)}
    predicted = None
    if stats is not None:
        predicted, model["predicted_step_speedup"] = predicted_speedups(stats, costs, shape, num_prompts)
    metrics["predicted_speedup"] = predicted
    if predicted and measured_speedup is not None and math.isfinite(measured_speedup):
        metrics["efficiency"] = measured_speedup / predicted
    alpha = fit_alpha(stats.depth_proposed, stats.depth_accepted) if stats is not None else None
    model["alpha"] = alpha
    if alpha is not None and shape["kind"] == "chain":
        curve = chain_speedup_by_k(alpha, costs, tokens_per_prompt=stats.new_tokens / num_prompts)
        model["expected_tau_by_k"] = {k: expected_tau(alpha, k) for k in KS}
        model["predicted_speedup_by_k"] = curve
        metrics["recommended_k"] = recommend_k(curve)
    elif shape["kind"] in ("tree", "dynamic"):
        model["note"] = "recommended_k is given for chains only; compare tree shapes with sweep=tree_shape"
    return metrics, model
