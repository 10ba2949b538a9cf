"""A draft vocabulary: a draft head's LM head over the target's most frequent tokens only.

A small target's LM head is a large share of any draft's cost (SmolLM2-135M: 49152 x 576, 28M of
its 135M parameters; one draft-head forward through it costs about a quarter of a target forward).
FR-Spec (arXiv 2502.14856) and EAGLE-3 (its ``d2t`` table) draft over a frequency-ranked subset of
the vocabulary instead; the target still verifies over the whole vocabulary.

:class:`DraftVocabHead` stands where a head's LM head was: it scores only ``ids`` (``[Vd]``, the
draft vocabulary) and returns logits over the whole vocabulary, ``-inf`` elsewhere. Everything
downstream is unchanged, and nothing is lost: greedy drafts are only proposals, and a sampled
draft's ``q`` is zero outside the draft vocabulary, which rejection sampling handles exactly (a
token the draft cannot propose is reached through the recovered distribution). Losses skip the
labels the head cannot express (:func:`expressible`).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from specdec.models import text_config


def frequent_tokens(sources: Iterable[torch.Tensor | None], size: int, vocab: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids over ``sources`` (each a tensor of ids, e.g. ``[R, T]`` rows;
    None is skipped), every source weighted equally (its counts normalised), plus ``always`` (EOS),
    ascending ``[Vd]``. Ties go to the lower id. Ids outside ``[0, vocab)`` (padding such as -100) are not
    counted."""
    freq = torch.zeros(vocab, dtype=torch.float64)
    for ids in sources:
        flat = ids.reshape(-1).long() if ids is not None else torch.empty(0, dtype=torch.long)  # [n]
        flat = flat[(flat >= 0) & (flat < vocab)]
        if flat.numel():
            counts = torch.bincount(flat, minlength=vocab).double()  # [vocab]
            freq += counts / counts.sum()
    keep = [int(t) for t in always if 0 <= int(t) < vocab]
    freq[keep] = float("inf")
    order = torch.argsort(-freq, stable=True)[: min(size, vocab)]  # most frequent first, ties by id
    return order.sort().values


def check_ids(ids: torch.Tensor, vocab: int) -> str | None:
    """Why ``ids`` is not a draft vocabulary of a ``vocab``-token model (None if it is one)."""
    if ids.dim() != 1 or ids.numel() == 0:
        return f"draft vocabulary ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}"
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        return f"draft vocabulary ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}"
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        return "draft vocabulary ids must be strictly ascending"
    return None


