"""Mutation pass 23: the batched chains (``drafters/batch_chain.py``, ``drafters/draft_model_batch.py``,
``drafters/eagle_batch.py``), the fixed-shape draft (``specdec/static_shape.py``), fused projections
(``verifier/fused_projections.py``), the cross-tokenizer drafter (``drafters/cross_tokenizer.py``), the CLI's
compose-time messages (``experiments/cli_messages.py``) and the decode run's cost model (``experiments/decode_costs.py``).
Most planted bugs there were caught by the existing tests; the tests here catch the ones that were not. Each test
names the planted bug it catches."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from drafters import DraftModelDrafter
from experiments.cli_messages import misspelled_key, null_value, wrong_type
from specdec import SamplingParams, SpecDecError
from specdec.batch_drafting import keyed_rows
from specdec.drafting import DraftContext
from specdec.models import tiny_random_pair
from specdec.types import AcceptResult
from tests.tiny_models import noisy_copy, pair, prompts

# --------------------------------------------------------------------------- the CLI's compose-time messages


def _not_in_struct(key: str) -> str:
    """Hydra's message for an override of a key the config does not have."""
    return (f"Could not override '{key}'.\nTo append to your config use +{key}=3\n"
            f"Key '{key.rsplit('.', 1)[-1]}' is not in struct\n    full_key: {key}")


def _cause(**node):
    """The exception Hydra chains: its ``parent_node`` is the config node the key was looked up in."""
    return SimpleNamespace(parent_node=OmegaConf.create(node))


def test_a_misspelled_key_is_matched_on_its_last_part_and_every_close_key_named():
    """``drafter.tre`` finds ``tree`` among the drafter's keys; ``max_ngam`` is close to two keys, both named
    (planted bugs: matching the whole dotted key, whose prefix makes it too far from every key, finds none; one
    close key at most)."""
    said = misspelled_key(_not_in_struct("drafter.tre"), _cause(tree="binary", num_speculative_tokens=4))
    assert said == "drafter.tre is not a key of this config: did you mean drafter.tree? --cfg job prints every key"
    said = misspelled_key(_not_in_struct("drafter.max_ngam"), _cause(max_ngram=3, min_ngram=1))
    assert said.startswith("drafter.max_ngam is not a key of this config: did you mean drafter.max_ngram or "
                           "drafter.min_ngram? ")


def test_a_key_from_elsewhere_is_followed_by_the_right_separator():
    """A hint that is a question is followed by a space, a statement by '; ' (planted bug: the two swapped)."""
    assert misspelled_key(_not_in_struct("temperature"), None) == (
        "temperature is not a key of this config: did you mean sampling.temperature? --cfg job prints every key")
    said = misspelled_key(_not_in_struct("max_rows"), None)
    assert said.startswith("max_rows is not a key of this config: the rows decoded at once are batch_size")
    assert said.endswith("e.g. batch_size=4; --cfg job prints every key")


def test_the_keys_there_are_listed_sorted_and_the_plus_hint_needs_a_parent_key():
    """Without a close key the node's keys are listed, sorted; a top-level key is never told to add itself with
    '+', even where its node has a ``_target_`` taking it (planted bugs: the keys unsorted; the ``prefix`` test
    dropped from the '+' hint)."""
    said = misspelled_key(_not_in_struct("zzz"), _cause(_target_="drafters.NGramDrafter", max_ngram=3, match="x"))
    assert said == ("zzz is not a key of this config: the keys there are ['_target_', 'match', 'max_ngram']; "
                    "--cfg job prints every key")
    top = misspelled_key(_not_in_struct("match"), _cause(_target_="drafters.NGramDrafter", max_ngram=3))
    assert "+match" not in top and "_target_ takes it" not in top, top
    nested = misspelled_key(_not_in_struct("drafter.match"), _cause(_target_="drafters.NGramDrafter", max_ngram=3))
    assert nested.endswith("; drafter's _target_ takes it as an argument: add it with a leading + (+drafter.match=...)")


def test_a_list_value_names_a_sweep_without_spaces_and_an_empty_list_none():
    """``batch_size=[2, 4]`` suggests ``-m batch_size=2,4`` (a space would split the shell word); ``[]`` suggests
    no sweep (planted bugs: the spaces kept; the length test dropped, suggesting ``-m batch_size=``)."""
    message = "Error merging override batch_size={0}. Value '{0}' of type 'list' could not be converted to Integer"
    assert wrong_type(message.format("[2, 4]")) == (
        "batch_size='[2, 4]': batch_size takes a whole number; to run several values, sweep them: -m batch_size=2,4")
    assert wrong_type(message.format("[]")) == "batch_size='[]': batch_size takes a whole number"


