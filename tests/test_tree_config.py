"""Trees from the Hydra config: a preset, a hybrid's second part, a budget, bad input (one ConfigError each)."""
from __future__ import annotations

from pathlib import Path

import pytest

from drafters import NGramDrafter
from specdec.errors import ConfigError
from specdec.tree import compile_tree, load_preset
from tests.test_tree_drafting import PRESETS
from tests.tiny_models import pair

# --------------------------------------------------------------------------- config


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    import experiments.schema  # noqa: F401  (registers base_config)

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _models():
    from experiments.models_from_config import LoadedModels

    target, draft, tok = pair("llama")
    return LoadedModels(target=target, draft=draft, tokenizer=tok)


@pytest.mark.parametrize("preset", PRESETS)
def test_tree_config_reaches_the_drafter(preset):
    from experiments.drafter_config import build_drafter

    cfg = _compose(f"tree={preset}", "drafter.tree_sampling=without_replacement")
    drafter = build_drafter(cfg.drafter, _models(), cfg.tree)
    assert drafter.mode == "static" and drafter.tree_sampling == "without_replacement"
    assert [list(p) for p in drafter.compiled.paths] == [list(p) for p in compile_tree(load_preset(preset)).paths]


def test_tree_config_reaches_a_hybrids_second_part(tmp_path):
    """``drafter=hybrid tree=<preset>``: the lookup takes no tree, so the preset is the second part's (an EAGLE head
    drafting it behind prompt lookup); the hybrid's config is left as it was."""
    from experiments.drafter_config import build_drafter

    cfg = _compose("drafter=hybrid", "tree=chain4_alts", f"drafter.second.heads={tmp_path / 'absent'}")
    drafter = build_drafter(cfg.drafter, _models(), cfg.tree)
    assert drafter.second.mode == "static" and drafter.first.k == 8 and drafter.max_nodes == 8
    assert [list(p) for p in drafter.second.compiled.paths] == [list(p) for p in load_preset("chain4_alts")]
    assert "tree" not in cfg.drafter.second


def test_tree_config_default_none_and_budget():
    from experiments.drafter_config import build_drafter

    for cfg in (_compose(), _compose("tree=none")):
        assert build_drafter(cfg.drafter, _models(), cfg.get("tree")).mode == "chain"
    cfg = _compose("drafter.budget=16", "drafter.num_speculative_tokens=6")
    drafter = build_drafter(cfg.drafter, _models(), cfg.get("tree"))
    assert drafter.mode == "dynamic" and drafter.max_nodes == 16 and drafter.k == 6


@pytest.mark.parametrize("overrides, message", [
    (("tree=binary", "tree.paths=[[0],[0,1],[2,0]]"), r"add the path \[2\]"),
    (("tree=binary", "drafter.tree_sampling=sampled"), "tree_sampling='sampled' is unknown"),
    (("drafter.budget=0",), "budget=0"),
    (("tree=binary", "drafter=ngram"), "takes no tree"),
])
def test_tree_config_bad_input(overrides, message):
    from experiments.drafter_config import build_drafter

    cfg = _compose(*overrides)
    with pytest.raises(ConfigError, match=message):
        build_drafter(cfg.drafter, _models(), cfg.tree)


def test_ngram_still_builds_without_tree():
    from experiments.drafter_config import build_drafter

    cfg = _compose("drafter=ngram")
    assert isinstance(build_drafter(cfg.drafter, _models(), cfg.get("tree")), NGramDrafter)


def test_a_chain_length_beside_a_tree_preset_is_refused_in_a_run_and_warned_in_a_sweep(monkeypatch, capsys):
    """It was ignored silently (a sweep over it gave identical runs labelled with different k); a grid over trees and
    k holds such jobs, so a sweep's job warns and decodes the tree."""
    from experiments import drafter_config

    given = ["tree=binary", "drafter.second.num_speculative_tokens=2"]
    monkeypatch.setattr(drafter_config, "task_overrides", lambda: given)
    drafter_config._check_no_chain_length("drafter", "tree=binary", 3)  # another part's k: not this drafter's
    with pytest.raises(ConfigError, match=r"drafter.second.num_speculative_tokens=2 has no effect with tree=binary: "
                                          r"the tree's paths shape the draft \(3 deep\); drop it"):
        drafter_config._check_no_chain_length("drafter.second", "tree=binary", 3)
    monkeypatch.setattr(drafter_config, "in_multirun", lambda: True)
    drafter_config._check_no_chain_length("drafter.second", "tree=binary", 3)
    assert capsys.readouterr().err.startswith("warning: drafter.second.num_speculative_tokens=2 has no effect")
