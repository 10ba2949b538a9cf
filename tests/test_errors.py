"""Bad input gets a clear error that names the problem and the fix."""
from __future__ import annotations

import copy
import os
import re

import pytest
import torch

from drafters import DraftModelDrafter, NoDrafter
from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from specdec.errors import ConfigError, NonFiniteLogitsError
from specdec.models import load_causal_lm, tiny_random_pair
from tests.tiny_models import pair

IDS = torch.tensor([[3, 4, 5]])


def _decoder(**kw):
    target = pair("llama")[0]
    return SpeculativeDecoder(target=target, drafter=kw.pop("drafter", NoDrafter()), **kw)


def test_draft_vocabulary_mismatch():
    target = pair("llama")[0]
    _, other_draft, _ = tiny_random_pair("llama", vocab=100)
    dec = SpeculativeDecoder(target, DraftModelDrafter(other_draft, num_speculative_tokens=2))
    with pytest.raises(SpecDecError, match=r"vocabulary \(100 tokens\) does not match the target's \(257 tokens\)"):
        dec.generate(IDS, max_new_tokens=4)


def test_prompt_longer_than_context():
    with pytest.raises(SpecDecError, match="longer than the model's context of 2048.*max_prompt_tokens"):
        _decoder().generate(torch.zeros(1, 2049, dtype=torch.long), max_new_tokens=4)


def test_a_prompt_that_fills_the_context_is_told_to_shorten():
    """No max_new_tokens fits after it: the fix named is the prompt's, never "at most 0" new tokens."""
    with pytest.raises(SpecDecError, match="2048 tokens, as long as the model's context of 2048: shorten it"):
        _decoder().generate(torch.zeros(1, 2048, dtype=torch.long), max_new_tokens=4)


def test_prompt_plus_new_tokens_past_context():
    with pytest.raises(SpecDecError, match="lower max_new_tokens to at most 48"):
        _decoder().generate(torch.zeros(1, 2000, dtype=torch.long), max_new_tokens=64)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_new_tokens_must_be_positive_int(bad):
    with pytest.raises(SpecDecError, match="max_new_tokens"):
        _decoder().generate(IDS, max_new_tokens=bad)


def test_empty_prompt():
    with pytest.raises(SpecDecError, match="empty prompt"):
        _decoder().generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)


@pytest.mark.parametrize("bad", [257, -3])
def test_an_id_outside_the_vocabulary_is_named_not_a_bare_index_error(bad):
    """A trial's ``generate([[5, 99999]])`` met torch's "IndexError: index out of range in self"."""
    size = " of 257 ids (0 .. 256)" if bad > 0 else ""
    with pytest.raises(SpecDecError, match=re.escape(f"the id {bad}, outside the target's vocabulary{size}: ")):
        _decoder().generate(torch.tensor([[5, bad]]), max_new_tokens=4)
    with pytest.raises(SpecDecError, match=rf"the id {bad}, outside"):  # a row of generate_batch's list
        _decoder().generate_batch([IDS, torch.tensor([[bad, 5]])], max_new_tokens=4)
    assert _decoder().generate(torch.tensor([[0, 256]]), max_new_tokens=1).sequences.shape == (1, 3)  # both ends


def test_batch_and_dtype_checked():
    with pytest.raises(SpecDecError, match=r"batch size 2: give one prompt, \[1, T\] \(several: generate_batch"):
        _decoder().generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(SpecDecError, match="batch size 2: give one prompt"):  # a row of generate_batch's list
        _decoder().generate_batch([torch.zeros(2, 3, dtype=torch.long)], max_new_tokens=4)
    from experiments.bench_drafters import verify_widths

    for bad in ("0", "4,0", "a,b", ","):
        with pytest.raises(SpecDecError, match=r"^--verify-widths .*: give auto or comma-separated widths >= 1"):
            verify_widths(bad, None, [], 4, [])
    assert verify_widths("8,4", None, [], 4, []) == (8, 4)
    from experiments.bench_drafters import parse_args

    with pytest.raises(SystemExit) as exit_:  # the command checks the list before the pair loads
        parse_args(["--verify-widths", "4,0"])
    assert exit_.value.code == 2
    with pytest.raises(SpecDecError, match="LongTensor"):
        _decoder().generate(torch.zeros(1, 3), max_new_tokens=4)


