"""Mutation pass 15, continued (:mod:`tests.test_mutation15_lookup`): draft vocabularies (``drafters.draft_vocab``)
and the heads bound to them. Each test names the planted bug it catches.
"""
from __future__ import annotations

import pytest
import torch

from drafters.draft_vocab import DraftVocabHead, check_ids, frequent_tokens
from tests.tiny_models import peaky_pair

# --------------------------------------------------------------------------- draft vocabularies


def test_an_empty_source_is_skipped_not_divided_by_zero():
    """Planted bug: only None was skipped (``if ids is not None``): an empty source (a split with no rows) divided
    zero counts by zero, NaN everywhere, and the ranking came out arbitrary."""
    rows = torch.tensor([[5] * 9 + [6] * 3 + [2]])
    empty = torch.empty(0, 8, dtype=torch.long)
    assert frequent_tokens([empty, rows], 2, 10).tolist() == frequent_tokens([rows], 2, 10).tolist() == [5, 6]


def test_ids_and_always_ids_outside_the_vocabulary_do_not_break_the_ranking():
    """Planted bugs: ``always`` ids not filtered to ``[0, vocab)`` (an EOS of -1, "none", marked the last id as
    always in; one past the vocabulary raised IndexError), and source ids not clamped (a padded row's id past the
    vocabulary made ``bincount`` longer than the counts it is added to)."""
    rows = torch.tensor([[5] * 9 + [6] * 3 + [2]])
    assert frequent_tokens([rows], 2, 10, always=[-1, 10]).tolist() == [5, 6]
    ids = frequent_tokens([torch.tensor([[3, 3, 12]])], 2, 10)
    assert 3 in ids.tolist() and ids.numel() == 2 and check_ids(ids, 10) is None
    # padding outside the vocabulary is not counted (it was clamped onto ids 0 and vocab - 1, ranking them first)
    padded = torch.tensor([[4, 4, 7, -100, -100, -100, 12, 12, 12]])
    assert frequent_tokens([padded], 2, 10).tolist() == [4, 7]
    assert frequent_tokens([torch.tensor([[-100, 12]]), torch.tensor([[2]])], 1, 10).tolist() == [2]


def test_empty_negative_or_wrongly_sized_draft_vocabularies_are_refused_with_their_reason():
    """Planted bugs: ``check_ids`` without its emptiness check (``ids.min()`` of no ids raised a bare RuntimeError),
    with ``min < -1`` (id -1, the last row read from the end, passed), and ``set_vocab`` taking ids of another size
    than the head's rows (the copy failed, or broadcast one id over all of them)."""
    assert "non-empty 1-D" in check_ids(torch.empty(0, dtype=torch.long), 6)
    assert "must lie in [0, 6)" in check_ids(torch.tensor([-1, 2]), 6)
    head = DraftVocabHead(10, 3, 4)
    for wrong in ([1, 2], [4]):
        with pytest.raises(ValueError, match="3-token draft vocabulary"):
            head.set_vocab(torch.tensor(wrong))


def test_a_view_over_a_draft_vocabulary_reports_the_size_it_emits():
    """Planted bug: the view's config kept the model's ``vocab_size`` when it emits another (a padded view's, the
    target's): HF's assisted generation, which compares the two, refused the pair."""
    from drafters.draft_vocab import with_draft_vocab

    model = peaky_pair()[0]  # 6 tokens
    view = with_draft_vocab(model, torch.tensor([0, 2]), vocab=8)
    assert view(torch.tensor([[1, 2]])).logits.shape[-1] == 8
    assert (view.config.vocab_size, view.config.draft_vocab_size, model.config.vocab_size) == (8, 2, 6)


def test_the_saved_draft_vocabulary_is_the_lm_heads_ids_not_any_ids_buffer(tmp_path):
    """Planted bug: ``vocab_of`` took any tensor whose key ends in ``ids`` (a head's ``position_ids`` buffer sorts
    before ``lm_head.ids``): a draft model given "the heads' draft vocabulary" got positions instead."""
    from safetensors.torch import save_file

    from drafters.draft_vocab import vocab_of

    save_file({"layers.0.position_ids": torch.arange(4), "lm_head.ids": torch.tensor([1, 3, 5])},
              str(tmp_path / "heads.safetensors"))
    assert vocab_of(tmp_path).tolist() == [1, 3, 5]


def test_a_trainable_head_over_a_draft_vocabulary_starts_from_the_lm_heads_rows():
    """Planted bug: ``DraftVocabHead.over(..., trainable=True)`` dropped the full weight (``set_vocab(ids, None)``):
    heads trained over a draft vocabulary started from zeros instead of the target's LM-head rows (and, with
    ``head.to(device=...)`` only, in float32 next to a bf16 model)."""
    torch.manual_seed(0)
    full = torch.randn(10, 4).to(torch.bfloat16)  # [V, H], as a bf16 model holds it
    ids = torch.tensor([1, 4, 8])
    head = DraftVocabHead.over(ids, 10, 4, full)
    assert head.weight.dtype == torch.bfloat16 and torch.equal(head.weight.detach(), full[ids])


def test_a_head_bound_to_a_bf16_lm_head_scores_float32_hidden_states_in_float32():
    """Planted bug: ``F.linear(hidden.to(weight.dtype), weight)``: a float32 draft reading a bf16 target's LM-head
    rows had its hidden states rounded to bf16 and its logits returned in bf16 (near-ties drafted otherwise)."""
    torch.manual_seed(0)
    full, h = torch.randn(10, 4).to(torch.bfloat16), torch.randn(3, 4)  # [V, H] bf16, [3, H] float32
    ids = torch.tensor([1, 4, 8])
    out = DraftVocabHead.over(ids, 10, 4, full, trainable=False)(h)  # [3, 10]
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, ids], h @ full[ids].float().T, atol=1e-6)
