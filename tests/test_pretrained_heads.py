"""``drafter.heads=null`` with ``model=smollm2``: the heads ``train_medusa`` / ``train_eagle target=smollm2`` cached,
not the embedded pair's (a new-user trial: decode looked in ``medusa/zoo-default`` and advised training heads for
another model)."""
from __future__ import annotations

import os
import time

import pytest

from experiments.pretrained import model_dir
from experiments.pretrained_heads import pretrained_heads
from specdec.errors import ConfigError
from tests.test_medusa import compose_decode


def _cfg(tmp_path, *overrides):
    return compose_decode("model=smollm2", f"model.cache_dir={tmp_path}", *overrides)


def _heads(tmp_path, kind: str, name: str, age: float = 0.0):
    directory = tmp_path / kind / name
    directory.mkdir(parents=True)
    config = directory / ("medusa_config.json" if kind == "medusa" else "eagle_config.json")
    config.write_text("{}")
    os.utime(config, (time.time() - age, time.time() - age))
    return directory


def test_medusa_heads_null_finds_the_newest_heads_cached_for_the_model(tmp_path):
    entry = model_dir("smollm2", tmp_path).name
    _heads(tmp_path, "medusa", f"{entry}-0000000000", age=100)
    newest = _heads(tmp_path, "medusa", f"{entry}-1111111111")
    _heads(tmp_path, "medusa", "zoo-default")  # the embedded pair's: not for this model
    (tmp_path / "medusa" / f"{entry}-2222222222").mkdir()  # no config: an unfinished training
    _heads(tmp_path, "medusa", f"{entry}-Instruct-3333333333")  # another model whose name starts alike: newer
    cfg = _cfg(tmp_path, "drafter=medusa")
    assert pretrained_heads(cfg) == [f"drafter.heads=null: the heads cached for model=smollm2, {newest}"]
    assert cfg.drafter.heads == str(newest)
    given = _cfg(tmp_path, "drafter=medusa", "drafter.heads=/my/heads")
    assert pretrained_heads(given) == [] and given.drafter.heads == "/my/heads"


def test_a_hybrids_part_and_eagle_versions(tmp_path):
    entry = model_dir("smollm2", tmp_path).name
    medusa = _heads(tmp_path, "medusa", f"{entry}-0000000000")
    eagle3 = _heads(tmp_path, "eagle", f"eagle3-{entry}-0000000000")
    cfg = _cfg(tmp_path, "drafter=hybrid_medusa")
    assert pretrained_heads(cfg) == [f"drafter.second.heads=null: the heads cached for model=smollm2, {medusa}"]
    assert cfg.drafter.second.heads == str(medusa)
    either = _cfg(tmp_path, "drafter=eagle")  # version=null: eagle2's first, else eagle3's
    pretrained_heads(either)
    assert either.drafter.heads == str(eagle3)
    with pytest.raises(ConfigError, match=r"drafter.heads=null with model=smollm2: no EAGLE heads are cached for it "
                                          r".*eagle2-smollm2.*train_eagle target=smollm2 version=eagle2"):
        pretrained_heads(_cfg(tmp_path, "drafter=eagle", "drafter.version=eagle2"))


def test_no_heads_cached_names_the_command_that_trains_them(tmp_path):
    with pytest.raises(ConfigError, match=r"no Medusa heads are cached for it .*`python -m experiments.train_medusa "
                                          rf"target=smollm2 cache_dir={tmp_path}`.*or set drafter.heads=<heads dir>"):
        pretrained_heads(_cfg(tmp_path, "drafter=medusa"))
    cut = tmp_path / "medusa" / f"{model_dir('smollm2', tmp_path).name}-0000000000"  # a training cut short
    cut.mkdir(parents=True)
    (cut / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"the training at {cut} has not finished \(its checkpoint.pt is there\)"):
        pretrained_heads(_cfg(tmp_path, "drafter=medusa"))


def test_a_zoo_model_or_another_drafter_is_left_alone(tmp_path):
    zoo = compose_decode("drafter=medusa")
    assert pretrained_heads(zoo) == [] and zoo.drafter.heads is None
    assert pretrained_heads(_cfg(tmp_path, "drafter=ngram")) == []
