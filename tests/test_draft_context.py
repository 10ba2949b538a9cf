"""A draft model with a shorter context than the target: refused up front with a clear error, never an index error
deep in its position table; at its limit, every decode path runs and stays lossless.

GPT-2's learned position table is the hard case: a position past ``n_positions`` is an ``IndexError`` on the CPU
and a device-side assert on a GPU. A batched chain drafts with the whole batch, so a row whose own chain has ended
feeds dropped drafts past its last token; those must not reach past the table either.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from drafters import DraftModelDrafter, HybridDrafter, NGramDrafter, NoDrafter
from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from specdec.models import context_length, tiny_random_pair
from tests.test_cli_contract import main_in_process

POSITIONS = 32  # the draft's position table


@pytest.fixture(scope="module")
def models():
    """``(target, draft, tokenizer)``: the tiny Llama target (context 2048) and a GPT-2 draft of its vocabulary
    whose learned positions end at 32."""
    target, _, tokenizer = tiny_random_pair("llama")
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=target.config.vocab_size, n_embd=32, n_layer=1, n_head=4, n_positions=POSITIONS,
                        bos_token_id=None, eos_token_id=None)
    return target, GPT2LMHeadModel(config).eval(), tokenizer


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 250, (1, n), generator=torch.Generator().manual_seed(seed))  # [1, n]


def test_a_prompt_past_the_drafts_context_is_refused_naming_the_draft(models):
    target, draft, _ = models
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, num_speculative_tokens=4))
    with pytest.raises(SpecDecError, match="prompt has 40 tokens, longer than the draft model's context of 32: "
                                           r"shorten it to at most 31 tokens \(in a run, e.g. "
                                           r"dataset.max_prompt_tokens=16\), or use a draft model"):
        dec.generate(_prompt(40), max_new_tokens=4)
    with pytest.raises(SpecDecError, match=r"prompt \(20 tokens\) \+ max_new_tokens \(16\) exceeds the draft model's "
                                           "context of 32: lower max_new_tokens to at most 12"):
        dec.generate(_prompt(20), max_new_tokens=16)
    with pytest.raises(SpecDecError, match="prompt 1: .*draft model's context of 32"):
        dec.generate_batch([_prompt(8), _prompt(30)], max_new_tokens=8)


def test_the_target_alone_is_not_limited_by_a_draft(models):
    target, _, _ = models
    out = SpeculativeDecoder(target, NoDrafter()).generate(_prompt(40), max_new_tokens=4)
    assert out.sequences.shape == (1, 44)


def test_a_hybrid_has_its_model_parts_context(models):
    target, draft, _ = models
    hybrid = HybridDrafter(NGramDrafter(num_speculative_tokens=2), DraftModelDrafter(draft, num_speculative_tokens=2))
    assert hybrid.context_length() == POSITIONS
    assert NGramDrafter().context_length() is None and context_length(torch.nn.Linear(2, 2)) is None  # no config
    with pytest.raises(SpecDecError, match="draft model's context of 32"):
        SpeculativeDecoder(target, hybrid).generate(_prompt(30), max_new_tokens=8)


#: Two rows: the first fills the draft's 32 positions exactly; the second, with room to spare, still drafts whole
#: chains when the first's last steps may draft fewer (the batch drafts on for it, past its last token).
ROWS = ((16, 16), (4, 24))  # (prompt tokens, max_new_tokens)


@pytest.mark.parametrize("shape", [{"num_speculative_tokens": 4}, {"tree": "binary"},
                                   {"budget": 8, "num_speculative_tokens": 4}], ids=["chain", "tree", "dynamic"])
def test_at_the_drafts_limit_every_path_runs_and_greedy_is_lossless(models, shape):
    """Batch 1 at the limit, a ragged batch, a continuous one and the fixed-shape step (:data:`ROWS`) equal plain
    decoding, token for token."""
    target, draft, _ = models
    prompts, limits = [_prompt(n, i) for i, (n, _) in enumerate(ROWS)], [m for _, m in ROWS]
    plain = SpeculativeDecoder(target, NoDrafter())
    expected = [plain.generate(p, max_new_tokens=m).sequences for p, m in zip(prompts, limits)]  # [1, T + m] each
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, **shape))
    assert torch.equal(dec.generate(prompts[0], max_new_tokens=limits[0]).sequences, expected[0])
    for got, want in zip(dec.generate_batch(prompts, max_new_tokens=limits).sequences, expected):
        assert torch.equal(got, want)
    continuous = dec.generate_batch(prompts, max_new_tokens=limits, max_rows=1).sequences
    assert all(torch.equal(got, want) for got, want in zip(continuous, expected))
    if "budget" not in shape:  # the fixed-shape step computes every row's whole tree, also past a row's room
        static = SpeculativeDecoder(target, DraftModelDrafter(draft, **shape), compile="static")
        assert all(torch.equal(got, want) for got, want in zip(static.generate_batch(prompts, limits).sequences,
                                                               expected))


def test_a_sampled_batched_chain_at_the_limit_runs(models):
    target, draft, _ = models
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, num_speculative_tokens=4), acceptance="rejection",
                             sampling=SamplingParams(temperature=1.0))
    for seed in range(3):
        out = dec.generate_batch([_prompt(n, i) for i, (n, _) in enumerate(ROWS)], [m for _, m in ROWS], seed=seed)
        assert all(s.shape[1] <= n + m for s, (n, m) in zip(out.sequences, ROWS))


def test_decode_refuses_a_long_prompt_before_measuring_or_decoding(models, tmp_path, monkeypatch, capsys):
    """``python -m experiments.decode model=hf`` with that draft: one ``error:`` line naming the prompt, exit 2, and
    no prompt decoded (the first prompt fits; the second does not)."""
    target, draft, tokenizer = models
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "target")
    prompts = tmp_path / "question.jsonl"
    rows = [{"question_id": "short", "category": "code", "turns": ["x = 1\n"]},
            {"question_id": "long", "category": "code", "turns": ["y = 2\n" * 8]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    code, err = main_in_process(
        monkeypatch, capsys, "model=hf", f"model.target={tmp_path / 'target'}", f"model.draft={tmp_path / 'draft'}",
        "dataset=spec_bench", f"dataset.path={prompts}", "num_prompts=2", "max_new_tokens=8", "logger=none",
        "warmup=0", "num_threads=1", f"hydra.run.dir={run_dir}")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "prompt 'long': " in lines[0] and "the draft model's context of 32" in lines[0], lines[0]
    assert not (run_dir / "records.jsonl").exists() or not (run_dir / "records.jsonl").read_text().strip()
