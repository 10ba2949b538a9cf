"""Mutation pass 17: the verifier's forwards (:mod:`verifier.verifier`, tree attention :mod:`verifier.attention`,
the batched forwards :mod:`verifier.batch`), the batch-1 decode loop (:mod:`specdec.decoder`), the drafter checks
(:mod:`specdec.drafting`) and the decode statistics (:mod:`specdec.stats`).

Each test names the planted bug it catches: small edits (a comparison, a dropped line, a shifted position) that the
rest of the suite let through. The tiny random models hardly depend on positions, so a forward that puts a token at
the wrong position still emits the right greedy tokens: logits are compared with the model's own full forward.
"""
from __future__ import annotations

import pytest
import torch

from specdec.cache import SpecDecCache
from specdec.drafting import Drafter
from specdec.types import DraftTree
from tests.tiny_models import pair
from verifier.verifier import Verifier, tree_forward

PROMPT = [3, 4, 5, 6]
TREE = [-1, -1, 0, 0, 2]  # parents: two children of the root, two of node 0, one of node 2


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's own next-token logits after ``ids`` ([V])."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def _path(tokens: list[int], parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.insert(0, tokens[node])
        node = parents[node]
    return out


class _Chain(Drafter):
    """Proposes ``chain`` (cut to ``max_depth``) at every step."""

    def __init__(self, chain: list[int]):
        super().__init__()
        self.chain = chain

    @property
    def max_nodes(self) -> int:
        return len(self.chain)

    def propose(self, max_depth: int) -> DraftTree:
        return DraftTree.chain(self.chain[:max_depth])


class _FixedTree(Drafter):
    """Proposes the tree :data:`TREE` (three levels) wherever ``max_depth`` allows it, and records every ``max_depth``."""

    def __init__(self):
        super().__init__()
        self.asked: list[int] = []

    @property
    def max_nodes(self) -> int:
        return len(TREE)

    def propose(self, max_depth: int) -> DraftTree:
        self.asked.append(max_depth)
        if max_depth < 3:
            return DraftTree.empty()
        return DraftTree(tokens=torch.tensor([7, 9, 11, 13, 15]), parents=torch.tensor(TREE))


def _gpt2(positions: int = 8):
    """A tiny GPT-2: a learned position table of ``positions`` rows (the RoPE models shift as a whole unseen)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=positions, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


# --------------------------------------------------------------------------- the verifier and tree attention


@pytest.mark.parametrize("widths", [None, [8]], ids=["unpadded", "padded"])
def test_every_verify_logit_equals_the_models_full_forward_on_its_path(widths):
    """Planted bugs: the verify block at positions ``length + 1 + depth`` (``prefix_len + 1`` in ``tree_forward``),
    a node's depth one short (``tree.depth - 1`` in ``Verifier.verify``), the ancestor mask transposed. Greedy decoding
    of the tiny models kept its tokens; row 0 (the root) and row 1 + i (node i) must be the full forward's logits."""
    target = pair("llama")[0]
    verifier = Verifier(target, verify_widths=widths)
    cache = SpecDecCache.for_model(target, 32)
    verifier.prefill(cache, torch.tensor([PROMPT[:-1]]))
    tokens = [7, 9, 11, 13, 15]
    tree = DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor(TREE))
    out = verifier.verify(cache, PROMPT[-1], tree, 0)
    assert out.logits.shape[0] == out.hidden.shape[0] == 1 + len(tokens)
    torch.testing.assert_close(out.logits[0], _full_logits(target, PROMPT), atol=1e-4, rtol=1e-4)
    for i in range(len(tokens)):
        ids = PROMPT + _path(tokens, TREE, i)
        torch.testing.assert_close(out.logits[1 + i], _full_logits(target, ids), atol=1e-4, rtol=1e-4)


def test_verify_positions_are_absolute_on_a_learned_position_table():
    """Planted bug: every forward's positions one past (``prefix_len + 1 + depth``). A RoPE model sees only relative
    positions, so the shifted run kept its logits; GPT-2's learned table does not."""
    model = _gpt2()
    verifier = Verifier(model)
    cache = SpecDecCache.for_model(model, 16)
    verifier.prefill(cache, torch.tensor([[1, 2]]))
    out = verifier.verify(cache, 3, DraftTree.chain([4, 5]), 0)
    for i in range(3):
        torch.testing.assert_close(out.logits[i], _full_logits(model, [1, 2, 3, 4, 5][: 3 + i]), atol=1e-4, rtol=1e-4)


def test_positions_past_a_learned_position_table_are_clamped_into_it():
    """Planted bug: positions clamped to ``limit`` instead of ``limit - 1``: a token a step drops (past the context)
    indexed one past GPT-2's position table. The last real position still computes its own logits."""
    model = _gpt2(positions=8)
    cache = SpecDecCache.for_model(model, 16)
    tree_forward(model, cache, torch.tensor([[1, 2, 3, 4, 5, 6, 7]]))
    logits, _ = tree_forward(model, cache, torch.tensor([[8, 9, 10]]))  # positions 7, 8, 9: the last two clamped
    torch.testing.assert_close(logits[0], _full_logits(model, [1, 2, 3, 4, 5, 6, 7, 8]), atol=1e-4, rtol=1e-4)


