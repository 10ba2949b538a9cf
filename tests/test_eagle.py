"""EAGLE heads and the EAGLE drafter.

- Greedy EAGLE decoding equals ``model.generate(do_sample=False)`` for chains, static trees and dynamic
  trees, Llama and Qwen2 targets, eagle2 and eagle3 heads trained for a few steps on the tiny target;
  every other prompt stops on EOS, and ``max_new_tokens`` lands mid-tree.
- After every catch-up the head's root state equals a fresh computation from the committed tokens
  (target features from a full target forward, the head over all pairs): features, rows and cache
  stay aligned through commits, rejections and sampled trees.
- ``rejection`` with EAGLE drafts reproduces the target's exactly enumerated output distribution
  (sampled children of a preset at T=1.0 and at T=0.7 with top-k 3; deterministic children of an
  EAGLE-2 dynamic tree at T=1.0), with depth-1 acceptance inside the band where both branches run.
- A head in bfloat16 on a float32 target (``dtype="bfloat16"``) is still lossless: greedy equality,
  and a sampled-chain chi-square cell.
- Batches (``generate_batch``, static and continuous): every row equals its batch-1 run.
- Bad input and configs: ``tests/test_eagle_files.py``; training (micro zoo target): ``tests/test_eagle_training.py``.
"""
from __future__ import annotations

import functools

import pytest
import torch

from drafters import EagleDrafter
from drafters.eagle_heads import EagleHead
from experiments.eagle_training import VERSION_DEFAULTS, eagle_loss, teacher_features
from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from tests.greedy import cases_for, check_greedy
from tests.lossless import BUGS_FOR_SHAPE, RUNS_FOR, check_cell
from tests.tiny_models import pair, peaky_pair, prompts

ARCHS = ["llama", "qwen2"]
VERSIONS = ["eagle2", "eagle3"]
SHAPES = {"chain": {"num_speculative_tokens": 3}, "binary": {"tree": "binary"}, "sparse60": {"tree": "sparse60"},
          "dynamic": {"budget": 12, "num_speculative_tokens": 5}}


