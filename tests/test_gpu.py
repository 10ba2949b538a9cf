"""On a CUDA device: greedy decoding equals ``generate(do_sample=False)`` for every drafter shape,
with both attention backends and prompts longer than the kernel's 64 tree tokens; the bf16 draft
path of the default experiment. Skipped without CUDA (``scripts/gpu_check.sh`` runs them)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from drafters import DraftModelDrafter, EagleDrafter, MedusaDrafter, NGramDrafter, NoDrafter
from drafters.eagle_heads import EagleHead
from drafters.medusa_heads import MedusaHeads
from specdec import SamplingParams, SpeculativeDecoder, static_step
from tests.tiny_models import noisy_copy, pair

pytestmark = pytest.mark.gpu
CUDA = "cuda"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request):
    target = copy.deepcopy(pair(request.param)[0]).to(CUDA)
    draft = copy.deepcopy(noisy_copy(request.param)).to(CUDA)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, n), generator=gen) for n in (70, 130, 5)]  # [1, T] each
    return target, draft, prompts


DRAFTERS = {
    "ar": lambda draft: NoDrafter(),
    "chain4": lambda draft: DraftModelDrafter(draft, num_speculative_tokens=4),
    "tree_binary": lambda draft: DraftModelDrafter(draft, tree="binary"),
    "dynamic70": lambda draft: DraftModelDrafter(draft, num_speculative_tokens=4, budget=70, top_k_children=8),
    "ngram": lambda draft: NGramDrafter(num_speculative_tokens=4),
}


def _check(target, drafter, prompts, backend, max_new=40):
    _check_against(target, SpeculativeDecoder(target, drafter, sampling=SamplingParams(), attn_backend=backend),
                   prompts, max_new)


def _check_against(target, decoder, prompts, max_new=40):
    """``decoder``'s greedy tokens equal ``target.generate(do_sample=False)``'s (a captured step may not fall back)."""
    for ids in prompts:
        ids = ids.to(CUDA)
        with torch.no_grad():
            ref = target.generate(ids, do_sample=False, max_new_tokens=max_new,
                                  pad_token_id=target.generation_config.eos_token_id)
        with warnings.catch_warnings():  # a fallback to the eager step would not test the capture
            warnings.filterwarnings("error", message="compile=")
            out = decoder.generate(ids, max_new_tokens=max_new, seed=0)
        assert out.sequences.tolist() == ref.tolist()


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("shape", list(DRAFTERS))
def test_greedy_equality_on_cuda(models, shape, backend):
    target, draft, prompts = models
    _check(target, DRAFTERS[shape](draft), prompts, backend)


def test_masked_grouped_attention_packs_the_heads_on_cuda(models, monkeypatch):
    """A tree verify through SDPA on a GQA target (4 query heads, 2 KV heads) takes ``grouped_sdpa`` on CUDA
    (SDPA's fused kernels with a mask take no grouped heads), and decodes generate's tokens."""
    from verifier import attention

    calls = []
    original = attention.grouped_sdpa
    monkeypatch.setattr(attention, "grouped_sdpa", lambda *a: calls.append(1) or original(*a))
    target, draft, prompts = models
    _check(target, DRAFTERS["tree_binary"](draft), prompts[:1], "sdpa", max_new=12)
    assert calls


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_medusa_greedy_equality_on_cuda(models, backend):
    target, _, prompts = models
    heads = MedusaHeads.for_target(target, num_heads=3, init="random")
    _check(target, MedusaDrafter(heads, tree="binary"), prompts, backend)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("version", ["eagle2", "eagle3"])
def test_eagle_greedy_equality_on_cuda(models, version, backend):
    """Untrained heads (the target's first layer): chains and dynamic trees, features and hooks on the device."""
    target, _, prompts = models
    head = EagleHead.for_target(target, version)
    for kwargs in ({"num_speculative_tokens": 4}, {"num_speculative_tokens": 4, "budget": 20, "top_k_children": 4}):
        drafter = EagleDrafter(head, **kwargs)
        _check(target, drafter, prompts, backend)
        drafter.close()


@pytest.mark.parametrize("version", ["eagle2", "eagle3"])
def test_batched_eagle_chain_on_cuda(models, version):
    """The batched EAGLE chain (one head forward per position for all rows, the head in bf16, its cache's
    indexed stores on the device): every row equals HF greedy, static and continuous."""
    target, _, prompts = models
    rows = [p.to(CUDA) for p in prompts]
    drafter = EagleDrafter(EagleHead.for_target(target, version), num_speculative_tokens=3, dtype="bfloat16")
    try:
        for max_rows in (None, 2):
            out = SpeculativeDecoder(target, drafter).generate_batch(rows, max_new_tokens=24, max_rows=max_rows)
            for ids, seq in zip(rows, out.sequences):
                with torch.no_grad():
                    ref = target.generate(ids, do_sample=False, max_new_tokens=24,
                                          pad_token_id=target.generation_config.eos_token_id)
                assert seq.tolist() == ref.tolist()
    finally:
        drafter.close()


def test_bf16_draft_of_fp32_target_on_cuda(models):
    """The default experiment's setting on a GPU (model.draft_dtype=auto picks bf16 there)."""
    target, draft, prompts = models
    _check(target, DraftModelDrafter(copy.deepcopy(draft).to(torch.bfloat16), num_speculative_tokens=4), prompts,
           "sdpa")


# --------------------------------------------------------------------------- the captured step (compile=graph)


@pytest.mark.parametrize("compile", ["graph", "inductor"])
@pytest.mark.parametrize("batch", [1, 4])
def test_captured_step_emits_the_eager_tokens(models, compile, batch):
    target, draft, prompts = models
    rows = (prompts * 2)[:batch]
    shapes = ({"num_speculative_tokens": 4}, {"tree": "binary"}, {"tree": "binary", "tree_sampling": "with_replacement"})
    if compile == "inductor":  # tens of seconds of compiling per shape: the chain only, within gpu_check's budget
        shapes = shapes[:1]
    for sampling, rule in ((SamplingParams(), "greedy"), (SamplingParams(temperature=1.0), "rejection")):
        for shape in shapes:
            eager = SpeculativeDecoder(target, DraftModelDrafter(draft, **shape), rule, sampling)
            captured = SpeculativeDecoder(target, DraftModelDrafter(draft, **shape), rule, sampling, compile=compile)
            # the second batch (other prompts, lengths and seed) replays the kept step on its refilled buffers
            for group, seed, new in ((rows, 3, 24), ([p[:, 3:] for p in rows[::-1]], 4, 20)):
                ref = eager.generate_batch(group, new, seed=seed)
                with warnings.catch_warnings():  # a fallback to the eager step would compare eager with eager
                    warnings.filterwarnings("error", message="compile=")
                    out = captured.generate_batch(group, new, seed=seed)
                assert not static_step._COMPILE_FAILED, static_step._COMPILE_FAILED  # inductor warns only once
                assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences], (shape, seed)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_a_fused_target_captured_decodes_the_unfused_tokens(models, backend):
    """Fused projections (``verifier.fused_projections``) in the captured step, with either attention: the
    tokens of ``generate(do_sample=False)`` on the unfused target (fp32)."""
    from verifier.fused_projections import fused_copy

    target, draft, prompts = models
    _check_against(target, SpeculativeDecoder(fused_copy(target), DraftModelDrafter(draft, num_speculative_tokens=4),
                                              attn_backend=backend, compile="graph"), prompts)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("shape", [{"num_speculative_tokens": 4}, {"tree": "binary"}])
def test_captured_step_makes_no_host_sync(models, shape, backend):
    """Under sync debug mode "error", replaying the captured step must not synchronise; only the
    step's one read (``StaticStep.step``'s ``report.tolist()``) may. ``triton``: the verify forward's kernel
    on the device-side lengths."""
    from specdec.static_step import StaticStep

    target, draft, prompts = models
    decoder = SpeculativeDecoder(target, DraftModelDrafter(draft, **shape), compile="graph", attn_backend=backend)
    rows = [p[0].tolist() for p in prompts]
    with torch.no_grad():
        step = StaticStep.for_decoder(decoder, rows, [16] * len(rows), list(range(len(rows))), "graph")
        step.prefill(rows)
        step.step()  # capture happens on the first use
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step._run()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.requires("hydra", "omegaconf")
def test_the_smoke_experiment_runs_on_cuda(tmp_path):
    """A user's first run on a GPU, ``experiment=smoke model.device=cuda``: the random pair decodes there, its
    speculative tokens equal the baseline's, and the summary says where it ran."""
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from experiments import decode

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "model.device=cuda", "costs=false", "num_prompts=2"])
    summary = decode.run(cfg, tmp_path)
    assert summary["metrics"]["matches_baseline"] is True
    assert json.loads((tmp_path / "summary.json").read_text())["models"]["device"].startswith("cuda")
