"""Mutation pass 15: prompt lookup (:mod:`drafters.ngram`), its REST-style datastore (:mod:`drafters.datastore`),
the cross-tokenizer drafter (:mod:`drafters.cross_tokenizer`); draft vocabularies: :mod:`tests.test_mutation15_draft_vocab`.

Each test names the planted bug it catches: small edits (a comparison, a dropped line, a swapped argument) that the
rest of the suite let through.
"""
from __future__ import annotations

import random

import pytest
import torch

from drafters import CrossTokenizerDrafter, NGramDrafter
from drafters.datastore import Datastore, load_datastore
from experiments.chat_data import ChatRows, save_rows
from specdec import SamplingParams
from specdec.drafting import DraftContext
from specdec.errors import ConfigError, SpecDecError
from specdec.rng import KeyedRandom
from tests.test_cross_tokenizer import CHARS, PERM, char_tokenizer, permuted
from tests.tiny_models import peaky_pair


def _started(drafter, tokens):
    """``drafter`` bound to a fresh run (no target: lookups run none) that has committed ``tokens``."""
    drafter.start(DraftContext(target=None, sampling=None, rng=None, capacity=64))
    drafter.tokens = list(tokens)
    return drafter


def _proposal(drafter, tokens, max_depth: int = 8) -> list[int]:
    return _started(drafter, tokens).propose(max_depth).tokens.tolist()


# --------------------------------------------------------------------------- prompt lookup


def test_match_first_proposes_the_earliest_occurrence_and_last_the_most_recent():
    """Planted bug: the index overwrote every key whatever ``match`` said (``if True:``), so ``match="first"``
    proposed what followed the most recent occurrence, exactly as ``"last"`` does."""
    tokens = [1, 2, 5, 6, 1, 2, 7, 8, 1, 2]
    assert _proposal(NGramDrafter(2, max_ngram=2, match="first"), tokens) == [5, 6]
    assert _proposal(NGramDrafter(2, max_ngram=2, match="last"), tokens) == [7, 8]


@pytest.mark.parametrize("match", ["lst", "latest", "First"])
def test_an_unknown_match_rule_is_one_config_error(match):
    """Planted bug: the ``match`` check was dropped (or let a typo through), so a misspelt rule silently behaved as
    ``"first"`` (anything but ``"last"`` keeps the first occurrence)."""
    with pytest.raises(ConfigError, match="drafter.match="):
        NGramDrafter(2, match=match)


def test_a_second_run_indexes_its_own_context_from_the_start():
    """Planted bug: ``start`` emptied the index but kept ``_indexed`` (how far the last run's context was indexed),
    so a drafter reused for the next prompt never indexed that prompt's first positions and missed their matches."""
    drafter = NGramDrafter(2, max_ngram=2)
    assert _proposal(drafter, [9, 9, 9, 9, 9, 9, 9, 3]) == []
    assert _proposal(drafter, [4, 5, 6, 7, 8, 1, 2, 4, 5]) == [6, 7]  # "4 5" at positions 0-1


def test_the_longest_matching_suffix_wins_over_a_more_recent_shorter_one():
    """Planted bug: suffix lengths tried shortest first, so "2" (last seen before "6 1") beat "1 2" (seen once,
    before "5 2"): the existing tests' contexts had both lengths end at the same place."""
    assert _proposal(NGramDrafter(2, max_ngram=2), [1, 2, 5, 2, 6, 1, 2]) == [5, 2]


def test_the_drafters_python_defaults_are_the_configs():
    """Planted bugs: a changed default (``num_speculative_tokens``, ``max_ngram``, ``min_ngram``, ``match``, the
    datastore's settings): a Python caller (or a hybrid built from code) would draft otherwise than
    ``drafter=ngram`` does."""
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "drafter" / "ngram.yaml")
    params = inspect.signature(NGramDrafter).parameters
    for key, value in OmegaConf.to_container(conf).items():
        if key != "_target_":
            assert params[key].default == value, key
    assert params["match"].default == "last"


# --------------------------------------------------------------------------- the datastore