@functools.cache
def trained_head(arch: str, version: str, steps: int = 60) -> EagleHead:
    """A head trained ``steps`` steps on text the tiny target samples itself (a few seconds)."""
    target = pair(arch)[0]
    head = EagleHead.for_target(target, version, seed=0)
    tap = head.tap(target)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, target.config.vocab_size - 1, (32, 4), generator=gen)
    with torch.no_grad():
        rows = target.generate(starts, attention_mask=torch.ones_like(starts), do_sample=True, top_k=0,
                               max_new_tokens=44, min_new_tokens=44, pad_token_id=0)  # [32, 48]
    opts = dict(VERSION_DEFAULTS[version], ttt_decay=0.8, ttt_steps=2 if version == "eagle3" else 1, ce_weight=1.0,
                ce_target="soft")
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, betas=(0.9, 0.95))
    head.train()
    for _ in range(steps):
        batch = rows[torch.randint(0, rows.shape[0], (8,), generator=gen)]
        raw, logits, hidden = teacher_features(target, tap, batch)
        loss, _ = eagle_loss(head, raw, logits, hidden, batch, opts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if tap is not None:
        tap.remove()
    return head.eval()


def noisy_head(target, version: str, noise: float, seed: int = 1) -> EagleHead:
    """An untrained head (the target's first layer) with Gaussian noise of ``noise`` x each tensor's std."""
    head = EagleHead.for_target(target, version)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    return head


# --------------------------------------------------------------------------- greedy equality


@pytest.fixture(scope="module", params=ARCHS)
def arch_cases(request):
    return request.param, cases_for(request.param)[:12]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_eagle_equals_plain_greedy(arch_cases, version, shape):
    """12 prompts per architecture (6 stop on EOS), max_new_tokens landing mid-tree; drafts get accepted."""
    arch, cases = arch_cases
    target = pair(arch)[0]
    drafter = EagleDrafter(trained_head(arch, version), **SHAPES[shape])
    check_greedy(target, drafter, cases)
    dec = SpeculativeDecoder(target, drafter)
    tau = sum(dec.generate(ids, 24, seed=0).stats.tau for ids, *_ in cases[:4]) / 4
    assert tau > 1.2, f"the {version} head accepts almost nothing (tau {tau:.2f}): the test would not test much"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", ["chain", "dynamic"])
def test_a_bfloat16_head_on_a_float32_target_is_still_lossless(version, shape):
    """``dtype="bfloat16"``: the head runs in bf16 (the target's embedding and, for eagle2, LM head are
    called in their own dtype, untouched); greedy output still equals plain greedy, and drafts get accepted."""
    import copy

    target = pair("llama")[0]
    before = target.get_input_embeddings().weight.clone()
    drafter = EagleDrafter(copy.deepcopy(trained_head("llama", version)), dtype="bfloat16", **SHAPES[shape])
    cases = cases_for("llama")[:6]
    check_greedy(target, drafter, cases)
    assert {p.dtype for p in drafter.head.parameters()} == {torch.bfloat16}
    assert target.dtype == torch.float32 and torch.equal(target.get_input_embeddings().weight, before)
    tau = sum(SpeculativeDecoder(target, drafter).generate(ids, 24, seed=0).stats.tau for ids, *_ in cases[:4]) / 4
    assert tau > 1.2, f"the bf16 {version} head accepts almost nothing (tau {tau:.2f})"


def test_head_dtype_choices(monkeypatch):
    from tests.test_auto_dtype import _timed

    target = pair("llama")[0]
    for native, bf16 in ((True, 0.5), (True, 0.9), (False, 0.5)):  # auto: bf16 where native and measured faster
        _timed(monkeypatch, native, bf16)
        choices = [(None, torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16),
                   ("auto", torch.bfloat16 if native and bf16 < 0.85 else torch.float32)]
        for dtype, want in choices:
            drafter = EagleDrafter(EagleHead.for_target(target, "eagle3"), dtype=dtype)
            drafter.step_shape(target)
            assert next(drafter.head.parameters()).dtype == want, (native, dtype)
    with pytest.raises(SpecDecError, match=r"drafter.dtype='bf16' is unknown; choose null, auto or one of"):
        EagleDrafter(EagleHead.for_target(target, "eagle3"), dtype="bf16")


def test_a_head_shared_by_drafters_of_two_dtypes_runs_in_each_ones():
    """Binding converts the head in place, so each drafter converts it back to its own dtype when it
    starts; the rotary frequencies stay float32 through every conversion."""
    target = pair("llama")[0]
    head = EagleHead.for_target(target, "eagle3")
    freqs = {n: b.clone() for n, b in head.named_buffers() if n.endswith("inv_freq")}
    half, full = EagleDrafter(head, dtype="bfloat16"), EagleDrafter(head)
    for drafter, want in [(half, torch.bfloat16), (full, torch.float32), (half, torch.bfloat16)]:
        drafter.step_shape(target)
        assert next(head.parameters()).dtype == want
    assert freqs and all(torch.equal(b, freqs[n]) for n, b in head.named_buffers() if n in freqs)


def test_bfloat16_heads_in_a_batch_and_over_a_draft_vocabulary():
    """A bf16 eagle3 head through ``generate_batch`` (per-row copies sharing one tap), and a bf16 eagle2 head
    over a draft vocabulary (the target's frozen rows, cast): greedy rows still equal HF greedy."""
    import copy

    target, _, tok = pair("llama")
    rows, limits = prompts(tok, 3, seed=7), [9, 14, 6]
    eagle2 = copy.deepcopy(trained_head("llama", "eagle2"))
    eagle2.use_draft_vocab(torch.arange(0, target.config.vocab_size, 2))
    for head in (copy.deepcopy(trained_head("llama", "eagle3")), eagle2):
        out = SpeculativeDecoder(target, EagleDrafter(head, dtype="bfloat16", num_speculative_tokens=3)).generate_batch(
            rows, limits, max_rows=2)
        for i, ids in enumerate(rows):
            ref = target.generate(ids, do_sample=False, max_new_tokens=limits[i], pad_token_id=0)
            assert out.sequences[i].tolist() == ref.tolist(), f"{head.version} row {i}"
        assert {p.dtype for p in head.parameters()} == {torch.bfloat16}


def test_benchmark_runs_leave_no_feature_hooks_on_the_target():
    """Each method's run releases its drafter (EAGLE-3's hooks), so no other method runs with them."""
    from experiments.bench_batch import ours_batched
    from experiments.bench_methods import decode_run
    from specdec.drafting import DraftContext
    from specdec.rng import KeyedRandom

    target, _, tok = pair("llama")
    hooks = lambda: sum("FeatureTap" in getattr(h, "__qualname__", "")
                        for layer in target.model.layers for h in layer._forward_hooks.values())
    rows = prompts(tok, 2, seed=3)
    drafter = EagleDrafter(trained_head("llama", "eagle3"), num_speculative_tokens=2)
    before = hooks()  # other tests' drafters may have left theirs on the shared target
    drafter.start(DraftContext(target, SamplingParams(), KeyedRandom.for_seed(0), 16))
    assert hooks() == before + 1  # what is counted
    decode_run(target, drafter, 4, 0.0)(rows[0])
    assert hooks() == before
    for chain in (True, False):
        kwargs = {"num_speculative_tokens": 2} if chain else {"tree": "binary"}
        ours_batched(SpeculativeDecoder(target, EagleDrafter(trained_head("llama", "eagle3"), **kwargs)), rows, 4)
        assert hooks() == before


def test_one_token_prompt_drafts_from_the_second_step():
    target = pair("llama")[0]
    drafter = EagleDrafter(trained_head("llama", "eagle3"), num_speculative_tokens=3)
    ids = torch.tensor([[65]])
    out = SpeculativeDecoder(target, drafter).generate(ids, 12)
    assert out.sequences.tolist() == target.generate(ids, do_sample=False, max_new_tokens=12).tolist()
    assert out.stats.proposed_per_step[0] == 0 and out.stats.proposed_per_step[1] == 3


def test_a_second_propose_without_commit_repeats_the_tree():
    from specdec.drafting import DraftContext
    from specdec.rng import KeyedRandom

    target, _, tok = pair("qwen2")
    drafter = EagleDrafter(trained_head("qwen2", "eagle2"), budget=8, num_speculative_tokens=4)
    drafter.start(DraftContext(target, SamplingParams(), KeyedRandom.for_seed(0), 64 + drafter.max_fed()))
    ids = prompts(tok, 1)[0]
    with torch.no_grad():
        hidden = target(ids[:, :-1], output_hidden_states=True).hidden_states[-1][0]
    drafter.prefill(ids, hidden)
    first, second = drafter.propose(8), drafter.propose(8)
    assert first.num_nodes == 8 and first.tokens.tolist() == second.tokens.tolist()
    assert first.parents.tolist() == second.parents.tolist()


@pytest.mark.parametrize("version", VERSIONS)
def test_tree_levels_feed_each_node_its_parents_feature(version):
    """Greedy: a tree's rank-0 path equals the chain (tree levels through HeadFeed's masks and parent
    features, the chain one causal token at a time); a dynamic tree's best child is the chain's first draft."""
    from specdec.drafting import DraftContext
    from specdec.rng import KeyedRandom

    target, _, tok = pair("llama")
    head = trained_head("llama", version)
    ids = prompts(tok, 3, seed=4)[2]
    trees = {}
    for name, kwargs in (("chain", {"num_speculative_tokens": 4}), ("binary", {"tree": "binary"}),
                         ("dynamic", {"budget": 6, "num_speculative_tokens": 4, "top_k_children": 2})):
        drafter = EagleDrafter(head, **kwargs)
        drafter.start(DraftContext(target, SamplingParams(), KeyedRandom.for_seed(0), 64 + drafter.max_fed()))
        with torch.no_grad():  # the prefill forward, after start (eagle3's hooks read it)
            hidden = target(ids[:, :-1], output_hidden_states=True).hidden_states[-1][0]
        drafter.prefill(ids, hidden)
        trees[name] = drafter.propose(8)
        drafter.close()
    binary = trees["binary"]
    path, node = [], -1
    for _ in range(4):
        node = min(i for i in range(binary.num_nodes) if int(binary.parents[i]) == node)  # first child: rank 0
        path.append(int(binary.tokens[node]))
    assert path == trees["chain"].tokens.tolist()
    assert int(trees["dynamic"].tokens[0]) == path[0]


# --------------------------------------------------------------------------- the head's state after commits


class CheckedEagle(EagleDrafter):
    """After every catch-up: the head's cache holds one slot per committed pair, and its root logits and
    feature equal a fresh computation from the committed tokens."""

    checks = 0

    def _catch_up(self):
        super()._catch_up()
        if self._root is None:
            return
        target, tokens = self.ctx.target, self.tokens
        assert self.cache.length == len(tokens) - 1
        with torch.no_grad():
            out = target(torch.tensor([tokens[:-1]]), output_hidden_states=True)
            raw = self._tap.take()[0] if self._tap is not None else out.hidden_states[-1][0]  # [n, H or 3H]
            logits, feature = self.head(torch.tensor([tokens[1:]]), self.head.target_features(raw)[None])
        torch.testing.assert_close(self._root[0], logits[0, -1].float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(self._root[1], feature[0, -1], atol=1e-4, rtol=1e-4)
        type(self).checks += 1


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape, sampling, mode", [
    ("chain", SamplingParams(), "deterministic"),
    ("sparse60", SamplingParams(temperature=1.0), "with_replacement"),
    ("dynamic", SamplingParams(), "deterministic"),
])
def test_head_state_after_commit_equals_a_fresh_computation(version, shape, sampling, mode):
    target, _, tok = pair("llama")
    kwargs = dict(SHAPES[shape], tree_sampling=mode) if shape == "sparse60" else SHAPES[shape]
    drafter = CheckedEagle(trained_head("llama", version), **kwargs)
    decoder = SpeculativeDecoder(target, drafter, "greedy" if sampling.greedy else "rejection", sampling)
    CheckedEagle.checks = 0
    accepted = []
    for ids in prompts(tok, 3, seed=2):
        accepted += decoder.generate(ids, max_new_tokens=30, seed=0).stats.accepted_per_step
    assert CheckedEagle.checks >= 10
    assert 0 < sum(accepted) and min(accepted) < max(accepted)  # partial acceptance happened


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", ["chain", "binary", "dynamic"])
@pytest.mark.parametrize("max_rows", [None, 2])
def test_batched_eagle_rows_equal_their_batch_one_runs(version, shape, max_rows):
    """``generate_batch`` (one batch of 4, and continuous with 2 rows at once): greedy rows equal HF greedy;
    eagle3's copies share one feature tap, read once per target forward and handed out by row."""
    target, _, tok = pair("llama")
    rows, limits = prompts(tok, 4, seed=7), [9, 14, 6, 12]
    make = lambda: EagleDrafter(trained_head("llama", version), **SHAPES[shape])
    out = SpeculativeDecoder(target, make()).generate_batch(rows, limits, max_rows=max_rows)
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=limits[i], pad_token_id=0)
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"
        single = SpeculativeDecoder(target, make()).generate(ids, limits[i])
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step, f"row {i} drafts differ"
    sampling = SamplingParams(temperature=1.0)
    out = SpeculativeDecoder(target, make(), "rejection", sampling).generate_batch(rows, limits, seed=3,
                                                                                  max_rows=max_rows)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make(), "rejection", sampling).generate(ids, limits[i], seed=3 + i)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"sampled row {i}"


