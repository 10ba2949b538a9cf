"""The hybrid drafter (``drafters.HybridDrafter``): prompt lookup first, a trained drafter for the other steps.

Lossless like each of its parts: greedy equals plain greedy (both parts really propose in those runs),
and ``rejection`` over a mix of deterministic n-gram chains and sampled draft-model chains passes the
chi-square test against the exact target distribution, while planted bugs of either kind of step fail it.
In batches every row equals its batch-1 run, and the tensorized rule over batches that mix lookup chains with
sampled chains equals the per-node rule row by row.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from drafters import DraftModelDrafter, EagleDrafter, HybridDrafter, NGramDrafter
from specdec import SamplingParams, SpeculativeDecoder
from specdec.errors import ConfigError
from specdec.types import DraftTree
from tests import lossless
from tests.greedy import cases_for, check_greedy
from tests.lossless import NGRAM_PROMPT, SETTINGS, check_cell
from tests.test_eagle import trained_head
from tests.tiny_models import pair, peaky_noisy_pair


def _second(kind: str, arch: str):
    if kind == "draft_model":
        return DraftModelDrafter(pair(arch)[1], num_speculative_tokens=3)
    if kind == "eagle3_alts":  # a tree preset behind lookup (the best configuration on the embedded pair)
        return EagleDrafter(trained_head(arch, "eagle3"), tree="chain4_alts")
    return EagleDrafter(trained_head(arch, "eagle3"), num_speculative_tokens=3)


def _batch_second(kind: str, arch: str):
    """The second part for the batch tests: a draft model close to the target (its drafts are accepted, so a
    stale draft cache would show in the per-step counts), EAGLE-3, or Medusa."""
    if kind == "draft_model":
        from tests.tiny_models import noisy_copy

        return DraftModelDrafter(noisy_copy(arch), num_speculative_tokens=3)
    if kind == "medusa":  # a tree drafter: one copy per row
        from drafters import MedusaDrafter
        from drafters.medusa_heads import MedusaHeads

        torch.manual_seed(0)
        return MedusaDrafter(MedusaHeads.for_target(pair(arch)[0], num_heads=3, init="random"), tree="binary")
    return _second(kind, arch)


def _by_part(drafter: HybridDrafter, stats) -> dict:
    """``stats.steps_by_source`` as ``{"first": n, "second": m}`` (the hybrid's labels of its parts)."""
    assert set(stats.steps_by_source) <= set(drafter.labels), stats.steps_by_source
    return {part: stats.steps_by_source.get(label, 0) for part, label in zip(("first", "second"), drafter.labels)}


def _steps(target, drafter, prompts, temperature: float = 0.0) -> dict:
    """Steps proposed by each part of ``drafter`` over decodes of ``prompts`` (seeds 0, 1, ...)."""
    decoder = SpeculativeDecoder(target, drafter, "greedy" if temperature == 0 else "rejection",
                                 SamplingParams(temperature=temperature))
    total = {"first": 0, "second": 0}
    for seed, ids in enumerate(prompts):
        stats = decoder.generate(ids, max_new_tokens=24, seed=seed).stats
        total = {k: total[k] + v for k, v in _by_part(drafter, stats).items()}
    return total


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("second", ["draft_model", "eagle3", "eagle3_alts"])
def test_greedy_hybrid_equals_plain_greedy(arch, second):
    """20 prompts (half stop on EOS, max_new_tokens mid-step); both parts propose in these runs."""
    cases = cases_for(arch)
    target = pair(arch)[0]
    drafter = HybridDrafter(NGramDrafter(num_speculative_tokens=5, max_ngram=3, min_ngram=2), _second(second, arch))
    check_greedy(target, drafter, cases)
    steps = _steps(target, drafter, [ids for ids, *_ in cases[:6]])
    assert steps["first"] > 0 and steps["second"] > 0, f"one part never proposed: {steps}"


@pytest.mark.parametrize("setting, rule", [("t1.0", "rejection"), ("t0.7_topk3", "rejection"),
                                           ("t1.0", "accept_always"), ("t1.0", "p_not_zeroed"),
                                           ("t0.7_topk3", "correction_from_p")])
def test_rejection_over_mixed_steps_is_lossless(setting, rule, record_property, monkeypatch):
    """Deterministic n-gram steps and sampled draft-model steps in the same runs (200 n-gram and about 120
    draft-model steps per 200 runs): ``rejection`` passes; a planted bug of either kind of step (p not zeroed
    after a rejected n-gram draft; the correction drawn from p after a rejected sampled draft) and accepting
    every draft fail. The draft-model steps are the fewer, so that bug gets 2000 runs (p about 5e-6)."""
    monkeypatch.setitem(lossless.RUNS_FOR, "correction_from_p", 2000)
    target, draft = peaky_noisy_pair()
    drafter = HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=2, min_ngram=2),
                            DraftModelDrafter(draft, num_speculative_tokens=2))
    for name, value in check_cell(target, drafter, setting, rule, NGRAM_PROMPT).items():
        record_property(name, value)


