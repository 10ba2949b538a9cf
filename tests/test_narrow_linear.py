"""Narrow linears (verifier.narrow_linear): nn.Linear's products by another layout, decoding unchanged."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drafters import DraftModelDrafter, NGramDrafter
from specdec import SamplingParams, SpeculativeDecoder
from specdec.errors import ConfigError
from tests.tiny_models import noisy_copy, pair, prompts
from verifier import narrow_linear
from verifier.narrow_linear import (
    MAX_ROWS,
    PACKED_MAX_ROWS,
    NarrowLinear,
    apply_narrow_linears,
    best_product,
    narrow_product,
    narrow_wanted,
    packed_available,
    use_narrow_linears,
)

needs_packing = pytest.mark.skipif(not packed_available(), reason="this torch build / CPU cannot pack for oneDNN")
PRODUCT_PARAMS = [pytest.param("packed", marks=needs_packing), "transposed"]


def _narrowed(model, product=None):
    model = copy.deepcopy(model)  # the cached tiny models stay plain for the other tests in this process
    use_narrow_linears(model, product=product)
    return model


@pytest.mark.parametrize("product", PRODUCT_PARAMS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 3), (1, 17), (1, MAX_ROWS), (1, MAX_ROWS + 1), (3, 40),
                                   (1, PACKED_MAX_ROWS + 1)])
@torch.no_grad()  # with gradients every call takes F.linear: the products would compare F.linear with itself
def test_same_products_as_linear(shape, bias, product):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    narrow = _narrowed(plain, product)
    x = torch.randn(*shape, 24)  # [B, T, in]
    want, got = F.linear(x, plain.weight, plain.bias), narrow(x)
    assert got.shape == want.shape == (*shape, 40)
    rows = shape[0] * shape[1]
    assert narrow.max_rows == (PACKED_MAX_ROWS if product == "packed" else MAX_ROWS)
    if rows == 1 or rows > narrow.max_rows:  # the plain path itself: bit for bit
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
    assert use_narrow_linears(model, max_rows=4, product="transposed") == 2 and model[0].max_rows == 4  # idempotent; the limit updates
    x = torch.randn(5, 4)  # 5 rows > max_rows 4: the plain path
    assert torch.equal(model[0](x), F.linear(x, model[0].weight, model[0].bias))


@needs_packing
def test_packed_weights_survive_copies_follow_weight_changes_and_leave_gradients_to_linear():
    torch.manual_seed(0)
    narrow = _narrowed(nn.Linear(24, 40), "packed")
    x = torch.randn(narrow_linear.PACKED_FROM_ROWS, 24)  # [rows, in]: the fewest rows that take the packed weights
    assert narrow_linear._PACKED.get(narrow) is None
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), F.linear(x, narrow.weight, narrow.bias), rtol=1e-5, atol=1e-5)
        assert narrow_linear._PACKED.get(narrow) is not None
        copied = copy.deepcopy(narrow)  # the packed copy is not in the module: deepcopy works, the copy packs its own
        narrow.weight.mul_(2)  # changed in place: packed again at the next call
        torch.testing.assert_close(narrow(x), F.linear(x, narrow.weight, narrow.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copied(x), F.linear(x, copied.weight, copied.bias), rtol=1e-5, atol=1e-5)
        strided = torch.randn(24, 7).t()  # [rows, in], not contiguous
        torch.testing.assert_close(narrow(strided), F.linear(strided, narrow.weight, narrow.bias), rtol=1e-5, atol=1e-5)
    if not packed_available(torch.bfloat16):  # cast after the switch to a dtype oneDNN cannot pack: transposed
        half = copy.deepcopy(narrow).to(torch.bfloat16)
        with torch.no_grad():
            got = half(x.to(torch.bfloat16))
        torch.testing.assert_close(got, F.linear(x.to(torch.bfloat16), half.weight, half.bias), rtol=2e-2, atol=2e-2)
    narrow(x).sum().backward()  # gradients wanted: the plain path, which has them
    assert narrow.weight.grad is not None and narrow.weight.grad.shape == (40, 24)
    assert list(narrow.state_dict()) == ["weight", "bias"]


def _timed(monkeypatch, seconds: dict[str, float]) -> list:
    """``auto``'s timings replaced by ``seconds`` per product (a fresh choice); returns the timed calls."""
    calls = []

    def timed(shapes, products):
        calls.extend(shapes)
        return {product: seconds[product] for product in products}

    monkeypatch.setattr(narrow_linear, "_product_seconds", timed)
    monkeypatch.setattr(narrow_linear, "_fastest", functools.cache(narrow_linear._fastest.__wrapped__))  # undone after
    return calls


