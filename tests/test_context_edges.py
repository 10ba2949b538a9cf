"""Edges of context limits and of switching a model's attention (specdec.models.context_length, the hybrid's
context, verifier.verifier.attention_backend) that the main tests do not reach: a multimodal model's context lives
in its text config, a hybrid's first part may declare a context of its own, and a view made after its model ran
switches its own config.
"""
from __future__ import annotations

import copy

import pytest
import torch

from drafters import DraftModelDrafter, HybridDrafter, NGramDrafter
from drafters.draft_vocab import with_draft_vocab
from specdec import SpecDecError, SpeculativeDecoder
from specdec.cache import SpecDecCache
from specdec.models import context_length
from tests.tiny_models import pair
from verifier import tree_forward


def test_a_multimodal_models_context_is_its_language_models():
    """A Llava-style config keeps ``max_position_embeddings`` in its text config only: that is the model's context."""
    from transformers import LlamaConfig, LlavaConfig

    model = torch.nn.Module()
    model.config = LlavaConfig(text_config=LlamaConfig(max_position_embeddings=64).to_dict())
    assert not hasattr(model.config, "max_position_embeddings") and context_length(model) == 64


class WindowedLookup(NGramDrafter):
    """A lookup drafter (no model of its own) that declares a context of 16 positions."""

    def context_length(self) -> int | None:
        return 16


def test_a_hybrid_is_bound_by_the_shorter_of_its_parts_contexts():
    """Either part may declare a context: the hybrid's is the shorter one, and a run past it is refused up front."""
    target, draft, _ = pair("llama")
    short = copy.copy(draft)
    short.config = copy.deepcopy(draft.config)
    short.config.max_position_embeddings = 32  # the draft model's own context: 32
    hybrid = HybridDrafter(WindowedLookup(num_speculative_tokens=2), DraftModelDrafter(short, num_speculative_tokens=2))
    assert hybrid.context_length() == 16
    with pytest.raises(SpecDecError, match="exceeds the draft model's context of 16"):
        SpeculativeDecoder(target, hybrid).generate(torch.randint(2, 250, (1, 10)), max_new_tokens=8)
    swapped = HybridDrafter(NGramDrafter(num_speculative_tokens=2), DraftModelDrafter(short, num_speculative_tokens=2))
    assert swapped.context_length() == 32


def _tree_logits(model, prefix: torch.Tensor, tree: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor):
    """``model``'s logits ``[n, V]`` for the tree tokens ``tree [1, n]`` (visibility ``mask [n, n]``, depths
    ``depth [n]``) after a causal prefill of ``prefix [1, T]``."""
    cache = SpecDecCache.for_model(model, 32)
    tree_forward(model, cache, prefix)
    return tree_forward(model, cache, tree, mask, depth)[0]


def test_a_view_made_after_its_model_ran_verifies_a_tree_as_the_model_does():
    """A draft-vocabulary view is a shallow copy with its own config; built after its model already ran a forward,
    it must still switch that config (not only the model's) to the tree attention: its tree logits equal the model's
    (all ids kept, so the view scores what the model scores), and the configs are restored after each forward."""
    model = copy.deepcopy(pair("llama")[1])
    prefix, tree = torch.tensor([[5, 9, 13, 2]]), torch.tensor([[7, 1, 2, 4]])  # [1, 4] each
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]).bool()  # [4, 4]: two branches
    depth = torch.tensor([0, 1, 1, 2])
    before = model.config._attn_implementation
    expected = _tree_logits(model, prefix, tree, mask, depth)  # the model ran: what it switches is known on it
    view = with_draft_vocab(model, torch.arange(int(model.config.vocab_size)))
    got = _tree_logits(view, prefix, tree, mask, depth)
    assert torch.allclose(got, expected, atol=1e-5)
    assert view.config._attn_implementation == before and model.config._attn_implementation == before