def test_unknown_acceptance_and_backend():
    with pytest.raises(ConfigError, match="acceptance='beam' is unknown"):
        _decoder(acceptance="beam")
    with pytest.raises(ConfigError, match="attn_backend='flash' is unknown"):
        _decoder(attn_backend="flash")


def test_greedy_rule_with_sampling_temperature():
    with pytest.raises(ConfigError, match="use acceptance=rejection"):
        _decoder(acceptance="greedy", sampling=SamplingParams(temperature=0.8))


def test_missing_model_path(tmp_path):
    with pytest.raises(SpecDecError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))


def test_nan_logits_name_the_step():
    target = copy.deepcopy(pair("llama")[0])
    with torch.no_grad():
        target.get_output_embeddings().weight.fill_(float("nan"))
    dec = SpeculativeDecoder(target, NoDrafter())
    with pytest.raises(NonFiniteLogitsError, match="decode step 0"):
        dec.generate(IDS, max_new_tokens=4)


def test_nan_draft_logits_name_the_draft_position():
    target = pair("llama")[0]
    draft = copy.deepcopy(target)
    with torch.no_grad():
        draft.get_output_embeddings().weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLogitsError, match="draft model forward at draft position 1"):
        SpeculativeDecoder(target, DraftModelDrafter(draft, num_speculative_tokens=2)).generate(IDS, max_new_tokens=4)


def test_unknown_draft_dtype_fails_before_any_model_loads(tmp_path):
    """A wrong model.draft_dtype names the key and the choices, before the target is loaded."""
    from experiments.models_from_config import load_models

    cfg = {"source": "hf", "target": str(tmp_path / "not-loaded-yet"), "draft": str(tmp_path / "d"),
           "draft_dtype": "bf16"}
    with pytest.raises(SpecDecError, match=r"model.draft_dtype='bf16' is unknown; choose null, auto or one of"):
        load_models(cfg)


