"""Edges of padding a draft to the target's vocabulary size (drafters.vocab_padding) and of draft-vocabulary views
(drafters.draft_vocab) that the main tests do not reach: tokenizers of one length but other tokens, a tokenizer that
exactly fills the smaller head, the note's bound, the remote-code switch, and views that must be refused.

The models are the tiny Llama target with 320 LM-head rows and its copies cut to fewer rows, over the byte
tokenizer's 257 tokens (as in tests/test_vocab_padding.py).
"""
from __future__ import annotations

import pytest
import torch

from drafters import DraftModelDrafter
from drafters.draft_vocab import with_draft_vocab
from drafters.vocab_padding import match_target_vocab, matched_draft, padded_to
from specdec import SpecDecError
from specdec.models import byte_tokenizer, tiny_random_pair, vocab_size
from tests.test_vocab_padding import DRAFT_ROWS, TARGET_ROWS, _cut

TOKENS = 257  # the byte tokenizer: 256 bytes + <|endoftext|>


@pytest.fixture(scope="module")
def target():
    """The tiny Llama target with 320 LM-head rows."""
    return tiny_random_pair("llama", vocab=TARGET_ROWS)[0]


@pytest.fixture(scope="module")
def draft(target):
    """The target cut to 272 rows."""
    return _cut(target, DRAFT_ROWS)


def test_a_tokenizer_of_the_same_length_with_other_tokens_is_not_the_targets(target, draft):
    """Two tokenizers of 258 tokens whose last token differs are not one tokenizer: the draft is refused, not padded
    (its ids would mean other text)."""
    tok, other = byte_tokenizer(), byte_tokenizer()
    tok.add_tokens(["<a>"])
    other.add_tokens(["<b>"])
    assert len(tok) == len(other)
    with pytest.raises(SpecDecError, match="its tokenizer is not the target's"):
        match_target_vocab(target, draft, tok, other)


def test_a_tokenizer_that_exactly_fills_the_smaller_head_is_padded(target):
    """A draft head of exactly the tokenizer's 257 rows holds every token: it is padded (the note says it proposes
    ids below 257), not refused."""
    exact = _cut(target, TOKENS)
    view, note = match_target_vocab(target, exact, byte_tokenizer(), byte_tokenizer())
    assert vocab_size(view) == TARGET_ROWS and "the draft proposes ids below 257" in note
    x = torch.tensor([[3, 4, 256]])  # [1, 3]
    assert torch.isneginf(view(x).logits[..., TOKENS:]).all()


def test_the_note_names_the_smaller_heads_rows(target, draft):
    """The note bounds the proposals by the smaller head: the draft's rows when it has fewer, the target's when it has
    more (its rows past the target's size are never proposed)."""
    _, note = match_target_vocab(target, draft, byte_tokenizer(), byte_tokenizer())
    assert "has 272 rows and the target's 320" in note and "proposes ids below 272" in note
    wider, note = match_target_vocab(target, _cut(target, 400), byte_tokenizer(), byte_tokenizer())
    assert vocab_size(wider) == TARGET_ROWS and "proposes ids below 320" in note


def test_matched_draft_reads_the_drafts_tokenizer_only_when_the_sizes_differ_and_passes_trust_remote_code(
        target, draft, monkeypatch):
    """``matched_draft`` loads the tokenizer saved beside the draft with the run's ``trust_remote_code`` (a tokenizer
    with its own code loads only when allowed), and reads nothing when the sizes already match."""
    from drafters import vocab_padding

    calls = []

    def fake_tokenizer(directory, trust_remote_code=False):
        calls.append((directory, trust_remote_code))
        return byte_tokenizer()

    monkeypatch.setattr(vocab_padding, "tokenizer_or_none", fake_tokenizer)
    view, note = matched_draft(target, draft, byte_tokenizer(), "draft_dir", trust_remote_code=True)
    assert calls == [("draft_dir", True)] and vocab_size(view) == TARGET_ROWS and note
    same, note = matched_draft(target, target, byte_tokenizer(), "other_dir", trust_remote_code=True)
    assert same is target and note is None and len(calls) == 1


def test_a_draft_vocabulary_id_at_the_heads_row_count_is_refused_naming_the_rows(draft):
    """A padded view emits 320 logits from 272 rows: id 272 (the first past its rows) is refused as a ValueError
    naming the rows, as any larger id is, never an index error inside the head."""
    view = padded_to(draft, TARGET_ROWS)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 272\) \(the LM head's rows\), got up to 272"):
        with_draft_vocab(view, torch.tensor([3, DRAFT_ROWS]))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 272\)"):
        DraftModelDrafter(view, draft_vocab=torch.tensor([0, DRAFT_ROWS]))


def test_a_view_over_a_draft_vocabulary_is_not_reduced_or_padded_again(draft):
    """A view whose head already scores a subset of ids (every other token) cannot be given another draft vocabulary
    or padded: its head's rows are not the model's rows, so ids over them would name other tokens."""
    reduced = with_draft_vocab(draft, torch.arange(0, DRAFT_ROWS, 2))  # [136] ids
    with pytest.raises(ValueError, match="already scores a draft vocabulary"):
        with_draft_vocab(reduced, torch.arange(10))
    with pytest.raises(ValueError, match="already scores a draft vocabulary"):
        padded_to(reduced, TARGET_ROWS)


def test_a_padded_view_reads_the_drafts_lm_head_in_place(target):
    """Padding copies no LM-head rows (a Qwen2.5-0.5B head is 136M parameters): the view reads the draft's own weight,
    so a change made to the draft's head in place is what the view scores."""
    draft = _cut(target, DRAFT_ROWS)
    view = padded_to(draft, TARGET_ROWS)
    x = torch.tensor([[3, 4, 5]])  # [1, 3]
    with torch.no_grad():
        draft.get_output_embeddings().weight[7].mul_(-3.0)  # token 7's row, changed in place
    assert torch.allclose(view(x).logits[..., :DRAFT_ROWS], draft(x).logits, atol=1e-5)