@pytest.mark.parametrize("setting, rule", [("t1.0", "rejection"), ("t0.7_topk3", "rejection"),
                                           ("t1.0", "p_not_zeroed")])
def test_rejection_with_a_deterministic_tree_behind_lookup_is_lossless(setting, rule, record_property):
    """Lookup chains and a deterministic tree preset with runners-up (``chain4_alts``: siblings rejected one by one,
    the point-mass residual after each) in the same runs: ``rejection`` passes, p left unzeroed after a rejected
    deterministic draft fails."""
    target, draft = peaky_noisy_pair()
    drafter = HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=2, min_ngram=2),
                            DraftModelDrafter(draft, tree="chain4_alts"))
    for name, value in check_cell(target, drafter, setting, rule, NGRAM_PROMPT).items():
        record_property(name, value)


def test_both_parts_propose_in_the_sampled_runs():
    target, draft = peaky_noisy_pair()
    drafter = HybridDrafter(NGramDrafter(num_speculative_tokens=2, max_ngram=2, min_ngram=2),
                            DraftModelDrafter(draft, num_speculative_tokens=2))
    decoder = SpeculativeDecoder(target, drafter, "rejection", SETTINGS["t1.0"])
    total = {"first": 0, "second": 0}
    for seed in range(40):
        stats = decoder.generate(NGRAM_PROMPT, max_new_tokens=3, seed=seed).stats
        for k, v in _by_part(drafter, stats).items():
            total[k] += v
    assert total["first"] >= 40 and total["second"] >= 10, total


def test_min_drafts_leaves_short_lookups_to_the_second_drafter():
    target, draft, _ = pair("llama")
    cases = cases_for("llama")[:6]
    strict = HybridDrafter(NGramDrafter(num_speculative_tokens=5, min_ngram=1), DraftModelDrafter(draft, 3),
                           min_drafts=6)  # more than n-gram ever proposes: every step is the draft model's
    check_greedy(target, strict, cases)
    assert _steps(target, strict, [ids for ids, *_ in cases])["first"] == 0


def test_bad_parts_fail_clearly():
    ngram = NGramDrafter()
    with pytest.raises(ConfigError, match="second= must be a drafter"):
        HybridDrafter(ngram, "eagle")
    with pytest.raises(ConfigError, match="two drafter objects"):
        HybridDrafter(ngram, ngram)
    with pytest.raises(ConfigError, match="first= must be a drafter that runs no model"):
        HybridDrafter(DraftModelDrafter(pair("llama")[1], 3), ngram)  # its discarded chains would desync its cache
    with pytest.raises(ConfigError, match="min_drafts"):
        HybridDrafter(ngram, NGramDrafter(), min_drafts=0)
    with pytest.raises(ConfigError, match="min_drafts=2.5: it must be an integer >= 1"):
        HybridDrafter(ngram, NGramDrafter(), min_drafts=2.5)  # was truncated to 2


def test_config_composes_builds_and_runs(tmp_path):
    """``drafter=hybrid``: an n-gram first and an EAGLE head second, through experiments.decode."""
    from drafters.eagle_heads import EagleHead, save_head
    from experiments import decode
    from experiments.loggers import NoLogger
    from experiments.models_from_config import load_models
    from experiments.results import RECORDS_FILE, read_records
    from tests.test_medusa import compose_decode

    heads = save_head(EagleHead.for_target(pair("llama")[0], "eagle3"), tmp_path / "eagle3")
    cfg = compose_decode("model=tiny_random", "drafter=hybrid", f"drafter.second.heads={heads}",
                         "drafter.first.min_ngram=1", "num_prompts=2", "max_new_tokens=12", "warmup=0", "logger=none",
                         "costs=false")
    drafter = decode.build_drafter(cfg.drafter, load_models(cfg.model))
    assert isinstance(drafter, HybridDrafter) and isinstance(drafter.first, NGramDrafter)
    assert isinstance(drafter.second, EagleDrafter) and drafter.max_nodes == 8
    summary = decode.run(cfg, tmp_path / "run", logger=NoLogger())
    assert summary["metrics"]["matches_baseline"] is True and summary["drafter"] == "HybridDrafter"
    cfg.batch_size = 2  # the batched hybrid, through the same entry point
    batched = decode.run(cfg, tmp_path / "batched", logger=NoLogger())
    assert batched["metrics"]["matches_baseline"] is True
    for run, result in (("run", summary), ("batched", batched)):  # steps counted by part, per record and in all
        spec = result["metrics"]["speculative"]
        assert set(spec["steps_by_source"]) == {"ngram", "eagle"}, spec["steps_by_source"]
        assert sum(spec["steps_by_source"].values()) <= spec["target_forwards"]
        records = [r for r in read_records(tmp_path / run / RECORDS_FILE)[0] if r["method"] == "speculative"]
        per_record = Counter()
        for r in records:
            per_record.update(r["stats"]["steps_by_source"])
        assert dict(per_record) == spec["steps_by_source"]