def test_target_logit_check_finds_every_non_finite_value_and_passes_huge_finite_ones():
    """check_finite first sums (a NaN or inf anywhere makes the sum so), then settles a non-finite sum
    elementwise: finite logits whose sum overflows pass, one bad value anywhere fails with its kind."""
    from verifier.verifier import check_finite

    check_finite(torch.full((4, 3, 64), 3e38), "target")  # the sum overflows; every value is finite
    for bad, kind in ((float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")):
        logits = torch.randn(4, 3, 64)
        logits[2, 1, 17] = bad
        with pytest.raises(NonFiniteLogitsError, match=kind):
            check_finite(logits, "target")


def test_hf_target_without_a_tokenizer_names_model_tokenizer_and_it_loads_with_one(tmp_path):
    """A target directory without tokenizer files (a zoo pair keeps its tokenizer beside, in tokenizer/) is one
    error naming model.tokenizer, raised before the weights load; with model.tokenizer the pair loads."""
    from experiments.models_from_config import load_models

    target, _, tokenizer = tiny_random_pair("llama")
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    cfg = {"source": "hf", "target": str(tmp_path / "target")}
    with pytest.raises(SpecDecError, match=r"holds no tokenizer .*pass model.tokenizer=<the directory that holds it>"):
        load_models(cfg)
    loaded = load_models({**cfg, "tokenizer": str(tmp_path / "tokenizer")})
    assert len(loaded.tokenizer) == loaded.target.config.vocab_size


def test_a_checkpoint_with_only_pickle_weights_says_how_to_convert(tmp_path):
    """safetensors only is deliberate (unpickling runs code); a pytorch_model.bin-only directory says so and how
    to convert it, instead of transformers' "no file named model.safetensors"."""
    target = pair("llama")[0]
    target.config.save_pretrained(tmp_path)
    torch.save(target.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / "pytorch_model.bin").is_file() and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(SpecDecError, match=r"only pickle weights \(pytorch_model.bin\).*save_pretrained\(dir\)"):
        load_causal_lm(str(tmp_path), role="target")


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["max_new_tokens=0"], "max_new_tokens=0: it must be an integer >= 1"),
    (["drafter=draft_model", "drafter.num_speculative_tokens=0"], "drafter.num_speculative_tokens=0: it must be an integer >= 1"),
    (["drafter=ngram", "drafter.num_speculative_tokens=abc"], "drafter.num_speculative_tokens='abc': it must be an integer"),
    (["drafter=hybrid", "drafter.first.max_ngram=0"], "drafter.first.max_ngram=0: it must be an integer >= 1"),
    (["drafter=medusa", "drafter.num_heads=0"], "drafter.num_heads=0: it must be an integer >= 1 or null"),
    (["drafter=draft_model", "drafter.budget=2.5"], "drafter.budget=2.5: it must be an integer >= 1 or null"),
    (["drafter=ngram", "tree=binary"], "tree=... needs a drafter that grows token trees"),
    (["compile=grph"], "compile='grph' is unknown; choose one of ['none', 'static', 'graph', 'inductor']"),
    (["drafter=eagle", "drafter.version=eagle4"], "drafter.version='eagle4' is unknown; choose one of ['eagle2', 'eagle3']"),
    (["drafter=hybrid", "drafter.second.tree_sampling=sometimes"], "drafter.second.tree_sampling='sometimes' is unknown"),
    (["drafter=draft_model", "tree=binary", "drafter.tree_sampling=chain"],  # a DraftTree tag, not a choice
     "drafter.tree_sampling='chain' is unknown; choose one of ['deterministic', 'with_replacement', 'without_"),
    (["drafter=hybrid", "drafter.second.confidence_threshold=2"],
     "drafter.second.confidence_threshold=2: it must be a number in [0, 1)"),
    (["drafter=draft_model", "drafter.budget=8", "drafter.confidence_threshold=0.1"],
     "drafter.confidence_threshold=0.1 stops a chain early; this drafter grows a tree"),
    (["drafter=hybrid", "drafter.second.dtype=bf16"], "drafter.second.dtype='bf16' is unknown"),
    (["drafter=hybrid", "drafter.first.min_ngram=4"], "1 <= drafter.first.min_ngram <= drafter.first.max_ngram (got 4, 3)"),
    (["acceptance=typical", "sampling.temperature=0.7", "acceptance.epsilon=abc"],
     "acceptance.epsilon='abc': give a number (TypicalAcceptance's epsilon is annotated float)"),
    (["acceptance=typical", "sampling.temperature=0.7", "acceptance.epsilon=2"],
     "acceptance.epsilon=2: typical acceptance needs 0 < epsilon <= 1"),
], ids=["max_new_tokens", "k", "k_text", "hybrid_part", "medusa_heads", "budget", "tree_without_grower", "compile",
        "eagle_version", "tree_sampling", "tree_sampling_chain", "confidence_part", "confidence_tree", "dtype_part", "ngram_order",
        "typical_text", "typical_range"])
def test_counts_trees_and_modes_fail_before_any_model_is_built(overrides, fragment, tmp_path, monkeypatch, capsys):
    """On a fresh machine the default pair is built first (minutes): a wrong count or tree fails before that."""
    import experiments.decode
    from tests.test_cli_contract import error_line, main_in_process

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded before the config was checked")

    monkeypatch.setattr(experiments.decode, "load_models", no_loading)
    code, err = main_in_process(monkeypatch, capsys, "experiment=smoke", *overrides, "num_prompts=1", "warmup=0",
                                "costs=false", f"hydra.run.dir={tmp_path / 'run'}")
    error_line(err, 2, code, fragment)


def test_ngram_sizes_are_counts_in_order():
    from drafters import NGramDrafter

    with pytest.raises(ConfigError, match="^drafter.min_ngram=0: it must be an integer >= 1"):  # the config's keys
        NGramDrafter(min_ngram=0)
    with pytest.raises(ConfigError, match=r"1 <= drafter.min_ngram <= drafter.max_ngram \(got 3, 2\)"):
        NGramDrafter(min_ngram=3, max_ngram=2)
    with pytest.raises(ConfigError, match="^drafter.num_speculative_tokens=2.5"):
        NGramDrafter(num_speculative_tokens=2.5)
    from specdec.acceptance import TypicalAcceptance

    with pytest.raises(ConfigError, match="^acceptance.delta='0.3': give a number"):  # the Python API checks it too
        TypicalAcceptance(delta="0.3")