@pytest.mark.parametrize("bad", [{"min_ngram": 0}, {"min_count": 0}, {"min_share": -0.1}])
def test_a_datastore_with_a_zero_size_or_count_or_a_negative_share_is_refused(bad):
    """Planted bugs: ``0 <= min_ngram`` (a 0-gram is the empty key, and ``context[-0:]`` the whole context),
    ``min_count < 0`` and a dropped lower bound on ``min_share``: each let a meaningless setting through."""
    with pytest.raises(ConfigError, match="datastore"):
        Datastore([[1, 2, 3]], **({"min_ngram": 1, "max_ngram": 2} | bad))


def test_a_share_of_one_is_a_valid_setting_and_keeps_only_unanimous_continuations():
    """Planted bug: ``min_share < 1`` refused 1.0, the documented top of ``[0, 1]``."""
    rows = [[1, 2, 3], [1, 2, 3], [5, 2, 4]]
    store = Datastore(rows, 2, 2, min_count=1, min_share=1.0)
    assert store.next_token([1, 2]) == 3 and store.next_token([7, 2]) is None


def test_an_ngram_longer_than_its_position_in_a_short_row_is_not_counted():
    """Planted bug: n-gram sizes not capped at the position (``range(min_ngram, max_ngram + 1)``): in a row shorter
    than ``max_ngram`` the slice ``row[end - n : end]`` wrapped around to a shorter n-gram, counted once more (a
    continuation seen once passed ``min_count=2``)."""
    store = Datastore([[5, 6]], min_ngram=1, max_ngram=3, min_count=2, min_share=0.0)
    assert store.next_token([5]) is None and len(store) == 0


def test_token_id_zero_is_a_continuation_like_any_other():
    """Planted bug: ``if token:`` in ``next_token`` read token id 0 (a real id: often ``<unk>`` or ``!``) as no
    continuation, so the datastore never drafted it and fell back to a shorter suffix instead."""
    store = Datastore([[3, 4, 0, 7]] * 2 + [[8, 4, 5]] * 3, min_ngram=1, max_ngram=2, min_count=1, min_share=0.0)
    assert store.next_token([3, 4]) == 0  # "3 4" -> 0, though "4" alone -> 5 (3 of 5)
    assert store.chain([3, 4], 3) == [0, 7]


def test_the_share_is_of_all_occurrences_not_of_distinct_continuations():
    """Planted bug: ``min_share * len(counts)`` (the number of distinct next tokens) instead of the n-gram's
    occurrences: 2 of 4 occurrences passed a share of 0.6 because 2 >= 0.6 * 3."""
    rows = [[1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 2, 5]]
    assert Datastore(rows, 2, 2, min_count=1, min_share=0.6).next_token([1, 2]) is None
    assert Datastore(rows, 2, 2, min_count=1, min_share=0.5).next_token([1, 2]) == 3


def test_a_context_no_longer_than_max_ngram_still_falls_back_to_the_datastore():
    """Planted bug: the datastore consulted only for contexts longer than ``max_ngram``
    (``len(toks) > self.max_ngram``): a short prompt with no match of its own drafted nothing."""
    store = Datastore([[1, 2, 3, 4, 5, 6, 7]] * 2, min_ngram=1, max_ngram=2, min_count=1, min_share=0.0)
    assert _proposal(NGramDrafter(4, max_ngram=2, min_ngram=2, datastore=store), [1, 2]) == [3, 4, 5, 6]

def _rows_file(root, prompt: int = 5):
    """Two chats with a ``prompt``-token prompt (ids 20..) and the answer 1 2 3 (then padding)."""
    ids = torch.tensor([list(range(20, 20 + prompt)) + [1, 2, 3, 0]] * 2)  # [2, prompt + 4]
    save_rows(ChatRows(ids, torch.tensor([prompt + 3] * 2), torch.tensor([prompt] * 2), 0), root / "rows.safetensors")
    return root / "rows.safetensors"


