"""Resuming where an earlier run left nothing to resume (a new user's trial): a run that failed before its first
prompt left a failed summary and an empty records file, and the next run in the directory moved them to
``superseded-<time>/`` as "results of another config"; there are no results to keep, so the summary is replaced.
Ctrl-C before a run began says nothing was decoded."""
from __future__ import annotations

from experiments.resume import prepare
from tests.test_mutation19_eagle_resume import METHODS, _records, _run_dir


def test_a_run_that_decoded_nothing_is_replaced_not_set_aside(tmp_path):
    failed = {"status": "failed: ConfigError: drafter.heads=/x: no heads", "config": {"seed": 1}}
    state = prepare(_run_dir(tmp_path, failed, []), {"seed": 0}, METHODS, [0, 1])
    assert not list(tmp_path.glob("superseded-*")) and state.done == set() and state.records == []
    said = f"an earlier run in {tmp_path} ended before decoding any prompt (status {failed['status']!r})"
    assert state.messages == [f"{said}: its summary is replaced"]
    (tmp_path / "records.jsonl").unlink()  # killed before it wrote the file
    assert not prepare(tmp_path, {"seed": 0}, METHODS, [0, 1]).records and not list(tmp_path.glob("superseded-*"))


def test_a_run_with_records_or_a_wandb_run_is_still_set_aside(tmp_path):
    """Records of another config, or a W&B run of the failed one, are kept in ``superseded-<time>/`` as before."""
    (tmp_path / "a").mkdir()
    prepare(_run_dir(tmp_path / "a", {"status": "failed: x", "config": {"seed": 1}}, _records([0])), {"seed": 0},
            METHODS, [0, 1])
    assert len(list((tmp_path / "a").glob("superseded-*"))) == 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "wandb").mkdir()
    prepare(_run_dir(tmp_path / "b", {"status": "failed: x", "config": {"seed": 1}}, []), {"seed": 0}, METHODS, [0])
    assert len(list((tmp_path / "b").glob("superseded-*"))) == 1


def test_ctrl_c_before_the_run_began_says_nothing_was_decoded(monkeypatch):
    """Cut while Hydra composed the config (no job yet): the note named ``hydra.run.dir`` as if a run had begun."""
    from hydra.core.hydra_config import HydraConfig

    from experiments.resume import interrupted_note

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: False))
    note = interrupted_note()
    assert "nothing was decoded" in note and "hydra.run.dir" not in note, note


def test_ctrl_c_in_a_run_says_whether_there_is_anything_to_go_on_from(monkeypatch, tmp_path):
    """A run cut while its models loaded or built (a default pair's first build takes minutes) has no finished
    prompt: the note said it kept "the prompts it finished" and to rerun in its directory; with records it does."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from experiments.resume import interrupted_note

    job = SimpleNamespace(mode=RunMode.RUN, runtime=SimpleNamespace(output_dir=str(tmp_path)))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: job))
    for records in (None, ""):  # no records file yet, or one with no prompt in it
        if records is not None:
            (tmp_path / "records.jsonl").write_text(records)
        assert interrupted_note().startswith(f"no prompt was finished, so nothing in {tmp_path} to go on from")
    (tmp_path / "records.jsonl").write_text('{"prompt_index": 0}\n')
    assert interrupted_note().startswith(f"a decode run keeps the prompts it finished in {tmp_path}: rerun with "
                                         f"hydra.run.dir={tmp_path} to go on")
