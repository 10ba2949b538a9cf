"""Measured forward costs and the speedup they predict for a draft-model chain.

predicted speedup over our autoregressive loop = tau * T_target(1) / (k * T_draft(1) + T_target(k + 1)),
with every forward timed at the same context length (REFERENCES.md, "Expected gain").
The implementation lives in :mod:`experiments.costs` (shared with the decode runs' cost model);
this module keeps the names ``experiments.bench`` imports. Importable without hydra or wandb.
"""
from __future__ import annotations

from experiments.costs import cost_at, forward_cost, measure_costs, predicted_chain_speedup

__all__ = ["cost_at", "forward_cost", "measure_costs", "predicted_chain_speedup"]