def test_batched_chain_forwards_the_head_once_per_position_for_all_rows():
    """The chain's batched form (:class:`drafters.eagle_batch.BatchEagleChain`): one head forward per draft
    position whatever the number of rows, a one-token prompt's row drafting from its second step."""
    from drafters.eagle_batch import BatchEagleChain

    target, _, tok = pair("llama")
    rows = [torch.tensor([[65]]), *prompts(tok, 3, seed=9)]
    drafter = EagleDrafter(trained_head("llama", "eagle3"), num_speculative_tokens=3)
    assert isinstance(drafter.batched(), BatchEagleChain)
    assert not isinstance(EagleDrafter(trained_head("llama", "eagle3"), tree="binary").batched(), BatchEagleChain)
    calls = []
    hook = drafter.head.model.lm_head.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        out = SpeculativeDecoder(target, drafter).generate_batch(rows, max_new_tokens=10)
    finally:
        hook.remove()
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=0)
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"
    assert out.row_stats[0].proposed_per_step[:2] == [0, 3] and out.row_stats[1].proposed_per_step[0] == 3
    steps = max(len(s.proposed_per_step) for s in out.row_stats)
    assert len(calls) <= 1 + 3 * steps  # the joining rows' prompts, then at most k forwards a step for all rows


@pytest.mark.parametrize("version", VERSIONS)
def test_batched_chain_admits_rows_after_a_step_without_head_forwards(version):
    """Continuous batching whose first rows are one-token prompts (no head forward in step 1, the head
    cache never written) and finish at once: the rows admitted then must get cache rows of their own
    (a regression: they shared row 0 and a later row selection failed)."""
    target, _, tok = pair("llama")
    rows, limits = [torch.tensor([[65]]), torch.tensor([[66]]), *prompts(tok, 2, seed=5)], [1, 8, 8, 6]
    make = lambda: EagleDrafter(trained_head("llama", version), num_speculative_tokens=3)
    out = SpeculativeDecoder(target, make()).generate_batch(rows, limits, max_rows=2)
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=limits[i], pad_token_id=0)
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"
        single = SpeculativeDecoder(target, make()).generate(ids, limits[i])
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step, f"row {i} drafts differ"
        assert out.row_stats[i].proposed_per_step == single.stats.proposed_per_step, f"row {i} drafts differ"


