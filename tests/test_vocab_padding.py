"""A draft whose LM head is padded differently from the target's, over one tokenizer (Qwen2.5-0.5B's 151936 rows
beside Qwen2.5-72B's 152064): padded to the target's size, it drafts, and decoding stays lossless.

Here the target has 320 rows and the draft 272 over the byte tokenizer's 257 tokens; the draft is the target cut
to its first 272 rows (so it agrees with the target where it can), or, for the distribution test, a noisy copy of a
6-token target cut to 5 rows: the target emits token 5, which the draft can neither propose nor embed.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import GenerationConfig

from drafters import DraftModelDrafter, NoDrafter
from drafters.vocab_padding import match_target_vocab, padded_to
from specdec import SpecDecError, SpeculativeDecoder
from specdec.models import byte_tokenizer, tiny_random_pair, vocab_size
from tests.lossless import PROMPT, SETTINGS, cached_exact_distribution, cells, check_cell
from tests.test_cli_contract import main_in_process
from tests.tiny_models import peaky_noisy_pair

TARGET_ROWS, DRAFT_ROWS, EOS = 320, 272, 256  # the byte tokenizer: 256 bytes + <|endoftext|> (256)


def _cut(model, rows: int):
    """A copy of ``model`` with only its first ``rows`` embedding and LM-head rows (a differently padded twin)."""
    cut = copy.deepcopy(model)
    cut.resize_token_embeddings(rows)
    return cut


@pytest.fixture(scope="module")
def padded_pair():
    """``(target, draft)``: a 320-row target whose rows past the tokenizer score low (padding), and its 272-row
    cut as the draft."""
    target, _, _ = tiny_random_pair("llama", vocab=TARGET_ROWS)
    with torch.no_grad():
        target.get_output_embeddings().weight[EOS + 1:] = 0.0  # padding rows: logit 0 (never the argmax here)
    target.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS)
    target.config.eos_token_id = EOS
    return target, _cut(target, DRAFT_ROWS)


def test_the_view_emits_the_targets_size_and_embeds_padding_ids(padded_pair):
    target, draft = padded_pair
    view = padded_to(draft, TARGET_ROWS)
    assert vocab_size(view) == TARGET_ROWS and vocab_size(draft) == DRAFT_ROWS  # the draft itself is unchanged
    assert type(draft.lm_head).__name__ == "Linear" and draft.get_input_embeddings().weight.shape[0] == DRAFT_ROWS
    x = torch.tensor([[3, 4, 5, 271]])  # [1, 4]
    own, padded = draft(x).logits, view(x).logits  # [1, 4, 272], [1, 4, 320]
    assert torch.allclose(padded[..., :DRAFT_ROWS], own, atol=1e-5) and torch.isneginf(padded[..., DRAFT_ROWS:]).all()
    past = view(torch.tensor([[3, 4, 5, 300]])).logits  # a padding id the target sampled: embedded as row 271
    assert torch.allclose(past, padded, atol=1e-5)
    bigger = _cut(target, 400)  # a draft with more rows: its view emits the target's size and embeds as it is
    wider = padded_to(bigger, TARGET_ROWS)
    assert vocab_size(wider) == TARGET_ROWS and wider.model is bigger.model and torch.isfinite(wider(x).logits).all()
    assert view.model is not draft.model and view.model.layers is draft.model.layers  # a wrapper, the same body


@pytest.mark.parametrize("shape", [{"num_speculative_tokens": 3}, {"num_speculative_tokens": 3, "fast_forward": False},
                                   {"tree": "binary"}, {"budget": 8}], ids=["chain", "chain_own_forward", "tree", "dynamic"])
def test_greedy_decoding_with_the_padded_draft_equals_plain_decoding(padded_pair, shape):
    """Every path equals plain decoding, and drafts as well as batch 1 (each row's tau is its batch-1 run's: the
    view's forwards see the step's masks, not the causal mask of a config the view copied)."""
    target, draft = padded_pair
    view, _ = match_target_vocab(target, draft, byte_tokenizer(), byte_tokenizer())
    tok = byte_tokenizer()
    prompts = [tok(text, return_tensors="pt").input_ids for text in ("def f(x):\n    return x", "import os\n")]
    plain = SpeculativeDecoder(target, NoDrafter())
    expected = [plain.generate(p, max_new_tokens=20).sequences for p in prompts]
    dec = SpeculativeDecoder(target, DraftModelDrafter(view, **shape))
    ones = [dec.generate(p, max_new_tokens=20) for p in prompts]
    assert all(torch.equal(one.sequences, want) for one, want in zip(ones, expected))
    assert min(one.stats.tau for one in ones) > 2.0  # the draft is the target where it can be
    batch = dec.generate_batch(prompts, max_new_tokens=20)
    assert all(torch.equal(a, b) for a, b in zip(batch.sequences, expected))
    assert [row.tau for row in batch.row_stats] == [one.stats.tau for one in ones]
    if "budget" not in shape:  # the fixed-shape step runs chains and tree presets
        static = SpeculativeDecoder(target, DraftModelDrafter(view, **shape), compile="static")
        out = static.generate_batch(prompts, max_new_tokens=20)
        assert all(torch.equal(a, b) for a, b in zip(out.sequences, expected))
        assert [row.tau for row in out.row_stats] == [one.stats.tau for one in ones]


def test_a_draft_whose_embedding_lies_deeper_is_wrapped_in_the_view_only():
    """GPT-2 keeps its embedding at ``transformer.wte``: the view wraps it there, on copies of the modules on the
    way; the draft's own modules are untouched."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    draft = GPT2LMHeadModel(GPT2Config(vocab_size=DRAFT_ROWS, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    view = padded_to(draft, TARGET_ROWS)
    assert type(draft.transformer.wte).__name__ == "Embedding" and type(view.transformer.wte).__name__ != "Embedding"
    assert view.transformer.h is draft.transformer.h  # the same layers
    x = torch.tensor([[3, 4, 271]])  # [1, 3]
    assert torch.allclose(view(torch.tensor([[3, 4, 300]])).logits, view(x).logits, atol=1e-6)
    assert torch.allclose(view(x).logits[..., :DRAFT_ROWS], draft(x).logits, atol=1e-5)


