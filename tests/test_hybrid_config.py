"""A hybrid's parts chosen on the command line: ``drafter@drafter.second=<drafter config>`` (and ``first``),
alone and in a sweep, with the sweep's report naming each job by the chosen part."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from drafters import DraftModelDrafter, EagleDrafter, HybridDrafter, MedusaDrafter, NGramDrafter
from experiments import report
from experiments.instantiate import check_arguments
from specdec.errors import ConfigError
from tests.test_sweeps import compose_cfg, hydra_main, prompts_file, tiny_args  # noqa: F401  (a fixture)

SECOND = "drafter@drafter.second"


def test_eagle3_is_eagle_with_its_version():
    eagle, eagle3 = compose_cfg("drafter=eagle").drafter, compose_cfg("drafter=eagle3").drafter
    assert eagle3.version == "eagle3" and eagle.version is None
    assert {k: v for k, v in eagle3.items() if k != "version"} == {k: v for k, v in eagle.items() if k != "version"}


@pytest.mark.parametrize(("preset", "second"), [("hybrid", EagleDrafter), ("hybrid_draft", DraftModelDrafter),
                                                ("hybrid_medusa", MedusaDrafter)])
def test_each_preset_keeps_its_second_part(preset, second):
    cfg = compose_cfg(f"drafter={preset}")
    assert cfg.drafter.first._target_ == "drafters.NGramDrafter" and cfg.drafter.first.num_speculative_tokens >= 8
    assert cfg.drafter.second._target_ == f"drafters.{second.__name__}"
    if preset == "hybrid":
        assert cfg.drafter.second.version == "eagle3"
    check_arguments(cfg.drafter, "drafter")


def test_the_second_part_is_any_drafter_config():
    from experiments.drafter_config import build_drafter
    from experiments.models_from_config import load_models

    cfg = compose_cfg("model=tiny_random", "drafter=hybrid", f"{SECOND}=draft_model",
                      "drafter.second.num_speculative_tokens=6")
    assert "version" not in cfg.drafter.second  # the EAGLE default's settings do not follow another part
    models = load_models(cfg.model)
    drafter = build_drafter(cfg.drafter, models)
    assert isinstance(drafter, HybridDrafter) and isinstance(drafter.first, NGramDrafter)
    assert isinstance(drafter.second, DraftModelDrafter) and drafter.second.model is models.draft
    assert drafter.second.k == 6
    medusa = compose_cfg("drafter=hybrid", f"{SECOND}=medusa", "drafter.second.tree_nodes=8").drafter.second
    assert medusa._target_ == "drafters.MedusaDrafter" and medusa.tree_nodes == 8
    first = compose_cfg("drafter=hybrid", "drafter@drafter.first=ngram", "drafter.first.max_ngram=4").drafter.first
    assert first._target_ == "drafters.NGramDrafter" and first.max_ngram == 4


def test_a_presets_part_setting_another_part_does_not_take_is_named():
    cfg = compose_cfg("drafter=hybrid_medusa", f"{SECOND}=eagle")
    with pytest.raises(ConfigError, match=r"drafter.second.tree_nodes: drafters.EagleDrafter takes no argument"):
        check_arguments(cfg.drafter, "drafter")


def test_a_sweep_over_the_second_part(prompts_file, tmp_path, monkeypatch):  # noqa: F811
    """``-m drafter=hybrid 'drafter@drafter.second=draft_model,ngram'``: one run each, both equal to the baseline,
    the report's column named by the override."""
    sweep_dir = tmp_path / "sweep"
    hydra_main(monkeypatch, "sweep=custom", *tiny_args(prompts_file, num_prompts=2), "costs=false", "drafter=hybrid",
               f"{SECOND}=draft_model,ngram", "drafter.first.min_ngram=1", f"hydra.sweep.dir={sweep_dir}")
    summaries = {path.parent.name: json.loads(path.read_text()) for path in sweep_dir.glob("*/summary.json")}
    assert len(summaries) == 2 and all(s["metrics"]["matches_baseline"] is True for s in summaries.values())
    seconds = {OmegaConf.load(sweep_dir / name / ".hydra" / "config.yaml").drafter.second._target_ for name in summaries}
    assert seconds == {"drafters.DraftModelDrafter", "drafters.NGramDrafter"}
    rows = report.report(sweep_dir)["rows"]
    assert sorted(row[SECOND] for row in rows) == ["draft_model", "ngram"]


class PluginHybrid:
    """A hybrid from outside this package: its parts reach it as the config gives them."""

    def __init__(self, first=None, second=None):
        self.first, self.second = first, second


class PluginGrower:
    def __init__(self, tree=None):
        self.tree = tree


def test_a_plugin_hybrids_second_part_gets_the_tree():
    from experiments.drafter_config import build_drafter

    here = f"{__name__}"
    cfg = OmegaConf.create({"drafter": {"_target_": f"{here}.PluginHybrid", "first": {"_target_": f"{here}.PluginGrower"},
                                        "second": {"_target_": f"{here}.PluginGrower"}},
                            "tree": {"paths": [[0], [1], [0, 0]]}})
    drafter = build_drafter(cfg.drafter, None, cfg.tree)
    assert isinstance(drafter, PluginHybrid) and drafter.second.tree == [[0], [1], [0, 0]]
    assert "tree" not in cfg.drafter.second  # the caller's config is left as it was


class MyHybrid(HybridDrafter):
    """A researcher's own hybrid (a subclass in their package): its parts are built as this package's hybrid's."""


def test_a_subclassed_hybrids_parts_get_what_each_needs():
    """A subclass of HybridDrafter from outside the package with ``drafter@drafter.second=draft_model``: its second
    part gets the run's draft model, as ``drafter=hybrid``'s does (Hydra alone would build it without one)."""
    from experiments.drafter_config import build_drafter
    from experiments.models_from_config import load_models

    cfg = compose_cfg("model=tiny_random", "drafter=hybrid", f"{SECOND}=draft_model")
    cfg.drafter._target_ = f"{__name__}.MyHybrid"
    models = load_models(cfg.model)
    drafter = build_drafter(cfg.drafter, models)
    assert isinstance(drafter, MyHybrid) and drafter.second.model is models.draft
