"""A draft model whose LM head is padded differently from the target's, over one shared tokenizer.

Model families pad their embedding tables to a multiple that suits their training setup, so two models of
one tokenizer can emit distributions of different sizes: Qwen2.5-0.5B's 151936 rows beside Qwen2.5-72B's
152064, one tokenizer of 151665 tokens (vLLM issues 5203, 7252, 10913; llama.cpp refuses such pairs).
The rows past the tokenizer are padding: no text encodes to them.

:func:`padded_to` makes such a draft usable without copying it: a view that emits the target's size, its
own logits on the ids both heads have and ``-inf`` past them, and that embeds an id past its own table (the
target can still sample a padding id, with a vanishing probability) as its last row instead of failing.
Nothing is lost: a sampled draft's ``q`` is zero where it cannot propose, which rejection sampling handles
exactly (those tokens are reached through the recovered distribution), and greedy drafts are proposals.
:func:`match_target_vocab` pads a draft only when its tokenizer is the target's and fits both heads.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from drafters.draft_vocab import head_weight, with_draft_vocab
from specdec.errors import SpecDecError
from specdec.models import tokenizer_or_none, vocab_size


class ClampedEmbedding(nn.Module):
    """An input embedding that embeds ids past its table as its last row: ``ids [...] -> [..., H]``."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids.clamp(max=self.embedding.weight.shape[0] - 1))


def padded_to(model: nn.Module, vocab: int) -> nn.Module:
    """A view of the causal LM ``model`` emitting ``vocab`` logits: its own on the ids below both its LM head's
    rows and ``vocab``, ``-inf`` past them; ids past its input embedding's rows are embedded as its last row.
    Every module but the head (and, for a smaller table, the embedding's wrapper) is ``model``'s own."""
    head_rows = int(head_weight(model.get_output_embeddings()).shape[0])
    view = with_draft_vocab(model, torch.arange(min(head_rows, vocab)), vocab)
    if int(model.get_input_embeddings().weight.shape[0]) < vocab:
        _clamp_inputs(view, model)
    return view


def _clamp_inputs(view: nn.Module, model: nn.Module) -> None:
    """Put a :class:`ClampedEmbedding` where ``view`` holds ``model``'s input embedding: every module on the way
    to it is shallow-copied with its own module table (a multimodal model's language model too), so ``model``
    keeps its own."""
    embedding = model.get_input_embeddings()
    path = next((name for name, module in model.named_modules() if module is embedding), "")
    if not path:
        raise ValueError(f"{type(model).__name__}: its input embedding is not one of its modules")
    *owners, last = path.split(".")
    parent = view  # its module table is already its own (with_draft_vocab)
    for name in owners:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = parent = child
    parent._modules[last] = ClampedEmbedding(embedding)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map the same strings to the same ids (special tokens included)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def match_target_vocab(target: nn.Module, draft: nn.Module, tokenizer, draft_tokenizer) -> tuple[nn.Module, str | None]:
    """``(draft, None)`` when its distributions have the target's size; ``(padded view, note)`` when only the LM
    heads' padding differs: ``draft_tokenizer`` is the target's ``tokenizer`` and fits both heads. Otherwise
    :class:`~specdec.errors.SpecDecError` naming why not (no tokenizer to compare, another one, one that does not fit)."""
    vt, vd = vocab_size(target), vocab_size(draft)
    if vt == vd:
        return draft, None
    problem = _not_padded(tokenizer, draft_tokenizer, vt, vd)
    if problem:
        raise SpecDecError(f"draft model vocabulary ({vd} tokens) does not match the target's ({vt} tokens) and "
                           f"{problem}")
    note = (f"note: the draft's LM head has {vd} rows and the target's {vt}, over one tokenizer of {len(tokenizer)} "
            f"tokens: the rows past it are padding; the draft proposes ids below {min(vt, vd)}")
    return padded_to(draft, vt), note


def matched_draft(target: nn.Module, draft: nn.Module, tokenizer, draft_dir: str, trust_remote_code: bool = False):
    """``(draft, note)``: :func:`match_target_vocab` with the tokenizer saved in ``draft_dir`` (read only when the
    sizes differ); ``note`` (None unless padded) says what was padded."""
    if vocab_size(draft) == vocab_size(target):
        return draft, None
    return match_target_vocab(target, draft, tokenizer, tokenizer_or_none(draft_dir, trust_remote_code))


def _not_padded(tokenizer, draft_tokenizer, vt: int, vd: int) -> str | None:
    """Why a draft of ``vd`` rows beside a target of ``vt`` is not a differently padded twin (None: it is one)."""
    if draft_tokenizer is None:
        return ("the draft's directory holds no tokenizer to compare: if the two share one tokenizer and only their LM "
                "heads' padding rows differ, save the target's tokenizer beside the draft (save_pretrained) and the "
                f"run pads it (in Python: drafters.vocab_padding.padded_to(draft, {vt})); else pick a draft that "
                "shares the target's tokenizer or use drafter=ngram")
    if not same_tokenizer(tokenizer, draft_tokenizer):
        return ("its tokenizer is not the target's: pick a draft that shares the target's tokenizer, or use "
                "drafter=cross_tokenizer (a draft with its own tokenizer) or drafter=ngram")
    if len(tokenizer) > min(vt, vd):
        return (f"the tokenizer's {len(tokenizer)} tokens do not fit the smaller LM head ({min(vt, vd)} rows): the two "
                "are not padded copies of one vocabulary; pick a draft that shares the target's or use drafter=ngram")
    return None
