"""Hugging Face's decoding methods as the benchmarks call them: ``run(ids) -> (output ids, None)``.

Plain greedy ``generate`` (with any of its options, e.g. prompt lookup), its static-cache compiled
path, and assisted generation with a draft model at a fixed draft length and confidence threshold.
"""
from __future__ import annotations

import torch


def hf(target, max_new, **kwargs):
    """HF greedy ``generate`` with ``kwargs``: ``run(ids [1, T]) -> (ids [1, T + new], None)``."""
    def run(ids):
        with torch.inference_mode():
            out = target.generate(ids, do_sample=False, max_new_tokens=max_new, **kwargs)
        return out, None
    return run


def hf_static_compiled(target, max_new):
    """HF plain greedy ``generate`` with its own fixed-shape path: ``cache_implementation="static"``, whose
    decoding forward transformers compiles (``torch.compile``, mode ``reduce-overhead``: CUDA graphs on a
    GPU). transformers compiles only on accelerators unless told to on every device, as here on a CPU."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = target.device.type == "cpu"
    return hf(target, max_new, cache_implementation="static", compile_config=config)


def hf_assisted(target, draft, max_new, k, confidence: float = 0.0):
    """Assisted generation; transformers 5.x reads its schedule from the draft's generation_config. ``k``:
    a constant draft length (None: HF's default schedule); ``confidence``: its ``assistant_confidence_threshold``
    (stop a draft after a token the draft gives less than this)."""
    def run(ids):
        cfg = draft.generation_config
        cfg.num_assistant_tokens = k or None  # None: HF's own default schedule
        cfg.num_assistant_tokens_schedule = "constant" if k else None
        cfg.assistant_confidence_threshold = confidence if k else None
        return hf(target, max_new, assistant_model=draft)(ids)
    return run
