"""Structured config (schema) of the decode entry point.

The dataclasses here are registered in Hydra's ConfigStore as ``base_config`` and sit first
in ``conf/config.yaml``'s defaults list, so every top-level knob has a type that Hydra
checks when the config is composed: ``max_new_tokens=abc`` or ``sampling.temperature=hot``
fails before any model is loaded. The config groups (``model``, ``drafter``, ...) are
typed ``Any`` here; their options live as YAML files under ``conf/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SamplingConfig:
    """Sampling parameters shared by the drafter and the acceptance rule (temperature 0 = greedy)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


@dataclass
class DecodeConfig:
    """Top-level config of ``python -m experiments.decode``.

    Attributes:
        model: which target/draft pair to load (group ``model``).
        drafter: ``_target_`` node of the drafter (group ``drafter``).
        acceptance: ``_target_`` node of the acceptance rule (group ``acceptance``).
        dataset: ``_target_`` node of the prompt set (group ``dataset``, :mod:`experiments.datasets`).
        logger: ``_target_`` node of the results logger (group ``logger``).
        tree / verifier: reserved for the ``tree`` and ``verifier`` groups.
        sampling: temperature / top-k / top-p / min-p, set once and given to the decoder.
        max_new_tokens: tokens generated per prompt.
        seed: seed of every ``generate`` call (same for drafter and baseline).
        num_prompts: how many prompts of the dataset to decode.
        attn_backend: the verifier's attention backend (``sdpa`` or ``triton``).
        baseline: also run the autoregressive baseline (needed for speedup and matches_baseline).
        warmup: untimed warm-up generations per method before the timed prompts.
        num_threads: ``torch.set_num_threads`` for CPU runs; None keeps torch's default.
        batch_size: prompts decoded together (``generate_batch``, ragged acceptance); every prompt still
            gets its own record and seed, the summary's tokens/s is the aggregate throughput.
        batch_mode: ``static`` (consecutive groups of ``batch_size``, each waiting for its slowest row) or
            ``continuous`` (at most ``batch_size`` rows at once; a finished row's place goes to the next
            prompt, records are written as rows finish); the same tokens either way.
        compile: ``none``, or the fixed-shape step (``static`` eager, ``graph`` CUDA graph, ``inductor``
            torch.compile) for no drafter and draft-model chains and tree presets; the same tokens either way.
        verify_widths: batch-1 eager loop: pad each verify block to the smallest of these widths that holds
            it (null: none), or ``auto``: ``experiments.costs.cheap_widths`` of the run's measured cost curve.
        costs: measure the forward-cost curves (cached) for ``predicted_speedup``, ``efficiency``
            and ``recommended_k`` (:mod:`experiments.costs`); false skips it (fast tests).
        resume: skip a run whose directory holds complete results of the same config, continue an
            interrupted one; false sets earlier results aside (:mod:`experiments.resume`).
    """

    model: Any = MISSING
    drafter: Any = MISSING
    acceptance: Any = MISSING
    dataset: Any = MISSING
    logger: Any = MISSING
    tree: Any = None
    verifier: Any = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 64
    seed: int = 0
    num_prompts: int = 10
    attn_backend: str = "sdpa"
    baseline: bool = True
    warmup: int = 1
    num_threads: int | None = None
    batch_size: int = 1
    batch_mode: str = "static"
    compile: str = "none"
    verify_widths: Any = None
    costs: bool = True
    resume: bool = True


def register_configs() -> None:
    """Register the schema as ``base_config`` (idempotent; call before composing)."""
    ConfigStore.instance().store(name="base_config", node=DecodeConfig)


register_configs()
