"""Batches with ragged acceptance: every row equals its batch-1 run (and, greedy, ``generate``).

Rows have prompts of different lengths, their own ``max_new_tokens`` and an EOS that some rows emit
mid-batch; drafters: draft-model chains (batched forwards), the layer-skip self-draft (bound to
the target at start), trees, dynamic trees, n-gram, Medusa (one copy per row); EAGLE's batches are
in ``tests/test_eagle.py``. Sampling: row i equals the batch-1 run with seed ``seed + i`` token for token,
and each row's output distribution passes a chi-square test against the exactly enumerated target
(a planted off-by-one in the rows' cache offsets fails it). A leak test fills other rows and stale
slots with noise.
"""
from __future__ import annotations

import copy

import pytest
import torch

from drafters import DraftModelDrafter, LayerSkipDrafter, MedusaDrafter, NGramDrafter, NoDrafter
from drafters.medusa_heads import MedusaHeads
from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from specdec.errors import ConfigError
from tests.test_sweeps import compose_cfg, prompts_file, tiny_args  # noqa: F401  (fixture)
from tests.tiny_models import noisy_copy, pair, prompts

ARCHS = ["llama", "qwen2"]


def drafters(arch: str) -> dict:
    draft, target = noisy_copy(arch), pair(arch)[0]
    heads = MedusaHeads.for_target(target, num_heads=3, init="random")
    return {
        "ar": NoDrafter,
        "chain3": lambda: DraftModelDrafter(draft, num_speculative_tokens=3),
        "chain5": lambda: DraftModelDrafter(draft, num_speculative_tokens=5),
        "tree": lambda: DraftModelDrafter(draft, tree="binary"),
        "dynamic": lambda: DraftModelDrafter(draft, num_speculative_tokens=4, budget=12),
        "ngram": lambda: NGramDrafter(num_speculative_tokens=4),
        "medusa": lambda: MedusaDrafter(heads, tree="binary"),
        "layer_skip": lambda: LayerSkipDrafter(layers=1, num_speculative_tokens=3),  # bound at start
    }


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    """A target whose EOS is a token that row 1's greedy continuation emits early (so it stops mid-batch)."""
    arch = request.param
    target = copy.deepcopy(pair(arch)[0])
    rows = prompts(pair(arch)[2], 8, seed=4)  # [1, T_i], lengths differ
    free = target.generate(rows[1], do_sample=False, max_new_tokens=12, pad_token_id=0)[0, rows[1].shape[1]:]
    target.generation_config.eos_token_id = int(free[4])
    return arch, target, rows


def _limits(n: int) -> list[int]:
    return [7 + (5 * i) % 17 for i in range(n)]  # different max_new_tokens per row


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("shape", ["ar", "chain3", "chain5", "tree", "dynamic", "ngram", "medusa", "layer_skip"])
def test_greedy_rows_equal_generate_and_batch_one(setup, shape, batch):
    arch, target, rows = setup
    make, rows, limits = drafters(arch)[shape], rows[:batch], _limits(batch)
    out = SpeculativeDecoder(target, make()).generate_batch(rows, max_new_tokens=limits, seed=3)
    eos = target.generation_config.eos_token_id
    stopped_early = 0
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=limits[i], pad_token_id=eos)
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"
        single = SpeculativeDecoder(target, make()).generate(ids, max_new_tokens=limits[i], seed=3 + i)
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step
        stopped_early += out.sequences[i].shape[1] - ids.shape[1] < limits[i]
    assert batch < 3 or stopped_early >= 1, "some row must stop on EOS mid-batch"
    assert out.stats.new_tokens == sum(s.new_tokens for s in out.row_stats)


SAMPLED = {
    "chain_t1": ("chain3", SamplingParams(temperature=1.0)),
    "chain_t07k": ("chain5", SamplingParams(temperature=0.7, top_k=20)),
    "tree_without": ("tree_without", SamplingParams(temperature=0.9, top_p=0.9)),
    "tree_with": ("tree_with", SamplingParams(temperature=1.0)),
    "ngram_t1": ("ngram", SamplingParams(temperature=1.0)),
    "medusa_t07": ("medusa", SamplingParams(temperature=0.7)),
}


@pytest.mark.parametrize("case", list(SAMPLED))
def test_sampled_rows_equal_their_batch_one_runs(setup, case):
    arch, target, rows = setup
    shape, sampling = SAMPLED[case]
    table = drafters(arch)
    draft = noisy_copy(arch)
    table["tree_without"] = lambda: DraftModelDrafter(draft, tree="binary", tree_sampling="without_replacement")
    table["tree_with"] = lambda: DraftModelDrafter(draft, tree="binary", tree_sampling="with_replacement")
    limits = _limits(len(rows))
    out = SpeculativeDecoder(target, table[shape](), "rejection", sampling).generate_batch(rows, limits, seed=11)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, table[shape](), "rejection", sampling).generate(ids, limits[i], seed=11 + i)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"row {i}"
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step


