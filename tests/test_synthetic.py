"""The random-weight pairs of real shapes that ``experiments.bench --synthetic`` times.

The self-draft is a truncated view of the target (the target's tensors, its own modules and config),
so the fixed-shape step drafts with it exactly as the eager step does: the same tokens and the same
acceptance per step. A draft that borrowed the target's layer modules (and so their config) drafted
garbage in the static step while the eager step accepted; these tests would catch it again.
"""
from __future__ import annotations

import pytest
import torch

from drafters import DraftModelDrafter
from experiments.synthetic import random_prompts, synthetic_pair
from specdec import SpeculativeDecoder


@pytest.fixture(scope="module")
def micro():
    return synthetic_pair("llama-micro", "cpu", torch.float32, draft_layers=3)


def test_the_self_draft_shares_the_targets_tensors_not_its_config(micro):
    target, draft = micro
    assert draft.config.num_hidden_layers == 3 and target.config.num_hidden_layers == 4
    assert draft.config is not target.config
    assert draft.model.layers[0].self_attn.q_proj.weight.data_ptr() == \
        target.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert draft.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()
    assert all(a is not b for a, b in zip(draft.model.layers, target.model.layers))


def test_the_static_step_drafts_like_the_eager_step(micro):
    target, draft = micro
    accepted = 0
    for ids in random_prompts(target.config.vocab_size, 2, 16):  # [1, 16] each
        eager = SpeculativeDecoder(target, DraftModelDrafter(draft, 3)).generate(ids, 16)
        static = SpeculativeDecoder(target, DraftModelDrafter(draft, 3), compile="static").generate(ids, 16)
        assert static.sequences.tolist() == eager.sequences.tolist()
        assert static.stats.accepted_per_step == eager.stats.accepted_per_step
        accepted += sum(eager.stats.accepted_per_step)
    assert accepted > 0  # otherwise equal acceptance would prove nothing


@pytest.mark.parametrize("layers", [0, 4])
def test_a_self_draft_needs_fewer_layers_than_the_target(layers):
    with pytest.raises(ValueError, match="--draft-layers"):
        synthetic_pair("llama-micro", "cpu", torch.float32, draft_layers=layers)


def test_an_unknown_shape_names_the_known_ones():
    with pytest.raises(ValueError, match="llama-8b"):
        synthetic_pair("llama-9b")


@pytest.mark.parametrize("argv, layers, prompt_len", [([], 2, 256), (["--draft-layers", "1", "--prompt-len", "9"], 1, 9)])
def test_bench_reads_the_synthetic_options_and_their_defaults(argv, layers, prompt_len):
    """``--draft-layers`` / ``--prompt-len`` default to None (so that given without ``--synthetic`` they are an
    error); the synthetic pair and prompts still take 2 layers and 256 tokens when they are left out."""
    from experiments import bench
    from experiments.bench_inputs import check_flags, fill_defaults, load_pair, load_prompt_ids

    args = bench.parse_args(["--synthetic", "llama-micro", "--prompts", "2", *argv])
    check_flags(args)
    fill_defaults(args)
    target, draft, tokenizer = load_pair(args)
    assert tokenizer is None and draft.config.num_hidden_layers == layers
    assert [p.shape for p in load_prompt_ids(tokenizer, target, args)] == [(1, prompt_len)] * 2


@pytest.mark.parametrize("argv, size, kept", [([], "default", 384), (["--size", "micro", "--max-prompt-tokens", "7"], "micro", 7)])
def test_bench_fills_the_real_pairs_defaults_after_the_checks(argv, size, kept):
    """``--size`` / ``--max-prompt-tokens`` default to None (given with ``--synthetic`` they are an error); a real
    pair's run still loads the default zoo pair and keeps 384 prompt tokens when they are left out."""
    from experiments import bench
    from experiments.bench_inputs import check_flags, fill_defaults

    args = bench.parse_args(argv)
    check_flags(args)
    fill_defaults(args)
    assert (args.size, args.max_prompt_tokens, args.draft_layers, args.prompt_len) == (size, kept, 2, 256)