def test_a_second_part_gets_what_it_would_get_alone(tmp_path):
    """``drafter=hybrid_draft``: the draft model second gets the model config's draft; a cross-tokenizer second
    gets the run's tokenizer and its ``zoo:`` draft's directory; greedy through decode equals the baseline."""
    from drafters import CrossTokenizerDrafter, DraftModelDrafter
    from experiments import decode
    from experiments.loggers import NoLogger
    from experiments.models_from_config import load_models
    from tests.test_medusa import compose_decode

    cfg = compose_decode("model=zoo_micro", "drafter=hybrid_draft", "num_prompts=2", "max_new_tokens=12", "warmup=0",
                         "logger=none", "costs=false")
    models = load_models(cfg.model)
    drafter = decode.build_drafter(cfg.drafter, models)
    assert isinstance(drafter.first, NGramDrafter) and isinstance(drafter.second, DraftModelDrafter)
    assert drafter.second.model is models.draft
    assert decode.run(cfg, tmp_path / "run", logger=NoLogger())["metrics"]["matches_baseline"] is True
    text = compose_decode("model=zoo_micro", "drafter=cross_tokenizer", "drafter.draft=zoo:micro/draft").drafter
    cfg.drafter.second = text
    drafter = decode.build_drafter(cfg.drafter, models)
    assert isinstance(drafter.second, CrossTokenizerDrafter) and drafter.second.tokenizer is models.tokenizer
    summary = decode.run(cfg, tmp_path / "text", logger=NoLogger())
    assert summary["metrics"]["matches_baseline"] is True
    assert set(summary["metrics"]["speculative"]["steps_by_source"]) <= {"ngram", "cross_tokenizer"}


def test_bench_drafters_puts_each_chain_behind_lookup(tmp_path):
    """``--hybrid N`` adds ``ours_ngram+<chain>`` for every chain and ``--trees`` preset (not the dynamic trees), each
    with its own drafter; ``--hf-lookup-tokens`` runs HF prompt lookup once per setting; ``--methods`` keeps the
    named ones and the baselines."""
    from drafters.eagle_heads import EagleHead, save_head
    from experiments.bench_drafters import build_methods, head_drafters, parse_args

    target, draft, _ = pair("llama")
    heads_dir = save_head(EagleHead.for_target(target, "eagle3"), tmp_path / "eagle3")
    args = parse_args(["--eagle3", str(heads_dir), "--ks", "2,3", "--hybrid", "2", "--ngram-tokens", "6",
                       "--hf-lookup-tokens", "4,8", "--cache-dir", str(tmp_path)])
    names = [m.name for m in build_methods(target, draft, args, 0.0, head_drafters(args, []))]
    assert [n for n in names if n.startswith("hf_prompt_lookup")] == ["hf_prompt_lookup_4", "hf_prompt_lookup_8"]
    hybrid = sorted(n for n in names if "+" in n)
    assert hybrid == ["ours_ngram+draft_k2", "ours_ngram+draft_k3", "ours_ngram+eagle3_k2", "ours_ngram+eagle3_k3"]
    args.trees = ["chain4_alts"]
    methods = {m.name: m for m in build_methods(target, draft, args, 0.0, head_drafters(args, []))}
    assert {"ours_draft_chain4_alts", "ours_eagle3_chain4_alts", "ours_ngram+draft_chain4_alts",
            "ours_ngram+eagle3_chain4_alts"} <= set(methods)
    seq, stats = methods["ours_ngram+eagle3_chain4_alts"].run(NGRAM_PROMPT)
    want = target.generate(NGRAM_PROMPT, do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=0)
    assert torch.equal(seq, want) and max(stats.proposed_per_step) == 8  # 6 lookup drafts, 8 preset nodes
    args.methods = "ours_ngram+eagle3_chain4_alts,hf_prompt_lookup_8"
    assert [m.name for m in build_methods(target, draft, args, 0.0, head_drafters(args, []))] == [
        "hf_plain", "hf_prompt_lookup_8", "ours_ar", "ours_ngram+eagle3_chain4_alts"]
    args.methods, args.trees, args.hybrid = None, [], 0
    assert not any("+" in m.name for m in build_methods(target, draft, args, 0.0, {}))