def test_typical_rows_equal_their_batch_one_runs(setup):
    arch, target, rows = setup
    make, sampling, limits = drafters(arch)["tree"], SamplingParams(temperature=0.7), _limits(len(rows))
    out = SpeculativeDecoder(target, make(), "typical", sampling).generate_batch(rows, limits, seeds=list(range(8)))
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make(), "typical", sampling).generate(ids, limits[i], seed=i)
        assert out.sequences[i].tolist() == single.sequences.tolist()


def test_stats_aggregate_and_per_row(setup):
    arch, target, rows = setup
    out = SpeculativeDecoder(target, drafters(arch)["chain3"]()).generate_batch(rows[:4], 10)
    assert len(out.row_stats) == 4 and out.stats.target_forwards == sum(s.target_forwards for s in out.row_stats)
    assert out.stats.steps == out.stats.batch_steps == max(s.target_forwards for s in out.row_stats)  # one batch
    assert out.stats.tokens_per_s > 0 and 1.0 <= out.stats.tau <= 4.0
    assert all(s.time_total <= out.stats.time_total + 1e-9 for s in out.row_stats)


# --------------------------------------------------------------------------- bad input


def test_bad_batches_name_the_row():
    target = pair("llama")[0]
    dec = SpeculativeDecoder(target, NoDrafter())
    with pytest.raises(SpecDecError, match="non-empty list of prompts"):
        dec.generate_batch([], 4)
    with pytest.raises(SpecDecError, match="prompt 1 is empty"):
        dec.generate_batch([torch.tensor([[1, 2]]), torch.zeros(1, 0, dtype=torch.long)], 4)
    with pytest.raises(SpecDecError, match=r"prompt 2: prompt \(2040 tokens\) \+ max_new_tokens \(64\) exceeds"):
        dec.generate_batch([torch.tensor([[1]]), torch.tensor([[1, 2]]), torch.zeros(1, 2040, dtype=torch.long)], 64)
    with pytest.raises(SpecDecError, match="max_new_tokens has 1 entries for 2 prompts"):
        dec.generate_batch([torch.tensor([[1]]), torch.tensor([[2]])], [4])


# --------------------------------------------------------------------------- experiments.decode batch_size=


def test_decode_with_batch_size_keeps_one_record_per_prompt(prompts_file, tmp_path):  # noqa: F811
    """batch_size=3 over 4 prompts: the same tokens and per-prompt records as batch_size=1; the summary's
    tokens/s is the batches' aggregate throughput."""
    import json

    from experiments import decode

    base = ["acceptance=rejection", "sampling.temperature=1.0", "drafter.num_speculative_tokens=2"]
    runs = {}
    for size in (1, 3):  # batch_size=3 measures no forward costs (the cost model prices batch-1 forwards)
        cfg = compose_cfg(*tiny_args(prompts_file, num_prompts=4), *base, f"batch_size={size}",
                          *(["costs=false"] if size == 1 else []))
        runs[size] = decode.run(cfg, tmp_path / f"b{size}")
        records = [json.loads(line) for line in (tmp_path / f"b{size}" / "records.jsonl").read_text().splitlines()]
        assert len(records) == 8  # 4 prompts x (speculative, baseline)
        runs[size]["records"] = {(r["question_id"], r["method"]): r for r in records}
    assert {k: r["tokens"] for k, r in runs[1]["records"].items()} == {k: r["tokens"] for k, r in runs[3]["records"].items()}
    spec = runs[3]["metrics"]["speculative"]
    batches = {r["batch"]["id"]: r["batch"] for r in runs[3]["records"].values() if r["method"] == "speculative"}
    assert sorted(b["size"] for b in batches.values()) == [1, 3] and spec["batch_size"] == 3
    assert spec["tokens_per_s"] == pytest.approx(spec["new_tokens"] / sum(b["time_total"] for b in batches.values()))
    # a batch's step is one forward over its rows: ms per step divides by the batches' steps, not the rows'
    assert spec["steps"] == sum(b["batch_steps"] for b in batches.values()) < spec["target_forwards"]
    assert runs[1]["metrics"]["speculative"]["steps"] == runs[1]["metrics"]["speculative"]["target_forwards"]
    assert runs[3]["metrics"]["predicted_speedup"] is None and "batch_size=3" in runs[3]["cost_model"]["note"]
    with pytest.raises(ConfigError, match="batch_size=0"):
        decode.run(compose_cfg(*tiny_args(prompts_file), "batch_size=0"), tmp_path / "b0")


