"""The fixed-shape step (``compile=static``; ``compile=inductor``: torch.compile; ``compile=graph``:
captured as a CUDA graph on a GPU).

On the CPU the step runs eagerly and must emit exactly the tokens of the readable step: greedy rows
equal ``generate(do_sample=False)``, sampled rows equal their batch-1 runs (keyed draws), for no
drafter, draft-model chains (and the layer-skip self-draft's) and tree presets (deterministic and
with-replacement children, a sparse preset), batch 1 and 4, EOS mid-batch and a ``max_new_tokens``
per row; the rejection step passes the chi-square test against the exactly enumerated target for
a chain and for trees, and a planted bug fails it. ``compile=inductor`` compiles on the CPU too and
emits the same tokens; a failing compiler falls back to the eager step. The capture itself and the
absence of host syncs are GPU tests (``tests/test_gpu.py``).
"""
from __future__ import annotations

import copy
import shutil
import time
import warnings

import pytest
import torch

from drafters import DraftModelDrafter, LayerSkipDrafter, NGramDrafter, NoDrafter
from specdec import SamplingParams, SpeculativeDecoder, static_kept, static_step
from specdec.acceptance import get_rule
from specdec.errors import ConfigError
from specdec.sampling import warp_probs
from specdec.static_step import StaticStep
from tests.lossless import ALPHA, NEW, PROMPT, chi_square_pvalue, exact_distribution
from tests.tiny_models import noisy_copy, pair, peaky_noisy_pair, prompts


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request):
    arch = request.param
    target = copy.deepcopy(pair(arch)[0])
    rows = prompts(pair(arch)[2], 4, seed=4)
    free = target.generate(rows[1], do_sample=False, max_new_tokens=12, pad_token_id=0)[0, rows[1].shape[1]:]
    target.generation_config.eos_token_id = int(free[4])  # row 1 stops on it mid-batch
    return arch, target, rows


LIMITS = [9, 14, 6, 11]
SHAPES = {"ar": lambda arch: NoDrafter(), "chain3": lambda arch: DraftModelDrafter(noisy_copy(arch), 3),
          "chain5": lambda arch: DraftModelDrafter(noisy_copy(arch), 5),
          "binary": lambda arch: DraftModelDrafter(noisy_copy(arch), tree="binary"),
          "sparse": lambda arch: DraftModelDrafter(noisy_copy(arch), tree=[[0], [1], [3], [0, 0], [0, 2], [1, 0],
                                                                            [0, 0, 0], [0, 0, 1], [0, 2, 0]]),
          "replace": lambda arch: DraftModelDrafter(noisy_copy(arch), tree="binary", tree_sampling="with_replacement"),
          "layer_skip": lambda arch: LayerSkipDrafter(1, 3)}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_static_step_equals_generate(setup, shape, batch):
    arch, target, rows = setup
    out = SpeculativeDecoder(target, SHAPES[shape](arch), compile="static").generate_batch(rows[:batch], LIMITS[:batch])
    eos = target.generation_config.eos_token_id
    for i, ids in enumerate(rows[:batch]):
        ref = target.generate(ids, do_sample=False, max_new_tokens=LIMITS[i], pad_token_id=eos)
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"
        eager = SpeculativeDecoder(target, SHAPES[shape](arch)).generate(ids, LIMITS[i], seed=i)
        assert out.row_stats[i].accepted_per_step == eager.stats.accepted_per_step
        assert out.row_stats[i].proposed_per_step == eager.stats.proposed_per_step  # the acceptance rate's divisor


@pytest.mark.parametrize("rule,sampling", [("rejection", SamplingParams(temperature=1.0)),
                                           ("rejection", SamplingParams(temperature=0.7, top_k=10)),
                                           ("typical", SamplingParams(temperature=0.7))])
@pytest.mark.parametrize("shape", ["ar", "chain3", "binary", "replace"])
def test_sampled_static_rows_equal_their_batch_one_runs(setup, shape, rule, sampling):
    arch, target, rows = setup
    static = SpeculativeDecoder(target, SHAPES[shape](arch), rule, sampling, compile="static")
    out = static.generate_batch(rows, LIMITS, seed=5)
    for i, ids in enumerate(rows):
        eager = SpeculativeDecoder(target, SHAPES[shape](arch), rule, sampling).generate(ids, LIMITS[i], seed=5 + i)
        assert out.sequences[i].tolist() == eager.sequences.tolist(), f"row {i}"
    one = static.generate(rows[2], LIMITS[2], seed=7)  # generate() with compile=static: a batch of one
    assert one.sequences.tolist() == SpeculativeDecoder(target, SHAPES[shape](arch), rule, sampling).generate(
        rows[2], LIMITS[2], seed=7).sequences.tolist()