# --------------------------------------------------------------------------- batches


def _batch_setup(arch: str, n: int) -> tuple:
    """``(target, rows, limits)``: ``n`` prompts of different lengths whose continuations repeat (the n-gram part
    matches), different ``max_new_tokens``, and a copy of the target whose EOS is a token row 1's greedy
    continuation emits early, so that row stops mid-batch."""
    import copy

    target = copy.deepcopy(pair(arch)[0])
    rows = [ids for ids, *_ in cases_for(arch)[:n]]
    free = target.generate(rows[1], do_sample=False, max_new_tokens=12, pad_token_id=0)[0, rows[1].shape[1]:]
    target.generation_config.eos_token_id = int(free[4])
    return target, rows, [9 + (7 * i) % 17 for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("second", ["draft_model", "eagle3", "medusa"])
@pytest.mark.parametrize("max_rows", [None, 3])
def test_batched_hybrid_rows_equal_generate_and_batch_one(arch, second, max_rows):
    """``generate_batch`` with a hybrid (static batch of 8, and continuous with 3 rows at once; a row stops on EOS
    mid-batch): every row equals HF greedy and the batch-1 hybrid's run step for step; within the batch, steps mix
    rows drafted by lookup and rows drafted by the second part."""
    target, rows, limits = _batch_setup(arch, 8)

    def make():
        return HybridDrafter(NGramDrafter(num_speculative_tokens=5, max_ngram=3, min_ngram=2), _batch_second(second, arch))

    batched = make()
    out = SpeculativeDecoder(target, batched).generate_batch(rows, max_new_tokens=limits, seed=3, max_rows=max_rows)
    assert greedy_rows_match(target, make, rows, limits, out, seed=3) >= 1, "some row must stop on EOS mid-batch"
    steps = _by_part(batched, out.stats)
    assert steps["first"] > 0 and steps["second"] > 0, steps


def greedy_rows_match(target, make, rows, limits, out, seed: int) -> int:
    """Assert each row of the batched greedy run ``out`` equals HF greedy and, step for step, its batch-1 run with
    a fresh drafter ``make()`` and seed ``seed + i``; returns how many rows stopped before their limit."""
    stopped_early = 0
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=limits[i], pad_token_id=0)
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"
        single = SpeculativeDecoder(target, make()).generate(ids, max_new_tokens=limits[i], seed=seed + i)
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step, f"row {i}"
        assert out.row_stats[i].steps_by_source == single.stats.steps_by_source, f"row {i}"
        stopped_early += out.sequences[i].shape[1] - ids.shape[1] < limits[i]
    return stopped_early


@pytest.mark.parametrize("second", ["draft_model", "eagle3"])
def test_sampled_batched_hybrid_rows_equal_their_batch_one_runs(second):
    """Under ``rejection`` at T = 1.0, row i of a batched hybrid is the batch-1 hybrid run with seed ``seed + i``,
    token for token: the second part draws nothing on rows the lookup covers."""
    target, rows, limits = _batch_setup("llama", 6)
    sampling = SamplingParams(temperature=1.0)

    def make():
        return HybridDrafter(NGramDrafter(num_speculative_tokens=4, max_ngram=3, min_ngram=2),
                             _batch_second(second, "llama"))

    batched = make()
    out = SpeculativeDecoder(target, batched, "rejection", sampling).generate_batch(rows, limits, seed=11)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make(), "rejection", sampling).generate(ids, limits[i], seed=11 + i)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"row {i}"
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step, f"row {i}"
        assert out.row_stats[i].steps_by_source == single.stats.steps_by_source, f"row {i}"
    steps = _by_part(batched, out.stats)
    assert steps["first"] > 0 and steps["second"] > 0, steps


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_batch_mixing_lookup_and_sampled_chains_accepts_as_the_per_node_rule(temperature):
    """``BatchTree.stack`` of deterministic (lookup) and sampled chains in one batch, then the tensorized
    ``rejection``: every row's accepted path and extra token equal the per-node rule's on that row's own tree
    with the row's own random numbers, over 300 random steps (both accepting and rejecting in each kind)."""
    from specdec.acceptance import RejectionAcceptance
    from specdec.batch_acceptance import batch_rejection
    from specdec.batch_types import BatchTree
    from specdec.rng import KeyedRandom

    gen, sampling, vocab = torch.Generator().manual_seed(0), SamplingParams(temperature=temperature), 6
    outcomes = {(kind, hit) for kind in ("deterministic", "chain") for hit in (True, False)}
    seen = set()
    for step in range(300):
        trees = []
        for _ in range(5):
            n = int(torch.randint(0, 5, (), generator=gen))
            q = torch.softmax(torch.randn(n, vocab, generator=gen) * 2, -1)  # [n, V]
            tokens = torch.multinomial(q, 1, generator=gen)[:, 0] if n else torch.empty(0, dtype=torch.long)
            trees.append(DraftTree.chain(tokens, q if torch.rand((), generator=gen) < 0.5 else None))
        logits = torch.randn(5, 1 + max(t.num_nodes for t in trees), vocab, generator=gen) * 2  # [B, 1 + N, V]
        rng = KeyedRandom(torch.arange(5) + 100)
        rng.set_step(step)
        batch = BatchTree.stack(trees)
        got = batch_rejection(batch, logits, sampling, rng).to_host(batch.tokens)
        for b, tree in enumerate(trees):
            single = RejectionAcceptance()(tree, logits[b, : 1 + tree.num_nodes], sampling, rng.row(b))
            assert got[b] == (single.accepted_nodes, single.tokens), f"step {step} row {b} ({tree.sampling})"
            if tree.num_nodes:
                seen.add((tree.sampling, single.num_accepted_drafts > 0))
    assert seen == outcomes, seen


