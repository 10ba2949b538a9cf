"""Edges of the measured ``auto`` settings and the drafter checks that the rest of the suite left unpinned.

Each test names the bug it catches (found by a mutation pass: the code was changed that way and every other test
still passed). Timings are faked throughout, so nothing here depends on the machine's speed.
"""
from __future__ import annotations

import copy
import functools
import io
import types

import pytest
import torch
from torch import nn

from specdec import models
from specdec.errors import SpecDecError
from specdec.timing import MARGIN
from tests.test_auto_dtype import _timed


def test_a_gpu_counts_as_bf16_from_compute_capability_8(monkeypatch):
    """Catches ``>= 8`` turned into ``> 8`` (an A100 or H100 taken for an emulating GPU) or into ``>= 7`` (a V100 or
    T4, which only emulate bf16, taken for native), and a capability asked of a torch without a visible GPU."""
    capability = {"now": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    for cap, native in (((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)):
        capability["now"] = cap
        assert models.has_native_bf16("cuda") is native, cap
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: pytest.fail("no GPU to ask"))
    assert models.has_native_bf16("cuda:0") is False


def test_only_the_cpu_reads_the_cpus_bf16_flags(monkeypatch):
    """Catches ``device.type == "cpu" and`` dropped: an MPS (or meta) device counted as bf16 because the CPU has it."""
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.has_native_bf16("cpu") and not models.has_native_bf16("mps") and not models.has_native_bf16("meta")


@pytest.mark.parametrize(("flags", "native"), [("fpu avx2 avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                                              ("fpu avx2 avx512f", False), (None, False)])


def test_cpu_bf16_is_avx512_bf16_or_amx(monkeypatch, flags, native):
    """Catches one of the two flags dropped (a CPU that lists only ``amx_bf16`` read as one without), and an
    unreadable /proc/cpuinfo raising instead of meaning no."""
    def fake_open(path, *args, **kwargs):
        if flags is None:
            raise OSError("no /proc here")
        return io.StringIO(f"processor : 0\nflags : {flags}\n")

    monkeypatch.setattr(models, "open", fake_open, raising=False)  # the module's ``open`` before the builtin
    assert models.cpu_has_bf16.__wrapped__() is native


def test_auto_decides_again_for_another_dtype_thread_count_or_layer_count(monkeypatch):
    """The decision is cached per (shapes with counts, dtype, threads). Catches a key without the dtype (a float16
    target reusing float32's answer), without the thread count (a decision made on 1 thread kept on 8), or without
    the counts (one layer's decision reused for a model of four of them)."""
    asked = _timed(monkeypatch, native=True, bf16=0.5)
    one = nn.Sequential(nn.Linear(8, 16))
    assert models.auto_dtype(one, "cpu", torch.float32) == torch.bfloat16 and len(asked) == 1
    assert models.auto_dtype(one, "cpu", torch.float16) == torch.bfloat16 and len(asked) == 2  # another dtype
    four = nn.Sequential(*(nn.Linear(8, 16) for _ in range(4)))
    assert models.auto_dtype(four, "cpu", torch.float32) == torch.bfloat16 and len(asked) == 3  # other counts
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert models.auto_dtype(one, "cpu", torch.float32) == torch.bfloat16 and len(asked) == 4  # other threads
    finally:
        torch.set_num_threads(threads)


def test_auto_needs_bf16_strictly_under_the_margin_and_else_keeps_the_given_dtype(monkeypatch):
    """Catches ``<`` turned into ``<=`` (bf16 at exactly the margin taken), a float16 target's auto answered with
    float32 instead of the float16 it was given, a module of None (a head not given) raising, ``head_dtype``'s None
    answered with float32 rather than the target's dtype, and its name check dropped."""
    _timed(monkeypatch, native=True, bf16=MARGIN)  # exactly the margin: not under it
    assert models.auto_dtype(nn.Linear(4, 8), "cpu", torch.float32) == torch.float32
    _timed(monkeypatch, native=True, bf16=2.0)
    assert models.auto_dtype(nn.Linear(4, 8), "cpu", torch.float16) == torch.float16
    asked = _timed(monkeypatch, native=True, bf16=0.1)
    assert models.auto_dtype(None, "cpu", torch.float32) == torch.float32 and asked == []
    assert models.head_dtype("auto", torch.float32, "cpu") == torch.float32  # head_dtype's head defaults to None
    assert models.head_dtype(None, torch.bfloat16, "cpu") == torch.bfloat16  # None: the target's, whatever it is
    with pytest.raises(SpecDecError, match=r"drafter.dtype='bf16' is unknown"):  # not a KeyError from DTYPES
        models.head_dtype("bf16", torch.float32, "cpu")


def test_narrow_linears_are_timed_as_linears():
    """Catches ``isinstance`` narrowed to ``type(sub) is nn.Linear``: a NarrowLinear (an nn.Linear subclass) left out."""
    from verifier.narrow_linear import use_narrow_linears

    module = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 32))
    use_narrow_linears(module, product="transposed")
    assert {shape: count for shape, (_, count) in models.matmul_weights(module).items()} == {(16, 8): 1, (32, 16): 1}


def test_timing_auto_leaves_the_runs_random_stream_alone(monkeypatch):
    """Catches the random inputs of ``_dtype_seconds`` drawn outside ``fork_rng``: a seeded run's samples would
    depend on whether auto timed (or found its decision cached)."""
    monkeypatch.setattr("specdec.timing.fastest_seconds", lambda calls, reps=7: dict.fromkeys(calls, 1.0))
    weights = models.matmul_weights(nn.Linear(8, 16))
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    models._dtype_seconds(weights, (torch.float32, torch.bfloat16))
    assert torch.equal(torch.rand(4), want)


def test_fastest_seconds_keeps_each_calls_fastest_timed_run(monkeypatch):
    """``perf_counter`` scripted: the untimed first round is the fastest (0.1 s) and must not count; of the timed runs
    (5, 3, 4 s) the fastest is kept. Catches the first round counted, ``max`` for ``min``, or the last run kept;
    and the calls running outside inference mode."""
    from specdec import timing

    elapsed = iter([0.1, 5.0, 3.0, 4.0])
    clock = {"now": 0.0, "start": True}

    def perf_counter():
        if not clock["start"]:
            clock["now"] += next(elapsed)
        clock["start"] = not clock["start"]
        return clock["now"]

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=perf_counter))
    modes = []
    best = timing.fastest_seconds({"a": lambda: modes.append(torch.is_inference_mode_enabled())}, reps=3)
    assert best == {"a": pytest.approx(3.0)} and modes == [True] * 4