@pytest.mark.parametrize("null", ["null", "None", "~"])
def test_every_spelling_of_null_is_named_as_given(null):
    """Hydra reads ``~`` and ``None`` as null too: the message names the value the user typed (planted bugs: ``~``
    left out of the pattern; the value always echoed as ``null``)."""
    said = null_value(f"Error merging override batch_size={null}. field 'batch_size' is not Optional")
    assert said == (f"batch_size={null}: batch_size cannot be null, give it a value (--cfg job prints every key's "
                    "default)")


# --------------------------------------------------------------------------- the decode run's cost model


def _chain_stats(steps: int = 4):
    """A chain run's stats: ``steps`` steps of 2 drafts with 1 accepted, 2 tokens each."""
    from specdec.stats import DecodeStats

    stats = DecodeStats()
    for _ in range(steps):
        stats.record_step(2, 2, 1)
    stats.new_tokens = 2 * steps
    return stats


def test_the_cost_model_keeps_the_runs_warnings_and_prices_every_prompts_prefill():
    """Two prompts' stats with a measured target prefill: the summary gets the cost model of both prompts (each
    prefilled once), its efficiency against the measured speedup, and keeps the warnings it had (planted bugs: the
    prompt count fixed at 1, the measured speedup dropped, the run's earlier warnings replaced by the model's)."""
    from experiments.costs import cost_model
    from experiments.decode_costs import add_cost_model
    from experiments.results import MethodResults
    from specdec.stats import DecodeStats

    costs = {"target": {1: 1.0, 2: 1.2, 3: 1.4}, "draft": {1: 0.1}, "prefill": {"target": 20.0, "draft": 2.0}}
    shape = {"kind": "chain", "draft_forwards": "per_level", "draft_source": None}
    spec = MethodResults(stats=[_chain_stats(), _chain_stats()])
    summary = add_cost_model({"metrics": {"speedup": 1.1}, "warnings": ["an earlier warning"]}, spec, costs, shape)
    wanted, _ = cost_model(DecodeStats.merge(spec.stats), costs, shape, 1.1, 2)
    assert summary["metrics"]["predicted_speedup"] == pytest.approx(wanted["predicted_speedup"])
    assert wanted["predicted_speedup"] != pytest.approx(cost_model(DecodeStats.merge(spec.stats), costs, shape, 1.1,
                                                                   1)[0]["predicted_speedup"])  # the count matters
    assert summary["metrics"]["efficiency"] == pytest.approx(1.1 / wanted["predicted_speedup"])
    assert summary["warnings"][0] == "an earlier warning"


def test_a_run_without_costs_says_why_in_its_cost_model():
    """No costs measured: the cost model's note is the one the run gave (planted bug: the note dropped, the
    summary says ``costs=false`` for a run that asked for costs)."""
    from experiments.decode_costs import add_cost_model
    from experiments.results import MethodResults

    summary = add_cost_model({"metrics": {}}, MethodResults(stats=[_chain_stats()]), None, {"kind": "chain"},
                             "batch_size=3: no predicted speedup")
    assert summary["cost_model"]["note"] == "batch_size=3: no predicted speedup"
    assert summary["metrics"]["predicted_speedup"] is None


def test_auto_widths_without_a_curve_warn_and_a_failed_measurement_is_no_failed_run(monkeypatch, capsys):
    """``verify_widths=auto`` without a measured curve leaves the verifier unpadded with a warning, with one it
    takes every cheap width; a measurement that raises is a warning and no costs, never a lost run (planted bugs:
    the missing-curve return dropped, a ``TypeError`` on None; width 1 dropped; the ``except`` narrowed to
    ``ValueError``)."""
    from experiments import cost_measure
    from experiments.decode_costs import measure_run_costs, set_cheap_widths

    decoder = SimpleNamespace(verifier=SimpleNamespace(verify_widths=()))
    set_cheap_widths(decoder, None)
    assert decoder.verifier.verify_widths == () and "verifies are not padded" in capsys.readouterr().err
    set_cheap_widths(decoder, {"target": {1: 8.9, 2: 13.6, 3: 14.7, 4: 12.5, 5: 12.7, 6: 13.7}})
    assert tuple(decoder.verifier.verify_widths) == (1, 4, 5, 6)  # width 1 kept: one-token verifies stay unpadded

    def fails(*args):
        raise RuntimeError("no timer")

    monkeypatch.setattr(cost_measure, "measure_run_costs", fails)
    cfg = OmegaConf.create({"costs": True, "max_new_tokens": 4, "attn_backend": "sdpa"})
    encoded = [SimpleNamespace(input_ids=torch.zeros(1, 5, dtype=torch.long))]  # [1, T]
    assert measure_run_costs(cfg, "shape", SimpleNamespace(target=None), encoded) is None
    assert "forward-cost measurement failed (RuntimeError: no timer)" in capsys.readouterr().err


