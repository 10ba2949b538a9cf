"""Decoding through the Triton tree-attention kernel (interpreter on CPU) gives the sdpa backend's tokens."""
from __future__ import annotations

import pytest

from drafters import DraftModelDrafter
from specdec import SamplingParams, SpeculativeDecoder
from tests.tiny_models import noisy_copy, pair, prompts


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_triton_backend_matches_sdpa(arch):
    target, _, tok = pair(arch)
    for ids in prompts(tok, 3, seed=2):
        outs = {}
        for backend in ("sdpa", "triton"):
            drafter = DraftModelDrafter(noisy_copy(arch), num_speculative_tokens=3)
            dec = SpeculativeDecoder(target, drafter, sampling=SamplingParams(), attn_backend=backend)
            outs[backend] = dec.generate(ids, max_new_tokens=12, seed=0)
        assert outs["triton"].sequences.tolist() == outs["sdpa"].sequences.tolist()
        assert outs["triton"].stats.accepted_per_step == outs["sdpa"].stats.accepted_per_step
