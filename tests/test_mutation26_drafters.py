"""Mutation pass 26: the cross-tokenizer drafter's text helpers, draft vocabularies, padded drafts, head files, the
heads cached for pretrained targets and the separator of the heads' training rows (each test names the planted bug
it catches)."""
from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file

from drafters import CrossTokenizerDrafter, EagleDrafter, MedusaDrafter
from drafters import head_files as hf
from drafters.draft_vocab import DraftVocabHead, frequent_tokens, vocab_of, with_draft_vocab
from drafters.vocab_padding import ClampedEmbedding, padded_to
from experiments import head_data
from experiments.pretrained import model_dir
from experiments.pretrained_heads import _kind, pretrained_heads
from specdec.errors import ConfigError, SpecDecError
from tests.test_cross_tokenizer import CHARS, char_tokenizer
from tests.test_mutation24_data import _llama
from tests.test_pretrained_heads import _cfg, _heads


class _HeadsError(SpecDecError):
    pass


FMT = hf.HeadFormat("Test heads", "w.safetensors", "c.json", 3, "python -m experiments.train_x", _HeadsError,
                    ("hidden_size",))


# --- experiments/pretrained_heads.py -------------------------------------------------------------------------


def test_eagle2_heads_are_taken_before_eagle3_heads_when_the_version_is_null(tmp_path):
    """With both cached, version=null takes eagle2's even when eagle3's are newer (planted bug: eagle3 tried
    first)."""
    entry = model_dir("smollm2", tmp_path).name
    eagle2 = _heads(tmp_path, "eagle", f"eagle2-{entry}-0000000000", age=100)
    _heads(tmp_path, "eagle", f"eagle3-{entry}-1111111111")
    cfg = _cfg(tmp_path, "drafter=eagle")
    pretrained_heads(cfg)
    assert cfg.drafter.heads == str(eagle2)


def test_subclasses_of_the_head_drafters_have_their_kind():
    """A subclass of MedusaDrafter / EagleDrafter is of that kind (planted bug: ``cls is MedusaDrafter``, and the
    same for EAGLE); a non-class is none."""
    medusa = type("MyMedusa", (MedusaDrafter,), {})
    eagle = type("MyEagle", (EagleDrafter,), {})
    assert (_kind(MedusaDrafter), _kind(medusa)) == ("medusa", "medusa")
    assert (_kind(EagleDrafter), _kind(eagle)) == ("eagle", "eagle")
    assert _kind(None) is None and _kind(CrossTokenizerDrafter) is None


def test_an_unfinished_training_is_named_when_no_heads_are_cached(tmp_path):
    """A directory holding only ``checkpoint.pt`` is named as an unfinished training (planted bug: the checkpoint
    looked for under the config's name)."""
    entry = model_dir("smollm2", tmp_path).name
    run = tmp_path / "medusa" / f"{entry}-0000000000"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"the training at {run} has not finished"):
        pretrained_heads(_cfg(tmp_path, "drafter=medusa"))


# --- experiments/head_data.py --------------------------------------------------------------------------------


def _chunks(monkeypatch, tokenizer, texts, context: int = 3) -> list[list[int]]:
    """``token_chunks`` over ``texts`` as the corpus (no files read)."""
    from experiments import corpus
    from experiments.zoo import tokenizer as zoo_tokenizer

    monkeypatch.setattr(corpus, "default_corpus_root", lambda: "root")
    monkeypatch.setattr(corpus, "corpus_files", lambda split: [])
    monkeypatch.setattr(corpus, "hash_order", lambda files: files)
    monkeypatch.setattr(zoo_tokenizer, "iter_texts", lambda files, max_chars: iter(texts))
    return head_data.token_chunks(tokenizer, "train", 100, context).tolist()


class _Tok:
    """A tokenizer without a fast backend: each text's ids are ``len(text) + 10``, once per character."""

    backend_tokenizer = None

    def __init__(self, bos: str | None, bos_id: int | None, eos_id: int | None):
        self.bos_token, self.bos_token_id, self.eos_token_id = bos, bos_id, eos_id

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [10 + len(text)] * len(text)}