# --------------------------------------------------------------------------- fused projections


def test_narrow_linears_are_fused_and_every_group_is_counted():
    """A target whose linears are narrow (the CPU default) still fuses, two groups per layer, all counted, with
    the same logits (planted bugs: only plain ``nn.Linear`` fused; the count set to 1 instead of incremented)."""
    import copy

    from verifier.fused_projections import FusedPart, fuse_projections
    from verifier.narrow_linear import use_narrow_linears

    target = copy.deepcopy(pair("llama")[0])
    ids = torch.arange(3, 12)[None]  # [1, 9]
    with torch.no_grad():
        ref = target(ids).logits  # [1, 9, V]
    assert use_narrow_linears(target, product="transposed")
    assert fuse_projections(target) == 2 * target.config.num_hidden_layers
    assert type(target.model.layers[0].self_attn.q_proj) is FusedPart and target.model.layers[0].mlp.up_proj.last
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- batched draft-model chains


def _chain(draft, rows: list[list[int]], k: int = 3):
    """A batched draft-model chain on the llama target, started and extended with ``rows``."""
    chain = DraftModelDrafter(draft, num_speculative_tokens=k).batched()
    chain.start(DraftContext(pair("llama")[0], SamplingParams(), keyed_rows(list(range(len(rows))), "cpu"), 96))
    chain.extend(rows, None)
    return chain


def test_a_step_that_drafts_nothing_leaves_the_draft_cache_behind():
    """A step whose rows may draft nothing (depth 0) feeds no draft forward: the draft cache stays at the prompt
    less its root, and the commit must not move it past what was written (planted bug: ``set_lengths(seen)``
    without the ``min`` with the written lengths marks the unwritten root and bonus slots as held)."""
    rows = [ids[0].tolist() for ids in prompts(pair("llama")[2], 2, seed=5)]
    chain = _chain(noisy_copy("llama"), rows)
    trees = chain.propose([0, 0])
    assert [t.num_nodes for t in trees] == [0, 0] and chain.drafted == [0, 0]
    chain.commit([AcceptResult(accepted_nodes=[], tokens=[7]) for _ in rows], None)
    assert list(chain.cache.host_lengths) == [len(r) - 1 for r in rows]  # behind: caught up on the next step
    assert [len(t) for t in chain.tokens] == [len(r) + 1 for r in rows]


def test_a_draft_of_another_vocabulary_is_refused_when_the_batched_chain_starts():
    """The batched chain checks the draft's vocabulary against the target's at start, as the batch-1 drafter does
    (planted bug: the check dropped; drafts would index the target's distributions out of range)."""
    other = tiny_random_pair("llama", vocab=100)[1]
    with pytest.raises(SpecDecError, match=r"draft model vocabulary \(100 tokens\) does not match"):
        _chain(other, [[1, 2, 3]])


# --------------------------------------------------------------------------- batched EAGLE chains


def test_pairs_queued_over_a_step_without_head_forwards_keep_one_feature_per_token(monkeypatch):
    """Both rows' first step is the lookup's, so the EAGLE part runs no head forward and its commit queues the new
    pairs behind the pending ones: every row keeps one feature per pending token, and rows equal their batch-1
    runs (planted bug: the queued features replaced by the new ones; a single one broadcasts over two tokens)."""
    from drafters import HybridDrafter, NGramDrafter
    from drafters.eagle_batch import BatchEagleChain
    from specdec import SpeculativeDecoder
    from tests.lossless import NGRAM_PROMPT
    from tests.test_hybrid import _batch_second

    commit, queued = BatchEagleChain.commit, []

    def checked(self, results, verify):
        commit(self, results, verify)
        for f, t in self.pending:
            assert f.shape[0] == len(t), (tuple(f.shape), t)  # [m, H] per m pending tokens
            queued.append(len(t))

    monkeypatch.setattr(BatchEagleChain, "commit", checked)
    rows = [NGRAM_PROMPT, torch.cat([torch.tensor([[3]]), NGRAM_PROMPT], 1)]  # [1, 5], [1, 6]

    def make():
        return HybridDrafter(NGramDrafter(num_speculative_tokens=3, max_ngram=3, min_ngram=2),
                             _batch_second("eagle3", "llama"))

    out = SpeculativeDecoder(pair("llama")[0], make()).generate_batch(rows, max_new_tokens=8, seed=0)
    assert max(queued) >= 2, "no pairs were queued behind pending ones: the case tests nothing"
    for i, ids in enumerate(rows):
        assert out.sequences[i].tolist() == SpeculativeDecoder(pair("llama")[0], make()).generate(
            ids, max_new_tokens=8, seed=i).sequences.tolist()


# --------------------------------------------------------------------------- the fixed-shape draft