def _fake_fastest(monkeypatch, seconds):
    """``narrow_linear._fastest`` uncached, its timings ``seconds`` per product; returns the shapes timed."""
    from verifier import narrow_linear

    timed = []

    def product_seconds(shapes, products):
        timed.append(shapes)
        return {p: seconds[p] for p in products}

    monkeypatch.setattr(narrow_linear, "_product_seconds", product_seconds)
    monkeypatch.setattr(narrow_linear, "_fastest", functools.cache(narrow_linear._fastest.__wrapped__))
    return timed


def test_auto_narrow_linears_time_an_already_narrow_model_and_again_per_thread_count(monkeypatch):
    """Catches NarrowLinear modules left out of the shapes (a model narrowed once measured as having no linears) and
    a cache key without the thread count (a choice made on 1 thread kept on 8)."""
    from verifier.narrow_linear import measured_product, use_narrow_linears

    timed = _fake_fastest(monkeypatch, {"plain": 1.0, "transposed": 0.5, "packed": 0.5})
    model = nn.Sequential(nn.Linear(8, 16))
    use_narrow_linears(model, product="transposed")
    assert measured_product(model) is not None and timed == [((16, 8),)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert measured_product(model) is not None and len(timed) == 2
    finally:
        torch.set_num_threads(threads)


def test_auto_narrow_times_the_largest_matrix_by_its_size_and_needs_a_product_under_the_margin(monkeypatch):
    """Catches the largest linear picked by its output rows alone (a wide 64 -> 8 projection has the most weights
    here, not the commonest 4 -> 16 one), and ``<`` turned into ``<=``: a product at exactly MARGIN of
    F.linear's time is not taken."""
    from verifier import narrow_linear

    margin = MARGIN
    timed = _fake_fastest(monkeypatch, {"plain": 1.0, "transposed": margin, "packed": margin})
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(4, 16), nn.Linear(64, 8))
    assert narrow_linear.measured_product(model) is None and timed == [((8, 64), (16, 4))]


