"""Fused projections (``verifier.fused_projections``): q/k/v and gate/up as one product each.

Greedy decoding of a fused target equals ``generate(do_sample=False)`` of the unfused one (llama and qwen2,
whose q/k/v carry biases), eagerly, through the fixed-shape step and compiled by inductor; the parameters
are the same numbers; a layer that calls its linears in another order fails with one clear error; a model
with nothing to fuse is refused by ``fused_copy``.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from drafters import DraftModelDrafter, NoDrafter
from specdec import SpeculativeDecoder
from specdec.errors import ConfigError
from tests.tiny_models import noisy_copy, pair, prompts
from verifier.fused_projections import FusedPart, fuse_projections, fused_copy, has_fused_projections


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_fused_target_decodes_the_unfused_tokens(arch):
    target = pair(arch)[0]
    fused = fused_copy(target)
    layers = target.config.num_hidden_layers
    assert has_fused_projections(fused) and not has_fused_projections(target)
    assert sum(isinstance(m, FusedPart) and m.first for m in fused.modules()) == 2 * layers  # qkv and gate/up
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in target.parameters())
    assert fuse_projections(fused) == 0  # already fused: nothing more
    for ids in prompts(pair(arch)[2], 2, seed=1):
        ref = target.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
        for compile in ("none", "static"):
            out = SpeculativeDecoder(fused, DraftModelDrafter(noisy_copy(arch), 3), compile=compile).generate(
                ids, max_new_tokens=12)
            assert out.sequences.tolist() == ref.tolist(), compile


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_a_fused_target_compiles_to_fewer_products_and_the_same_tokens():
    """Compiled by inductor (on the CPU), the fused step runs one product for q/k/v and one for gate/up."""
    from torch._inductor.utils import run_and_get_code

    target = pair("llama")[0]
    fused = fused_copy(target)
    ids = prompts(pair("llama")[2], 1, seed=3)[0]
    ref = target.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)
    decoder = SpeculativeDecoder(fused, NoDrafter(), compile="inductor")
    out, codes = run_and_get_code(lambda: decoder.generate(ids, max_new_tokens=6))
    assert out.sequences.tolist() == ref.tolist()
    layers = target.config.num_hidden_layers
    step = max(codes, key=len)  # the compiled step (prefill runs eagerly)
    assert step.count("extern_kernels.mm(") + step.count("extern_kernels.addmm(") == 4 * layers + 1  # + LM head


def test_linears_called_out_of_order_fail_with_one_clear_error():
    fused = fused_copy(pair("llama")[0])
    attn = fused.model.layers[0].self_attn
    x = torch.randn(1, 3, attn.q_proj.weight.shape[1])
    attn.q_proj(x)
    with pytest.raises(RuntimeError, match="another order"):
        attn.k_proj(x.clone())
    attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert attn.q_proj.group.x is None and attn.q_proj.group.out is None  # the last part let the activations go


def test_a_model_without_such_layers_is_refused():
    with pytest.raises(ConfigError, match="no layers with q/k/v or gate/up"):
        fused_copy(nn.Sequential(nn.Linear(4, 4)))


def test_the_model_config_fuses_on_request():
    """``model.fuse_projections=true`` fuses the loaded target and draft; a wrong value is one ConfigError."""
    from experiments.models_from_config import load_models

    loaded = load_models({"source": "tiny_random", "fuse_projections": True})
    assert has_fused_projections(loaded.target) and has_fused_projections(loaded.draft)
    assert loaded.info["fuse_projections"] is True
    assert not has_fused_projections(load_models({"source": "tiny_random"}).target)
    with pytest.raises(ConfigError, match="model.fuse_projections='yes': use true or false"):
        load_models({"source": "tiny_random", "fuse_projections": "yes"})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_fused_draft_runs_the_lean_forward_on_its_own_fused_weights(arch):
    """The draft's lean forward (``drafters.fast_decoder``) concatenates q/k/v and gate/up itself; a fused draft
    hands it the fused weights instead (the same layout), and drafting proposes what the unfused draft does."""
    from drafters.fast_decoder import fast_decoder

    target, draft = pair(arch)[0], noisy_copy(arch)
    fused = fused_copy(draft)
    plain_w, fused_w = fast_decoder(draft).layers[0].weights(), fast_decoder(fused).layers[0].weights()
    assert fused_w[0] is fused.model.layers[0].self_attn.q_proj.weight  # no second copy
    for a, b in zip(plain_w, fused_w):
        assert (a is None and b is None) or torch.equal(a, b)
    for ids in prompts(pair(arch)[2], 2, seed=2):
        outs = [SpeculativeDecoder(target, DraftModelDrafter(d, 3)).generate(ids, max_new_tokens=12) for d in (draft, fused)]
        assert outs[0].sequences.tolist() == outs[1].sequences.tolist()
        assert outs[0].stats.accepted_per_step == outs[1].stats.accepted_per_step


def test_a_group_with_a_missing_bias_fuses_it_as_zeros():
    """q and v with biases, k without: the fused product keeps q's and v's biases (k's part adds zeros)."""
    torch.manual_seed(0)
    layer = nn.Module()
    layer.self_attn = nn.Module()
    linears = nn.Linear(6, 4), nn.Linear(6, 2, bias=False), nn.Linear(6, 2)
    for name, linear in zip(("q_proj", "k_proj", "v_proj"), linears):
        setattr(layer.self_attn, name, linear)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = [linear(x) for linear in linears]
        assert fuse_projections(layer) == 1
        got = [getattr(layer.self_attn, name)(x) for name in ("q_proj", "k_proj", "v_proj")]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
