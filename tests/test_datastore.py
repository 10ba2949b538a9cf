"""The REST-style datastore behind prompt lookup (:mod:`drafters.datastore`, ``NGramDrafter(datastore=...)``).

- Its statistics: the most frequent continuation of the longest known suffix, within rows only, and only where it
  is frequent (``min_count``) and dominant (``min_share``) enough; chains extend greedily.
- The n-gram drafter takes the context's own match first and the datastore where there is none.
- Greedy decoding with it (alone and in front of Medusa heads, merged or not) equals ``generate``; ``rejection``
  reproduces the target's exact distribution, and a planted bug fails the same test.
- A chat-rows file builds it (answers only); a missing or foreign file is one ConfigError.
"""
from __future__ import annotations

import re

import pytest
import torch

from drafters import MedusaDrafter, NGramDrafter
from drafters.datastore import Datastore, load_datastore
from drafters.hybrid import behind_lookup
from drafters.medusa_heads import MedusaHeads
from experiments.chat_data import ChatRows, save_rows
from specdec import SpeculativeDecoder
from specdec.drafting import DraftContext
from specdec.errors import ConfigError
from tests.greedy import check_greedy, greedy_cases
from tests.lossless import SETTINGS, VOCAB, check_cell
from tests.tiny_models import pair, peaky_pair, prompts


def test_statistics_take_the_longest_known_suffix_and_its_most_frequent_continuation():
    rows = [[1, 2, 3, 4], [1, 2, 3, 4], [9, 2, 3, 5], [7, 2, 3, 5], [8, 2, 3, 5]]
    store = Datastore(rows, min_ngram=2, max_ngram=3, min_count=1, min_share=0.0)
    assert store.next_token([1, 2, 3]) == 4  # "1 2 3" -> 4 (twice), though "2 3" -> 5 more often
    assert store.next_token([6, 2, 3]) == 5  # unknown 3-gram: "2 3" -> 5 (3 of 5)
    assert store.next_token([4, 1]) is None  # rows do not run into each other: "4 1" never occurred
    assert store.chain([0, 1, 2], 5) == [3, 4]  # greedy, until no known suffix continues
    assert len(store) == len(store.best) > 0 and store.tokens == 20


def test_rare_or_ambiguous_continuations_are_not_drafted():
    rows = [[1, 2, 3], [1, 2, 4], [5, 6, 7]]
    assert Datastore(rows, 2, 2, min_count=1, min_share=0.5).next_token([1, 2]) in (3, 4)  # 1 of 2: a half
    assert Datastore(rows, 2, 2, min_count=1, min_share=0.6).next_token([1, 2]) is None
    assert Datastore(rows, 2, 2, min_count=2, min_share=0.0).next_token([5, 6]) is None  # seen once
    with pytest.raises(ConfigError, match="min_ngram <= max_ngram"):
        Datastore(rows, 3, 2)
    with pytest.raises(ConfigError, match="min_share"):
        Datastore(rows, 1, 2, min_share=1.5)
    for bad, says in (({"min_ngram": 2.5}, "datastore min_ngram=2.5: it must be an integer"),
                      ({"max_ngram": 3.0}, "datastore max_ngram=3.0"), ({"min_count": True}, "datastore min_count=True"),
                      ({"min_share": "0.5"}, "datastore min_share='0.5': it must be a number in")):
        with pytest.raises(ConfigError, match=re.escape(says)):  # 2.5 was truncated to 2 without a word
            Datastore(rows, **({"min_ngram": 1, "max_ngram": 3} | bad))


def _proposal(drafter, tokens):
    drafter.start(DraftContext(target=None, sampling=None, rng=None, capacity=64))
    drafter.tokens = list(tokens)
    return drafter.propose(8).tokens.tolist()


def test_lookup_prefers_the_context_then_the_datastore():
    store = Datastore([[4, 5, 6, 7, 8]] * 2, min_ngram=2, max_ngram=2)
    drafter = NGramDrafter(3, max_ngram=2, min_ngram=2, datastore=store)
    assert _proposal(drafter, [4, 5, 9, 9, 4, 5]) == [9, 9, 4]  # the context's own earlier "4 5"
    assert _proposal(drafter, [1, 4, 5]) == [6, 7, 8]  # none in the context: the datastore's
    assert _proposal(drafter, [1, 2, 3]) == []
    assert _proposal(NGramDrafter(3, max_ngram=2, min_ngram=2), [1, 4, 5]) == []


@pytest.fixture(scope="module")
def tiny():
    target, _, tok = pair("llama")
    cases = greedy_cases(target, prompts(tok, 10, seed=6), len(tok) - 1)
    rows = [target.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=0)[0].tolist()
            for ids in prompts(tok, 30, seed=7)]  # the target's own text, as a datastore is built from
    return target, cases, Datastore(rows, min_ngram=1, max_ngram=3, min_count=1, min_share=0.0)


def test_greedy_with_a_datastore_equals_plain_decoding(tiny):
    target, cases, store = tiny
    tau = check_greedy(target, NGramDrafter(6, max_ngram=3, min_ngram=3, datastore=store), cases)
    assert tau > 1.0  # the datastore's chains are accepted at times
    heads = MedusaHeads.for_target(target, 2, init="random", seed=0)
    for merge in (False, True):
        check_greedy(target, behind_lookup(MedusaDrafter(heads, tree_nodes=5), 6, 3, merge, store), cases)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("rule", ["rejection", "p_not_zeroed"])
