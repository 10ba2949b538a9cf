"""The cross-tokenizer drafter: drafts through text from a model with its own tokenizer.

Target and draft read the same six characters under different token ids (and, in one test, a draft tokenizer
that merges two characters into one token), so the drafter's text round trip is what is tested:
- greedy runs equal ``generate(do_sample=False)``; a draft that is the target under permuted ids is accepted
  almost always (proposals aligned with the target's tokens), one with another segmentation still exactly;
- sampled runs keep the target's distribution (the chi-square test of ``tests/lossless.py``, with the planted
  bugs of deterministic proposals failing it; at T = 1 only: the proposals are greedy whatever the sampling,
  and the warped settings are the rule's own business, tested with the n-gram drafter's proposals);
- a continuation that merges into the last committed token is not proposed; bad tokenizers are one error.
"""
from __future__ import annotations

import copy
import functools
import random
import string

import pytest
import torch

from drafters import CrossTokenizerDrafter
from drafters.fast_decoder import forward_lm
from specdec import SpeculativeDecoder
from specdec.cache import SpecDecCache
from specdec.errors import SpecDecError
from specdec.models import tiny_random_pair
from tests.lossless import cells, check_cell
from tests.test_sweeps import compose_cfg, prompts_file, tiny_args  # noqa: F401  (fixture)
from tests.tiny_models import _with_noise, peaky_noisy_pair, peaky_pair

CHARS = "abcdef"  # the distribution tests' target: id i reads CHARS[i]
PERM = [3, 5, 0, 4, 1, 2]  # their draft: id j reads CHARS[PERM[j]]
WIDE = string.ascii_lowercase + string.digits + " .,;"  # the greedy tests' target: 40 ids, varied greedy text
WIDE_PERM = random.Random(0).sample(range(len(WIDE)), len(WIDE))


def char_tokenizer(chars: str, merges: list[tuple[str, str]] = (), eos: str | None = None):
    """A real tokenizer whose id i is the text ``chars[i]`` (then one id per merged pair, in ``merges`` order, then
    ``eos`` if given)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(chars)} | {a + b: len(chars) + i for i, (a, b) in enumerate(merges)}
    if eos:
        vocab[eos] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def permuted(model, perm: list[int]):
    """``model`` reading and writing draft id j where it read target id ``perm[j]``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight[perm])  # [V, H]
        out.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight[perm])  # [V, H]
    return out


def drafter(draft, k: int = 3, merges=(), chars: str = CHARS, perm=PERM, **kwargs) -> CrossTokenizerDrafter:
    """Over ``chars``; the draft reads them in ``perm``'s order, with ``merges`` as extra draft ids."""
    return CrossTokenizerDrafter(draft, tokenizer=char_tokenizer(chars),
                                 draft_tokenizer=char_tokenizer("".join(chars[p] for p in perm), merges),
                                 num_speculative_tokens=k, **kwargs)


@functools.cache
def wide_target():
    target = tiny_random_pair("llama", seed=3, vocab=len(WIDE), hidden=64, layers=2)[0]
    target.generation_config.eos_token_id = target.config.eos_token_id = None
    return target


def wide_draft(noise: float, merges=()):
    """The wide target with noise (0.15: about two drafts in three accepted), under permuted ids; the rows of
    ``merges`` are new (the draft sometimes emits them)."""
    draft = permuted(_with_noise(wide_target(), noise, 1) if noise else wide_target(), WIDE_PERM)
    draft.resize_token_embeddings(len(WIDE) + len(merges), mean_resizing=False)
    return draft