class DraftVocabHead(nn.Module):
    """An LM head over ``size`` of a ``vocab``-token vocabulary: ``[..., H] -> [..., vocab]``, ``-inf``
    outside the draft vocabulary.

    Args:
        vocab: the full vocabulary (the target's).
        size: draft vocabulary size ``Vd``; ``ids`` (a buffer, saved with the head) is set by
            :meth:`set_vocab` or loaded from a file.
        hidden_size: ``H``.
        trainable: own weights ``[Vd, H]`` (a parameter, saved); False: the rows of a frozen LM
            head given by :meth:`bind_rows` (not saved: EAGLE-2 reuses the target's own head).
    """

    def __init__(self, vocab: int, size: int, hidden_size: int, trainable: bool = True):
        super().__init__()
        self.vocab = int(vocab)
        self.register_buffer("ids", torch.arange(size, dtype=torch.long))  # [Vd]
        self.weight = nn.Parameter(torch.zeros(size, hidden_size)) if trainable else None  # [Vd, H]
        self.register_buffer("rows", None, persistent=False)  # [Vd, H] frozen rows (trainable=False)

    @classmethod
    def over(cls, ids: torch.Tensor, vocab: int, hidden_size: int, weight: torch.Tensor | None = None,
             trainable: bool = True) -> DraftVocabHead:
        """A head over ``ids [Vd]`` taking rows of the full LM-head ``weight [V, H]``: copied into its own
        parameter (``trainable``, on the weight's device and dtype) or read frozen (:meth:`bind_rows`;
        with ``weight`` None, bound later). ValueError for ids that are not a draft vocabulary."""
        head = cls(vocab, int(ids.numel()), hidden_size, trainable)
        head.set_vocab(ids.long().cpu(), weight.float().cpu() if trainable and weight is not None else None)
        if weight is not None and trainable:
            head.to(device=weight.device, dtype=weight.dtype)
        elif weight is not None:
            head.to(weight.device)  # its ids too: they index logits on the weight's device (CUDA)
            head.bind_rows(weight)
        return head

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def matmul_weight(self) -> torch.Tensor | None:
        """The ``[Vd, H]`` matrix the head multiplies by (its own, or the bound rows; None before binding): what
        ``auto`` times (:func:`specdec.models.matmul_weights`)."""
        return self.weight if self.weight is not None else self.rows

    @torch.no_grad()
    def set_vocab(self, ids: torch.Tensor, full_weight: torch.Tensor | None = None) -> None:
        """Use draft vocabulary ``ids [Vd]``; a trainable head starts from ``full_weight [V, H]``'s rows."""
        problem = check_ids(ids, self.vocab)
        if problem or ids.numel() != self.size:
            raise ValueError(problem or f"{ids.numel()} ids for a {self.size}-token draft vocabulary")
        self.ids.copy_(ids)
        if self.weight is not None and full_weight is not None:
            self.weight.copy_(full_weight.detach()[ids.to(full_weight.device)].to(self.weight))

    def bind_rows(self, full_weight: torch.Tensor) -> None:
        """A frozen head reads rows ``ids`` of ``full_weight [V, H]`` (a copy of ``Vd`` rows, on its device; ids
        ``0 .. Vd - 1``, a padded vocabulary's, read the weight's first rows in place)."""
        if int(self.ids[-1]) == self.size - 1:  # ids ascend strictly: they are 0 .. Vd - 1
            self.rows = full_weight.detach()[: self.size]  # [Vd, H], a view
        else:
            self.rows = full_weight.detach()[self.ids.to(full_weight.device)]  # [Vd, H]

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., Vd]`` of the draft vocabulary's tokens only (column ``j`` is token ``ids[j]``)."""
        weight = self.weight if self.weight is not None else self.rows
        if weight is None:
            raise RuntimeError("a frozen DraftVocabHead needs bind_rows(the LM head's weight) before use")
        return F.linear(hidden, weight.to(hidden.dtype))  # [..., Vd]

    def columns(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Token ids ``labels [...]`` as columns of :meth:`scores` (``ignore_index`` where not in ``ids``)."""
        table = torch.full((self.vocab,), ignore_index, dtype=torch.long, device=labels.device)  # [V]
        table[self.ids.to(labels.device)] = torch.arange(self.size, device=labels.device)
        return table[labels]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = self.scores(hidden)  # [..., Vd]
        out = scores.new_full((*scores.shape[:-1], self.vocab), float("-inf"))  # [..., V]
        return out.scatter(-1, self.ids.to(scores.device).expand_as(scores), scores)


def expressible(logq: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels [...]`` with those the head cannot express (``logq [..., V]`` is ``-inf`` there, e.g.
    outside its draft vocabulary) replaced by ``ignore_index``, for ``F.nll_loss``."""
    reachable = torch.isfinite(logq.gather(-1, labels[..., None]))[..., 0]
    return torch.where(reachable, labels, ignore_index)


def soft_cross_entropy(teacher_logits: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``-sum_x p(x) log q(x)`` over the tokens the head can express
    (``teacher_logits``, ``logq``: ``[..., V]``)."""
    p = F.softmax(teacher_logits, dim=-1)
    return -(p * logq.masked_fill(~torch.isfinite(logq), 0.0)).sum(-1).mean()


def head_weight(head: nn.Module) -> torch.Tensor:
    """An LM head's rows ``[rows, H]``: a linear's weight, or those a padded view's head reads (its ids ``0 .. rows -
    1``, :func:`drafters.vocab_padding.padded_to`); ValueError for a head over any other draft vocabulary."""
    if not isinstance(head, DraftVocabHead):
        return head.weight
    if int(head.ids[-1]) != head.size - 1 or (head.weight is None and head.rows is None):
        raise ValueError("the model's LM head already scores a draft vocabulary: give the ids over the whole model")
    return head.weight if head.weight is not None else head.rows


def with_draft_vocab(model: nn.Module, ids: torch.Tensor, vocab: int | None = None) -> nn.Module:
    """A view of the causal LM ``model`` whose LM head scores only ``ids [Vd]`` (its rows read in place when the ids
    are ``0 .. Vd - 1``, else copied once); every other module is ``model``'s own (shared, not copied). Its config
    records the draft vocabulary, so cost curves measured for it are not taken for the whole model's. ``vocab``:
    the size of the distributions the view emits (default: what the model's LM head emits; a padded target's,
    see :func:`drafters.vocab_padding.padded_to`). ``model`` may itself be a padded view."""
    head = model.get_output_embeddings()
    weight = head_weight(head)  # [rows, H]
    rows, hidden = int(weight.shape[0]), int(weight.shape[1])
    if ids.numel() and int(ids.max()) >= rows:
        raise ValueError(f"draft vocabulary ids must lie in [0, {rows}) (the LM head's rows), "
                         f"got up to {int(ids.max())}")
    vocab = int(vocab or getattr(head, "vocab", None) or rows)
    reduced = DraftVocabHead.over(ids, vocab, hidden, weight, trainable=False)
    view = copy.copy(model)
    view._modules = dict(model._modules)  # the view's own module table: swapping its head leaves model's alone
    view.config = copy.deepcopy(model.config)
    view.config.draft_vocab_size = int(ids.numel())
    text_config(view).vocab_size = vocab  # the size of what it emits (HF's assisted generation compares it)
    names = [name for name, module in model.named_children() if module is head]
    if len(names) != 1:
        raise ValueError(f"{type(model).__name__}: its output embedding is not one top-level module")
    view._modules[names[0]] = reduced
    return view


def vocab_of(directory) -> torch.Tensor:
    """The draft vocabulary ids ``[Vd]`` saved with trained heads (an EAGLE or Medusa heads directory),
    e.g. to give a draft model the same draft vocabulary; ValueError if the heads have none."""
    from pathlib import Path

    from safetensors import safe_open

    for weights in sorted(Path(directory).expanduser().glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            keys = sorted(k for k in f.keys() if k.endswith("lm_head.ids"))
            if keys:
                return f.get_tensor(keys[0]).long()
    raise ValueError(f"{directory}: no heads with a draft vocabulary there (train them with draft_vocab=N)")