def test_rejection_with_datastore_chains_is_lossless(setting, rule):
    target, _ = peaky_pair(VOCAB)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (40, 3), generator=gen)  # [40, 3]
    torch.manual_seed(0)
    rows = target.generate(starts, attention_mask=torch.ones_like(starts), do_sample=True, max_new_tokens=6,
                           pad_token_id=0).tolist()  # the target's own samples
    store = Datastore(rows, min_ngram=1, max_ngram=2, min_count=1, min_share=0.0)
    check_cell(target, NGramDrafter(3, max_ngram=5, min_ngram=5, datastore=store), setting, rule)


def test_chat_rows_build_it_and_bad_files_are_one_error(tmp_path):
    ids = torch.tensor([[10, 11, 12, 1, 2, 3, 0], [13, 12, 1, 2, 4, 4, 4]])  # [2, T]: prompt, answer, padding
    save_rows(ChatRows(ids, torch.tensor([6, 7]), torch.tensor([3, 3]), 0), tmp_path / "rows.safetensors")
    store = Datastore.from_chat_rows(tmp_path, min_ngram=1, max_ngram=2, min_count=1, min_share=0.0)
    assert store.tokens == 2 * 2 + 3 + 4  # each answer with max_ngram prompt tokens before it
    assert store.next_token([11, 12]) == 1 and store.next_token([3]) is None  # padding never counted
    assert load_datastore(str(tmp_path)) is load_datastore(str(tmp_path))  # built once, shared
    with pytest.raises(ConfigError, match="no rows.safetensors there"):
        Datastore.from_chat_rows(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "rows.safetensors").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="not a chat-rows file"):
        NGramDrafter(4, datastore=str(tmp_path / "bad"))


def test_the_drafters_datastore_errors_name_its_settings_and_come_before_any_model(tmp_path):
    """A datastore's errors name the n-gram drafter's keys (``drafter.datastore``, ``..._min_ngram``,
    ``..._min_share``; a hybrid's part's at its place), and ``check_files`` raises them from the config alone."""
    from omegaconf import OmegaConf

    from experiments.drafter_config import check_drafter_files

    with pytest.raises(ConfigError, match=r"^drafter\.datastore=.*missing: no rows\.safetensors"):
        NGramDrafter(4, datastore=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"^drafter\.datastore_min_ngram=0: "):
        NGramDrafter(4, datastore=str(tmp_path), datastore_min_ngram=0)
    for share in (1.5, -0.1, "x", True):
        with pytest.raises(ConfigError, match=r"^drafter\.datastore_min_share=.*in \[0, 1\]"):
            NGramDrafter(4, datastore=str(tmp_path), datastore_min_share=share)
    with pytest.raises(ConfigError, match="^--datastore="):
        Datastore.from_chat_rows(tmp_path, key="--datastore")
    ngram = {"_target_": "drafters.NGramDrafter", "datastore": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match=r"^drafter\.datastore=.*no rows\.safetensors"):
        check_drafter_files(OmegaConf.create(ngram))
    with pytest.raises(ConfigError, match=r"^drafter\.datastore_min_share=2"):
        check_drafter_files(OmegaConf.create({**ngram, "datastore_min_share": 2}))
    hybrid = OmegaConf.create({"_target_": "drafters.HybridDrafter", "first": ngram,
                               "second": {"_target_": "drafters.NGramDrafter"}})
    with pytest.raises(ConfigError, match=r"^drafter\.first\.datastore=.*no rows\.safetensors"):
        check_drafter_files(hybrid)
    check_drafter_files(OmegaConf.create({"_target_": "drafters.NGramDrafter", "datastore": None}))
    # without a datastore too (a trial's drafter=ngram drafter.datastore_min_share=2 ran without a word)
    with pytest.raises(ConfigError, match=r"^drafter\.datastore_min_share=2"):
        check_drafter_files(OmegaConf.create({"_target_": "drafters.NGramDrafter", "datastore_min_share": 2}))
    with pytest.raises(ConfigError, match=r"^drafter\.datastore_min_ngram=0"):
        NGramDrafter(4, datastore_min_ngram=0)


def test_rows_of_another_tokenizer_are_one_error_when_a_run_starts(tmp_path):
    """A datastore written by a model with a larger vocabulary (SmolLM2's rows beside the embedded pair) was taken,
    and the run failed at the first step it drafted from it, blaming the drafter's proposal; now the drafter's start
    refuses it, naming the setting and the rows' file (and a hybrid's part by its place)."""
    target = pair("llama")[0]
    vocab = target.config.vocab_size
    ids = torch.tensor([[1, 2, 3, vocab + 5, 4, 0]])  # [1, T]: an id past this target's vocabulary
    save_rows(ChatRows(ids, torch.tensor([5]), torch.tensor([2]), 0), tmp_path / "rows.safetensors")
    drafter = NGramDrafter(4, datastore=str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^drafter\.datastore={tmp_path}: its rows hold token id {vocab + 5}, "
                                          rf"outside the target's vocabulary of {vocab} ids: .*another tokenizer"):
        drafter.start(DraftContext(target=target, sampling=None, rng=None, capacity=64))
    hybrid = behind_lookup(NGramDrafter(4), datastore=drafter.datastore)
    with pytest.raises(ConfigError, match=r"^drafter\.first\.datastore="):
        SpeculativeDecoder(target, hybrid).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    store = Datastore([[1, 2, 3, vocab - 1]], min_count=1)
    NGramDrafter(4, datastore=store).start(DraftContext(target, None, None, 64))  # its largest id inside it: fine