def test_chat_rows_are_read_from_the_file_itself_with_four_prompt_tokens_by_default(tmp_path):
    """Planted bugs: the rows file's own path taken for a directory (``file / ROWS_FILE`` always), and the prompt
    tokens kept before each answer defaulting to 3 rather than the default longest n-gram, 4."""
    store = Datastore.from_chat_rows(_rows_file(tmp_path), min_ngram=1, min_count=1, min_share=0.0)
    assert store.tokens == 2 * (4 + 3) and store.max_ngram == 4
    assert store.next_token([21, 22, 23, 24]) == 1


def test_the_default_settings_are_the_documented_ones(tmp_path):
    """Planted bugs: defaults changed (``Datastore``'s min_count 2, min_share 0.5, n-grams 3..4;
    ``load_datastore``'s min_ngram 3; the drafter's ``datastore_min_ngram`` 3 and ``datastore_min_share`` 0.5),
    the drafter's ``datastore_min_share`` not passed on, or a ``Path`` datastore kept as it is (not loaded)."""
    plain = Datastore([[1, 2, 3]])
    assert (plain.min_ngram, plain.max_ngram, plain.min_count, plain.min_share) == (3, 4, 2, 0.5)
    _rows_file(tmp_path)
    loaded = load_datastore(str(tmp_path))
    assert (loaded.min_ngram, loaded.max_ngram, loaded.min_count, loaded.min_share) == (3, 4, 2, 0.5)
    store = NGramDrafter(2, datastore=str(tmp_path)).datastore
    assert (store.min_ngram, store.min_share) == (3, 0.5)
    assert NGramDrafter(2, datastore=str(tmp_path), datastore_min_share=0.0).datastore.min_share == 0.0
    assert isinstance(NGramDrafter(2, datastore=tmp_path).datastore, Datastore)  # a Path, as check_files takes


# --------------------------------------------------------------------------- the cross-tokenizer drafter


def _cross(k: int = 3, target_chars: str = CHARS, draft_chars: str | None = None, **kwargs):
    """A cross-tokenizer drafter whose draft is the peaky target under permuted ids (it drafts what the target
    would), and that target."""
    target, _ = peaky_pair()
    draft_chars = "".join(CHARS[p] for p in PERM) if draft_chars is None else draft_chars
    return CrossTokenizerDrafter(permuted(target, PERM), tokenizer=char_tokenizer(target_chars),
                                 draft_tokenizer=char_tokenizer(draft_chars), num_speculative_tokens=k,
                                 **kwargs), target


def _run(drafter, target, tokens, capacity: int = 64):
    drafter.start(DraftContext(target, SamplingParams(), KeyedRandom.for_seed(0), capacity))
    drafter.prefill(torch.tensor([tokens]), None)
    return drafter


def test_the_draft_models_own_tokenizer_is_checked_against_it_too():
    """Planted bug: ``start`` checked the target's tokenizer only: a draft tokenizer with ids past the draft model's
    vocabulary fed the draft ids it cannot embed (an index error deep in the forward, or garbage on CUDA)."""
    d, target = _cross(draft_chars="".join(CHARS[p] for p in PERM) + "gh")
    with pytest.raises(SpecDecError, match="drafter.draft_tokenizer has 8 tokens but the draft model reads 6"):
        _run(d, target, [1, 2, 3])


def test_a_second_run_forgets_the_first_runs_anchor(monkeypatch):
    """Planted bugs: ``start`` no longer reset the anchored text (the next prompt's draft ids began with the last
    run's anchored ids, and its text was read from the last run's anchor on), and the anchor moved to the text's
    end rather than ``KEEP_TOKENS`` before it (the text the draft continues was encoded at a cut)."""
    import drafters.cross_tokenizer as ct

    monkeypatch.setattr(ct, "TAIL_TOKENS", 12)
    monkeypatch.setattr(ct, "KEEP_TOKENS", 4)
    d, target = _cross()
    _run(d, target, [random.Random(0).randrange(6) for _ in range(40)])
    d.propose(3)
    assert d._anchor == 40 - 4  # moved, KEEP_TOKENS behind the end (every cut is clean here)
    second = [5, 4, 3, 2, 1, 0, 1]
    _run(d, target, second)
    assert d._draft_ids() == d.draft_tokenizer.encode(ct._text(d.tokenizer, second), add_special_tokens=False)