def _static_counts(target, drafter, sampling, runs: int, rule=None) -> dict:
    decoder = SpeculativeDecoder(target, drafter, "rejection", sampling, compile="static")
    if rule is not None:
        decoder.rule = rule
    counts: dict = {}
    for seed in range(runs):
        seq = tuple(decoder.generate(PROMPT, NEW, seed=10**6 + seed).sequences[0, -NEW:].tolist())
        counts[seq] = counts.get(seq, 0) + 1
    return counts


TREE = [[0], [1], [0, 0], [1, 0]]
LOSSLESS = {"chain": lambda draft: DraftModelDrafter(draft, 2),
            "tree_replace": lambda draft: DraftModelDrafter(draft, tree=TREE, tree_sampling="with_replacement"),
            "tree_top": lambda draft: DraftModelDrafter(draft, tree=TREE)}


@pytest.mark.parametrize("shape", list(LOSSLESS))
def test_static_rejection_is_lossless_and_a_planted_bug_is_not(monkeypatch, shape):
    target, draft = peaky_noisy_pair()
    sampling = SamplingParams(temperature=1.0)
    exact = exact_distribution(target, sampling)
    counts = _static_counts(target, LOSSLESS[shape](draft), sampling, 1500)
    assert chi_square_pvalue(counts, exact, 1500) > ALPHA

    from specdec import batch_acceptance

    def accept_all(tree, logits, sampling, rng):  # planted: the first child always accepted, the bonus from its p
        out = batch_acceptance.batch_rejection(tree, logits, sampling, rng)
        first = tree.children[:, 0, 0]  # [B] the root's first child
        out.accepted[:, 0], out.counts = first, torch.ones_like(out.counts)
        p = warp_probs(logits, sampling)[torch.arange(first.shape[0]), 1 + first]  # [B, V]
        out.extra = rng.categorical(p, 99)
        return out

    monkeypatch.setattr(StaticStep, "__init__", _with_rule(accept_all))
    counts = _static_counts(target, LOSSLESS[shape](draft), sampling, 300)
    assert chi_square_pvalue(counts, exact, 300) < ALPHA


def _with_rule(rule):
    original = StaticStep.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.rule = rule

    return init


def test_compile_modes_and_their_errors(setup):
    arch, target, rows = setup
    with pytest.raises(ConfigError, match="supports drafter=none and draft-model chains and tree presets only, not NGram"):
        SpeculativeDecoder(target, NGramDrafter(), compile="static")
    with pytest.raises(ConfigError, match=r"not DraftModelDrafter \(dynamic\)"):
        SpeculativeDecoder(target, DraftModelDrafter(noisy_copy(arch), budget=8), compile="static")
    without = DraftModelDrafter(noisy_copy(arch), tree="binary", tree_sampling="without_replacement")
    with pytest.raises(ConfigError, match="not without_replacement"):
        SpeculativeDecoder(target, without, "rejection", SamplingParams(temperature=1.0), compile="static")
    SpeculativeDecoder(target, without, compile="static")  # greedy: its children are deterministic
    with pytest.raises(ConfigError, match="compile='fast' is unknown"):
        SpeculativeDecoder(target, NoDrafter(), compile="fast")
    # models on the CPU (CUDA present or not): one warning, then the eager static step, same tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = SpeculativeDecoder(target, SHAPES["chain3"](arch), compile="graph").generate_batch(rows, LIMITS)
    assert [str(w.message) for w in caught] == ["compile=graph needs a CUDA device; running the static step eagerly"]
    ref = SpeculativeDecoder(target, SHAPES["chain3"](arch)).generate_batch(rows, LIMITS)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences]


needs_compiler = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                    reason="torch.compile on the CPU needs a C++ compiler")


