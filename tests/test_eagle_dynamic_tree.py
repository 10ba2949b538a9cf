"""EAGLE-2's dynamic tree at its edges: the head's cache holds every node a step feeds, not only the nodes the
tree keeps (the drafter in general: ``tests/test_eagle.py``)."""
from __future__ import annotations

import torch

from drafters import EagleDrafter
from specdec import SpeculativeDecoder
from tests.test_eagle import trained_head
from tests.tiny_models import pair, prompts


def test_a_dynamic_tree_that_feeds_more_nodes_than_it_keeps_fits_the_heads_cache():
    """budget=2 with a beam of 2 over 8 levels feeds up to 14 nodes per step but keeps 2: the head's cache must
    hold the fed ones (one sized for the kept nodes only overflows near the end)."""
    target, _, tok = pair("llama")
    drafter = EagleDrafter(trained_head("llama", "eagle2"), budget=2, top_k_children=4, num_speculative_tokens=8)
    for ids in prompts(tok, 2, seed=3):
        ref = target.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)
        assert torch.equal(SpeculativeDecoder(target, drafter).generate(ids, 16).sequences, ref)