def greedy_reference(target, prompt: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones_like(prompt)  # the prompt holds the pad id: no mask inferred from it
    return target.generate(prompt, attention_mask=mask, max_new_tokens=n, do_sample=False)[0]  # [T + n]


PROMPT = torch.tensor([[1, 2, 3, 1, 2, 0, 4, 5, 5, 2]])
WIDE_PROMPT = torch.tensor([[1, 5, 9, 12, 30, 2, 7, 33, 3]])


def test_the_target_under_other_ids_is_accepted_and_greedy_output_is_plain_decoding():
    decoder = SpeculativeDecoder(wide_target(), drafter(wide_draft(0.0), 3, chars=WIDE, perm=WIDE_PERM))
    out = decoder.generate(WIDE_PROMPT, max_new_tokens=40, seed=0)
    assert torch.equal(out.sequences[0], greedy_reference(wide_target(), WIDE_PROMPT, 40))
    assert len(set(out.sequences[0, -40:].tolist())) > 5  # varied text, not one token repeated
    assert out.stats.tau == 4.0  # k + 1: every draft accepted; a misaligned proposal would be rejected at once


@pytest.mark.parametrize("merges", [(), (("a", "b"), ("c", "d"), ("ab", "e"), ("4", "4"))])
@pytest.mark.parametrize("k, draft_tokens", [(1, None), (3, None), (4, 2), (2, 6)])
def test_greedy_output_is_plain_decoding_whatever_the_draft_and_its_segmentation(merges, k, draft_tokens):
    d = drafter(wide_draft(0.15, merges), k, merges, WIDE, WIDE_PERM, draft_tokens=draft_tokens)
    decoder = SpeculativeDecoder(wide_target(), d)
    accepted = 0
    for seed, n in ((0, 40), (1, 7)):
        out = decoder.generate(WIDE_PROMPT[:, : 6 + seed], max_new_tokens=n, seed=seed)
        assert torch.equal(out.sequences[0], greedy_reference(wide_target(), WIDE_PROMPT[:, : 6 + seed], n))
        accepted += out.stats.new_tokens - out.stats.target_forwards
    assert accepted > 0  # drafts were proposed and some accepted: both branches ran


class Checked(CrossTokenizerDrafter):
    """After every proposal, checks that the draft cache holds what a fresh feed of the draft ids it claims would."""

    def propose(self, max_depth):
        tree = super().propose(max_depth)
        fresh = SpecDecCache.for_model(self.model, self._limit)
        n = len(self._fed)
        forward_lm(self.model, torch.tensor([self._fed]), fresh, torch.arange(n)[None], None, 1, output_hidden=False)
        assert self.cache.length == n
        for kept, new in zip(self.cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(kept.keys[:, :, :n], new.keys[:, :, :n])  # [1, H, n, D]
            torch.testing.assert_close(kept.values[:, :, :n], new.values[:, :, :n])
        self.proposed += len(tree.tokens)
        return tree


@pytest.mark.parametrize("merges, context", [((), None), ((("a", "b"), ("4", "4")), None), ((), 16)])
def test_the_kept_draft_cache_holds_what_feeding_the_whole_text_again_would(merges, context):
    """``context``: the draft's position limit, below the text's length: its window moves."""
    draft = wide_draft(0.15, merges)
    if context:
        draft.config.max_position_embeddings = context
    d = Checked(draft, tokenizer=char_tokenizer(WIDE), num_speculative_tokens=3,
                draft_tokenizer=char_tokenizer("".join(WIDE[p] for p in WIDE_PERM), merges))
    d.proposed = 0
    out = SpeculativeDecoder(wide_target(), d).generate(WIDE_PROMPT, max_new_tokens=40, seed=0)
    assert d.proposed > 10 and out.stats.draft_acceptance_rate < 0.9  # rejected drafts were dropped from the cache
    assert torch.equal(out.sequences[0], greedy_reference(wide_target(), WIDE_PROMPT, 40))
    assert (d._offset > 0) == bool(context)


class Counted(Checked):
    """Checked, and the longest run of target ids decoded, and text encoded for the draft, in each step."""

    def propose(self, max_depth):
        self.decoded, self.encoded = 0, 0
        tree = super().propose(max_depth)
        self.steps.append((self.decoded, self.encoded))
        return tree


@pytest.mark.parametrize("merges, chars", [((), WIDE), ((("a", "b"), ("4", "4")), WIDE),
                                           ((), "\ufffd" + WIDE[1:])])  # the prompt's first character reads U+FFFD
def test_the_host_work_per_step_is_bounded_and_drafting_stays_aligned(merges, chars, monkeypatch):
    """With the anchor moving every few tokens (TAIL_TOKENS=12, KEEP_TOKENS=4) over 120 new tokens: each step
    decodes and encodes a bounded run (not the whole text), a U+FFFD in the text (not at a cut) included; the draft
    ids behind the anchor are the whole text's encoding where no merge crosses an anchor (a draft that is the
    target under other ids is still accepted at every step); output equals plain decoding; the draft cache equals
    a fresh feed of its ids."""
    import drafters.cross_tokenizer as ct

    monkeypatch.setattr(ct, "TAIL_TOKENS", 12)
    monkeypatch.setattr(ct, "KEEP_TOKENS", 4)
    target_tok = char_tokenizer(chars)
    d = Counted(wide_draft(0.0 if not merges else 0.15, merges), tokenizer=target_tok, num_speculative_tokens=3,
                draft_tokenizer=char_tokenizer("".join(chars[p] for p in WIDE_PERM), merges))
    d.proposed, d.steps = 0, []
    real_text, real_encode = ct._text, d._encode

    def counting_text(tokenizer, ids):
        if tokenizer is target_tok:
            d.decoded = max(d.decoded, len(ids))
        return real_text(tokenizer, ids)

    def counting_encode(text):
        d.encoded = max(d.encoded, len(text))
        return real_encode(text)

    monkeypatch.setattr(ct, "_text", counting_text)
    d._encode = counting_encode
    out = SpeculativeDecoder(wide_target(), d).generate(WIDE_PROMPT, max_new_tokens=120, seed=0)
    assert torch.equal(out.sequences[0], greedy_reference(wide_target(), WIDE_PROMPT, 120))
    later = d.steps[3:]  # after the first steps, whatever the text's length (129 tokens at the end)
    assert later and max(n for n, _ in later) <= 12 + ct.MAX_LOOKBEHIND + 3
    assert max(c for _, c in later) <= 12 + ct.MAX_LOOKBEHIND + 3 + ct.ANCHOR_CONTEXT
    assert d._anchor > 100
    if not merges:  # no merge can cross an anchor: the ids equal the whole text's
        assert d._anchor_ids + d._encode(real_text(target_tok, d.tokens[d._anchor:])) == \
            real_encode(real_text(target_tok, d.tokens))
    if chars == WIDE and not merges:  # the permuted draft stays aligned (U+FFFD near the end stops proposals)
        assert out.stats.tau == 4.0


def test_a_chunk_after_the_anchor_is_encoded_as_it_reads_there():
    """A tokenizer that marks where a text starts (SentencePiece's "▁", prepended by its normalizer) marks no start
    at an anchor: the chunk is encoded behind the text before it and that text's ids dropped."""
    from tokenizers import normalizers

    spm = char_tokenizer("▁" + WIDE)
    spm.backend_tokenizer.normalizer = normalizers.Prepend("▁")
    assert spm.encode("ab", add_special_tokens=False) == [0, 1, 2]  # "▁", "a", "b": a text's start is marked
    d = CrossTokenizerDrafter(wide_draft(0.0), tokenizer=char_tokenizer(WIDE), draft_tokenizer=spm)
    d._reset_text()
    assert d._encode_after("ab") == [0, 1, 2]  # no anchor yet: the text's own start
    d._anchor_end, d._anchor_end_ids = "xy", d._encode("xy")
    assert d._encode_after("ab") == [1, 2]  # as in "xyab": no "▁" before "a"


@pytest.mark.parametrize("setting, shape, rule", [c for c in cells(["ngram"]) if c[0] == "t1.0"])
def test_sampled_output_keeps_the_targets_distribution(setting, shape, rule):
    target, noisy = peaky_noisy_pair()
    check_cell(target, drafter(permuted(noisy, PERM), k=2), setting, rule)


def test_a_continuation_that_merges_into_the_last_committed_token_is_not_proposed():
    target, _ = peaky_pair()
    d = CrossTokenizerDrafter(permuted(target, PERM), tokenizer=char_tokenizer(CHARS, [("a", "b")]),
                              draft_tokenizer=char_tokenizer("".join(CHARS[p] for p in PERM)))
    d.tokens = [2, 0]  # "ca": "b" next would make the target's "ab" token, so "a" is not the target's last token
    assert d._target_tokens(("bcd", False)) == []
    assert d._target_tokens(("cdb", False)) == [2, 3]  # the last token may be a cut word: not proposed
    assert d._target_tokens(("cd", True)) == [2, 3]  # the draft ended (no EOS in this tokenizer)


def test_a_draft_that_ends_proposes_the_targets_eos_after_its_text():
    """The draft's EOS (id 7 of its tokenizer) ends the continuation; the target's own EOS (id 6) is proposed."""
    target, _ = peaky_pair()
    d = CrossTokenizerDrafter(permuted(target, PERM), tokenizer=char_tokenizer(CHARS, eos="<t>"), draft_tokens=4,
                              draft_tokenizer=char_tokenizer("".join(CHARS[p] for p in PERM), [("a", "b")], eos="<d>"))
    d.tokens = [2, 0]  # "ca"
    wanted = iter([d.draft_tokenizer.convert_tokens_to_ids(t) for t in ("d", "e", "<d>")])
    d._window, d._feed = (lambda ids: ids), (lambda window: torch.nn.functional.one_hot(torch.tensor(next(wanted)), 8))
    assert d._continue(d.draft_tokenizer.encode("ca")) == ("de", True)
    assert d._target_tokens(("de", True)) == [3, 4, 6]
    wanted = iter([d.draft_tokenizer.convert_tokens_to_ids(t) for t in ("d", "ab", "e", "f")])
    assert d._continue(d.draft_tokenizer.encode("ca")) == ("dabef", False)  # 4 draft tokens: cut, not ended


def test_the_text_behind_the_continuation_starts_at_a_whole_character():
    """A byte-level target whose last 4 tokens start inside a character: the run behind grows to its first byte."""
    from specdec.models import byte_tokenizer

    target, _ = peaky_pair()
    tok = byte_tokenizer()
    d = CrossTokenizerDrafter(target, tokenizer=tok, draft_tokenizer=char_tokenizer(CHARS))
    d.tokens = tok.encode("x\u00e9abc")  # x, é's two bytes, a, b, c
    assert d._behind() == d.tokens[-5:]
    assert d._target_tokens(("de", False)) == tok.encode("d")  # "é" was not cut: proposals come


def test_a_tokenizer_with_more_ids_than_its_model_reads_is_one_error():
    target, _ = peaky_pair()
    wide = CrossTokenizerDrafter(permuted(target, PERM), tokenizer=char_tokenizer(CHARS + "gh"),
                                 draft_tokenizer=char_tokenizer(CHARS))
    with pytest.raises(SpecDecError, match="the target's tokenizer has 8 tokens but the target reads 6"):
        SpeculativeDecoder(target, wide).generate(PROMPT, max_new_tokens=2, seed=0)
    with pytest.raises(SpecDecError, match="needs the target's tokenizer"):
        SpeculativeDecoder(target, CrossTokenizerDrafter(target, draft_tokenizer=char_tokenizer(CHARS))).generate(
            PROMPT, max_new_tokens=2, seed=0)
    with pytest.raises(SpecDecError, match="draft_tokens=0"):
        CrossTokenizerDrafter(target, draft_tokenizer=char_tokenizer(CHARS), draft_tokens=0)


def permuted_byte_tokenizer(perm: list[int]):
    """:func:`specdec.models.byte_tokenizer` with byte id j reading what byte id ``perm[j]`` reads there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {alphabet[p]: j for j, p in enumerate(perm)} | {"<|endoftext|>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_the_decode_command_drafts_across_tokenizers_at_batch_1_and_in_batches(prompts_file, tmp_path):  # noqa: F811
    """``drafter=cross_tokenizer drafter.draft=<dir>``: a saved draft with its own tokenizer (the smoke target with
    noise, under permuted byte ids); outputs match the baseline, batches equal batch 1, and the cost model counts
    ``draft_tokens`` draft forwards every step."""
    import json

    from experiments import decode
    from experiments.models_from_config import load_models

    target = load_models(compose_cfg(*tiny_args(prompts_file)).model).target
    perm = random.Random(1).sample(range(256), 256) + [256]
    draft = permuted(_with_noise(target, 0.05, 2), perm)
    draft.save_pretrained(tmp_path / "draft")
    permuted_byte_tokenizer(perm[:256]).save_pretrained(tmp_path / "draft")
    args = [*tiny_args(prompts_file, num_prompts=3, tokens=24), "drafter=cross_tokenizer",
            f"drafter.draft={tmp_path / 'draft'}", "drafter.num_speculative_tokens=3"]
    records = {}
    for size in (1, 2):
        summary = decode.run(compose_cfg(*args, f"batch_size={size}"), tmp_path / f"b{size}")
        assert summary["metrics"]["matches_baseline"] is True
        lines = (tmp_path / f"b{size}" / "records.jsonl").read_text().splitlines()
        records[size] = {(r["question_id"], r["method"]): r["tokens"] for r in map(json.loads, lines)}
    assert records[1] == records[2]
    assert summary["metrics"]["speculative"]["tau"] > 1.05  # random bytes are often no text: few proposals here
    shape = summary["drafter_shape"]
    assert (shape["draft_forwards"], shape["k"], shape["max_nodes"]) == ("fixed", 4, 3)


def test_the_cost_model_prices_draft_tokens_forwards_every_step_whatever_was_proposed():
    from experiments.costs import cost_model, draft_forwards_per_step
    from specdec.stats import DecodeStats

    target, _ = peaky_pair()
    shape = drafter(permuted(target, PERM), k=3, draft_tokens=5).step_shape(target).describe("cross_tokenizer")
    stats = DecodeStats()
    for proposed, source in ((3, "cross_tokenizer"), (0, None), (2, "ngram"), (0, None)):
        stats.record_step(proposed, proposed, 0, source)
    assert draft_forwards_per_step(stats, shape) == 5  # per_level would say (3 + 2) / 4
    # behind a lookup (a hybrid's draft_source): only the steps this part drafted
    assert draft_forwards_per_step(stats, {**shape, "draft_source": "cross_tokenizer"}) == 5 * 1 / 4
    metrics, model = cost_model(stats, {"target": {"1": 0.01, "5": 0.012}, "draft": {"1": 0.001}}, shape, 1.0, 1)
    assert metrics["recommended_k"] is None and "fixed number (5)" in model["note"]  # no k curve of k forwards
