"""A draft model with its own tokenizer: drafts go through text (universal assisted generation).

The target's committed tokens are decoded to text and encoded with the draft's tokenizer; the draft model
continues that text greedily for ``draft_tokens`` of its own tokens; the continuation is encoded with the
target's tokenizer (behind the last committed tokens, so that a word is split as the target splits it) and its
first ``num_speculative_tokens`` target tokens are proposed. The host work per step is bounded: the text before
an anchor is encoded once (its draft ids appended to as the anchor moves), only the tokens after it are decoded
and encoded again each step (at most :data:`TAIL_TOKENS`). The proposals are deterministic (point masses for
the acceptance rule), so every rule stays exact: greedy runs equal plain decoding and rejection sampling keeps
the target's distribution, whatever the draft or its tokenizer.
"""
from __future__ import annotations

import torch

from drafters.fast_decoder import PROBE_CONTEXT, forward_lm, lean_probe
from specdec.cache import SpecDecCache
from specdec.drafting import DraftContext, Drafter, StepShape
from specdec.errors import SpecDecError, positive_int
from specdec.models import context_length, vocab_size
from specdec.types import DraftTree

#: How many of the last committed target tokens are re-encoded with the draft's continuation, so that the
#: continuation's first token is split as the target's tokenizer splits it after them.
LOOKBEHIND = 4
#: The longest run of committed tokens tried for that (see :meth:`CrossTokenizerDrafter._behind`).
MAX_LOOKBEHIND = 16
#: The most committed target tokens decoded and encoded again per step: past that the anchor moves on, leaving
#: :data:`KEEP_TOKENS` after it (their text is encoded again each step, so a word they end is split as a whole).
TAIL_TOKENS = 256
KEEP_TOKENS = 64
#: Characters of the text before the anchor that the text after it is encoded behind (then dropped).
ANCHOR_CONTEXT = 16
#: The draft's cache holds this many draft tokens per target token of the run's capacity (or its position limit,
#: if lower); a longer text is seen through a window (:meth:`CrossTokenizerDrafter._window`).
DRAFT_TOKENS_PER_TOKEN = 4