def test_product_seconds_times_each_product_on_its_own_copy_and_sums_every_width(monkeypatch):
    """The real ``_product_seconds`` with fake timings. Catches a product timed on the shared layer (switching it
    switched ``plain`` too), a product timed as :func:`best_product` instead of itself, widths collapsed into one
    call per shape or reduced by ``max`` instead of summed, and random weights drawn outside ``fork_rng``."""
    from verifier import narrow_linear
    from verifier.narrow_linear import AUTO_WIDTHS, NarrowLinear

    seen = []

    def fastest(calls, reps=7):
        for (product, shape, *_), call in calls.items():
            layer = call.func[0]
            seen.append((product, shape, type(layer), getattr(layer, "product", None), call.args[0].shape[0]))
        return {key: 1.0 + i for i, key in enumerate(calls)}

    monkeypatch.setattr(narrow_linear, "fastest_seconds", fastest)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    shapes = ((16, 8), (32, 16))
    seconds = narrow_linear._product_seconds(shapes, ("plain", "transposed"))
    assert torch.equal(torch.rand(3), want)  # the run's random stream untouched
    n = len(AUTO_WIDTHS) * len(shapes)
    assert seconds == {"plain": sum(range(1, n + 1)), "transposed": sum(range(n + 1, 2 * n + 1))}
    assert len(seen) == 2 * n
    for product, shape, kind, used, rows in seen:
        assert (kind, used) == ((nn.Linear, None) if product == "plain" else (NarrowLinear, product)), product
    assert sorted(rows for p, s, *_, rows in seen if p == "plain" and s == shapes[0]) == sorted(AUTO_WIDTHS)


def test_auto_narrow_linears_only_on_the_cpu_and_the_summary_names_the_targets(monkeypatch):
    """Catches the device check dropped from ``auto`` (a model off the CPU measured as if on it: here a meta
    model), and ``narrow_models`` reporting the last model's product (the draft's) instead of the target's."""
    from verifier.narrow_linear import narrow_models, narrow_product

    _fake_fastest(monkeypatch, {"plain": 1.0, "transposed": 0.5, "packed": 0.5})
    assert narrow_product("auto", nn.Linear(4, 8, device="meta")) is None
    target, draft = nn.Linear(4, 8), nn.Linear(4, 8).to(torch.bfloat16)  # auto narrows float32 models only
    product = narrow_models([target, None, draft], "auto")
    assert product in ("packed", "transposed") and type(draft) is nn.Linear
    assert narrow_models([None, None], "auto") == "off"


def test_a_type_error_inside_a_propose_that_takes_max_depth_is_the_drafters_own():
    """Catches every TypeError from ``propose`` reported as a misnamed parameter (the signature check dropped), and
    a propose whose signature cannot be read (a builtin) blamed on its parameter name: both stay TypeErrors."""
    from specdec.drafting import proposal

    def broken(max_depth):
        return len(max_depth)  # a bug in the drafter: TypeError

    with pytest.raises(TypeError, match="has no len"):
        proposal(types.SimpleNamespace(max_nodes=4, propose=broken), 3, 257)
    with pytest.raises(TypeError) as err:
        proposal(types.SimpleNamespace(max_nodes=4, propose=max), 3, 257)  # a builtin: inspect.signature raises ValueError
    assert not isinstance(err.value, SpecDecError)


def test_checked_proposal_edges():
    """Each limit at its edge. Catches the depth check run on a tree of no nodes (``depth.max()`` of nothing raises;
    the shortcut ``num_nodes > max_depth`` is not only speed), a depth limit or a node limit off by one, negative
    token ids let through (and named), draft_probs checked on the vocabulary only, and parents of another length."""
    from specdec.drafting import checked_proposal
    from specdec.types import DraftTree

    drafter = types.SimpleNamespace(max_nodes=3)  # a stand-in drafter
    assert checked_proposal(drafter, DraftTree.empty(), 257, 0).num_nodes == 0
    assert checked_proposal(drafter, DraftTree.chain([1, 2]), 257, 2).num_nodes == 2
    with pytest.raises(SpecDecError, match=r"propose\(max_depth=2\) returned a tree 3 levels deep"):
        checked_proposal(drafter, DraftTree.chain([1, 2, 3]), 257, 2)
    assert checked_proposal(drafter, DraftTree.chain([1, 2, 3]), 257, 3).num_nodes == 3
    with pytest.raises(SpecDecError, match="returned 4 nodes but its max_nodes is 3"):
        checked_proposal(drafter, DraftTree.chain([1, 2, 3, 4]), 257)
    with pytest.raises(SpecDecError, match=r"returned token id -1, outside the target's vocabulary of 257 ids"):
        checked_proposal(drafter, DraftTree.chain([5, -1]), 257)
    assert checked_proposal(drafter, DraftTree.chain([0, 256]), 257).num_nodes == 2
    probs = torch.full((3, 257), 1 / 257)  # one row too many for two nodes
    with pytest.raises(SpecDecError, match=r"draft_probs of shape \(3, 257\); expected \[2, 257\]"):
        checked_proposal(drafter, DraftTree.chain([1, 2], probs), 257)
    odd = DraftTree(tokens=torch.tensor([1, 2]), parents=torch.tensor([-1, 0, 1]))
    with pytest.raises(SpecDecError, match=r"tokens \(2,\) and parents \(3,\); both must be \[N\]"):
        checked_proposal(drafter, odd, 257)


