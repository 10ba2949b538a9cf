"""Narrow linears (verifier.narrow_linear): nn.Linear's products by another layout, decoding unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drafters import DraftModelDrafter, NGramDrafter
from specdec import SamplingParams, SpeculativeDecoder
from specdec.errors import ConfigError
from tests.tiny_models import noisy_copy, pair, prompts
from verifier.narrow_linear import (
    MAX_ROWS,
    NarrowLinear,
    apply_narrow_linears,
    narrow_wanted,
    use_narrow_linears,
)


def _narrowed(model):
    model = copy.deepcopy(model)  # the cached tiny models stay plain for the other tests in this process
    use_narrow_linears(model)
    return model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 3), (1, 17), (1, MAX_ROWS), (1, MAX_ROWS + 1), (3, 40)])
def test_same_products_as_linear(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    narrow = copy.deepcopy(plain)
    use_narrow_linears(narrow)
    x = torch.randn(*shape, 24)  # [B, T, in]
    want, got = F.linear(x, plain.weight, plain.bias), narrow(x)
    assert got.shape == want.shape == (*shape, 40)
    rows = shape[0] * shape[1]
    if rows == 1 or rows > MAX_ROWS:  # the plain path itself: bit for bit
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_plain_linears_switch_and_state_dicts_are_unchanged():
    class Adapter(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Adapter(8, 8), nn.Linear(8, 2))
    keys = list(model.state_dict())
    assert use_narrow_linears(model) == 2
    assert [type(m) for m in model] == [NarrowLinear, nn.ReLU, Adapter, NarrowLinear]
    assert list(model.state_dict()) == keys
    assert use_narrow_linears(model, max_rows=4) == 2 and model[0].max_rows == 4  # idempotent; the limit updates
    x = torch.randn(5, 4)  # 5 rows > max_rows 4: the plain path
    assert torch.equal(model[0](x), F.linear(x, model[0].weight, model[0].bias))


def test_auto_means_float32_on_the_cpu_and_bad_modes_name_the_key():
    model = nn.Linear(4, 4)
    assert narrow_wanted("auto", model) and narrow_wanted(True, model) and narrow_wanted("on", model)
    assert not narrow_wanted("off", model) and not narrow_wanted(False, model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert not narrow_wanted("auto", half) and narrow_wanted("on", half)
    assert apply_narrow_linears(None, "on") == 0
    with pytest.raises(ConfigError, match=r"model.narrow_linears='fast': choose auto, on or off"):
        narrow_wanted("fast", model)


def _reference(target, ids, max_new, eos):
    target.generation_config.eos_token_id = eos
    return target.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=eos)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decoding_with_narrow_linears_equals_plain_generate(arch, monkeypatch):
    """Chains, trees and n-gram drafts verified through narrow linears emit plain ``generate``'s tokens, and
    the narrow path really runs (multi-row verifies)."""
    plain, _, tok = pair(arch)
    target, draft = _narrowed(plain), _narrowed(noisy_copy(arch))
    widths = []
    forward = NarrowLinear.forward

    def counting(self, x):
        widths.append(x.numel() // x.shape[-1])
        return forward(self, x)

    monkeypatch.setattr(NarrowLinear, "forward", counting)
    eos = len(tok) - 1
    drafters = [DraftModelDrafter(draft, num_speculative_tokens=4),
                DraftModelDrafter(draft, tree=[[0], [1], [0, 0], [1, 0], [0, 0, 0]]),
                NGramDrafter(num_speculative_tokens=6, max_ngram=3, min_ngram=1)]
    for ids in prompts(tok, 6, seed=5):
        ref = _reference(plain, ids, 24, eos)
        for drafter in drafters:
            dec = SpeculativeDecoder(target=target, drafter=drafter, sampling=SamplingParams(temperature=0.0))
            assert dec.generate(ids, max_new_tokens=24, seed=0).sequences.tolist() == ref.tolist(), drafter.name
    assert any(1 < w <= MAX_ROWS for w in widths)


def test_model_config_switches_the_pair_unless_off():
    from experiments.models_from_config import load_models

    loaded = load_models({"source": "tiny_random", "arch": "llama"})
    assert loaded.info["narrow_linears"] == "on"
    assert isinstance(loaded.target.lm_head, NarrowLinear) and isinstance(loaded.draft.lm_head, NarrowLinear)
    off = load_models({"source": "tiny_random", "arch": "llama", "narrow_linears": "off"})
    assert off.info["narrow_linears"] == "off" and type(off.target.lm_head) is nn.Linear
    with pytest.raises(ConfigError, match="model.narrow_linears='maybe'"):
        load_models({"source": "hf", "target": "/nonexistent/not-loaded", "narrow_linears": "maybe"})


def test_verify_curve_times_a_plain_copy_beside_a_narrow_target():
    from experiments.bench import verify_curve

    target = _narrowed(pair("llama")[0])
    curves, table = verify_curve(target, context=4, widths=(1, 3), backends=["sdpa"], reps=1)
    assert set(curves) == {"sdpa", "sdpa, plain linears"} and all(c[3] > 0 for c in curves.values())
    assert "| sdpa, plain linears T(w)/T(1) |" in table
    assert isinstance(target.lm_head, NarrowLinear)  # the copy went back to plain linears, not the target
    assert set(verify_curve(pair("llama")[0], 4, (1, 2), ["sdpa"], 1)[0]) == {"sdpa"}  # a plain target: one curve


def test_cached_cost_curves_tell_narrow_from_plain_linears():
    """A cost curve measured with plain linears is not reused for the same model with narrow ones."""
    from experiments.cost_measure import fingerprint

    plain = pair("llama")[0]
    narrow = _narrowed(plain)
    assert "linears" not in fingerprint(plain, 8, (1, 2), "sdpa", 3)  # plain models keep their cached curves
    assert fingerprint(narrow, 8, (1, 2), "sdpa", 3) == {**fingerprint(plain, 8, (1, 2), "sdpa", 3), "linears": "narrow"}