def test_prefill_returns_the_last_layers_hidden_states():
    """Planted bug: ``hidden_states[-2]`` (the input of the last layer) for ``[-1]``: EAGLE-style drafters read the
    target's final states, which the greedy tests' draft models never look at."""
    target = pair("llama")[0]
    hidden = Verifier(target).prefill(SpecDecCache.for_model(target, 16), torch.tensor([PROMPT]))
    with torch.no_grad():
        ref = target(input_ids=torch.tensor([PROMPT]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(hidden, ref, atol=1e-5, rtol=1e-5)


def test_a_causal_chunk_after_the_cache_equals_the_full_forward():
    """Planted bugs: a causal chunk's default depths from 1 (``arange(1, n + 1)``), its SDPA mask aligned top-left
    (``causal_upper_left``: the chunk's first token sees only the first cache slot) and a chunk of two tokens
    taken without a causal mask (``n > 2``)."""
    target = pair("llama")[0]
    for chunk in ([7, 8], [7, 8, 9]):
        cache = SpecDecCache.for_model(target, 32)
        tree_forward(target, cache, torch.tensor([PROMPT]))
        logits, _ = tree_forward(target, cache, torch.tensor([chunk]))
        for i in range(len(chunk)):
            torch.testing.assert_close(logits[i], _full_logits(target, PROMPT + chunk[: i + 1]), atol=1e-4, rtol=1e-4)



def test_a_draft_vocabulary_view_switches_its_own_config_too():
    """Planted bug: the configs found for a model reused for a ``copy.copy`` view of it (``known[0] is not model``
    dropped from ``_configs``): the view's own config (``with_draft_vocab`` deep-copies it) kept its attention
    implementation while the backend was switched."""
    from drafters.draft_vocab import with_draft_vocab
    from verifier.verifier import attention_backend

    model = pair("llama")[1]
    with attention_backend(model, "sdpa"):  # finds and keeps the model's configs
        pass
    view = with_draft_vocab(model, torch.arange(100))
    before = view.config._attn_implementation
    with attention_backend(view, "sdpa"):
        assert view.config._attn_implementation == "specdec_sdpa" and model.config._attn_implementation == "specdec_sdpa"
    assert view.config._attn_implementation == before


# --------------------------------------------------------------------------- the decode loop


def test_eos_ids_fall_back_to_the_model_config_and_keep_every_listed_id():
    """Planted bugs: the model config's EOS never read when the generation config has none, and only the first of
    a list of EOS ids kept (a chat model's end-of-turn id never stopped decoding)."""
    from types import SimpleNamespace

    from specdec.decoder import eos_token_ids

    def model(gen, cfg):
        return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=gen), config=SimpleNamespace(eos_token_id=cfg))

    assert eos_token_ids(model(None, [5, 7])) == {5, 7}
    assert eos_token_ids(model([9, 2], 5)) == {9, 2}
    assert eos_token_ids(model(None, None)) == set()


def test_a_prompt_and_budget_that_exactly_fill_the_context_decode():
    """Planted bugs: ``t + max_new_tokens >= limit`` refused a run that ends on the context's last position, and the
    over-long prompt's suggested ``dataset.max_prompt_tokens`` the whole context rather than half of it."""
    from drafters import NoDrafter
    from specdec import SpeculativeDecoder
    from specdec.errors import SpecDecError

    decoder = SpeculativeDecoder(pair("llama")[0], NoDrafter())
    out = decoder.generate(torch.zeros(1, 2044, dtype=torch.long), max_new_tokens=4)
    assert out.sequences.shape[1] <= 2048
    with pytest.raises(SpecDecError, match=r"max_prompt_tokens=1024\)"):
        decoder.generate(torch.zeros(1, 2049, dtype=torch.long), max_new_tokens=4)


def test_the_cache_holds_a_verify_block_padded_well_past_the_drafts():
    """Planted bug: the target cache sized for ``max_nodes + 1`` block tokens, not the padded width
    (``verifier.width``): a chain of two verified at width 16 ran out of cache slots near the budget's end."""
    from specdec import SpeculativeDecoder

    target = pair("llama")[0]
    padded = SpeculativeDecoder(target, _Chain([7, 8]), verify_widths=[16]).generate(torch.tensor([PROMPT]), 6)
    plain = SpeculativeDecoder(target, _Chain([7, 8])).generate(torch.tensor([PROMPT]), 6)
    assert torch.equal(padded.sequences, plain.sequences)


def test_a_step_asks_for_the_budget_less_the_bonus_and_records_the_trees_depth():
    """Planted bugs: ``propose(max_depth=remaining)`` (the target's own token left out of the budget: drafts past
    ``max_new_tokens``) and a tree's depth recorded as its node count (``depth_proposed`` five levels for a tree of
    three)."""
    from specdec import SpeculativeDecoder

    drafter = _FixedTree()
    out = SpeculativeDecoder(pair("llama")[0], drafter).generate(torch.tensor([PROMPT]), max_new_tokens=6)
    assert drafter.asked[0] == 5
    assert all(asked < 6 - done for asked, done in zip(drafter.asked, [0] + out.stats.accepted_per_step))
    assert len(out.stats.depth_proposed) == 3 and out.stats.proposed_per_step[0] == len(TREE)