def test_older_summaries_and_dynamic_runs_keep_their_step_shape_and_k(tmp_path):
    """Summaries written before ``drafter_shape`` keep the step shape under ``cost_model.drafter``. Catches that
    fallback dropped (an old hybrid's runs drawn on a k-curve, its k lost) and a dynamic tree's depth limit left out
    of the k column (only ``chain`` counted); a preset tree has no k."""
    from experiments.runs import Run, is_hybrid, k_of, shape_of, step_shape_of

    shape = {"kind": "chain", "max_nodes": 8, "k": 4, "draft_source": ["eagle"]}
    old = Run(tmp_path, "old", summary={"status": "complete", "drafter": "HybridDrafter", "config": {"drafter": {}},
                                        "cost_model": {"drafter": shape}})
    assert step_shape_of(old) == shape and is_hybrid(old) and k_of(old, shape_of(old)) == 4
    plain = Run(tmp_path, "plain", summary={"status": "complete", "drafter": "DraftModelDrafter",
                                            "cost_model": {"drafter": {**shape, "draft_source": None}}})
    assert not is_hybrid(plain) and k_of(plain, "chain") == 4
    dynamic = Run(tmp_path, "dyn", summary={"status": "complete", "drafter": "EagleDrafter",
                                            "config": {"drafter": {"budget": 16, "num_speculative_tokens": 5}}})
    assert shape_of(dynamic) == "dynamic16" and k_of(dynamic, "dynamic16") == 5 and k_of(dynamic, "tree3") is None


def test_measure_run_costs_names_only_the_cached_curves_it_measured_again(monkeypatch, tmp_path):
    """``remeasured`` lists the roles whose cache entry existed but was not used. Catches ``in_cache`` inverted or
    keyed differently from ``cost_curves`` (another ``reps``), looked up after ``cost_curves`` stored the new
    curves, ``remeasured`` listing every uncached role (a first run's fresh curves), and ``cached`` read from
    ``in_cache`` (an entry that was replaced reported as used)."""
    from drafters import NGramDrafter
    from experiments import cost_measure
    from tests.tiny_models import pair

    def measure(requests, reps=0, backend="sdpa"):
        return [{w: 0.01 + 0.001 * w for w in widths} for _, _, widths in requests]

    monkeypatch.setattr(cost_measure, "measure_interleaved", measure)
    target, shape = pair("llama")[0], NGramDrafter(3).step_shape(None)
    first = cost_measure.measure_run_costs(target, shape, 0, prompt_tokens=5, cache_dir=tmp_path)
    assert first["cached"] == {"target": False, "prefill_target": False} and first["remeasured"] == []
    again = cost_measure.measure_run_costs(target, shape, 0, prompt_tokens=5, cache_dir=tmp_path)
    assert again["cached"] == {"target": True, "prefill_target": True} and again["remeasured"] == []
    busy = {w: 0.5 if w == 2 else 0.01 for w in cost_measure.TARGET_WIDTHS}  # cached by hand: implausible
    fp = cost_measure.fingerprint(target, 0, cost_measure.TARGET_WIDTHS, "sdpa", cost_measure.REPS)
    cost_measure._store(fp, busy, tmp_path)
    third = cost_measure.measure_run_costs(target, shape, 0, prompt_tokens=5, cache_dir=tmp_path)
    assert third["cached"] == {"target": False, "prefill_target": True} and third["remeasured"] == ["target"]
    assert third["target"][2] == pytest.approx(0.012)