def test_a_chat_turn_bos_is_replaced_by_eos_as_the_separator(monkeypatch):
    """SmolLM2's BOS ``<|im_start|>`` opens a chat turn: files are separated by EOS (planted bug: the chat-turn
    check dropped, or the BOS kept whatever it reads)."""
    assert _chunks(monkeypatch, _Tok("<|im_start|>", 1, 2), ["ab", "c"]) == [[2, 12, 12]]
    assert _chunks(monkeypatch, _Tok("<|im_start|>", 1, 2), ["ab", "cd"], context=2) == [[2, 12], [12, 2], [12, 12]]


def test_a_plain_bos_separates_files_and_no_bos_falls_back_to_eos(monkeypatch):
    """A BOS that is not a chat-turn marker stays the separator (planted bug: EOS always); none falls back to EOS
    (planted bug: the None check dropped)."""
    assert _chunks(monkeypatch, _Tok("<s>", 1, 2), ["ab", "cd"], context=2) == [[1, 12], [12, 1], [12, 12]]
    assert _chunks(monkeypatch, _Tok(None, None, 2), ["ab", "cd"], context=2) == [[2, 12], [12, 2], [12, 12]]
    assert _chunks(monkeypatch, _Tok(None, None, None), ["ab", "cd"], context=2) == [[12, 12], [12, 12]]


# --- drafters/draft_vocab.py ---------------------------------------------------------------------------------


def test_a_frozen_head_over_scattered_ids_reads_those_rows():
    """Ids that start at 0 but skip some are gathered (planted bug: the in-place view taken when ``ids[0] == 0``),
    and ``0 .. Vd - 1`` read the first rows in place."""
    weight = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))  # [V, H]
    ids = torch.tensor([0, 2, 5])
    head = DraftVocabHead.over(ids, 8, 4, weight, trainable=False)
    assert torch.equal(head.rows, weight[ids])
    first = DraftVocabHead.over(torch.arange(3), 8, 4, weight, trainable=False)
    assert first.rows.data_ptr() == weight.data_ptr() and torch.equal(first.rows, weight[:3])
    out = head(torch.ones(1, 4))  # [1, 8]
    assert torch.isinf(out[0, [1, 3, 4, 6, 7]]).all() and torch.allclose(out[0, ids], weight[ids].sum(-1))


def test_columns_map_labels_outside_the_draft_vocabulary_to_the_ignore_index():
    """A label outside ``ids`` is ``ignore_index`` (planted bug: the table filled with column 0)."""
    head = DraftVocabHead(8, 3, 4)
    head.set_vocab(torch.tensor([1, 4, 6]))
    assert head.columns(torch.tensor([[1, 4, 6, 0, 7]])).tolist() == [[0, 1, 2, -100, -100]]
    assert head.columns(torch.tensor([2, 6]), ignore_index=-1).tolist() == [-1, 2]


def test_frequent_tokens_skip_ids_outside_the_vocabulary_and_break_ties_by_id():
    """Padding ids (-100) and ids past the vocabulary are not counted, ``always`` ids out of range are ignored
    (planted bug: the lower bound dropped), and equal counts go to the lower id."""
    rows = torch.tensor([[-100, -100, -100, 3, 1, 5, 9, 9]])
    assert frequent_tokens([rows, None], 2, 8, always=[-1, 12]).tolist() == [1, 3]
    assert frequent_tokens([rows], 20, 8).tolist() == list(range(8))


