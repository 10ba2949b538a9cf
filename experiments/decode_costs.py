"""The decode run's cost model (``costs``, ``verify_widths=auto``): the target's and the drafter's forward costs
measured at the run's context, the verify widths read off them, and the predicted speedup, efficiency and
recommended k added to the run's summary (:mod:`experiments.costs` holds the model itself)."""
from __future__ import annotations

import logging
import sys
from typing import Any

from omegaconf import DictConfig

from experiments.decoding import EncodedPrompt
from experiments.models_from_config import LoadedModels
from experiments.results import MethodResults
from specdec.errors import ConfigError

log = logging.getLogger(__name__)


def auto_widths(cfg: DictConfig) -> bool:
    """``verify_widths=auto``: pad verifies to the cheap widths of the target's measured cost curve (needs costs)."""
    if cfg.get("verify_widths") != "auto":
        return False
    if not cfg.costs:
        raise ConfigError("verify_widths=auto reads the target's measured cost curve: set costs=true, or list the "
                          "widths (e.g. verify_widths=[1,4,5,8])")
    return True


def set_cheap_widths(decoder: Any, costs: dict | None) -> None:
    """Give the speculative ``decoder`` the widths :func:`experiments.costs.cheap_widths` reads off
    ``costs["target"]`` (the baseline's one-token forwards stay unpadded)."""
    from experiments.costs import cheap_widths

    if costs is None:
        print("warning: verify_widths=auto without a measured cost curve: verifies are not padded", file=sys.stderr)
        return
    decoder.verifier.verify_widths = widths = cheap_widths(costs["target"])
    log.info("verify widths (cheap widths of the target's cost curve): %s", list(widths))


def padded_costs(costs: dict | None, decoder: Any) -> dict | None:
    """``costs`` with the widths the speculative ``decoder`` pads its verifies to (``verify_widths``: the cost model
    prices a verify at its padded width, :func:`experiments.costs.verify_cost`); unchanged where it pads nothing."""
    widths = list(decoder.verifier.verify_widths)
    return {**costs, "verify_widths": widths} if costs is not None and widths else costs


def measure_run_costs(cfg: DictConfig, step_shape: Any, models: LoadedModels, encoded: list[EncodedPrompt]) -> dict | None:
    """The target's and the drafter's forward costs at the run's context (a draft model's curves are
    measured once per model and device, then cached: :mod:`experiments.cost_measure`); None with
    ``costs=false`` or on failure."""
    if not cfg.costs:
        return None
    from experiments import cost_measure as costs

    lengths = [p.input_ids.shape[1] for p in encoded]
    try:
        context = costs.run_context(lengths, cfg.max_new_tokens)
        prefill = round(sum(lengths) / len(lengths)) - 1  # the decoder prefills all but the last prompt token
        return costs.measure_run_costs(models.target, step_shape, context, prefill, cfg.attn_backend, None,
                                       ": costs=false skips them")
    except Exception as exc:  # noqa: BLE001  (a prediction is a bonus: never lose the run over it)
        print(f"warning: forward-cost measurement failed ({type(exc).__name__}: {exc}); no predicted speedup",
              file=sys.stderr)
        return None


def add_cost_model(summary: dict, spec: MethodResults, costs: dict | None, shape: dict, note: str | None = None) -> dict:
    """Add ``predicted_speedup``, ``efficiency`` and ``recommended_k`` to the metrics and the
    ``cost_model`` section (alpha, predictions by k, cost curves) to ``summary``."""
    from experiments.costs import cost_model
    from specdec.stats import DecodeStats

    stats = DecodeStats.merge(spec.stats) if spec.stats else None
    metrics, model = cost_model(stats, costs, shape, summary["metrics"].get("speedup"), len(spec.stats), note)
    summary["metrics"].update(metrics)
    summary["cost_model"] = model
    summary["warnings"] = list(summary.get("warnings") or []) + list(model.get("warnings") or [])
    return summary