def test_a_run_without_a_draft_model_reports_no_draft_dtype(saved_tiny_pair):
    """Catches ``info["draft_dtype"]`` filled in without a draft (the summary naming a dtype no model ran in)."""
    from experiments.models_from_config import load_models

    for draft_dtype in (None, "bfloat16"):
        loaded = load_models({"source": "hf", "target": str(saved_tiny_pair / "target"), "draft_dtype": draft_dtype,
                              "narrow_linears": "off"})
        assert loaded.draft is None and loaded.info["draft_dtype"] is None


def test_an_auto_draft_on_a_bf16_gpu_is_loaded_in_bf16(saved_tiny_pair, monkeypatch):
    """``draft_dtype=auto`` with ``device=cuda`` on a bf16 GPU loads the draft in bf16 directly (no float32 copy on
    the GPU first). Catches the draft dtype resolved for another device than the configured one. The GPU is faked:
    the loads run on the CPU and record what they were asked."""
    from experiments.models_from_config import load_models

    real, loads = models.load_causal_lm, []

    def load(path, dtype="float32", device="cpu", trust_remote_code=False, device_map=None, role="model"):
        loads.append((role, dtype, device))
        return real(path, dtype, "cpu", trust_remote_code, device_map, role)

    monkeypatch.setattr(models, "load_causal_lm", load)
    monkeypatch.setattr(models, "has_native_bf16", lambda device: torch.device(device).type == "cuda")
    loaded = load_models({"source": "hf", "target": str(saved_tiny_pair / "target"), "draft": str(saved_tiny_pair / "draft"),
                          "device": "cuda", "draft_dtype": "auto", "narrow_linears": "off"})
    assert loads == [("target", "float32", "cuda"), ("draft", "bfloat16", "cuda")]
    assert loaded.info["draft_dtype"] == "bfloat16" and next(loaded.draft.parameters()).dtype == torch.bfloat16


def test_an_auto_eagle2_head_loaded_from_disk_is_bound_before_it_is_timed(tmp_path, monkeypatch):
    """A saved eagle2 head over a draft vocabulary reads the target's LM-head rows only once bound; auto must time
    them (the largest product). Catches the first bind (in the target's dtype) skipped before ``head_dtype``."""
    from drafters import EagleDrafter
    from drafters.eagle_heads import EagleHead, load_head, save_head
    from tests.tiny_models import pair

    target = pair("llama")[0]
    save_head(EagleHead.for_target(target, "eagle2", draft_vocab=torch.arange(40)), tmp_path / "h")
    asked = _timed(monkeypatch, native=True, bf16=0.5)
    drafter = EagleDrafter(load_head(tmp_path / "h"), dtype="auto")
    drafter.step_shape(target)
    assert (40, target.config.hidden_size) in asked[0]
    assert next(drafter.head.parameters()).dtype == torch.bfloat16


def test_binding_an_eagle3_drafter_to_another_target_removes_the_first_targets_hooks():
    """Catches the old feature tap left on the first target when a drafter is bound to a second one: the first
    would keep capturing (and holding) features of every forward it runs, for a drafter that no longer reads them."""
    from drafters import EagleDrafter
    from drafters.eagle_heads import EagleHead
    from tests.tiny_models import pair

    first = pair("llama")[0]
    second = copy.deepcopy(first)

    def hooks(model):
        return sum(len(m._forward_hooks) for m in model.modules())

    before = hooks(first)
    drafter = EagleDrafter(EagleHead.for_target(first, "eagle3"))
    drafter.step_shape(first)
    assert hooks(first) > before
    drafter.step_shape(second)
    assert hooks(first) == before and hooks(second) > before
    drafter.close()
    assert hooks(second) == before


def test_a_shared_head_goes_back_to_the_targets_dtype_for_a_drafter_already_bound():
    """Two drafters share one head, bound in turns, each twice. Catches the target-dtype default read off the head
    (whatever dtype the other drafter left it in) instead of the target: the float32 drafter's second turn kept
    the head in bfloat16. (Each drafter's first turn binds in the target's dtype, which hid it.)"""
    from drafters import EagleDrafter
    from drafters.eagle_heads import EagleHead
    from tests.tiny_models import pair

    target = pair("llama")[0]
    head = EagleHead.for_target(target, "eagle3")
    half, full = EagleDrafter(head, dtype="bfloat16"), EagleDrafter(head)
    for drafter, want in [(half, torch.bfloat16), (full, torch.float32)] * 2:
        drafter.step_shape(target)
        assert next(head.parameters()).dtype == want
    half.close(), full.close()