def test_a_padded_draft_over_a_draft_vocabulary_and_a_view_of_a_view(padded_pair):
    """A padded draft takes a draft vocabulary (``drafter.draft_vocab``) over its own ids, and padding a padded view
    again pads from its rows; ids past the draft's rows are refused naming them."""
    _, draft = padded_pair
    view = padded_to(draft, TARGET_ROWS)
    x = torch.tensor([[3, 4, 5, 300]])  # [1, 4]
    ids = torch.arange(0, DRAFT_ROWS, 2)  # [136]
    reduced = DraftModelDrafter(view, num_speculative_tokens=2, draft_vocab=ids).model
    logits, full = reduced(x).logits, view(x).logits  # [1, 4, 320] each
    assert vocab_size(reduced) == TARGET_ROWS and torch.allclose(logits[..., ids], full[..., ids], atol=1e-5)
    assert torch.isneginf(logits[..., 1::2]).all()
    again = padded_to(view, 400)
    assert vocab_size(again) == 400 and torch.allclose(again(x).logits[..., :TARGET_ROWS], full, atol=1e-5)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 272\)"):
        DraftModelDrafter(view, draft_vocab=torch.tensor([3, 300]))


def test_only_one_shared_tokenizer_that_fits_both_heads_is_padded(padded_pair):
    target, draft = padded_pair
    tok = byte_tokenizer()
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])  # one more token: not the target's tokenizer
    with pytest.raises(SpecDecError, match=r"\(272 tokens\) does not match the target's \(320 tokens\) and the "
                                           r"draft's directory holds no tokenizer.*padded_to\(draft, 320\)"):
        match_target_vocab(target, draft, tok, None)
    with pytest.raises(SpecDecError, match="its tokenizer is not the target's: .*drafter=cross_tokenizer"):
        match_target_vocab(target, draft, tok, other)
    with pytest.raises(SpecDecError, match=r"the tokenizer's 257 tokens do not fit the smaller LM head \(200 rows\)"):
        match_target_vocab(target, _cut(target, 200), tok, byte_tokenizer())
    same, note = match_target_vocab(target, _cut(target, TARGET_ROWS), tok, None)
    assert note is None and vocab_size(same) == TARGET_ROWS