def test_a_batch_size_above_the_prompts_is_said(prompts_file, tmp_path, capsys):  # noqa: F811
    """batch_size=5 over 2 prompts: the records say batches of 2 and the config 5, silently; now a warning says
    what the batches hold."""
    from experiments import decode

    cfg = compose_cfg(*tiny_args(prompts_file, num_prompts=2, tokens=4), "costs=false", "baseline=false",
                      "batch_size=5")
    assert decode.run(cfg, tmp_path / "b5")["metrics"]["speculative"]["batch_size"] == 2
    assert "warning: batch_size=5 but 2 prompt(s): each batch holds 2 rows" in capsys.readouterr().err


def test_outputs_are_ordinary_tensors():
    """The loops run without autograd but not in ``torch.inference_mode``: what they return is usable in
    autograd afterwards (an embedding lookup under grad saves its indices, which an inference tensor refuses)."""
    target, draft, tok = pair("llama")
    decoder = SpeculativeDecoder(target, DraftModelDrafter(draft, 2), "greedy", SamplingParams())
    rows = prompts(tok, 2)
    single = decoder.generate(rows[0], max_new_tokens=4).sequences
    batch = decoder.generate_batch(rows, max_new_tokens=4).sequences
    for seq in [single, *batch]:
        assert not seq.is_inference()
        weight = torch.zeros(target.config.vocab_size, 2, requires_grad=True)
        torch.nn.functional.embedding(seq, weight).sum().backward()


def test_decoding_runs_without_autograd_and_returns_ordinary_tensors():
    """The eager loop decodes in inference mode; what it returns is an ordinary tensor (in-place writes and
    autograd on it work afterwards), at batch 1 and batched."""
    target, _, tokenizer = pair("llama")
    rows = prompts(tokenizer, n=2)
    dec = SpeculativeDecoder(target, DraftModelDrafter(noisy_copy("llama"), num_speculative_tokens=2))
    seen = []
    original = target.forward
    target.forward = lambda *a, **k: (seen.append(torch.is_inference_mode_enabled()), original(*a, **k))[1]
    try:
        single = dec.generate(rows[0], max_new_tokens=6).sequences
        batch = dec.generate_batch(rows, max_new_tokens=6).sequences
    finally:
        del target.forward
    assert seen and all(seen)
    for seq in [single, *batch]:
        assert not seq.is_inference()
        seq[0, 0] = seq[0, 0]  # an in-place write outside inference mode
        target.get_input_embeddings()(seq).sum().backward()  # autograd through an embedding of the output
    target.zero_grad(set_to_none=True)


@pytest.mark.parametrize("path", ["generate", "batch", "static"])
def test_drafts_accepted_past_eos_are_not_counted(path):
    """The target drafting for itself accepts all 4 drafts; the second is EOS, so the output holds 2 tokens,
    and the step counts 2 accepted drafts (the other 2 are not in the output), whichever loop ran it."""
    target, tok = copy.deepcopy(pair("llama")[0]), pair("llama")[2]
    ids = prompts(tok, 1, seed=4)[0]
    free = target.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=0)[0, ids.shape[1]:]
    target.generation_config.eos_token_id = int(free[1])
    decoder = SpeculativeDecoder(target, DraftModelDrafter(target, num_speculative_tokens=4),
                                 compile="static" if path == "static" else "none")
    stats = decoder.generate(ids, 12).stats if path == "generate" else decoder.generate_batch([ids], 12).row_stats[0]
    assert (stats.new_tokens, stats.target_forwards, stats.proposed_per_step) == (2, 1, [4])
    assert stats.accepted_per_step == [2] and stats.depth_accepted == [1, 1, 0, 0]
    assert stats.draft_acceptance_rate == 0.5


def test_warm_up_runs_the_path_the_run_times():
    """batch_size > 1 warms the batched loop on the first batch (its first calls are not generate()'s), and the
    seconds the warm-up spent compiling are returned per method (they are the run's compile time: with
    ``warmup >= 1`` the timed decodes find the step compiled)."""
    from types import SimpleNamespace

    from experiments.decode import warm_up

    calls = []

    def out(compile_s):
        return SimpleNamespace(stats=SimpleNamespace(time_compile=compile_s))

    fake = SimpleNamespace(generate=lambda ids, **kw: calls.append(("one", ids.shape[1])) or out(2.5),
                           generate_batch=lambda rows, **kw: calls.append(("batch", len(rows))) or out(1.0))
    eager = SimpleNamespace(generate=lambda ids, **kw: out(0.0))
    encoded = [SimpleNamespace(input_ids=torch.zeros(1, n, dtype=torch.long)) for n in (3, 4, 5)]
    for size, expected in ((1, [("one", 3)]), (2, [("batch", 2)]), (8, [("batch", 3)])):
        calls.clear()
        warm_up({"speculative": (fake, None)}, encoded, SimpleNamespace(warmup=1, batch_size=size, max_new_tokens=4, seed=0))
        assert calls == expected, size
    compiled = warm_up({"speculative": (fake, None), "baseline": (eager, None)}, encoded,
                       SimpleNamespace(warmup=2, batch_size=1, max_new_tokens=4, seed=0))
    assert compiled == {"speculative": 5.0}  # both warm-ups' seconds; an eager method's none


