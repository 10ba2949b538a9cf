"""Edges of the kept fixed-shape steps (``compile=graph|inductor``, :mod:`specdec.static_kept`) and of the step's
buffers that the main static-step tests leave open.

On the CPU ``compile=graph`` warns once and runs the static step eagerly, but keeps its steps exactly as on a
GPU: which step a batch gets (a kept one refilled in place, or a new one) is the same logic either way.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from drafters import NoDrafter
from specdec import SamplingParams, SpeculativeDecoder, static_kept
from tests.test_static_step import LIMITS, SHAPES
from tests.tiny_models import pair, prompts


@pytest.fixture(scope="module")
def llama():
    target, _, tok = pair("llama")
    return target, prompts(tok, 4, seed=4)


def _quiet(call):
    """``call()`` with the CPU's one ``compile=graph needs a CUDA device`` warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


def _kept(decoder) -> list:
    return [entry[1] for entry in decoder.static_steps.values()]


def _tokens(out) -> list[list[int]]:
    return [s.tolist() for s in out.sequences]


def test_batches_of_similar_lengths_share_one_kept_step(llama):
    """A captured step is sized in capacity buckets, so a later batch of the same size whose rows are a little
    longer or shorter replays the kept step (no second capture) and still decodes the readable step's tokens."""
    target, rows = llama
    decoder = SpeculativeDecoder(target, SHAPES["chain3"]("llama"), compile="graph")
    readable = SpeculativeDecoder(target, SHAPES["chain3"]("llama"))
    for limits in (LIMITS, [n + 5 for n in LIMITS]):  # the longest row 5 tokens longer: the same 128-slot bucket
        out = _quiet(lambda limits=limits: decoder.generate_batch(rows, limits))
        assert _tokens(out) == _tokens(readable.generate_batch(rows, limits)), limits
    assert len(decoder.static_steps) == 1


def test_a_new_sampling_or_eos_set_gets_a_step_of_its_own(llama):
    """A kept step was built for the decoder's sampling parameters and EOS ids: a decoder given new ones decodes
    with them (the readable path's tokens), not with the kept step's."""
    target, rows = llama
    decoder = SpeculativeDecoder(target, SHAPES["chain3"]("llama"), "rejection", SamplingParams(temperature=1.0),
                                 compile="graph")
    _quiet(lambda: decoder.generate_batch(rows, LIMITS, seed=1))
    decoder.sampling = SamplingParams(temperature=0.5, top_k=3)
    readable = SpeculativeDecoder(target, SHAPES["chain3"]("llama"), "rejection", decoder.sampling)
    out = _quiet(lambda: decoder.generate_batch(rows, LIMITS, seed=1))
    assert _tokens(out) == _tokens(readable.generate_batch(rows, LIMITS, seed=1))

    greedy = SpeculativeDecoder(target, SHAPES["chain3"]("llama"), compile="graph")
    free = _quiet(lambda: greedy.generate_batch(rows, LIMITS))
    stop = free.sequences[0][0, rows[0].shape[1] + 2].item()  # row 0's third new token
    greedy.eos = {stop}
    out = _quiet(lambda: greedy.generate_batch(rows, LIMITS))
    assert out.sequences[0][0, -1].item() == stop and out.sequences[0].shape[1] <= rows[0].shape[1] + 3


def test_the_least_recently_used_step_goes_first(llama, monkeypatch):
    """Past ``KEPT_STEPS`` the step used longest ago is dropped; one used again meanwhile stays (and is the one
    replayed next time)."""
    target, rows = llama
    monkeypatch.setattr(static_kept, "KEPT_STEPS", 2)
    decoder = SpeculativeDecoder(target, NoDrafter(), compile="graph")
    for size in (3, 2):
        _quiet(lambda size=size: decoder.generate_batch(rows[:size], LIMITS[:size]))
    three, two = _kept(decoder)
    _quiet(lambda: decoder.generate_batch(rows[:3], LIMITS[:3]))  # batch size 3 again: now the most recent
    _quiet(lambda: decoder.generate_batch(rows[:1], LIMITS[:1]))  # a third size: one step must go
    kept = _kept(decoder)
    assert len(kept) == 2 and any(s is three for s in kept) and not any(s is two for s in kept)


def test_a_finished_row_beside_a_long_one_stays_in_its_slots():
    """A row that is done still runs through every step of its batch (fixed shapes) but must not grow its caches:
    beside a row that decodes much longer, it would run past the buffers' capacity (sized for the longest row)."""
    target, _, tok = pair("llama")
    long_prompt = prompts(tok, 8, seed=4)
    long_prompt = max(long_prompt, key=lambda p: p.shape[1])[:, :40]  # [1, <=40]
    short_prompt = long_prompt[:, :4]  # [1, 4]
    rows, limits = [long_prompt, short_prompt], [1, 48]  # row 0 is done after one step, row 1 runs ~48 more
    out = SpeculativeDecoder(target, NoDrafter(), compile="static").generate_batch(rows, limits)
    for i, (ids, n) in enumerate(zip(rows, limits)):
        ref = target.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0,
                              eos_token_id=target.generation_config.eos_token_id)
        assert out.sequences[i].tolist() == ref.tolist(), i