def _swapped(model, a: int = 3, b: int = 5):
    """A copy of ``model`` with tokens ``a`` and ``b`` exchanged (their embedding and LM-head rows)."""
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        for weight in (swapped.get_input_embeddings().weight, swapped.get_output_embeddings().weight):
            weight[[a, b]] = weight[[b, a]]
    return swapped


@pytest.fixture(scope="module")
def cut_noisy_pair():
    """The 6-token peaky target and its noisy copy, token 5 swapped with a likely one (3), the draft cut to 5 rows
    and padded back to 6."""
    target, noisy = (_swapped(m) for m in peaky_noisy_pair())
    return target, padded_to(_cut(noisy, 5), 6)


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_target_puts_mass_where_the_draft_cannot_propose(cut_noisy_pair, setting):
    """The distribution test below has power over token 5: about a third of the target's continuations hold it."""
    target, _ = cut_noisy_pair
    exact = cached_exact_distribution(target, setting, tuple(PROMPT[0].tolist()))
    assert sum(p for seq, p in exact.items() if 5 in seq) > 0.2


@pytest.mark.parametrize("setting, shape, rule", cells(["chain"]))
def test_sampling_with_the_padded_draft_is_lossless(cut_noisy_pair, setting, shape, rule):
    target, draft = cut_noisy_pair
    check_cell(target, DraftModelDrafter(draft, num_speculative_tokens=2), setting, rule)


def test_decode_pads_a_draft_saved_with_the_targets_tokenizer(padded_pair, tmp_path, monkeypatch, capsys):
    """``model=hf``: with the tokenizer saved beside the draft, the run pads it (a note, the summary records it)
    and matches its baseline; without it, one ``error:`` line says what to do. The benchmark loads such a pair the same
    way, and HF's assisted generation runs the padded draft too."""
    target, draft = padded_pair
    tok = byte_tokenizer()
    for name, model in (("target", target), ("draft", draft), ("bare", draft)):
        model.save_pretrained(tmp_path / name)
    for name in ("target", "draft"):
        tok.save_pretrained(tmp_path / name)
    prompts = tmp_path / "question.jsonl"
    prompts.write_text(json.dumps({"question_id": 0, "category": "code", "turns": ["def f(x):\n    return x"]}) + "\n")
    common = ["model=hf", f"model.target={tmp_path / 'target'}", "dataset=spec_bench", f"dataset.path={prompts}",
              "num_prompts=1", "max_new_tokens=12", "logger=none", "warmup=0", "num_threads=1", "costs=false"]
    code, err = main_in_process(monkeypatch, capsys, *common, f"model.draft={tmp_path / 'draft'}",
                            f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err[-2000:]
    assert "the draft's LM head has 272 rows and the target's 320" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["matches_baseline"] is True and summary["models"]["draft_vocab_padded"] == {"draft": 272, "target": 320}
    code, err = main_in_process(monkeypatch, capsys, *common, f"model.draft={tmp_path / 'bare'}",
                            f"hydra.run.dir={tmp_path / 'run2'}")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "save the target's tokenizer beside the draft" in lines[0], err[-2000:]
    from experiments.bench_inputs import pair_from_dirs
    from experiments.hf_generate import hf, hf_assisted

    opts = {"dtype": "float32", "device": "cpu"}
    target, view, tok = pair_from_dirs(str(tmp_path / "target"), str(tmp_path / "draft"), opts, opts)  # the benchmark's
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    assert vocab_size(view) == TARGET_ROWS and torch.equal(hf_assisted(target, view, 12, 3)(ids)[0], hf(target, 12)(ids)[0])
    with pytest.raises(SpecDecError, match="save the target's tokenizer beside the draft"):
        pair_from_dirs(str(tmp_path / "target"), str(tmp_path / "bare"), opts, opts)