def test_auto_takes_a_product_only_where_it_beats_plain_linears(monkeypatch):
    """``auto`` times F.linear and the products on the model's largest and commonest matrix shapes, once, and takes
    the fastest product only if it is under the auto margin (specdec.timing.MARGIN) of F.linear's time (a CPU without MKL's slow multi-row path
    keeps plain linears)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 64))  # commonest (16, 8), largest (64, 16)
    calls = _timed(monkeypatch, {"plain": 1.0, "transposed": 0.6, "packed": 0.5})
    assert narrow_product("auto", model) == ("packed" if packed_available() else "transposed")
    assert sorted(set(calls)) == [(16, 8), (64, 16)]
    assert narrow_product("auto", model) and len(calls) == 2  # timed once: cached
    _timed(monkeypatch, {"plain": 1.0, "transposed": 0.9, "packed": 0.9})  # faster, but not by the margin
    assert narrow_product("auto", model) is None and apply_narrow_linears(model, "auto") == 0
    assert narrow_product("on", model) == best_product(model)  # on: a product whatever the timings


def test_auto_means_float32_on_the_cpu_and_bad_modes_name_the_key(monkeypatch):
    model = nn.Linear(4, 4)
    _timed(monkeypatch, {"plain": 1.0, "transposed": 0.5, "packed": 0.4})
    assert narrow_wanted("auto", model) and narrow_wanted(True, model) and narrow_wanted("on", model)
    assert narrow_product("auto", model) == narrow_product("on", model) == best_product(model)
    assert best_product(model) == ("packed" if packed_available() else "transposed")
    assert narrow_product("transposed", model) == "transposed"
    assert not narrow_wanted("off", model) and not narrow_wanted(False, model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert not narrow_wanted("auto", half) and narrow_wanted("on", half)
    assert apply_narrow_linears(None, "on") == 0
    with pytest.raises(ConfigError, match=r"model.narrow_linears='fast': choose auto, on, off, packed, transposed"):
        narrow_wanted("fast", model)
    monkeypatch.setattr(narrow_linear, "packed_available", lambda dtype=torch.float32: False)
    assert narrow_product("on", model) == "transposed"  # oneDNN cannot pack: the MKL layout instead
    with pytest.raises(ConfigError, match=r"model.narrow_linears=packed: oneDNN cannot pack .* use model.narrow_linears="
                                          r"transposed"):
        narrow_product("packed", model)


def _reference(target, ids, max_new, eos):
    target.generation_config.eos_token_id = eos
    return target.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=eos)


@pytest.mark.parametrize("product", PRODUCT_PARAMS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decoding_with_narrow_linears_equals_plain_generate(arch, product, monkeypatch):
    """Chains, trees and n-gram drafts verified through narrow linears emit plain ``generate``'s tokens, and
    the narrow path really runs (multi-row verifies)."""
    plain, _, tok = pair(arch)
    target, draft = _narrowed(plain, product), _narrowed(noisy_copy(arch), product)
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
    if product == "packed":  # oneDNN's packed weights ran too
        assert any(narrow_linear.PACKED_FROM_ROWS <= w <= MAX_ROWS for w in widths)


def test_model_config_switches_the_pair_unless_off(monkeypatch):
    from experiments.models_from_config import load_models

    _timed(monkeypatch, {"plain": 1.0, "transposed": 0.5, "packed": 0.4})  # a CPU where F.linear is slow
    loaded = load_models({"source": "tiny_random", "arch": "llama"})
    assert loaded.info["narrow_linears"] == best_product(loaded.target)
    assert {m.product for m in loaded.target.modules() if isinstance(m, NarrowLinear)} == {best_product(loaded.target)}
    assert isinstance(loaded.target.lm_head, NarrowLinear) and isinstance(loaded.draft.lm_head, NarrowLinear)
    off = load_models({"source": "tiny_random", "arch": "llama", "narrow_linears": "off"})
    assert off.info["narrow_linears"] == "off" and type(off.target.lm_head) is nn.Linear
    _timed(monkeypatch, {"plain": 1.0, "transposed": 2.0, "packed": 2.0})  # one where it is the fastest
    plain = load_models({"source": "tiny_random", "arch": "llama"})
    assert plain.info["narrow_linears"] == "off" and type(plain.target.lm_head) is nn.Linear
    with pytest.raises(ConfigError, match="model.narrow_linears='maybe'"):
        load_models({"source": "hf", "target": "/nonexistent/not-loaded", "narrow_linears": "maybe"})


def test_verify_curve_times_plain_and_other_product_copies_beside_a_narrow_target():
    from experiments.bench import verify_curve

    target = _narrowed(pair("llama")[0], "transposed")
    curves, table = verify_curve(target, context=4, widths=(1, 3), backends=["sdpa"], reps=1)
    other = {"sdpa, packed linears"} if packed_available() else set()  # the other product, where it runs
    assert set(curves) == {"sdpa", "sdpa, plain linears"} | other and all(c[3] > 0 for c in curves.values())
    assert "| sdpa, plain linears T(w)/T(1) |" in table
    assert isinstance(target.lm_head, NarrowLinear) and target.lm_head.product == "transposed"  # copies changed, not it
    assert set(verify_curve(pair("llama")[0], 4, (1, 2), ["sdpa"], 1)[0]) == {"sdpa"}  # a plain target: one curve


def test_cached_cost_curves_tell_narrow_from_plain_linears():
    """A cost curve measured with plain linears is not reused for the same model with narrow ones."""
    from experiments.cost_measure import fingerprint

    plain = pair("llama")[0]
    narrow = _narrowed(plain, "transposed")
    assert "linears" not in fingerprint(plain, 8, (1, 2), "sdpa", 3)  # plain models keep their cached curves
    assert fingerprint(narrow, 8, (1, 2), "sdpa", 3) == {**fingerprint(plain, 8, (1, 2), "sdpa", 3), "linears": "narrow"}
    packed = _narrowed(plain, "packed")
    assert fingerprint(packed, 8, (1, 2), "sdpa", 3) == {**fingerprint(plain, 8, (1, 2), "sdpa", 3),
                                                         "linears": "narrow-packed"}
