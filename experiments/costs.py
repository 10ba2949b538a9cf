"""The speedups measured forward costs predict (the costs: :mod:`experiments.cost_measure`).

Cost model (REFERENCES.md, "Expected gain"). One speculative step runs ``F_d`` draft-model
forwards and one target forward over the root plus the ``N`` draft nodes, so against our own
autoregressive loop (one width-1 target forward per token)::

    predicted speedup = tau * T_t(1) / (F_d * T_d(1) + T_t(N + 1))

- draft-model chain of k: ``F_d = k``, ``N = k`` (``tau * T_t(1) / (k T_d(1) + T_t(k + 1))``);
- n-gram lookup: ``F_d = 0`` (a dictionary lookup), ``N`` = the tokens it proposed;
- token trees: ``F_d`` = the tree's depth (one draft forward per level), ``N`` = its nodes.

``T_t(w)`` and ``T_d(1)`` are read as measured (:func:`cost_at`; a wider forward may cost less on a CPU);
widths between the measured ones are interpolated linearly, wider ones extrapolated from the last two. A run
that padded its verifies (``verify_widths``, kept in the costs) is priced at the padded widths (:func:`verify_cost`).
A run predicts with its measured per-step proposals (mean over steps of ``F_d T_d(1) + T_t(n_i + 1)``),
so steps cut short near ``max_new_tokens`` and n-gram steps with no match are costed as they ran.
``predicted_speedup`` also counts what the measured ``speedup`` counts, the prefills: the baseline takes
``P_t + N T_t(1)`` for N tokens, speculation ``P_t + P_d + S * step`` for its S steps;
``predicted_step_speedup`` leaves them out.

Recommendation: ``alpha`` is fitted to the measured acceptance by depth (:func:`fit_alpha`),
``tau(k) = (1 - alpha^(k+1)) / (1 - alpha)``, and ``recommended_k`` is the k in 1..8 with the
largest predicted speedup for that alpha and the measured costs. Importable without hydra or wandb.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

#: Chain lengths the recommendation considers.
KS = tuple(range(1, 9))


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


def verify_cost(costs: dict, width: int) -> float:
    """Seconds of a verify forward of ``width`` tokens, at the width the run padded it to (``costs["verify_widths"]``:
    the speculative decoder's ``verify_widths``, absent or empty where it padded nothing)."""
    widths = costs.get("verify_widths")
    if widths:
        from verifier.verifier import padded_width

        width = padded_width(sorted(widths), width)
    return cost_at(costs["target"], width)


def step_seconds(costs: dict, draft_forwards: float, verify_width: int) -> float:
    """Predicted seconds of one step: ``draft_forwards * T_d(1) + T_t(verify_width)`` (padded: :func:`verify_cost`)."""
    return draft_forwards * _draft_cost(costs) + verify_cost(costs, verify_width)


def draft_forwards_per_step(stats, shape: dict) -> float:
    """Mean draft forwards per step as the run proposed them: one per tree level (``per_level``:
    the depths of the steps' trees), one per step that proposed anything (``per_step``), or none; with a
    ``draft_source`` (a hybrid: one source, or a list), only those sources' steps count (the other part's
    lookups cost no forward); ``k`` every step (``fixed``)."""
    steps, source = stats.target_forwards, shape.get("draft_source")
    sources = [source] if isinstance(source, str) else list(source or [])
    if shape["draft_forwards"] == "per_level":
        return (sum(stats.depth_by_source.get(s, 0) for s in sources) if sources else sum(stats.depth_proposed)) / steps
    if shape["draft_forwards"] == "fixed":  # every step its part ran (a hybrid's: only that part's steps)
        return shape["k"] * (sum(stats.steps_by_source.get(s, 0) for s in sources) / steps if sources else 1.0)
    if shape["draft_forwards"] == "per_step":
        return (sum(stats.steps_by_source.get(s, 0) for s in sources) if sources else
                stats.depth_proposed[0] if stats.depth_proposed else 0) / steps
    return 0.0


def predicted_step_seconds(stats, costs: dict, shape: dict) -> float:
    """Mean predicted seconds of the run's steps: ``F_d T_d(1) + T_t(n_i + 1)`` with its own proposals."""
    verify = statistics.fmean(verify_cost(costs, n + 1) for n in stats.proposed_per_step)
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
    if shape["kind"] == "none" and not costs.get("verify_widths"):  # padded, its one-token verifies cost more
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


def curve_warnings(costs: dict) -> list[str]:
    """One line per cost curve that stayed implausible when measured again (``costs["implausible"]``, from
    :func:`experiments.cost_measure.implausible`): the predictions built on it mean little."""
    return [f"the {role.replace('_', ' ')} forward-cost curve is implausible even measured twice ({why}): the "
            "machine was busy while it was timed; predicted_speedup and efficiency are unreliable (the curve is not "
            "cached: rerun on a quiet machine)" for role, why in sorted((costs.get("implausible") or {}).items())]


def cost_model_scope(batch_size: int, compile: str) -> str | None:
    """Why the cost model does not price a run (None: it does). It predicts from batch-1 eager forward
    costs, so a batched or compiled run's speedup is not set against it (``experiments.bench --compile``
    prices captured forwards)."""
    if batch_size > 1:
        return f"batch_size={batch_size}: the cost model prices batch-1 forwards; no predicted speedup"
    if compile != "none":
        return f"compile={compile}: the cost model prices eager forwards; no predicted speedup"
    return None


def cost_model(stats, costs: dict | None, shape: dict, measured_speedup: float | None,
               num_prompts: int = 1, note: str | None = None) -> tuple[dict, dict]:
    """``(metrics, cost_model)`` for the summary.

    ``metrics``: ``predicted_speedup`` (prefills included, like ``speedup``), ``efficiency``
    (measured / predicted) and ``recommended_k`` (chains of one part only). ``cost_model``: the step shape,
    ``predicted_step_speedup`` (decode loop only), ``alpha``, expected tau and predicted speedup
    by k (prefills included), and the cost curves with their context length. ``note``: why no costs were
    measured, when it was not ``costs=false``.
    """
    metrics = {"predicted_speedup": None, "efficiency": None, "recommended_k": None}
    if costs is None:
        return metrics, {"costs": None, "note": note or "cost measurement skipped (costs=false)"}
    model = {"drafter": shape, "costs": costs, "predicted_step_speedup": None, "alpha": None,
             "expected_tau_by_k": None, "predicted_speedup_by_k": None,
             "warnings": draft_cost_warnings(costs) + curve_warnings(costs)}
    predicted = None
    if stats is not None:
        predicted, model["predicted_step_speedup"] = predicted_speedups(stats, costs, shape, num_prompts)
    metrics["predicted_speedup"] = predicted
    if predicted and measured_speedup is not None and math.isfinite(measured_speedup):
        metrics["efficiency"] = measured_speedup / predicted
    alpha = fit_alpha(stats.depth_proposed, stats.depth_accepted) if stats is not None else None
    model["alpha"] = alpha
    if shape.get("draft_forwards") == "fixed":  # its forwards are not one per draft: the k curve would misprice it
        model["note"] = ("recommended_k prices k draft forwards per k-chain; this drafter runs a fixed number "
                         f"({shape['k']}) whatever it proposes, so none is given: read the measured speedups of a sweep over "
                         "drafter.num_speculative_tokens (experiments.report) instead")
    elif shape.get("draft_source") is not None:  # alpha would pool the lookup's steps with the model's
        model["note"] = ("recommended_k is given for chains of one part only: a drafter of several parts pools "
                         "every part's steps (lookups included) in its alpha; sweep its parts' settings instead")
    elif alpha is not None and shape["kind"] == "chain":
        curve = chain_speedup_by_k(alpha, costs, tokens_per_prompt=stats.new_tokens / num_prompts)
        model["expected_tau_by_k"] = {k: expected_tau(alpha, k) for k in KS}
        model["predicted_speedup_by_k"] = curve
        metrics["recommended_k"] = best = recommend_k(curve)
        if curve[best] < 1:  # the least bad k is still no recommendation to speculate
            model["warnings"].append(f"no draft length pays off at alpha {alpha:.3f}: the best, k = {best}, is "
                                     f"predicted at {curve[best]:.2f}x of autoregressive decoding "
                                     "(recommended_k is the least slow; a better drafter or none is faster)")
    elif shape["kind"] in ("tree", "dynamic"):
        model["note"] = "recommended_k is given for chains only; compare tree shapes with sweep=tree_shape"
    return metrics, model
