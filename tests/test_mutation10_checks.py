"""Mutation pass 10: the proposal checks at their edges (per-row depth limits, a tree exactly as deep as allowed), the
lean forward's probe and its fallbacks (models it must not run, float32 logits, a second cache size), the greedy
check's per-prompt arithmetic and the per-row batch drafters. Each test names the planted bug it catches."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafters.fast_decoder import fast_decoder, forward_lm, lean_probe, unsupported
from specdec.cache import SpecDecCache
from specdec.drafting import checked_proposal, checked_row_proposals
from specdec.errors import SpecDecError
from specdec.types import DraftTree
from tests.test_extending import Repeat
from tests.tiny_models import pair

# --------------------------------------------------------------------------- proposal checks


def _binary(depth: int) -> DraftTree:
    """A full binary tree ``depth`` levels deep (2 + 4 + ... nodes), parents before children."""
    parents, level = [], [-1]
    for _ in range(depth):
        nxt = []
        for p in level:
            for _ in range(2):
                parents.append(p)
                nxt.append(len(parents) - 1)
        level = nxt
    return DraftTree(tokens=torch.arange(len(parents)) % 7, parents=torch.tensor(parents))


def test_a_tree_exactly_max_depth_deep_is_accepted_and_one_level_more_is_not():
    """A tree has more nodes than levels, so the depth test itself decides (a chain never reaches it). Catches the
    limit taken as exclusive (``depth >= max_depth``): every full-depth tree proposal refused."""
    drafter = Repeat(num_speculative_tokens=14)
    tree = _binary(2)  # 6 nodes, 2 levels
    assert checked_proposal(drafter, tree, 257, 2) is tree
    with pytest.raises(SpecDecError, match=r"propose\(max_depth=1\) returned a tree 2 levels deep"):
        checked_proposal(drafter, tree, 257, 1)


def test_each_row_is_held_to_its_own_depth_limit():
    """Rows near the end of their budget get a smaller ``max_depth`` than the others. Catches every row checked
    against the largest limit (the short row's over-deep tree let through) or against another row's."""
    deep, short = DraftTree.chain([1, 2, 3]), DraftTree.chain([4])
    assert checked_row_proposals(Repeat(), [deep, short], [3, 1], 3, 257) == [deep, short]
    with pytest.raises(SpecDecError, match=r"propose\(max_depths\)\[row 1\] \(max_depth 1\) returned a tree 3 levels"):
        checked_row_proposals(Repeat(), [short, deep], [3, 1], 3, 257)


# --------------------------------------------------------------------------- the lean forward


def _sliding_window_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = dict(pair("qwen2")[0].config.to_dict(), use_sliding_window=True, sliding_window=4, max_window_layers=0)
    config.pop("layer_types", None)
    return Qwen2ForCausalLM(Qwen2Config(**config)).eval()


def test_the_lean_probe_times_one_token_after_the_context_every_call():
    """The probe's output is the draft's logits for one token after ``context`` cached ones (all ids 0), and a second
    call gives the same (the cache is cut back to the context first). Catches the cut dropped: the second call
    overruns the cache's capacity. (With every id 0 the output does not depend on the positions: a probe fed at
    another position costs and returns the same.)"""
    draft = pair("llama")[1]
    probe = lean_probe(draft, True, 6)
    first, second = probe(), probe()
    with torch.no_grad():
        expected = draft(input_ids=torch.zeros(1, 7, dtype=torch.long)).logits[:, -1:]  # [1, 1, V]
    torch.testing.assert_close(first, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(second, first)


def test_a_model_the_lean_forward_cannot_run_gets_no_lean_probe():
    """Catches ``lean_probe`` handing out a probe for a model :class:`FastDecoder` does not support: the bench would
    time a forward no chain runs (and the probe would raise)."""
    assert lean_probe(_sliding_window_model(), True, 6) is None


def _llama(**config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, **config)).eval()


@pytest.mark.parametrize(("config", "reason"), [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"max_position_embeddings": 8, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
], ids=["gelu", "dynamic_rope"])
def test_models_whose_arithmetic_the_lean_forward_does_not_do_run_their_own(config, reason):
    """A GELU MLP, or a rope whose frequencies depend on the sequence length (dynamic NTK: a rotary table built for
    a 32-slot cache, past its 8 positions, is scaled even at positions 0-5), is not what the lean forward computes:
    ``forward_lm`` must give the model's own logits. Catches the activation or the rope-type check dropped from
    :func:`unsupported`."""
    model = _llama(**config)
    assert reason in unsupported(model) and fast_decoder(model) is None
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    logits, _ = forward_lm(model, ids, SpecDecCache.for_model(model, 32), torch.arange(6)[None])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=ids).logits.float(), atol=2e-5, rtol=2e-5)


def test_the_lean_forward_gives_float32_logits_from_a_bf16_model():
    """``forward_lm`` promises float32 logits either way (the drafters' softmax and sampling read them). Catches the
    lean forward returning the LM head's bf16 output."""
    draft = copy.deepcopy(pair("llama")[1]).to(torch.bfloat16)
    ids = torch.tensor([[3, 4, 5]])
    for fast in (True, False):
        logits, hidden = forward_lm(draft, ids, SpecDecCache.for_model(draft, 8), torch.arange(3)[None], fast=fast)
        assert logits.dtype == torch.float32 and hidden.dtype == torch.bfloat16


def test_one_model_run_with_a_small_cache_then_a_larger_one_matches_its_own_forward():
    """The rotary table is built per cache capacity: a draft used with an 8-slot cache (a probe, a short run) and
    then a 32-slot one must read positions past 8. Catches the table kept across capacities (an index error, or on
    a GPU a device assert)."""
    draft = copy.deepcopy(pair("llama")[1])
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(2))
    forward_lm(draft, ids[:, :4], SpecDecCache.for_model(draft, 8), torch.arange(4)[None])
    logits, _ = forward_lm(draft, ids, SpecDecCache.for_model(draft, 32), torch.arange(24)[None])
    with torch.no_grad():
        torch.testing.assert_close(logits, draft(input_ids=ids).logits, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- greedy up to rounding


def test_the_greedy_deficit_is_the_worst_token_and_each_prompt_is_cut_at_its_own_length():
    """A float32 target's own greedy outputs have deficit 0 (up to float noise); the least likely token planted last
    has deficit max(z) - min(z), the worst over the output, not its mean. Catches the mean taken, and every output of
    :func:`deficits` cut at the first prompt's length (a longer prompt's own tokens then counted as generated)."""
    from experiments.greedy_check import deficits, greedy_deficit
    from tests.tiny_models import peaky_pair

    target = peaky_pair(vocab=32, scale=30.0)[0]
    short, longer = torch.tensor([[1, 5, 9]]), torch.tensor([[4, 30, 2, 17, 8, 21]])
    outs = [target.generate(p, do_sample=False, max_new_tokens=8, pad_token_id=0) for p in (short, longer)]
    assert all(d == pytest.approx(0.0, abs=1e-4) for d in deficits(target, dict(enumerate(outs)), [short, longer]).values())
    with torch.inference_mode():
        z = target(input_ids=outs[0][:, :-1]).logits[0, -1]  # [V]: the last position's logits
    bad = outs[0].clone()
    bad[0, -1] = int(z.argmin())
    assert greedy_deficit(target, bad, short.shape[1]) == pytest.approx(float(z.max() - z.min()), rel=1e-4)


# --------------------------------------------------------------------------- one drafter copy per row


class _SeesVerify(Repeat):
    """Records the target's logits and hidden states its ``commit`` is handed, one entry per step."""

    def start(self, ctx):
        super().start(ctx)
        self.seen = []

    def commit(self, result, verify):
        self.seen.append((verify.logits.clone(), verify.hidden.clone()))
        super().commit(result, verify)


def test_each_rows_drafter_sees_the_roots_and_its_nodes_scores_as_at_batch_1(monkeypatch):
    """A drafter of one's own batched one copy per row (:class:`~specdec.batch_drafting.PerRowDrafters`) is handed,
    each step, its row's ``[1 + N]`` logits and hidden states, as at batch 1. Catches the row's view cut one short
    (``[:N]``: the last node's scores lost) on the logits or the hidden states."""
    from specdec import SpeculativeDecoder
    from specdec.batch_drafting import PerRowDrafters
    from tests.test_extending import PROMPTS

    copies = []
    monkeypatch.setattr(PerRowDrafters, "before_row", lambda self, row, drafter, n: copies.append(drafter))
    decoder = SpeculativeDecoder(pair("llama")[0], _SeesVerify())
    decoder.generate_batch(PROMPTS, max_new_tokens=6)
    rows = list(dict.fromkeys(copies))  # each row's copy, in row order
    for row, prompt in zip(rows, PROMPTS):
        alone = _SeesVerify()
        SpeculativeDecoder(pair("llama")[0], alone).generate(prompt, max_new_tokens=6)
        steps = row.seen[: len(alone.seen)]  # a batch row's copy also commits the row's last step; batch 1 does not
        assert alone.seen and [lg.shape for lg, _ in steps] == [lg.shape for lg, _ in alone.seen]
        for (lg, hid), (lg1, hid1) in zip(steps, alone.seen):
            torch.testing.assert_close((lg, hid), (lg1, hid1), atol=1e-4, rtol=1e-4)