def test_drafters_the_fixed_shape_step_cannot_run_are_refused_when_the_decoder_is_built():
    """A dynamic draft length (``confidence_threshold``) has no fixed shape, and a tree preset whose sibling rank
    reaches past the draft's vocabulary has no such child: both are configuration errors named up front, not a
    silently fixed-length decode or a failure inside a step."""
    from drafters import DraftModelDrafter
    from specdec.errors import ConfigError
    from tests.tiny_models import peaky_pair

    target, _, _ = pair("llama")
    with pytest.raises(ConfigError, match="confidence_threshold"):
        SpeculativeDecoder(target, DraftModelDrafter(SHAPES["chain3"]("llama").model, 3, confidence_threshold=0.4),
                           compile="static")
    small, draft = peaky_pair()  # a 6-token vocabulary
    ranks = DraftModelDrafter(draft, tree=[[0], [5]])  # ranks 0 and 5: the draft's last token, fine
    assert SpeculativeDecoder(small, ranks, compile="static").generate(torch.tensor([[1, 2]]), 3).sequences.shape[1] == 5
    with pytest.raises(ConfigError, match="sibling rank 6, past the draft's 6 tokens"):
        SpeculativeDecoder(small, DraftModelDrafter(draft, tree=[[0], [6]]), compile="static").generate(
            torch.tensor([[1, 2]]), 3)


def test_non_finite_target_logits_stop_the_fixed_shape_step_naming_the_row():
    """The fixed-shape step reads no logits on the host, yet a row whose target logits are NaN must fail as the
    readable path does (:class:`NonFiniteLogitsError` naming the step and the row), not decode argmax-of-NaN
    tokens; the other rows of the batch are not blamed."""
    import copy

    from specdec.errors import NonFiniteLogitsError

    target = copy.deepcopy(pair("llama")[0])
    with torch.no_grad():
        target.get_input_embeddings().weight[200].fill_(float("nan"))  # token 200 poisons the rows that hold it
    rows = [torch.tensor([[3, 4, 5]]), torch.tensor([[3, 200, 5]])]  # [1, 3] each: only row 1 holds it
    for drafter in (NoDrafter(), SHAPES["chain3"]("llama")):
        decoder = SpeculativeDecoder(target, drafter, compile="static")
        with pytest.raises(NonFiniteLogitsError, match=r"decode step 0 \(row 1\)"):
            decoder.generate_batch(rows, [4, 4])


@pytest.mark.parametrize("shape", ["chain3", "binary"])
def test_each_rows_statistics_equal_the_readable_batchs(llama, shape):
    """Rows of one batch finish at different steps, but the batch keeps stepping (fixed shapes): a finished row's
    statistics (target forwards, drafts proposed and accepted per step, tokens) must stop where the row stopped,
    as the readable batched path reports them."""
    target, rows = llama

    def per_row(out):
        return [(s.target_forwards, s.proposed_per_step, s.accepted_per_step, s.new_tokens) for s in out.row_stats]

    static = SpeculativeDecoder(target, SHAPES[shape]("llama"), compile="static").generate_batch(rows, LIMITS)
    readable = SpeculativeDecoder(target, SHAPES[shape]("llama")).generate_batch(rows, LIMITS)
    assert per_row(static) == per_row(readable)
    assert static.stats.target_forwards == readable.stats.target_forwards


def test_a_target_without_eos_decodes_every_token_to_its_limit():
    """With no EOS id at all, no token may end a row early (the step's EOS table must hold no real token id):
    sampled rows run to ``max_new_tokens`` and equal their batch-1 readable runs, token 0 included."""
    from drafters import DraftModelDrafter
    from tests.tiny_models import peaky_pair

    target, draft = peaky_pair()  # 6 tokens, no EOS
    sampling = SamplingParams(temperature=1.0)
    rows = [torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5]])]  # [1, 2], [1, 3]
    static = SpeculativeDecoder(target, DraftModelDrafter(draft, 2), "rejection", sampling, compile="static")
    assert not static.eos
    out = static.generate_batch(rows, [16, 16], seed=3)
    readable = SpeculativeDecoder(target, DraftModelDrafter(draft, 2), "rejection", sampling)
    for i, ids in enumerate(rows):
        assert out.sequences[i].shape[1] == ids.shape[1] + 16
        assert out.sequences[i].tolist() == readable.generate(ids, 16, seed=3 + i).sequences.tolist(), i
    assert any(0 in s[0, r.shape[1]:].tolist() for s, r in zip(out.sequences, rows))  # token 0 was drawn
