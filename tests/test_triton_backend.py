"""Decoding through the Triton tree-attention kernel gives the sdpa backend's tokens.

On a GPU the models move to CUDA; on the CPU the kernel runs under the Triton interpreter (in a
fresh process if triton was imported before the interpreter could be switched on). Prompts longer
than the kernel's 64 tree tokens prefill through SDPA's causal path; trees wider than that verify
through SDPA; every other verify forward takes the kernel.
"""
from __future__ import annotations

import copy

import pytest
import torch

from drafters import DraftModelDrafter, NoDrafter
from specdec import SamplingParams, SpeculativeDecoder
from tests.tiny_models import noisy_copy, pair, prompts
from tests.triton_env import DEVICE, fresh_process_test, interpreter_guard

_needs_interpreter = interpreter_guard()
test_file_in_fresh_process = fresh_process_test(__file__)


def _on_device(model):
    return copy.deepcopy(model).to(DEVICE) if DEVICE != "cpu" else model


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the tree-attention kernel's calls (one per attention layer of a verify forward that takes it)."""
    from specdec_kernels import TreeAttentionPlan

    calls, call = [], TreeAttentionPlan.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(TreeAttentionPlan, "__call__", counted)
    return calls


def _decode_both(target, make_drafter, ids, max_new_tokens, kernel_calls: list[int]):
    """Both backends' outputs, and how many kernel calls each made: ``(outs, calls)``."""
    outs, calls = {}, {}
    for backend in ("sdpa", "triton"):
        kernel_calls.clear()
        dec = SpeculativeDecoder(target, make_drafter(), sampling=SamplingParams(), attn_backend=backend)
        outs[backend] = dec.generate(ids.to(DEVICE), max_new_tokens=max_new_tokens, seed=0)
        calls[backend] = len(kernel_calls)
    return outs, calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_triton_backend_matches_sdpa(arch, kernel_calls):
    """Chains of 3 verify through the kernel (every layer of every verify that has drafts: only triton calls it) and
    give sdpa's tokens and acceptance, also after a 100-token prompt's causal prefill."""
    target, draft = _on_device(pair(arch)[0]), _on_device(noisy_copy(arch))
    layers = target.config.num_hidden_layers
    long_prompt = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(3))  # [1, 100]
    for ids in prompts(pair(arch)[2], 2, seed=2) + [long_prompt]:
        outs, calls = _decode_both(target, lambda: DraftModelDrafter(draft, num_speculative_tokens=3), ids, 12,
                                   kernel_calls)
        assert outs["triton"].sequences.tolist() == outs["sdpa"].sequences.tolist()
        assert outs["triton"].stats.accepted_per_step == outs["sdpa"].stats.accepted_per_step
        drafted = sum(1 for n in outs["triton"].stats.proposed_per_step if n)  # one-token verifies take SDPA
        assert drafted and calls == {"sdpa": 0, "triton": layers * drafted}, calls


def test_triton_backend_plain_decoding_and_wide_trees(kernel_calls):
    """One-token forwards and a 70-node dynamic tree (past the kernel's 64) take SDPA and still agree."""
    target, draft = _on_device(pair("llama")[0]), _on_device(noisy_copy("llama"))
    ids = prompts(pair("llama")[2], 1, seed=4)[0]
    for make in (NoDrafter, lambda: DraftModelDrafter(draft, num_speculative_tokens=4, budget=70, top_k_children=8)):
        outs, calls = _decode_both(target, make, ids, 10, kernel_calls)
        assert outs["triton"].sequences.tolist() == outs["sdpa"].sequences.tolist()
        if make is NoDrafter:
            assert calls == {"sdpa": 0, "triton": 0}  # one-token forwards never take the kernel
    assert max(outs["triton"].stats.proposed_per_step) == 70


@pytest.mark.parametrize("shape", ["ar", "chain3", "binary"])
def test_the_fixed_shape_step_verifies_through_the_kernel(shape):
    """``attn_backend=triton`` in the fixed-shape step (captured on a GPU): the verify forward runs the kernel
    on the device-side lengths (``specdec_kernels.rows``), and a batch of ragged rows gets the SDPA step's tokens,
    greedy and sampled (the rejection rule)."""
    from specdec_kernels import rows as kernel_rows

    target, draft = _on_device(pair("llama")[0]), _on_device(noisy_copy("llama"))
    make = {"ar": NoDrafter, "chain3": lambda: DraftModelDrafter(draft, 3),
            "binary": lambda: DraftModelDrafter(draft, tree="binary")}[shape]
    batch = [p.to(DEVICE) for p in prompts(pair("llama")[2], 4, seed=5)]
    assert len({p.shape[1] for p in batch}) > 1  # ragged: every row has its own prefix on the device
    compile = "graph" if DEVICE != "cpu" else "static"
    for sampling, rule in ((SamplingParams(), "greedy"), (SamplingParams(temperature=1.0), "rejection")):
        outs = {}
        for backend in ("sdpa", "triton"):
            kernel_rows._LAUNCHES.clear()
            dec = SpeculativeDecoder(target, make(), rule, sampling, attn_backend=backend, compile=compile)
            outs[backend] = [s.tolist() for s in dec.generate_batch(batch, [10, 7, 12, 9], seed=0).sequences]
            assert bool(kernel_rows._LAUNCHES) == (backend == "triton")  # the kernel ran, and only for triton
        assert outs["triton"] == outs["sdpa"], rule  # sampled too: the draws are keyed, the logits the same
