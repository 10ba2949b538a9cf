"""The layer-skip self-draft: a view on the target's own tensors, its errors and its cost shape."""
from __future__ import annotations

import pytest
import torch

from drafters import LayerSkipDrafter
from drafters.layer_skip import truncated_view
from specdec.errors import ConfigError
from specdec.models import tiny_random_pair


def test_view_shares_every_tensor_and_equals_the_truncated_model():
    target, _, _ = tiny_random_pair("llama", seed=0, layers=3)
    view = truncated_view(target, 2)
    target_ptrs = {p.data_ptr() for p in target.parameters()}
    assert all(p.data_ptr() in target_ptrs for p in view.parameters())  # nothing copied
    assert len(view.model.layers) == view.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 3
    ids = torch.tensor([[3, 7, 11, 5, 2]])
    with torch.no_grad():
        hidden = target(input_ids=ids, output_hidden_states=True).hidden_states[2]  # after 2 layers, [1, T, H]
        expected = target.lm_head(target.model.norm(hidden))  # [1, T, V]
        assert torch.allclose(view(input_ids=ids).logits, expected, atol=1e-5)
    with torch.no_grad():  # a change to the target's weights is seen by the view (shared storage)
        target.model.layers[0].mlp.up_proj.weight.add_(1.0)
        assert torch.equal(view.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)


def test_step_shape_runs_the_view_k_times():
    target, _, _ = tiny_random_pair("qwen2", seed=0)
    shape = LayerSkipDrafter(layers=1, num_speculative_tokens=3).step_shape(target)
    assert (shape.kind, shape.max_nodes, shape.draft_forwards, shape.k) == ("chain", 3, "per_level", 3)
    assert shape.draft_model.config.num_hidden_layers == 1


@pytest.mark.parametrize("arch,layers,message", [("llama", 2, "the target has 2 layers"),
                                                 ("gpt_neox", 1, "model.layers / model.norm / lm_head")])
def test_errors_name_the_problem(arch, layers, message):
    target, _, _ = tiny_random_pair(arch, seed=0)
    with pytest.raises(ConfigError, match=message):
        LayerSkipDrafter(layers=layers, target=target)


def test_no_layer_count_takes_a_fifth_of_the_targets_layers():
    from drafters.layer_skip import default_layers

    assert [default_layers(n) for n in (1, 2, 6, 9, 10, 30, 32)] == [1, 1, 1, 1, 2, 6, 6]
    target, _, _ = tiny_random_pair("llama", seed=0)  # 2 layers: the view runs 1
    assert LayerSkipDrafter(target=target).model.config.num_hidden_layers == 1


def test_bad_layer_count_is_a_config_error():
    with pytest.raises(ConfigError, match="drafter.layers"):
        LayerSkipDrafter(layers=0)


def test_a_hybrids_part_names_its_own_settings():
    """Behind lookup the self-draft is ``drafter.second``: its errors name ``drafter.second.layers`` (the key the
    command line takes), at batch 1 and batched."""
    from drafters import HybridDrafter, NGramDrafter
    from specdec.batch_drafting import keyed_rows
    from specdec.drafting import DraftContext

    target, _, _ = tiny_random_pair("llama", seed=0)  # 2 layers
    fix = "set drafter.second.layers between 1 and 1, e.g. drafter.second.layers=1"
    with pytest.raises(ConfigError, match=r"^drafter\.second\.layers=2: the target has 2 layers.*" + fix):
        HybridDrafter(NGramDrafter(), LayerSkipDrafter(layers=2)).step_shape(target)
    with pytest.raises(ConfigError, match=r"^drafter\.second\.layers=2: .*" + fix):
        HybridDrafter(NGramDrafter(), LayerSkipDrafter(layers=2)).start(DraftContext(target, None, None, 64))
    with pytest.raises(ConfigError, match=r"^drafter\.second\.layers=2: .*" + fix):
        batch = HybridDrafter(NGramDrafter(), LayerSkipDrafter(layers=2)).batched()
        batch.start(DraftContext(target, None, keyed_rows([0, 1], "cpu"), 64))
    assert HybridDrafter(NGramDrafter(), LayerSkipDrafter(layers=1)).step_shape(target).k == 4


def test_a_part_built_from_the_config_names_its_own_settings():
    from omegaconf import OmegaConf

    from experiments.drafter_config import build_drafter
    from experiments.models_from_config import LoadedModels

    cfg = OmegaConf.create({"_target_": "drafters.HybridDrafter", "first": {"_target_": "drafters.NGramDrafter"},
                            "second": {"_target_": "drafters.LayerSkipDrafter", "fast_forward": "maybe"}})
    with pytest.raises(ConfigError, match=r"^drafter\.second\.fast_forward='maybe'"):
        build_drafter(cfg, LoadedModels(target=None, draft=None, tokenizer=None))


def test_only_a_parts_own_keys_are_renamed():
    """A path or a name holding "drafter." is left alone, and so is a key given with the hybrid's place beside it
    (the heads' directory), while the other keys of the same message are renamed."""
    from drafters.head_files import HEADS_OPTION
    from drafters.hybrid import part_errors

    for text, renamed in (
            (f"drafter.version=eagle2 but the head is eagle3: set drafter.version=eagle3 or pass {HEADS_OPTION}",
             (f"drafter.second.version=eagle2 but the head is eagle3: set drafter.second.version=eagle3 or pass "
              f"{HEADS_OPTION}")),
            ("no checkpoint at /ckpts/drafter.pt nor runs/eagle-drafter.v2 (drafters.EagleDrafter, drafter=eagle)",
             None)):
        with pytest.raises(ConfigError) as raised, part_errors("second"):
            raise ConfigError(text)
        assert str(raised.value) == (renamed or text)