def test_a_plugin_drafters_keys_are_its_own():
    """A drafter from outside this package may use ``layers`` or ``budget`` for something else: not checked early."""
    from omegaconf import OmegaConf

    from experiments.drafter_config import check_before_loading

    check_before_loading(OmegaConf.create({"max_new_tokens": 4, "drafter": {"_target_": "my_lab.Drafter", "layers": [0, 2]}}))
    with pytest.raises(ConfigError, match="drafter.layers=0"):
        check_before_loading(OmegaConf.create({"max_new_tokens": 4,
                                               "drafter": {"_target_": "drafters.LayerSkipDrafter", "layers": 0}}))


def test_draft_logits_may_mask_tokens_but_not_hold_nan_inf_or_a_row_without_a_token():
    """``check_finite(masked_ok=True)`` (a draft vocabulary's -inf) after its fast path for finite logits."""
    from verifier.verifier import check_finite

    logits = torch.randn(2, 8)  # [positions, V]
    check_finite(logits, "draft", masked_ok=True)
    masked = logits.clone()
    masked[:, 3:] = float("-inf")
    check_finite(masked, "draft", masked_ok=True)
    for value, row in ((float("nan"), 0), (float("inf"), 1)):
        bad = masked.clone()
        bad[row, 0] = value
        with pytest.raises(NonFiniteLogitsError, match="draft: the model produced"):
            check_finite(bad, "draft", masked_ok=True)
    empty = masked.clone()
    empty[1] = float("-inf")  # a position that can propose no token
    with pytest.raises(NonFiniteLogitsError):
        check_finite(empty, "draft", masked_ok=True)
    with pytest.raises(NonFiniteLogitsError):
        check_finite(masked, "target")  # -inf from a target is an error


def test_a_target_module_that_raises_while_importing_is_named_with_its_error(tmp_path, monkeypatch):
    """A ``_target_`` whose module is there but raises as it imports (a mistake in it, a package it needs that is
    missing) is named with the error and its file:line, not "are you sure that module is installed?"; a module
    or name that is not there keeps the import error (and its did-you-mean)."""
    from experiments.instantiate import target_of

    (tmp_path / "t17_broken.py").write_text("x = 1\ny = undefined_name\nclass D: pass\n")
    (tmp_path / "t17_needs.py").write_text("import t17_not_installed\nclass D: pass\n")
    (tmp_path / "t17_syntax.py").write_text("class D: pass\ndef f(:\n    pass\n")
    (tmp_path / "t17_fine.py").write_text("class D: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    here = os.path.realpath(tmp_path)
    cases = {"t17_broken.D": (f"drafter: importing _target_ 't17_broken.D' raised NameError: name 'undefined_name' "
                              f"is not defined at {here}/t17_broken.py:2 (<module>): fix it there"),
             "t17_needs.D": (f"drafter: importing _target_ 't17_needs.D' raised ModuleNotFoundError: No module named "
                             f"'t17_not_installed' at {here}/t17_needs.py:1 (<module>): install t17_not_installed or "
                             "fix the import")}
    for path, says in cases.items():
        with pytest.raises(ConfigError) as info:
            target_of({"_target_": path}, "drafter")
        assert str(info.value) == says
    with pytest.raises(ConfigError) as info:  # the file and line the SyntaxError names (its wording is Python's)
        target_of({"_target_": "t17_syntax.D"}, "drafter")
    assert str(info.value).startswith("drafter: importing _target_ 't17_syntax.D' raised SyntaxError: ")
    assert str(info.value).endswith(f" at {here}/t17_syntax.py:2: fix it there")
    for path, says in (("t17_nowhere.D", "cannot import _target_ 't17_nowhere.D'"),
                       ("drafters.NGramDraftr", "did you mean 'drafters.NGramDrafter'?"),
                       ("t17_fine.D.nope", "cannot import _target_ 't17_fine.D.nope'")):  # the module imported
        with pytest.raises(ConfigError, match=re.escape(says)):
            target_of({"_target_": path}, "drafter")