def test_a_draft_directory_is_read_with_the_draft_tokenizer_given(tmp_path):
    """Planted bug: a ``draft`` directory always brought its own tokenizer (``draft_tokenizer = draft``), ignoring
    the one passed: a checkpoint saved without tokenizer files could not be used at all."""
    target, _ = peaky_pair()
    permuted(target, PERM).save_pretrained(tmp_path / "draft")  # weights only, no tokenizer files
    given = char_tokenizer("".join(CHARS[p] for p in PERM))
    d = CrossTokenizerDrafter(str(tmp_path / "draft"), tokenizer=char_tokenizer(CHARS), draft_tokenizer=given)
    assert d.draft_tokenizer is given


def test_the_draft_cache_holds_several_draft_tokens_per_target_token():
    """Planted bug: the draft cache sized at one draft token per target token of the run's capacity (not
    ``DRAFT_TOKENS_PER_TOKEN``): a draft whose tokens are shorter than the target's (here two draft ids per "ab")
    had its window moved, and its cache refilled, on a text well within the run's capacity."""
    d, target = _cross(target_chars="abcde")
    d.tokenizer = char_tokenizer("abcde", [("a", "b")])  # id 5 reads "ab"
    _run(d, target, [5] * 15 + [2], capacity=20)  # 31 draft ids
    d.propose(3)
    assert d._offset == 0 and len(d._fed) >= 31


def test_a_draft_with_room_for_less_than_two_lookbehinds_of_context_is_refused():
    """Planted bug: the check at ``start`` asked for one ``LOOKBEHIND`` of context (not two) after the drafted
    tokens and the root: a draft model with 12 positions (7 of context for ``draft_tokens=4``) was let through."""
    for positions, refused in ((12, True), (13, False)):
        d, target = _cross()
        d.model.config.max_position_embeddings = positions
        if refused:
            with pytest.raises(SpecDecError, match="sees 12 positions, too few for drafter.draft_tokens=4"):
                _run(d, target, [1, 2, 3])
        else:
            _run(d, target, [1, 2, 3])


def test_a_second_run_starts_the_draft_cache_afresh():
    """Planted bug: ``start`` kept the last run's fed ids: the new, empty cache was "kept" up to the prefix both runs
    share, so the draft attended to positions never fed (zeros) and the same prompt drafted otherwise."""
    d, target = _cross()
    tokens = [1, 2, 3, 1, 2, 0, 4, 5, 5, 2]
    first = _run(d, target, tokens).propose(3).tokens.tolist()
    assert _run(d, target, tokens).propose(3).tokens.tolist() == first
    assert d.cache.length == len(d._fed)


def test_a_text_that_does_not_read_back_after_the_anchor_is_encoded_again_whole():
    """Planted bug: where the text after the anchor does not read back (the anchor inside a character's bytes), the
    whole text was encoded but the anchor's ids were kept in front of it: the draft read the start twice."""
    from specdec.models import byte_tokenizer

    tok = byte_tokenizer()
    d = CrossTokenizerDrafter(peaky_pair()[0], tokenizer=tok, draft_tokenizer=tok)
    d._reset_text()
    d.tokens = tok.encode("x\u00e9ab")  # x, the two bytes of é, a, b
    d._anchor, d._anchor_ids = 2, tok.encode("x")  # an anchor between é's bytes
    assert d._draft_ids() == tok.encode("x\u00e9ab") and d._anchor == 0