# --------------------------------------------------------------------------- losslessness

#: (drafter shape, head) per lossless cell: deterministic children (an EAGLE-2 dynamic tree, eagle2 head)
#: and sampled children (a preset grown with i.i.d. draws, eagle3 head); noise sets the depth-1 acceptance
#: (t1.0 / t0.7_topk3: about 0.60 / 0.68 and 0.83 / 0.81).
LOSSLESS = {
    "tree_deterministic": ({"budget": 5, "num_speculative_tokens": 2, "top_k_children": 2}, "eagle2", 0.2),
    "tree_with_replacement": ({"tree": [[0], [1], [0, 0], [0, 1], [1, 0]], "tree_sampling": "with_replacement"},
                              "eagle3", 0.6),
    "chain_sampled_bf16": ({"num_speculative_tokens": 3, "dtype": "bfloat16"}, "eagle3", 0.6),
}


#: Sampled children at both temperatures (top-k warps q as well as p there); deterministic children at T=1.
#: A head in bf16 on the fp32 target: q is recorded as drawn from the bf16 logits.
CELLS = [("t1.0", "tree_with_replacement"), ("t0.7_topk3", "tree_with_replacement"), ("t1.0", "tree_deterministic"),
         ("t0.7_topk3", "chain_sampled_bf16")]