def test_only_a_chain_preset_is_a_chain_shape():
    """A chain's accepted drafts are already in place, so the fixed-shape step skips their compaction: the shape of
    ``chain_paths`` says it is a chain, a tree's does not (planted bug: ``is_chain`` always False, compacting every
    chain step for nothing)."""
    from specdec.static_shape import StaticShape
    from specdec.tree import chain_paths, compile_tree

    assert StaticShape(compile_tree(chain_paths(4)), "chain", "cpu").is_chain
    assert not StaticShape(compile_tree([[0], [1], [0, 0]]), "deterministic", "cpu").is_chain


# --------------------------------------------------------------------------- the cross-tokenizer drafter


def test_a_draft_too_short_for_its_draft_tokens_after_a_context_is_refused():
    """A draft that sees 12 positions leaves 7 after ``draft_tokens=4`` (k + 1) and its input: fewer than the two
    look-behind runs (8) a context needs, so the run is refused naming the setting (planted bug: one run's 4
    positions asked for, the draft then decodes from a context too short to re-encode behind)."""
    from drafters import CrossTokenizerDrafter
    from specdec import SpeculativeDecoder
    from tests.test_cross_tokenizer import CHARS, PERM, PROMPT, char_tokenizer, permuted
    from tests.tiny_models import peaky_pair

    target, _ = peaky_pair()
    draft = permuted(target, PERM)
    draft.config.max_position_embeddings = 12
    d = CrossTokenizerDrafter(draft, tokenizer=char_tokenizer(CHARS), num_speculative_tokens=3,
                              draft_tokenizer=char_tokenizer("".join(CHARS[p] for p in PERM)))
    with pytest.raises(SpecDecError, match=r"sees 12 positions, too few for drafter.draft_tokens=4"):
        SpeculativeDecoder(target, d).generate(PROMPT, max_new_tokens=2, seed=0)


def test_text_after_a_cut_inside_a_character_is_none():
    """Byte-level target tokens of "xéab": the text after é's first byte does not read as a suffix of the text
    before it (None: the caller encodes the whole text again); after whole characters it is the rest (planted bug:
    the prefix check dropped, a cut character's bytes read as text)."""
    from drafters import CrossTokenizerDrafter
    from specdec.models import byte_tokenizer
    from tests.test_cross_tokenizer import CHARS, char_tokenizer
    from tests.tiny_models import peaky_pair

    tok = byte_tokenizer()
    d = CrossTokenizerDrafter(peaky_pair()[0], tokenizer=tok, draft_tokenizer=char_tokenizer(CHARS))
    d.tokens = tok.encode("x\u00e9ab")  # x, é's two bytes, a, b
    assert [d._text_after(i, 5) for i in range(5)] == ["x\u00e9ab", "\u00e9ab", None, "ab", "b"]


def test_a_chunk_whose_first_token_merges_into_the_anchor_is_encoded_alone():
    """Behind the anchor's "ca" the chunk "bd" encodes as "c", "ab", "d": the anchor's own ids ("c", "a") do not
    begin it, so the chunk is encoded alone, not cut after two ids (planted bug: the head check dropped, "b" lost)."""
    from drafters import CrossTokenizerDrafter
    from tests.test_cross_tokenizer import CHARS, char_tokenizer
    from tests.tiny_models import peaky_pair

    d = CrossTokenizerDrafter(peaky_pair()[0], tokenizer=char_tokenizer(CHARS),
                              draft_tokenizer=char_tokenizer(CHARS, [("a", "b")]))
    d._reset_text()
    d._anchor_end, d._anchor_end_ids = "ca", d._encode("ca")
    assert d._encode("cabd") == [2, 6, 3] and d._encode_after("bd") == [1, 3]
    assert d._encode_after("dd") == [3, 3]  # no token spans the two: the anchor's ids dropped


def test_the_window_never_starts_past_a_shrunken_encoding_and_a_new_run_starts_afresh():
    """The text's draft ids may shrink (bytes became a character): the window still holds the last id. A second run
    of the same drafter drafts as the first (planted bugs: the offset left past the ids, an empty window; the fed ids
    and the offset kept from the last run, a fresh draft cache read as holding them)."""
    from specdec import SpeculativeDecoder
    from tests.test_cross_tokenizer import WIDE, WIDE_PERM, WIDE_PROMPT, drafter, wide_draft, wide_target

    d = drafter(wide_draft(0.15), 3, (), WIDE, WIDE_PERM)
    d._limit, d._offset = 64, 10
    assert d._window(list(range(5))) == [4]
    runs = [SpeculativeDecoder(wide_target(), d).generate(WIDE_PROMPT, max_new_tokens=16, seed=0) for _ in range(2)]
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()
    assert runs[0].stats.accepted_per_step == runs[1].stats.accepted_per_step