@pytest.mark.parametrize("second", ["draft_model", "eagle3"])
def test_a_step_where_every_row_looks_up_leaves_the_second_part_in_step(second):
    """Both rows' first step is the lookup's (their prompts end in a suffix that recurred), so the second part
    drafts nothing in that step; afterwards it catches up and drafts exactly what the batch-1 runs draft."""
    target = pair("llama")[0]
    rows = [NGRAM_PROMPT, torch.cat([torch.tensor([[3]]), NGRAM_PROMPT], 1)]

    def make():
        return HybridDrafter(NGramDrafter(num_speculative_tokens=3, max_ngram=3, min_ngram=2),
                             _batch_second(second, "llama"))

    firsts = []
    for ids in rows:
        one = make()
        stats = SpeculativeDecoder(target, one).generate(ids, max_new_tokens=2, seed=0).stats  # one step, depth 1
        firsts.append(_by_part(one, stats)["first"])
    assert firsts == [1, 1], "each row's first step must be the lookup's"
    out = SpeculativeDecoder(target, make()).generate_batch(rows, max_new_tokens=16, seed=0)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make()).generate(ids, max_new_tokens=16, seed=i)
        assert out.sequences[i].tolist() == single.sequences.tolist()
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step, f"row {i}"


def test_a_deterministic_tree_with_siblings_cannot_join_a_batch_sampled_without_replacement():
    """Sampled without replacement, a node's q' is renormalised after each rejected child; a point mass on one
    deterministic child has nothing left for the next, so only deterministic chains may join such a batch."""
    from specdec.batch_types import BatchTree

    q = torch.full((2, 4), 0.25)
    sampled = DraftTree(torch.tensor([1, 2]), torch.tensor([-1, -1]), q, sampling="without_replacement")
    siblings = DraftTree(torch.tensor([0, 3]), torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="only deterministic chains"):
        BatchTree.stack([sampled, siblings])
    mixed = BatchTree.stack([sampled, DraftTree.chain(torch.tensor([3, 1]))])
    assert mixed.sampling == "without_replacement" and mixed.draft_probs[1, :, [3, 1]].diag().tolist() == [1.0, 1.0]
    assert BatchTree.stack([siblings, DraftTree.chain(torch.tensor([2]), q[:1])]).sampling == "chain"


def test_batched_hybrid_honours_min_drafts():
    """A batch with ``min_drafts`` above what the lookup ever proposes: every row's steps are the second part's, as
    in its batch-1 run (a lookup of 1..5 nodes does not cover a row)."""
    from tests.tiny_models import noisy_copy

    target, rows, limits = _batch_setup("llama", 4)

    def make():
        return HybridDrafter(NGramDrafter(num_speculative_tokens=5, max_ngram=3, min_ngram=1),
                             DraftModelDrafter(noisy_copy("llama"), num_speculative_tokens=3), min_drafts=6)

    batched = make()
    out = SpeculativeDecoder(target, batched).generate_batch(rows, max_new_tokens=limits, seed=3)
    greedy_rows_match(target, make, rows, limits, out, seed=3)
    steps = _by_part(batched, out.stats)
    assert steps["first"] == 0 and steps["second"] > 0, steps