def test_a_rows_latency_counts_its_own_prefill(monkeypatch):
    """A row's ``time_total`` runs from its prefill, as ``generate()``'s does (prefill included): with a prefill
    slowed by 0.2 s, both rows of a continuous batch (the second admitted late) take at least that long."""
    import time

    from verifier import batch as verifier_batch

    original = verifier_batch.prefill_rows

    def slow(*args):
        time.sleep(0.2)
        return original(*args)

    monkeypatch.setattr(verifier_batch, "prefill_rows", slow)
    target, tok = pair("llama")[0], pair("llama")[2]
    rows = prompts(tok, 2, seed=4)
    out = SpeculativeDecoder(target, NoDrafter()).generate_batch(rows, 2, max_rows=1)
    assert all(s.time_total >= 0.2 for s in out.row_stats), [s.time_total for s in out.row_stats]


def test_a_late_rows_latency_starts_at_its_own_admission(monkeypatch):
    """Under a fake clock that only prefills advance (100 s each), a continuous batch of one row at a time gives
    each row the latency of its own prefill, not the time since the batch began (which the second row's wait
    for the first would add)."""
    from types import SimpleNamespace

    from specdec import batch_decoder
    from verifier import batch as verifier_batch

    clock = [0.0]
    original = verifier_batch.prefill_rows

    def slow(*args):
        clock[0] += 100.0
        return original(*args)

    monkeypatch.setattr(verifier_batch, "prefill_rows", slow)
    monkeypatch.setattr(batch_decoder, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    target, tok = pair("llama")[0], pair("llama")[2]
    out = SpeculativeDecoder(target, NoDrafter()).generate_batch(prompts(tok, 2, seed=4), 2, max_rows=1)
    assert [s.time_total for s in out.row_stats] == [100.0, 100.0]
    assert out.stats.time_total == 200.0


def test_the_callers_on_row_is_off_the_runs_clock(monkeypatch):
    """What ``on_row`` does (decode writes and fsyncs a record, a logger sends a step per row) is not decoding:
    under the fake clock of the test above, an ``on_row`` that takes 1000 s changes no row's latency, no
    ``so_far`` and not the run's total (it was counted in all of them: tokens/s and speedup fell with the I/O)."""
    from types import SimpleNamespace

    from specdec import batch_decoder
    from verifier import batch as verifier_batch

    clock = [0.0]
    original = verifier_batch.prefill_rows

    def slow(*args):
        clock[0] += 100.0
        return original(*args)

    def on_row(i, sequence, stats, so_far):
        seen.append((i, stats.time_total, so_far.time_total))
        clock[0] += 1000.0

    seen = []
    monkeypatch.setattr(verifier_batch, "prefill_rows", slow)
    monkeypatch.setattr(batch_decoder, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    target, tok = pair("llama")[0], pair("llama")[2]
    out = SpeculativeDecoder(target, NoDrafter()).generate_batch(prompts(tok, 2, seed=4), 2, max_rows=1, on_row=on_row)
    assert seen == [(0, 100.0, 100.0), (1, 100.0, 200.0)]
    assert [s.time_total for s in out.row_stats] == [100.0, 100.0]
    assert out.stats.time_total == 200.0


@pytest.mark.parametrize("shape", ["ar", "chain3"])
def test_row_step_counts_equal_their_batch_one_runs(shape):
    """Each row's per-step and per-depth counts are its batch-1 run's, steps without drafts included (no
    drafter, or a row's last token: depth 0, nothing proposed at any depth)."""
    target, _, tok = pair("llama")
    make = {"ar": NoDrafter, "chain3": lambda: DraftModelDrafter(noisy_copy("llama"), num_speculative_tokens=3)}[shape]
    rows, limits = prompts(tok, 3, seed=4), [5, 9, 3]
    out = SpeculativeDecoder(target, make()).generate_batch(rows, limits)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make()).generate(ids, limits[i]).stats
        got = out.row_stats[i]
        assert (got.depth_proposed, got.depth_accepted, got.proposed_per_step, got.accepted_per_step) == \
            (single.depth_proposed, single.depth_accepted, single.proposed_per_step, single.accepted_per_step), i
