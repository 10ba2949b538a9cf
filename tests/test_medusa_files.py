"""Medusa heads files and configs: heads for another target, a damaged or misplaced heads file, more heads than
trained, missing heads (how to train them), the target fingerprint, and the configs that build the drafter."""
from __future__ import annotations

import pytest
import torch

from drafters import MedusaDrafter
from drafters.medusa_heads import (
    WEIGHTS_FILE,
    MedusaHeads,
    MedusaHeadsError,
    load_heads,
    save_heads,
    target_fingerprint,
)
from specdec import SpeculativeDecoder
from tests.lossless import VOCAB
from tests.test_medusa import compose_decode, compose_train
from tests.tiny_models import pair, peaky_pair


@pytest.fixture()
def saved_heads(tmp_path):
    return save_heads(MedusaHeads.for_target(pair("llama")[0], 3), tmp_path / "heads")


def test_heads_for_another_target_fail(saved_heads):
    other = pair("qwen2")[0]  # same hidden size and vocabulary, other weights
    with pytest.raises(MedusaHeadsError, match="trained for another target.*train_medusa target="):
        SpeculativeDecoder(other, MedusaDrafter(saved_heads)).generate(torch.tensor([[1, 2, 3]]), 4)
    peaky = peaky_pair(VOCAB)[0]  # another hidden size and vocabulary
    with pytest.raises(MedusaHeadsError, match="hidden size 64 and vocabulary 257, the target has 32 and 6"):
        SpeculativeDecoder(peaky, MedusaDrafter(saved_heads, tree="chain4")).generate(torch.tensor([[1, 2, 3]]), 4)


def test_fingerprint_tolerates_a_dtype_round_trip_only():
    from drafters.medusa_heads import same_target

    target = pair("llama")[0]
    fp = target_fingerprint(target)
    half = target_fingerprint(_copy(target).to(torch.bfloat16))
    assert fp["sha256"] != half["sha256"] and same_target(fp, half)
    assert not same_target(fp, target_fingerprint(pair("qwen2")[0]))


def test_fingerprint_tells_apart_a_target_retrained_in_one_layer_only():
    """The sampled values miss most tensors (the first, middle and last, and the LM head): the norms of all of them
    catch a checkpoint that differs in one MLP, whose sha256 is the same."""
    from drafters.medusa_heads import same_target

    target = pair("llama")[0]
    other = _copy(target)
    with torch.no_grad():
        weight = other.model.layers[0].mlp.down_proj.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * weight.std())
    fp, changed = target_fingerprint(target), target_fingerprint(other)
    assert fp["sha256"] == changed["sha256"] and not same_target(fp, changed)
    legacy = {k: v for k, v in fp.items() if k != "norms"}  # heads saved before norms: compared as before
    assert same_target(legacy, changed) and same_target(legacy, fp)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_heads_file_with_a_missing_tensor_fails(saved_heads):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved_heads / WEIGHTS_FILE))
    del tensors["heads.2.lm_head.weight"]
    save_file(tensors, str(saved_heads / WEIGHTS_FILE))
    with pytest.raises(MedusaHeadsError, match="lacks tensor 'heads.2.lm_head.weight'.*retrain"):
        MedusaDrafter(saved_heads)
    assert load_heads(saved_heads, num_heads=2).num_heads == 2  # the first two heads are intact


def test_a_heads_file_instead_of_its_directory_names_the_directory(saved_heads):
    with pytest.raises(MedusaHeadsError, match=f"is a file: point drafter.heads .*'{saved_heads}'"):
        MedusaDrafter(saved_heads / WEIGHTS_FILE)


def test_more_heads_than_trained_fail(saved_heads, tmp_path):
    with pytest.raises(MedusaHeadsError, match="num_heads=5 but the heads .* were trained with 3.*num_heads<=3"):
        MedusaDrafter(saved_heads, num_heads=5)
    micro = save_heads(MedusaHeads.for_target(pair("llama")[0], 3), tmp_path / "micro", {"zoo_size": "micro"})
    with pytest.raises(MedusaHeadsError, match="train_medusa num_heads=5 zoo_size=micro`"):  # it suggested the default
        MedusaDrafter(micro, num_heads=5)


def test_missing_heads_say_how_to_train_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    drafter = MedusaDrafter()  # the default location: built lazily, so configs compose without heads
    with pytest.raises(MedusaHeadsError, match="no Medusa heads at .*zoo-default.*python -m experiments.train_medusa"):
        _ = drafter.max_nodes
    with pytest.raises(MedusaHeadsError, match=r"other/medusa/zoo-micro.*`python -m experiments.train_medusa "
                                               r"zoo_size=micro cache_dir=.*other` \(a few minutes at most on a CPU\)"):
        _ = MedusaDrafter(zoo_size="micro", cache_dir=tmp_path / "other").max_nodes
    unfinished = tmp_path / "unfinished"  # a training cut before its heads were written
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(MedusaHeadsError, match="medusa_config.json is missing; a checkpoint.pt is there: the training "
                                               "writing them has not finished"):
        _ = MedusaDrafter(unfinished).max_nodes


def test_configs_compose_and_build(saved_heads):
    from experiments import decode
    from experiments.models_from_config import load_models

    cfg = compose_decode("model=tiny_random", "drafter=medusa", f"drafter.heads={saved_heads}", "tree=binary")
    drafter = decode.build_drafter(cfg.drafter, load_models(cfg.model), cfg.get("tree"))
    assert isinstance(drafter, MedusaDrafter) and drafter.max_nodes == 14  # binary pruned to the 3 heads
    cfg = compose_decode("experiment=medusa")
    assert cfg.model.source == "zoo" and cfg.drafter.zoo_size == "default" and cfg.drafter.heads is None
    assert compose_decode("model=zoo_micro", "drafter=medusa").drafter.zoo_size == "micro"
    moved = compose_decode("model=zoo_micro", "model.cache_dir=/x", "drafter=hybrid_medusa")  # the pair's cache
    assert moved.drafter.second.cache_dir == "/x" and compose_decode("drafter=eagle").drafter.cache_dir is None
    train_cfg = compose_train()
    assert train_cfg.zoo_size == "default" and train_cfg.loss in ("soft", "hard")