def test_the_anchor_moves_only_to_a_cut_between_whole_characters():
    """Planted bugs: ``_move_anchor`` no longer refusing a cut whose text before it ends in U+FFFD (a character's
    bytes on both sides of the cut: the anchor's ids then encoded a replacement character the text never held), and
    only ``to`` itself tried (the anchor stuck wherever ``to`` splits a character)."""
    from drafters.cross_tokenizer import _text
    from specdec.models import byte_tokenizer

    tok = byte_tokenizer()
    ids = tok.encode("ab\u20accd\u00e9fg\u20ac")  # three-byte and two-byte characters
    for to in range(1, len(ids)):
        d = CrossTokenizerDrafter(peaky_pair()[0], tokenizer=tok, draft_tokenizer=tok)
        d._reset_text()
        d.tokens = ids
        d._move_anchor(to)
        before, after = _text(tok, ids[: d._anchor]), _text(tok, ids[d._anchor :])
        assert "\ufffd" not in before + after and d._anchor_ids == tok.encode(before), to
        assert to - 3 <= d._anchor <= to  # a clean cut near ``to`` (a character here has <= 3 bytes)


def test_an_anchor_that_found_no_clean_cut_tries_again_max_lookbehind_tokens_later(monkeypatch):
    """Planted bugs: after a failed move (no cut between whole characters in reach), the next try put off far past
    ``MAX_LOOKBEHIND`` tokens (the text after the anchor, decoded and encoded every step, kept growing), or made at
    every step regardless (up to ``MAX_LOOKBEHIND`` decodes more per step)."""
    import drafters.cross_tokenizer as ct

    monkeypatch.setattr(ct, "TAIL_TOKENS", 12)
    monkeypatch.setattr(ct, "KEEP_TOKENS", 4)
    tok = char_tokenizer("\ufffd" + CHARS[1:])  # id 0 reads U+FFFD, as a split character would
    d = CrossTokenizerDrafter(peaky_pair()[0], tokenizer=tok, draft_tokenizer=tok)
    d._reset_text()
    d.tokens = [0] * 20
    d._draft_ids()
    assert (d._anchor, d._retry_at) == (0, 20 + ct.MAX_LOOKBEHIND)  # no clean cut: try again 16 tokens later
    d.tokens += [0]
    d._draft_ids()
    assert d._retry_at == 36  # not tried again at every step before then
    d.tokens += [1] * 15
    assert d._draft_ids() == tok.encode(ct._text(tok, d.tokens)) and d._anchor == 36 - 4


def test_the_window_never_starts_past_a_shrunken_encoding():
    """Planted bug: the clamp of the window's start dropped: when the text's encoding shrank below it (bytes that
    became one character), the draft was fed an empty window."""
    d, _ = _cross()
    d._limit, d._offset, d._fed = 20, 9, []  # the window had moved to draft id 9
    assert d._window(list(range(5))) == [4]


def test_a_continuation_that_changes_how_the_context_reads_is_not_proposed():
    """Planted bug: ``_continue`` no longer checked that the context's text is a prefix of the text with the
    drafted tokens: a draft completing a character the context's last byte began proposed a cut-off text ("")."""
    from specdec.models import byte_tokenizer

    tok = byte_tokenizer()
    x, e1, e2 = tok.encode("x\u00e9")  # x and the two bytes of é
    d = CrossTokenizerDrafter(peaky_pair()[0], tokenizer=tok, draft_tokenizer=tok, draft_tokens=1)
    d._window, d._feed = (lambda ids: ids), (lambda window: torch.nn.functional.one_hot(torch.tensor(e2), 257))
    assert d._continue([x, e1]) is None  # "x\ufffd" then "x\u00e9": the context read otherwise


def test_special_tokens_in_the_context_reach_the_draft_as_text():
    """Planted bug: ``_text`` decoding with ``skip_special_tokens=True``: a chat template's markers (here an EOS in
    the middle of the context) vanished from the text the draft reads."""
    d = CrossTokenizerDrafter(peaky_pair()[0], tokenizer=char_tokenizer(CHARS, eos="<s>"),
                              draft_tokenizer=char_tokenizer("".join(CHARS[p] for p in PERM), eos="<s>"))
    d._reset_text()
    d.tokens = [0, 6, 1]  # "a", EOS, "b"
    ids = d._draft_ids()
    assert ids == d._encode("a<s>b") and d.draft_tokenizer.eos_token_id in ids