@needs_compiler
def test_inductor_step_compiles_and_emits_the_eager_tokens():
    """``compile=inductor`` really compiles the step (it used to fail on inference tensors and fall back)
    and emits the readable step's tokens (rejection at T = 1: the keyed draws inside the compiled graph);
    a batch of other lengths in the same capacity bucket reuses it (the kept step: nothing compiled). Greedy
    steps are compiled on a GPU (``tests/test_gpu.py``)."""
    from torch._dynamo.utils import counters

    target, draft, tok = pair("llama")
    rows, sampling = prompts(tok, 3, seed=9), SamplingParams(temperature=1.0)
    compiled = SpeculativeDecoder(target, DraftModelDrafter(draft, 3), "rejection", sampling, compile="inductor")
    readable = SpeculativeDecoder(target, DraftModelDrafter(draft, 3), "rejection", sampling)
    graphs = [counters["stats"]["unique_graphs"]]
    for limits in ([12, 7, 10], [9, 11, 5]):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="compile=")  # a fallback warns: fail on it
            out = compiled.generate_batch(rows, limits, seed=2)
        assert (out.stats.time_compile > 0) == (limits[0] == 12) and out.stats.time_total > 0  # timed apart, once
        graphs.append(counters["stats"]["unique_graphs"])
        ref = readable.generate_batch(rows, limits, seed=2)
        assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences], limits
    assert graphs[1] > graphs[0] and graphs[2] == graphs[1], graphs  # compiled once, then reused


def test_a_kept_step_serves_later_batches_in_the_same_buffers(setup, monkeypatch):
    """compile=graph|inductor keeps its step per batch size and capacity bucket: a later batch refills its
    buffers in place (what a captured graph needs: the same addresses), decodes the readable step's tokens
    (sampled: the keyed draws start again from each row's seed), and is not prepared (captured) again."""
    arch, target, rows = setup
    sampling = SamplingParams(temperature=1.0)
    decoder = SpeculativeDecoder(target, SHAPES["binary"](arch), "rejection", sampling, compile="graph")
    readable = SpeculativeDecoder(target, SHAPES["binary"](arch), "rejection", sampling)

    def addresses(step):
        caches = [layer for cache in (step.t_cache, step.d_cache) for layer in cache.layers]
        return [t.data_ptr() for t in step._state() + [x for layer in caches for x in (layer.keys, layer.values)]]

    batches = [(rows, LIMITS, 1), (rows[::-1], LIMITS[::-1], 5), (rows[:2], LIMITS[:2], 3)]
    outputs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (batch, limits, seed) in enumerate(batches):
            handed = []  # what on_row receives: a caller may keep it
            out = decoder.generate_batch(batch, limits, seed=seed, on_row=lambda i, seq, *_, h=handed: h.append(seq))
            ref = readable.generate_batch(batch, limits, seed=seed)
            outputs.append(([s.tolist() for s in ref.sequences], handed))
            assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences], i
            assert out.stats.accepted_per_step == ref.stats.accepted_per_step, i
            steps = [entry[1] for entry in decoder.static_steps.values()]
            if i == 0:
                (step,), before = steps, addresses(steps[0])
            if i == 1:
                assert steps == [step] and addresses(step) == before
    assert len(decoder.static_steps) == 2  # batch sizes 4 and 2
    assert all([s.tolist() for s in out] == ref for ref, out in outputs)  # copies, not the kept buffers
    prepared = [w for w in caught if str(w.message).startswith("compile=graph")]
    assert len(prepared) == 2  # once per kept step, not per batch (the models are on the CPU, CUDA or not)
    small = [entry[1] for entry in decoder.static_steps.values()][-1]  # the batch of 2's
    decoder.rule = get_rule("rejection")  # another rule object: a step of its own, not the kept one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder.generate_batch(rows[:2], LIMITS[:2], seed=3)
    steps = [entry[1] for entry in decoder.static_steps.values()]
    assert len(steps) == 2 and steps[0] is step and steps[1] is not small
    monkeypatch.setattr(static_kept, "KEPT_STEPS", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder.generate_batch(rows[:1], LIMITS[:1])
    assert len(decoder.static_steps) == 1  # the least recently used go first


def test_a_block_past_the_capacity_is_reported_not_decoded(setup, monkeypatch):
    """``capacity_for`` sizes the buffers; were it too small (planted: 5 slots short), a block of a row that is not
    the last would be written into the next head's slots, silently (the last row's would fail its index copy).
    The step flags it on the device and the host raises at that step, no tokens."""
    arch, target, rows = setup
    if arch != "llama":
        pytest.skip("the planted shortfall is sized for the llama pair's rows (qwen2's stop on EOS before it)")
    from specdec.batch_cache import BatchCache

    cache = BatchCache(1, 10, 2)
    cache.lengths.copy_(torch.tensor([8, 3]))
    cache.begin_static_block(2)
    assert not cache.overflow
    cache.begin_static_block(2, offset=1)  # row 0: slots 9 and 10 of 10
    assert cache.overflow
    real = static_step.capacity_for
    monkeypatch.setattr(static_step, "capacity_for", lambda *a: real(*a) - 5)
    decoder = SpeculativeDecoder(target, SHAPES["chain3"](arch), compile="static")
    with pytest.raises(RuntimeError, match="past the cache's"):
        decoder.generate_batch(rows[:2], [20, 20])
    monkeypatch.setattr(static_step, "capacity_for", real)
    assert decoder.generate_batch(rows[:2], [20, 20]).sequences  # sized right, the same rows decode


def test_a_failing_compile_falls_back_to_the_eager_step(setup, monkeypatch):
    """Where the compiler fails (planted: a backend that raises), one warning, then the eager step, same tokens; the
    failed attempt's seconds are compile time (``time_compile``), not in the decode's ``time_total``."""
    arch, target, rows = setup
    real = torch.compile

    clock, skipped = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + skipped[0])

    def failing_backend(gm, example_inputs):
        skipped[0] += 100.0  # a compiler that takes 100 s (on the clock the decoder reads) to fail
        raise RuntimeError("planted compiler failure")

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(1) or real(fn, backend=failing_backend,
                                                                                dynamic=False))
    monkeypatch.setattr(static_step, "_COMPILE_FAILED", [])
    decoder = SpeculativeDecoder(target, SHAPES["chain3"](arch), compile="inductor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decoder.generate_batch(rows, LIMITS)
        again = decoder.generate_batch(rows[:2], LIMITS[:2])  # no second attempt, no second warning
    failed = [str(w.message) for w in caught if "compile=inductor failed" in str(w.message)]
    assert len(failed) == 1 and "planted compiler failure" in failed[0], [str(w.message) for w in caught]
    assert len(calls) == 1
    assert out.stats.time_compile >= 100 > out.stats.time_total and again.stats.time_compile < 100  # not in tokens/s
    ref = SpeculativeDecoder(target, SHAPES["chain3"](arch)).generate_batch(rows, LIMITS)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences]
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in ref.sequences[:2]]