def test_vocab_of_reads_the_lm_heads_ids_only(tmp_path):
    """The ids saved under ``...lm_head.ids`` (planted bug: any key ending in ``ids``, here a head's position ids
    sorted first)."""
    save_file({"a.position_ids": torch.arange(5), "heads.lm_head.ids": torch.tensor([0, 3, 4]),
               "heads.w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    assert vocab_of(tmp_path).tolist() == [0, 3, 4]


def test_a_draft_vocabulary_view_leaves_the_models_config_alone():
    """The view's config records the draft vocabulary and emitted size; the model's is untouched (planted bug: the
    config shared, not copied)."""
    model = _llama()
    view = with_draft_vocab(model, torch.tensor([0, 5, 9]), vocab=70)
    assert view.config.draft_vocab_size == 3 and view.config.vocab_size == 70
    assert model.config.vocab_size == 64 and not hasattr(model.config, "draft_vocab_size")
    assert model.get_output_embeddings() is model.lm_head and isinstance(view.lm_head, DraftVocabHead)


# --- drafters/vocab_padding.py -------------------------------------------------------------------------------


def test_a_draft_with_more_rows_than_the_target_is_cut_to_the_targets_size():
    """A draft of 64 rows beside a 48-row target emits 48 logits, its own (planted bug: ``max`` of the rows), and
    its embedding, big enough, is not wrapped (planted bug: wrapped when the table is as large as ``vocab``)."""
    model = _llama()
    view = padded_to(model, 48)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out, full = view(ids).logits, model(ids).logits  # [1, 3, 48], [1, 3, 64]
    assert out.shape == (1, 3, 48) and torch.allclose(out, full[..., :48])
    assert view.get_input_embeddings() is model.get_input_embeddings()
    assert padded_to(model, 64).get_input_embeddings() is model.get_input_embeddings()
    wider = padded_to(model, 65)
    assert isinstance(wider.get_input_embeddings(), ClampedEmbedding)
    assert not isinstance(model.get_input_embeddings(), ClampedEmbedding)


# --- drafters/head_files.py ----------------------------------------------------------------------------------


def _fp(**extra) -> dict:
    base = {"model_type": "llama", "hidden_size": 32, "vocab_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "sha256": "a", "probe": [1.0, 2.0]}
    return base | extra


def test_same_target_compares_norms_shape_and_probes():
    """Norms of another length are another target (planted bug: the shape check dropped: an error), differing
    norms are refused even with equal sha256 (planted bug: sha256 compared first), no probes match nothing (planted
    bug: the empty check dropped), a differing shape field is another target (planted bug: fields not compared)."""
    assert hf.same_target(_fp(sha256="a"), _fp(sha256="b", probe=[1.001, 2.0]))
    assert not hf.same_target(_fp(norms=[1.0, 2.0]), _fp(norms=[1.0, 2.0, 3.0]))
    assert not hf.same_target(_fp(norms=[1.0, 2.0]), _fp(norms=[1.0, 3.0]))
    assert not hf.same_target(_fp(sha256="a", probe=[]), _fp(sha256="b", probe=[]))
    assert not hf.same_target(_fp(sha256="a"), _fp(sha256="b", num_hidden_layers=3))
    assert hf.same_target(_fp(norms=[1.0]), _fp(sha256="b", probe=[1.0, 2.0001]))  # one side without norms: probes


def test_check_target_refuses_another_vocabulary_alone():
    """Same hidden size, another vocabulary (planted bug: both had to differ); the recorded fingerprint is
    compared."""
    target = _llama()
    fp = hf.target_fingerprint(target)
    hf.check_target(FMT, 32, 64, fp, "/h", target)
    with pytest.raises(_HeadsError, match=r"Test heads at /h have hidden size 32 and vocabulary 65, the target has "
                                          r"32 and 64"):
        hf.check_target(FMT, 32, 65, fp, "/h", target)
    with pytest.raises(_HeadsError, match="were trained for another target"):
        hf.check_target(FMT, 32, 64, fp | {"norms": [x + 1 for x in fp["norms"]]}, None, target)


def test_read_config_needs_the_format_and_every_required_key(tmp_path):
    """A config lacking a required key is refused (planted bug: only the format checked), another format too."""
    (tmp_path / "c.json").write_text('{"format": 3}')
    with pytest.raises(_HeadsError, match=r"not a format-3 Test heads config \(needs \('hidden_size',\)\)"):
        hf.read_config(FMT, tmp_path, "how")
    (tmp_path / "c.json").write_text('{"format": 2, "hidden_size": 4}')
    with pytest.raises(_HeadsError, match="not a format-3"):
        hf.read_config(FMT, tmp_path, "how")
    (tmp_path / "c.json").write_text('{"format": 3, "hidden_size": 4}')
    assert hf.read_config(FMT, tmp_path, "how") == {"format": 3, "hidden_size": 4}


def test_files_round_trip_and_a_wrong_shape_is_the_heads_error(tmp_path):
    """``save_files`` writes the format into the tensors and config; a tensor of another shape is the heads' own
    error (planted bug: the shape check dropped: torch's RuntimeError)."""
    from safetensors import safe_open

    module = torch.nn.Linear(3, 2)
    hf.save_files(FMT, module, {"hidden_size": 3}, tmp_path, evaluation={"ok": 1})
    assert hf.read_config(FMT, tmp_path, "how") == {"format": 3, "hidden_size": 3}
    assert hf.read_eval(tmp_path) == {"ok": 1}
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "3"}
    loaded = hf.load_into(FMT, torch.nn.Linear(3, 2), tmp_path, "3 wide", "how")
    assert torch.equal(loaded.weight, module.weight) and not loaded.training
    with pytest.raises(_HeadsError, match=r"tensor 'weight' has shape \(2, 3\), c.json implies \(2, 4\)"):
        hf.load_into(FMT, torch.nn.Linear(4, 2), tmp_path, "4 wide", "how")


def test_a_missing_directory_with_a_checkpoint_says_training_has_not_finished(tmp_path):
    """``checkpoint.pt`` in the directory is named (planted bug: looked for in its parent); the micro pair's command
    says it is quick, others' not (planted bug: every pair)."""
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert "a checkpoint.pt is there" in str(hf.missing(FMT, tmp_path, "c.json is missing", "how"))
    assert "checkpoint.pt" not in str(hf.missing(FMT, tmp_path / "sub", "c.json is missing", "how"))
    assert hf.zoo_training_command(FMT, "micro", "/c", "version=eagle3") == (
        "`python -m experiments.train_x version=eagle3 zoo_size=micro cache_dir=/c` (a few minutes at most on a CPU)")
    assert hf.zoo_training_command(FMT, "default") == "`python -m experiments.train_x zoo_size=default`"


def test_the_cache_root_follows_specdec_cache(monkeypatch, tmp_path):
    """``$SPECDEC_CACHE`` sets the root (planted bug: the environment ignored); an explicit directory wins."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "env"))
    assert hf.cache_root() == tmp_path / "env" and hf.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SPECDEC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf.cache_root() == tmp_path / ".cache" / "specdec"


# --- drafters/cross_tokenizer.py -----------------------------------------------------------------------------


def _text_drafter(tokens: list[int], merges=()) -> types.SimpleNamespace:
    """The state the cross-tokenizer drafter's text helpers read (no model)."""
    tok = char_tokenizer(CHARS, list(merges))
    return types.SimpleNamespace(tokens=tokens, tokenizer=tok, draft_tokenizer=tok)


def test_the_run_behind_the_continuation_is_at_least_lookbehind_tokens():
    """The shortest clean run has LOOKBEHIND tokens (planted bug: it starts at 1), or all when fewer are
    committed."""
    d = _text_drafter([0, 1, 2, 3, 4, 5, 0])
    assert CrossTokenizerDrafter._behind(d) == [3, 4, 5, 0]
    d.tokens = [1, 2]
    assert CrossTokenizerDrafter._behind(d) == [1, 2]


def test_a_text_with_a_replacement_character_does_not_round_trip():
    """U+FFFD in the decoded text means a cut character (planted bug: only the re-encoding compared)."""
    from drafters.cross_tokenizer import _round_trips

    tok = char_tokenizer(CHARS + "\ufffd")
    assert _round_trips(tok, [0, 1]) and not _round_trips(tok, [0, 6])


def test_the_draft_cache_keeps_the_longest_fed_prefix_but_recomputes_the_last_position(monkeypatch):
    """A window already fed whole still feeds its last id again for its logits (planted bug: the prefix kept up to
    the window's end: an empty forward), and a changed id cuts the prefix there."""
    from drafters import cross_tokenizer

    fed = []
    monkeypatch.setattr(cross_tokenizer, "forward_lm", lambda model, x, cache, positions, *a, **k: (
        fed.append((x.tolist(), positions.tolist())) or torch.zeros(1, x.shape[1], 5), None))
    cuts = []
    d = types.SimpleNamespace(_fed=[4, 5, 6], cache=types.SimpleNamespace(truncate=cuts.append), model=None,
                              _device=torch.device("cpu"))
    assert CrossTokenizerDrafter._feed(d, [4, 5, 6]).shape == (5,)
    CrossTokenizerDrafter._feed(d, [4, 7, 6, 1])
    assert cuts == [2, 1] and fed == [([[6]], [[2]]), ([[7, 6, 1]], [[1, 2, 3]])] and d._fed == [4, 7, 6, 1]


def test_a_shrunken_encoding_keeps_at_least_its_last_id_in_the_window():
    """The window's start is pulled back when the encoding shrinks below it (planted bug: not pulled back: an empty
    window)."""
    d = types.SimpleNamespace(_limit=40, draft_tokens=3, _offset=10, _fed=[1])
    assert CrossTokenizerDrafter._window(d, [1, 2, 3, 4, 5]) == [5] and d._offset == 4