# --------------------------------------------------------------------------- drafter checks


def test_draft_rows_with_zero_entries_are_distributions():
    """Planted bug: a draft row flagged for any entry ``<= 0`` (for ``< 0``): top-k sampling or a draft vocabulary
    leaves most of a row at exactly 0, and every such proposal was refused as "not distributions"."""
    from specdec.drafting import checked_proposal

    probs = torch.zeros(2, 257)
    probs[0, 7], probs[1, 8], probs[1, 9] = 1.0, 0.25, 0.75
    tree = DraftTree.chain([7, 8], draft_probs=probs)
    assert checked_proposal(_Chain([7, 8]), tree, 257, 5) is tree



def test_a_float32_draft_row_summing_to_1_01_or_with_a_negative_entry_is_named():
    """Planted bugs: half precision's rounding tolerance (3e-2) taken for float32 rows too (a row summing to 1.01, a
    drafter's scaled distribution, passed), and the per-row message's ``low >= 0`` test dropped (a row summing to 1
    with a negative entry got the generic message, naming no row)."""
    from specdec.drafting import checked_proposal
    from specdec.errors import SpecDecError

    probs = torch.zeros(1, 257)
    probs[0, 7], probs[0, 8] = 0.51, 0.5
    with pytest.raises(SpecDecError, match="row 0 sums to 1.01"):
        checked_proposal(_Chain([7]), DraftTree.chain([7], draft_probs=probs), 257, 5)
    probs[0, 7], probs[0, 8], probs[0, 9] = 1.0, 0.5, -0.5  # sums to 1, one entry below 0
    with pytest.raises(SpecDecError, match=r"row 0 has a negative entry \(-0.5\)"):
        checked_proposal(_Chain([7]), DraftTree.chain([7], draft_probs=probs), 257, 5)


def test_a_batch_names_the_row_whose_draft_probs_are_wrong():
    """Planted bug: after the batch's one check found a bad row, the first sampled row raised (its own check
    dropped): a fine row 0 was named, with no row to fix, instead of row 1."""
    from specdec.drafting import checked_row_proposals
    from specdec.errors import SpecDecError

    good, bad = torch.zeros(1, 257), torch.zeros(1, 257)
    good[0, 7], bad[0, 7] = 1.0, 2.0
    trees = [DraftTree.chain([7], draft_probs=good), DraftTree.chain([7], draft_probs=bad)]
    with pytest.raises(SpecDecError, match=r"\[row 1\] returned draft_probs whose row 0 sums to 2"):
        checked_row_proposals(_Chain([7]), trees, [5, 5], 4, 257)

# --------------------------------------------------------------------------- statistics


def test_a_batch_aggregates_tau_is_per_row_step_not_per_batch_step():
    """Planted bugs: ``tau`` divided by ``steps`` (the batch's own steps in an aggregate) instead of
    ``target_forwards`` (the rows' steps): a batch of two rows reported twice the tokens per forward; and a run of no
    steps reporting ``mean_accepted_drafts`` -1 (its ``target_forwards`` guard dropped)."""
    from specdec.stats import DecodeStats

    stats = DecodeStats(new_tokens=12, target_forwards=6, batch_steps=3)
    assert stats.steps == 3 and stats.tau == pytest.approx(2.0) and stats.mean_accepted_drafts == pytest.approx(1.0)
    assert DecodeStats().tau == 0.0 and DecodeStats().mean_accepted_drafts == 0.0


def test_the_fixed_shape_step_takes_every_prompt_at_once_and_refuses_fewer_rows():
    """Bug: ``max_rows <= len(prompts)`` refused a compiled batch whose ``max_rows`` equals its prompt count (all
    rows at once: no continuous batching asked for); fewer rows than prompts stays one error."""
    from drafters import NoDrafter
    from specdec import SpecDecError, SpeculativeDecoder

    decoder = SpeculativeDecoder(pair("llama")[0], NoDrafter(), compile="static")
    prompts = [torch.tensor([PROMPT]), torch.tensor([PROMPT[:3]])]
    out = decoder.generate_batch(prompts, max_new_tokens=3, max_rows=2)
    assert [s.shape[1] for s in out.sequences] == [7, 6]
    with pytest.raises(SpecDecError, match="max_rows=1 .continuous batching. needs compile='none'"):
        decoder.generate_batch(prompts, max_new_tokens=3, max_rows=1)


def test_specdec_attention_outside_the_tree_forward_is_refused():
    """Bug: the check dropped: a model whose attention was switched to ours, called as a plain forward (no tree
    mask), ran without one instead of saying what it needs."""
    from verifier.attention import _require_tree

    with pytest.raises(RuntimeError, match="outside verifier.tree_forward: it needs the tree mask"):
        _require_tree({})
    _require_tree({"specdec_prefix_len": 0})
