"""Edges of the config and command-line layers that no other test pinned (mutation pass 9; the results and
logging layers' are in ``test_mutation9_results.py``).

Instantiation and +key checks, argparse types at their bounds, the one-line error contract of sweeps, drafter and
model config checks. Fakes stand in for Hydra's app and the models: every test takes well under a second.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from experiments import cli, cli_args
from experiments.drafter_config import build_drafter, check_before_loading
from experiments.instantiate import accepts_argument, check_arguments, instantiate, target_of
from experiments.models_from_config import LoadedModels, _load, drafter_paths, target_device
from experiments.overrides import check_added_keys
from specdec.errors import ConfigError, SpecDecError

HERE = __name__


class KeywordOnly:
    def __init__(self, *, size: int = 1):
        self.size = size


class TakesAnything:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Refuses:
    def __init__(self, size: int = 1):
        raise SpecDecError(f"size={size} is not a size this class takes")


def cfg_of(**node):
    return OmegaConf.create(node)


def test_target_of_restores_hydras_logger_and_suggests_public_names_only():
    """hydra.utils logs again after a failed import; a typo is never matched to a private helper."""
    log = logging.getLogger("hydra.utils")
    with pytest.raises(ConfigError) as info:
        target_of({"_target_": "experiments.instantiate.describ"}, "drafter")
    assert not log.disabled and "did you mean" not in str(info.value)
    target_of({"_target_": f"{HERE}.KeywordOnly"}, "drafter")
    assert not log.disabled


def test_hydras_keys_and_keyword_only_arguments_are_not_unknown_arguments():
    """_partial_ is Hydra's key, a keyword-only parameter an argument, **kwargs takes any name."""
    check_arguments(cfg_of(_target_=f"{HERE}.KeywordOnly", _partial_=True, size=3), "drafter")
    assert accepts_argument({"_target_": f"{HERE}.KeywordOnly"}, "size", "drafter")
    assert accepts_argument({"_target_": f"{HERE}.TakesAnything"}, "tokenizer", "drafter")
    assert not accepts_argument({"_target_": f"{HERE}.KeywordOnly"}, "tokenizer", "drafter")


def test_a_constructors_own_error_passes_through_and_a_type_error_is_quoted():
    """A SpecDecError from the constructor reaches the user unchanged; Hydra's wrapper names the real cause."""
    with pytest.raises(SpecDecError) as info:
        instantiate(cfg_of(_target_=f"{HERE}.Refuses", size=5), "drafter")
    assert type(info.value) is SpecDecError and str(info.value) == "size=5 is not a size this class takes"
    with pytest.raises(ConfigError, match=r"cannot build the drafter from .*unexpected keyword argument 'colour'"):
        instantiate(cfg_of(_target_=f"{HERE}.KeywordOnly"), "drafter", colour=1)


def test_added_keys_a_package_selection_and_the_valid_keys_listed():
    """+group@package=option is Hydra's; **kwargs is no argument called kwargs; an existing empty node is a key."""
    cfg = cfg_of(model={"source": "tiny_random"}, extra={"source": "tiny_random"},
                 x={"_target_": f"{HERE}.TakesAnything", "kwargs": 1, "opts": {}})
    check_added_keys(cfg, ["+model@extra=tiny_random"], {})
    with pytest.raises(ConfigError, match=r"unknown key 'x.kwargs' \(from \+x.kwargs=1\): x has the keys "
                                          r"\['_target_', 'opts'\]"):
        check_added_keys(cfg, ["+x.kwargs=1"], {})


@pytest.mark.parametrize("override", ["batch_size=two", "warmup=x", "seed=one", "num_threads=many"])
def test_every_count_of_the_schema_is_typed(override):
    """A word where a count belongs fails when the config is composed, before anything loads."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    import experiments.schema  # noqa: F401  (registers base_config)

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        assert compose("config", overrides=[override.split("=")[0] + "=2"]).batch_size >= 1  # a count composes
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=[override])


def test_output_dirs_and_temperature_lists_at_their_edges(tmp_path, monkeypatch):
    """An existing --out-dir is fine, an unwritable parent is not; '0,0.8,' is two temperatures, ',' none."""
    assert cli_args.output_dir(str(tmp_path)) == tmp_path
    assert cli_args.output_dir(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # made by the command later, not by the check
    assert cli_args.temperatures("0, 0.8,") == [0.0, 0.8]
    for text in (",", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="at least one temperature"):
            cli_args.temperatures(text)
    for text in ("inf", "nan", "-0.1"):  # SamplingParams would refuse them after the models load
        with pytest.raises(argparse.ArgumentTypeError, match="finite value > 0"):
            cli_args.temperature(text)
    monkeypatch.setattr(cli_args.os, "access", lambda path, mode: not mode & os.W_OK)  # read-only for this user
    with pytest.raises(argparse.ArgumentTypeError, match="cannot make"):
        cli_args.output_dir(str(tmp_path / "new"))


def test_one_line_messages_for_option_lists_missing_values_and_a_null_group():
    """Indented options become 'a, b'; a ??? key names how to set it; tree=null keeps Hydra's words plus the fix."""
    lines = ["Could not find 'drafter/nope'", "Available options in 'drafter':", "\tdraft_model", "\teagle", "Done"]
    assert cli._join_lines(lines) == "Could not find 'drafter/nope'. Available options in 'drafter': draft_model, eagle. Done"
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue) as info:
        _ = OmegaConf.create({"model": {"target": "???"}}).model.target
    assert cli.error_message(info.value) == "model.target is required and has no value: set model.target=<value> on the command line"
    text = cli.error_message(ValueError("Config group override must be a string : tree=None"))
    assert text.startswith("Config group override must be a string : tree=None: ") and "tree=none" in text