#: The planted bugs of each EAGLE shape's arithmetic (tests/lossless.py).
BUGS = BUGS_FOR_SHAPE | {"chain_sampled_bf16": BUGS_FOR_SHAPE["chain"]}


@pytest.mark.parametrize("setting, shape, rule", [(setting, shape, rule) for setting, shape in CELLS
                                                   for rule in ["rejection", *BUGS[shape]]])
def test_rejection_with_eagle_drafts_is_lossless(setting, shape, rule, record_property):
    """``rejection`` passes (2000 runs); each planted bug of the shape's arithmetic (a correction drawn from p
    instead of the residual, a deterministic child's p not zeroed, accepting every draft) fails in the same
    cell (500 or 100 runs): the cell has power."""
    assert RUNS_FOR[rule] <= 2000
    target, _ = peaky_pair()
    kwargs, version, noise = LOSSLESS[shape]
    for name, value in check_cell(target, EagleDrafter(noisy_head(target, version, noise), **kwargs), setting,
                                  rule).items():
        record_property(name, value)


@pytest.mark.parametrize("version", VERSIONS)
def test_padded_verify_widths_keep_eagle_lossless(arch_cases, version):
    """verify_widths pads the target's verify (EAGLE-3's feature taps then see padding after the nodes):
    chains and dynamic trees still equal HF greedy, EOS and max_new_tokens mid-draft included."""
    arch, cases = arch_cases
    target = pair(arch)[0]
    default_eos = target.generation_config.eos_token_id
    try:
        for shape in ("chain", "dynamic"):
            drafter = EagleDrafter(trained_head(arch, version), **SHAPES[shape])
            for ids, max_new, eos, ref in cases[:6]:
                target.generation_config.eos_token_id = eos
                dec = SpeculativeDecoder(target, drafter, verify_widths=[6, 8, 16])
                assert dec.generate(ids, max_new_tokens=max_new, seed=0).sequences.tolist() == ref.tolist()
    finally:
        target.generation_config.eos_token_id = default_eos