class CrossTokenizerDrafter(Drafter):
    """Drafts a chain with a causal LM whose tokenizer differs from the target's.

    Args:
        draft: the draft model (a loaded causal LM) or its checkpoint directory (loaded with safetensors).
        tokenizer: the target's tokenizer (``experiments.decode`` passes the run's).
        draft_tokenizer: the draft's tokenizer, or its directory; None: the ``draft`` directory's own.
        num_speculative_tokens: the most target tokens proposed per step (k >= 1).
        draft_tokens: draft-model tokens generated per step (one draft forward each); None: ``k + 1`` (the last
            target token of the continuation is not proposed, as it may be a word cut short; a draft whose tokens
            are shorter than the target's needs more for k proposals).
        dtype: the dtype a draft loaded from a directory runs in.
    """

    name = "cross_tokenizer"

    def __init__(self, draft, tokenizer=None, draft_tokenizer=None, num_speculative_tokens: int = 4,
                 draft_tokens: int | None = None, dtype: str = "float32"):
        super().__init__()
        from specdec.models import load_causal_lm, load_tokenizer

        self.k = positive_int(num_speculative_tokens, "drafter.num_speculative_tokens")
        self.draft_tokens = positive_int(self.k + 1 if draft_tokens is None else draft_tokens, "drafter.draft_tokens")
        if isinstance(draft, str):
            draft_tokenizer = draft_tokenizer or draft
            draft = load_causal_lm(draft, dtype=dtype, role="draft")
        if draft_tokenizer is None:
            raise SpecDecError("CrossTokenizerDrafter: pass draft_tokenizer= (the draft model's own tokenizer)")
        if isinstance(draft_tokenizer, str):
            draft_tokenizer = load_tokenizer(draft_tokenizer, elsewhere="drafter.draft_tokenizer",
                                             what="drafter.draft_tokenizer")
        self.model = draft.eval()
        self.tokenizer, self.draft_tokenizer = tokenizer, draft_tokenizer
        self.cache: SpecDecCache | None = None
        self._fed: list[int] = []  # draft ids in the cache, from draft id self._offset of the text's encoding
        self._offset = 0
        self._limit = 0  # draft tokens the cache holds (set per run)
        self._device = next(draft.parameters()).device

    @property
    def max_nodes(self) -> int:
        return self.k

    def step_shape(self, target) -> StepShape:
        """``draft_tokens`` draft forwards every step, whatever it proposes, then a verify of ``1 + k``."""
        self._follow(target)
        context = min(PROBE_CONTEXT, self._positions() - 1)
        probe = lean_probe(self.model, True, context)
        return StepShape(kind="chain", max_nodes=self.k, draft_forwards="fixed", draft_model=self.model,
                         draft_probe=probe, k=self.draft_tokens)

    def _follow(self, target) -> None:
        """Run the draft on the target's device."""
        self._device = next(target.parameters()).device
        self.model.to(self._device)

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        if self.tokenizer is None:
            raise SpecDecError("CrossTokenizerDrafter needs the target's tokenizer: pass tokenizer=")
        _check_tokenizer(self.tokenizer, ctx.target, "the target's tokenizer", "target")
        _check_tokenizer(self.draft_tokenizer, self.model, "drafter.draft_tokenizer", "draft model")
        self._follow(ctx.target)
        # draft tokens per target token: up to DRAFT_TOKENS_PER_TOKEN (a byte-level draft for a word-level target)
        self._limit = min(self._positions(), DRAFT_TOKENS_PER_TOKEN * ctx.capacity + self.draft_tokens + 1)
        if self._limit - self.draft_tokens - 1 < 2 * LOOKBEHIND:
            raise SpecDecError(f"the draft model sees {self._positions()} positions, too few for drafter.draft_tokens="
                               f"{self.draft_tokens} after a context: lower drafter.draft_tokens or use another draft")
        self.cache = SpecDecCache.for_model(self.model, self._limit)
        self._fed, self._offset = [], 0
        self._reset_text()

    def _reset_text(self) -> None:
        """Forget the anchored text (a new run)."""
        self._anchor, self._anchor_ids = 0, []  # the text of self.tokens[:_anchor], as draft ids (encoded once)
        self._anchor_end, self._anchor_end_ids = "", []  # its last characters (the next chunk is encoded behind
        # them) and their own draft ids, encoded once per anchor
        self._retry_at = 0  # no clean cut was found: the anchor tries again once the text reaches this many tokens

    def _positions(self) -> int:
        """The draft model's position limit."""
        return int(context_length(self.model) or 2048)

    def propose(self, max_depth: int) -> DraftTree:
        k = min(self.k, max_depth)
        if k <= 0:
            return DraftTree.empty()
        ids = self._draft_ids()
        if not ids:
            return DraftTree.empty()
        continuation = self._continue(ids)
        if continuation is None:
            return DraftTree.empty()
        return DraftTree.chain(self._target_tokens(continuation)[:k])

    def _draft_ids(self) -> list[int]:
        """The committed text as draft ids: the anchor's (the text before it, encoded when the anchor passed it) and
        the rest's, encoded now. The anchor moves once the rest is longer than :data:`TAIL_TOKENS` target tokens."""
        if len(self.tokens) - self._anchor > TAIL_TOKENS and len(self.tokens) >= self._retry_at:
            self._move_anchor(len(self.tokens) - KEEP_TOKENS)
        tail = self._text_after(self._anchor, len(self.tokens))
        if tail is None:  # the anchor's last character does not read back whole: encode everything again
            self._reset_text()
            tail = _text(self.tokenizer, self.tokens)
        return self._anchor_ids + self._encode_after(tail)

    def _move_anchor(self, to: int) -> None:
        """Move the anchor to ``to`` or just before it, where the text splits between whole characters; the text in
        between is encoded (behind the end of the text before it) and its ids appended. Where a draft token would
        span the cut, the draft reads two (drafting only, never output). No clean cut in :data:`MAX_LOOKBEHIND`
        tokens: the anchor stays, and tries again :data:`MAX_LOOKBEHIND` tokens later."""
        for at in range(to, max(self._anchor, to - MAX_LOOKBEHIND), -1):
            between, after = self._text_after(self._anchor, at), self._text_after(at, at + 1)
            if between and after is not None and not between.endswith("\ufffd") and not after.startswith("\ufffd"):
                self._anchor_ids = self._anchor_ids + self._encode_after(between)
                self._anchor, self._anchor_end = at, (self._anchor_end + between)[-ANCHOR_CONTEXT:]
                self._anchor_end_ids = self._encode(self._anchor_end)
                return
        self._retry_at = len(self.tokens) + MAX_LOOKBEHIND

    def _text_after(self, start: int, end: int) -> str | None:
        """The text of ``self.tokens[start:end]`` as it reads after the tokens before it (decoded behind a few of
        them, whose own text is then cut off: a SentencePiece word keeps its space); None when that text is not a
        prefix (a character split between ``start - 1`` and ``start``)."""
        before = self.tokens[max(0, start - LOOKBEHIND):start]
        base, full = _text(self.tokenizer, before), _text(self.tokenizer, before + self.tokens[start:end])
        return full[len(base):] if full.startswith(base) else None

    def _encode(self, text: str) -> list[int]:
        return self.draft_tokenizer.encode(text, add_special_tokens=False, verbose=False)  # longer than it reads: fine

    def _encode_after(self, text: str) -> list[int]:
        """``text``'s draft ids as they read after the anchor's last characters: encoded behind them and their ids
        dropped (a tokenizer that marks where a text starts, as SentencePiece's "▁", marks no start there); ``text``
        alone when the encoding does not begin with those characters' own ids (a token spans the two)."""
        if not self._anchor_end:
            return self._encode(text)
        head, ids = self._anchor_end_ids, self._encode(self._anchor_end + text)
        return ids[len(head):] if ids[: len(head)] == head else self._encode(text)

    def _continue(self, ids: list[int]) -> tuple[str, bool] | None:
        """``(text, ended)``: the draft model's greedy continuation of ``ids`` as text, and whether it ended with the
        draft's EOS; None when the continuation cannot be read back as text after the context's."""
        window = self._window(ids)
        logits = self._feed(window)  # [V]
        drafted, eos = [], self.draft_tokenizer.eos_token_id
        for i in range(self.draft_tokens):
            token = int(logits.argmax())
            if token == eos:
                break
            drafted.append(token)
            if i + 1 < self.draft_tokens:
                logits = self._feed(window + drafted)
        tail = window[-LOOKBEHIND:]  # the continuation's text after the window's last few tokens (not all of it)
        base = _text(self.draft_tokenizer, tail)
        full = _text(self.draft_tokenizer, tail + drafted)
        if not full.startswith(base):
            return None
        return full[len(base):], len(drafted) < self.draft_tokens

    def _window(self, ids: list[int]) -> list[int]:
        """The draft ids the draft model sees: the encoding from draft id ``_offset`` on; moved to keep the last half
        of the draft's cache once the text outgrows it (the cache is then refilled once, not every step)."""
        limit = self._limit - self.draft_tokens - 1
        if len(ids) - self._offset > limit:
            self._offset = max(0, len(ids) - limit // 2)
            self._fed = []
        self._offset = min(self._offset, max(0, len(ids) - 1))  # the encoding may shrink (bytes became a character)
        return ids[self._offset:]

    def _feed(self, window: list[int]) -> torch.Tensor:
        """Bring the draft cache to ``window`` (keeping the longest prefix already fed); the last position's logits
        ``[V]``."""
        keep = 0
        while keep < min(len(self._fed), len(window) - 1) and self._fed[keep] == window[keep]:
            keep += 1
        self.cache.truncate(keep)
        new = window[keep:]
        x = torch.tensor([new], dtype=torch.long, device=self._device)  # [1, n]
        positions = keep + torch.arange(len(new), device=self._device)[None]  # [1, n]
        logits, _ = forward_lm(self.model, x, self.cache, positions, None, 1, output_hidden=False)  # [1, 1, V]
        self._fed = list(window)
        return logits[0, -1]  # [V]

    def _behind(self) -> list[int] | None:
        """The last committed tokens the continuation is encoded behind: the shortest run of at least
        :data:`LOOKBEHIND` that decodes to whole characters and encodes back to itself (a run that starts inside a
        word, or a character's bytes, may not: SentencePiece adds a word boundary, byte-level BPE a U+FFFD); None
        when no run up to :data:`MAX_LOOKBEHIND` does."""
        for n in range(min(LOOKBEHIND, len(self.tokens)), min(MAX_LOOKBEHIND, len(self.tokens)) + 1):
            if _round_trips(self.tokenizer, self.tokens[-n:]):
                return self.tokens[-n:]
        return None

    def _target_tokens(self, continuation: tuple[str, bool]) -> list[int]:
        """The continuation's text as target tokens after the last committed ones; none when the re-encoding does
        not keep those as they are (the text merges into the last committed token)."""
        text, ended = continuation
        behind = self._behind()
        if behind is None:
            return []
        ids = self.tokenizer.encode(_text(self.tokenizer, behind) + text, add_special_tokens=False)
        if ids[: len(behind)] != behind:
            return []
        proposed = ids[len(behind):]
        if ended:
            eos = self.tokenizer.eos_token_id
            return proposed + ([eos] if eos is not None else [])
        return proposed[:-1]  # the last target token may be a word the draft's text cut short


def _round_trips(tokenizer, ids: list[int]) -> bool:
    """Whether ``ids`` decode to whole characters that encode back to ``ids``."""
    text = _text(tokenizer, ids)
    return "\ufffd" not in text and tokenizer.encode(text, add_special_tokens=False) == ids


def _text(tokenizer, ids: list[int]) -> str:
    """``ids`` as text, special tokens and spaces as they are (no clean-up that the encoder would not undo)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _check_tokenizer(tokenizer, model, what: str, whose: str) -> None:
    """A tokenizer whose ids the model can read: no id past the model's vocabulary."""
    if len(tokenizer) > vocab_size(model):
        raise SpecDecError(f"{what} has {len(tokenizer)} tokens but the {whose} reads {vocab_size(model)}: pass the "
                           f"{whose}'s own tokenizer")