def test_a_failed_sweep_job_is_noted_and_ctrl_c_ends_the_sweep(tmp_path, monkeypatch):
    """In a multirun a failed job leaves its note and the sweep goes on; Ctrl-C (130) ends the sweep at once."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    job = SimpleNamespace(mode=RunMode.MULTIRUN, job=SimpleNamespace(num=3, override_dirname="k=2"),
                          runtime=SimpleNamespace(output_dir=str(tmp_path / "job")))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: job))
    monkeypatch.setenv(cli.FAILED_JOBS_ENV, str(tmp_path))
    assert cli._job(lambda: 2)() is None
    assert json.loads((tmp_path / "3.json").read_text()) == [3, "#3 k=2", 2]
    with pytest.raises(SystemExit) as info:
        cli._job(lambda: cli.INTERRUPTED)()
    assert info.value.code == cli.INTERRUPTED


def test_a_sweep_with_failed_jobs_exits_with_the_worst_status(monkeypatch, capsys):
    """The sweep exits with its jobs' highest status; Hydra's error switch and the notes dir are set only inside."""
    import hydra

    seen = []

    def app():
        seen.append(os.environ.get("HYDRA_FULL_ERROR"))
        for num, status in ((0, 1), (1, 2)):
            Path(os.environ[cli.FAILED_JOBS_ENV], f"{num}.json").write_text(json.dumps([num, f"#{num}", status]))
    monkeypatch.setattr(hydra, "main", lambda **kwargs: lambda task: app)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv(cli.FAILED_JOBS_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        cli.hydra_main("config")(lambda cfg: None)()
    assert info.value.code == 2 and seen == ["1"]
    assert "error: 2 job(s) of this sweep failed (#0, #1)" in capsys.readouterr().err
    assert "HYDRA_FULL_ERROR" not in os.environ and cli.FAILED_JOBS_ENV not in os.environ


def test_a_null_draft_length_and_a_threshold_on_a_tree_fail_before_loading():
    """num_speculative_tokens may not be null; a confidence threshold is refused for the drafter given a tree."""
    def cfg(tree=None, **drafter):
        return cfg_of(max_new_tokens=8, tree=tree, drafter={"_target_": "drafters.DraftModelDrafter", **drafter})
    with pytest.raises(ConfigError, match="drafter.num_speculative_tokens"):
        check_before_loading(cfg(num_speculative_tokens=None))
    check_before_loading(cfg(confidence_threshold=0.5))  # a chain may stop early
    with pytest.raises(ConfigError, match="drafter.confidence_threshold=0.5 stops a chain early"):
        check_before_loading(cfg(tree={"paths": [[0], [1], [0, 0]]}, confidence_threshold=0.5))


def test_a_missing_draft_model_names_the_command_that_builds_it():
    """model=<pretrained> draft=distilled without the draft built: the error names the build, not model.draft=."""
    models = LoadedModels(None, None, None, info={"draft_missing": "run experiments.build_draft first"})
    with pytest.raises(ConfigError, match="needs a draft model.*run experiments.build_draft first"):
        build_drafter(cfg_of(_target_="drafters.DraftModelDrafter"), models)


def test_zoo_drafts_are_checked_without_building_and_built_with_the_users_tokenizer(tmp_path, monkeypatch):
    """build=False only checks zoo:<size>/<role> (no 20-minute build); a built one keeps a draft_tokenizer given."""
    import experiments.zoo

    built = []
    pair = SimpleNamespace(target_dir="T", draft_dir="D", tokenizer_dir="TOK")
    monkeypatch.setattr(experiments.zoo, "ensure_pair", lambda size: built.append(size) or pair)
    node = {"_target_": "drafters.DraftModelDrafter", "draft": "zoo:default/draft"}
    assert drafter_paths(cfg_of(**node), build=False) == {} and built == []
    with pytest.raises(ConfigError, match="zoo:<size>/target or zoo:<size>/draft"):
        drafter_paths(cfg_of(**{**node, "draft": "zoo:default/drafts"}), build=False)
    assert drafter_paths(cfg_of(**node)) == {"draft": "D", "draft_tokenizer": "TOK"}
    mine = cfg_of(**{**node, "draft": "zoo:default/target", "draft_tokenizer": str(tmp_path)})
    assert drafter_paths(mine) == {"draft": "T", "draft_tokenizer": str(tmp_path)}


def test_model_seed_empty_target_and_device_map(monkeypatch):
    """model.seed picks the tiny weights; target='' is a missing key; device_map=auto means CUDA when there is one."""
    weights = [next(_load({"source": "tiny_random", "seed": seed}).target.parameters()) for seed in (0, 0, 1)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    with pytest.raises(ConfigError, match="model.target is required for model.source='hf'"):
        _load({"source": "hf", "target": ""})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert target_device({"device_map": "auto"}) == "cuda" and target_device({"device": "cpu"}) == "cpu"
