"""Measured forward costs and the speedup they predict for a draft-model chain.

predicted speedup over our autoregressive loop = tau * T_target(1) / (k * T_draft(1) + T_target(k + 1)),
with every forward timed at the same context length (REFERENCES.md, "Expected gain").
Importable without hydra or wandb.
"""
from __future__ import annotations

import statistics
import time

import torch

from specdec.cache import SpecDecCache
from verifier import tree_forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_cost(model, context: int, width: int, reps: int = 15, backend: str = "sdpa") -> float:
    """Median seconds of one forward of ``width`` new tokens (causal) after ``context`` cached tokens."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    cache = SpecDecCache.for_model(model, context + width)
    prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)  # [1, L]
    tree_forward(model, cache, prefix, torch.ones(context, context, dtype=torch.bool, device=device).tril(),
                 torch.arange(context, device=device), backend, logits_to_keep=1)
    ids = torch.randint(0, vocab, (1, width), generator=gen).to(device)  # [1, w]
    mask = torch.ones(width, width, dtype=torch.bool, device=device).tril()  # [w, w]
    depth = torch.arange(width, device=device)  # [w]
    times = []
    for i in range(reps + 2):
        cache.truncate(context)
        _sync(device)
        t0 = time.perf_counter()
        tree_forward(model, cache, ids, mask, depth, backend)
        _sync(device)
        if i >= 2:  # two warm-ups
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def predicted_chain_speedup(tau: float, k: int, t_target: dict[int, float], t_draft: float) -> float:
    """Speedup of a k-chain over autoregressive decoding predicted from tau and measured costs."""
    return tau * t_target[1] / (k * t_draft + t_target[k + 1])


def measure_costs(target, draft, context: int, ks: list[int], backend: str = "sdpa") -> dict:
    """``{"target": {width: s}, "draft": s, "context": L}`` for widths 1 and k + 1 of every k."""
    widths = sorted({1} | {k + 1 for k in ks})
    return {
        "context": context,
        "target": {w: forward_cost(target, context, w, backend=backend) for w in widths},
        "draft": forward_cost(draft, context, 1, backend=backend) if draft is not None else None,
    }