def test_running_out_of_memory_while_compiling_is_not_a_compile_failure(setup, monkeypatch):
    """An OOM inside the compiler (dynamo wraps it) is raised as itself: the eager step needs the same memory, so
    falling back would only fail later or hide it, and a later batch may still compile (nothing is remembered)."""
    arch, target, rows = setup
    real = torch.compile

    def oom_backend(gm, example_inputs):
        raise torch.OutOfMemoryError("planted: out of memory")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=oom_backend, dynamic=False))
    monkeypatch.setattr(static_step, "_COMPILE_FAILED", [])
    decoder = SpeculativeDecoder(target, SHAPES["chain3"](arch), compile="inductor")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(torch.OutOfMemoryError, match="planted"):
        warnings.simplefilter("always")
        decoder.generate_batch(rows, LIMITS)  # the OOM itself (the command line's error: line), not dynamo's wrapper
    assert not static_step._COMPILE_FAILED
    assert not [w for w in caught if "failed" in str(w.message)], [str(w.message) for w in caught]


def test_projections_fused_after_a_step_was_kept_get_a_step_of_their_own(setup):
    """A kept step captured the weights it found: fusing the target's projections in place afterwards (which
    frees the unfused weights) must not replay it; the next batch builds a step of its own, same tokens."""
    from verifier.fused_projections import fuse_projections

    arch, target, rows = setup
    target = copy.deepcopy(target)  # fused in place below: the module's fixture stays unfused
    decoder = SpeculativeDecoder(target, SHAPES["chain3"](arch), compile="graph")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = decoder.generate_batch(rows, LIMITS)
        (kept,) = [entry[1] for entry in decoder.static_steps.values()]
        fuse_projections(target)
        after = decoder.generate_batch(rows, LIMITS)
    steps = [entry[1] for entry in decoder.static_steps.values()]
    assert len(steps) == 2 and steps[-1] is not kept
    assert [s.tolist() for s in after.sequences] == [s.tolist() for s in before.sequences]
