"""The embedded model pair: micro build, cache reuse, corruption and interruption handling."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experiments.data import CacheDirError
from experiments.zoo import ZooError, cache, ensure_pair
from experiments.zoo import build as zoo_build
from tests import repo_env

REPO = Path(__file__).resolve().parents[1]
MICRO = {"size": "micro", "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """One real micro build, shared by the module."""
    cache_dir = tmp_path_factory.mktemp("zoo_cache")
    return ensure_pair(cache_dir=str(cache_dir), **MICRO), cache_dir


@pytest.fixture
def copy_builder(micro, monkeypatch):
    """Replace the (real) builder by one that copies the micro pair: tests the cache mechanics fast."""
    pair, _ = micro
    calls = []

    def fake_build(size, out_dir, seed, settings):
        calls.append(out_dir)
        for part in ("tokenizer", "target", "draft"):
            shutil.copytree(Path(pair.root) / part, out_dir / part)
        return dict(pair.metrics)

    monkeypatch.setattr(zoo_build, "build_pair", fake_build)
    return calls


def _copy_entry(micro, tmp_path) -> Path:
    """A private copy of the micro cache entry (so tests can damage it)."""
    pair, _ = micro
    dest = tmp_path / "zoo" / "micro"
    shutil.copytree(pair.root, dest)
    return dest


def test_micro_build_metrics_and_manifest(micro):
    pair, cache_dir = micro
    assert Path(pair.root) == cache_dir / "zoo" / "micro"
    m = pair.metrics
    assert 0 < m["draft_params"] < m["target_params"]
    assert m["target_train_tokens"] > 0 and m["draft_train_tokens"] > 0
    assert 0.0 <= m["alpha"] <= 1.0
    assert m["target_heldout_loss"] > 0 and m["draft_heldout_loss"] > 0
    manifest = cache.verify_entry(Path(pair.root))
    assert {"target/model.safetensors", "draft/model.safetensors", "tokenizer/tokenizer.json"} <= set(manifest["files"])
    assert manifest["metrics"] == m and manifest["config"]["name"] == "micro"
    assert not list((cache_dir / "zoo").glob(".micro.tmp-*"))


def test_models_load_through_auto_classes_and_generate(micro):
    pair, _ = micro
    tokenizer = AutoTokenizer.from_pretrained(pair.tokenizer_dir)
    ids = tokenizer("import os\n", return_tensors="pt")["input_ids"]  # [1, T]
    assert ids[0, 0].item() == tokenizer.bos_token_id
    for model_dir in (pair.target_dir, pair.draft_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        assert model.config.model_type == "llama"
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert model.config.vocab_size == len(tokenizer)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)  # [1, T + 6]
        assert out.shape == (1, ids.shape[1] + 6)
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        assert text.startswith("import os\n") and len(text) > len("import os\n")  # prompt round-trips, then new text


def test_second_call_reuses_the_cache(micro, caplog, monkeypatch):
    pair, cache_dir = micro
    threads = torch.get_num_threads()
    before = os.stat(Path(pair.target_dir) / "model.safetensors").st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("the second call trained the pair again instead of reusing the cache")

    monkeypatch.setattr(zoo_build, "build_pair", no_build)
    with caplog.at_level(logging.INFO, logger="experiments.zoo.build"):
        again = ensure_pair(cache_dir=str(cache_dir), **MICRO)  # building allowed, yet it must not build
    assert again == pair
    assert "already built" in caplog.text
    assert torch.get_num_threads() == threads
    assert os.stat(Path(pair.target_dir) / "model.safetensors").st_mtime_ns == before


def _flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    path.write_bytes(bytes(raw))


def test_corrupt_checkpoint_is_reported(micro, tmp_path):
    entry = _copy_entry(micro, tmp_path)
    _flip_bytes(entry / "target" / "model.safetensors")
    with pytest.raises(ZooError, match=r"target/model\.safetensors.*sha256.*corrupt"):
        ensure_pair(cache_dir=str(tmp_path), on_corrupt="error", **MICRO)
    with pytest.raises(ZooError, match="invalid"):
        ensure_pair(cache_dir=str(tmp_path), build_if_missing=False, **MICRO)


def test_truncated_file_is_caught_by_the_size_check(micro, tmp_path):
    entry = _copy_entry(micro, tmp_path)
    with (entry / "draft" / "model.safetensors").open("r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ZooError, match="bytes"):
        ensure_pair(cache_dir=str(tmp_path), on_corrupt="error", checksums=False, **MICRO)


def test_corrupt_checkpoint_is_rebuilt_with_a_warning(micro, tmp_path, copy_builder, caplog):
    entry = _copy_entry(micro, tmp_path)
    _flip_bytes(entry / "draft" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="experiments.zoo.build"):
        pair = ensure_pair(cache_dir=str(tmp_path), **MICRO)
    assert len(copy_builder) == 1
    assert "corrupt" in caplog.text and "rebuilding" in caplog.text
    cache.verify_entry(Path(pair.root))
    assert not list((tmp_path / "zoo").glob(".micro.*-*"))


def test_interrupted_build_is_cleaned_and_rebuilt(micro, tmp_path, copy_builder):
    zoo = tmp_path / "zoo"
    stale = zoo / ".micro.tmp-killed"  # what a SIGKILLed build leaves behind
    (stale / "target").mkdir(parents=True)
    (stale / "target" / "model.safetensors").write_bytes(b"partial")
    half = zoo / "micro"  # a dir without manifest is never loaded
    (half / "target").mkdir(parents=True)
    (half / "target" / "config.json").write_text("{}")
    with pytest.raises(ZooError, match="COMPLETE.json"):
        ensure_pair(cache_dir=str(tmp_path), on_corrupt="error", **MICRO)
    pair = ensure_pair(cache_dir=str(tmp_path), **MICRO)
    assert len(copy_builder) == 1
    assert not stale.exists()
    cache.verify_entry(Path(pair.root))
    assert AutoModelForCausalLM.from_pretrained(pair.target_dir) is not None


def test_force_rebuilds_a_valid_entry(micro, tmp_path, copy_builder):
    _copy_entry(micro, tmp_path)
    ensure_pair(cache_dir=str(tmp_path), **MICRO)
    assert copy_builder == []
    ensure_pair(cache_dir=str(tmp_path), force=True, **MICRO)
    assert len(copy_builder) == 1


def test_missing_pair_without_building(tmp_path):
    with pytest.raises(ZooError, match="python -m experiments.build_zoo size=micro"):
        ensure_pair(cache_dir=str(tmp_path), build_if_missing=False, **MICRO)


def test_unwritable_cache_dir_names_dir_and_override(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CacheDirError) as info:
        ensure_pair(cache_dir=str(blocker / "cache"), **MICRO)
    message = str(info.value)
    assert str(blocker / "cache") in message and "cache_dir=" in message and "SPECDEC_CACHE" in message


def test_unknown_size_and_option():
    with pytest.raises(ValueError, match="micro"):
        ensure_pair(size="huge")
    with pytest.raises(ValueError, match="on_corrupt"):
        ensure_pair(size="micro", on_corrupt="ignore")


def _cli(*overrides, run_dir):
    env = repo_env(WANDB_MODE="offline")
    command = [sys.executable, "-m", "experiments.build_zoo", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_cli_reuses_the_cache_and_reports_errors(micro, tmp_path):
    _, cache_dir = micro
    done = _cli("size=micro", f"cache_dir={cache_dir}", "logger=none", "threads=1", run_dir=tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert "already built" in done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["metrics"]["alpha"] == pytest.approx(micro[0].metrics["alpha"])
    (tmp_path / "a_file").write_text("")
    failed = _cli("size=micro", f"cache_dir={tmp_path / 'a_file' / 'c'}", "logger=none", run_dir=tmp_path / "run2")
    assert failed.returncode == 2
    assert "error: cache directory" in failed.stderr and "SPECDEC_CACHE" in failed.stderr


def test_side_by_side_benchmark_on_micro_pair(micro, tmp_path):
    """experiments.bench runs every method, checks each output against HF plain greedy, writes its table."""
    from experiments import bench

    _, cache_dir = micro
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    rc = bench.main(["--size", "micro", "--cache-dir", str(cache_dir), "--prompts", "2", "--max-new-tokens", "12",
                     "--ks", "2", "--confidence", "0.3", "--hf-compile", "--reps", "1", "--threads", "1",
                     "--markdown", str(md), "--json", str(js)])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads(js.read_text())["rows"]}
    expected = {"hf_plain", "hf_prompt_lookup", "ours_ar", "ours_ngram", "hf_assisted_default", "hf_assisted_k2",
                "ours_chain_k2", "hf_assisted_k2_conf0.3", "ours_chain_k2_conf0.3", "hf_static_compiled"}
    assert set(rows) == expected and all(r["matches_hf_plain"] for r in rows.values())
    assert rows["ours_chain_k2"]["tau"] >= 1.0 and 0.0 <= rows["ours_chain_k2"]["draft_acceptance"] <= 1.0
    assert rows["ours_chain_k2"]["vs_hf_same_drafter"] and rows["ours_chain_k2"]["efficiency"]
    assert rows["ours_chain_k2"]["ceiling_vs_hf"]["median"] > 0
    dynamic = rows["ours_chain_k2_conf0.3"]  # a dynamic draft length: compared with HF's at the same threshold
    assert dynamic["vs_hf_same_drafter"] and dynamic["efficiency"] is None and dynamic["tau"] >= 1.0
    table = md.read_text()
    assert "draft acceptance" in table and "| NO |" not in table and table.count("| yes |") == len(expected)
    loops = json.loads(js.read_text())["loops"]  # where our steps go: the AR loop and the chain of fixed k
    assert set(loops) == {"ours_ar", "ours_chain_k2"} and all(ms["step"] > ms["verify"] > 0 for ms in loops.values())
    assert "| ours_chain_k2 | " in table.split("Where our steps go")[1]


def test_bench_cut_in_the_first_cost_sample_keeps_the_first_prompt(micro, tmp_path, monkeypatch):
    """Ctrl-C while the forward costs are sampled after prompt 1: its rounds stand (prompts_done 1, exit status
    130) and the costs come from one sample taken after the interrupt."""
    from experiments import bench

    _, cache_dir = micro
    real, calls = bench.measure_costs, []

    def cut_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(bench, "measure_costs", cut_once)
    js = tmp_path / "bench.json"
    rc = bench.main(["--size", "micro", "--cache-dir", str(cache_dir), "--prompts", "2", "--max-new-tokens", "8",
                     "--ks", "2", "--reps", "1", "--threads", "1", "--json", str(js)])
    out = json.loads(js.read_text())
    assert rc == 130 and (out["prompts_done"], out["prompts_asked"]) == (1, 2) and len(calls) == 2
    assert out["costs"]["target"] and all(r["matches_hf_plain"] for r in out["rows"])
    calls.clear()  # one prompt, its sample cut: every prompt done, but the run was cut (status 130, a note)
    md = tmp_path / "bench.md"
    rc = bench.main(["--size", "micro", "--cache-dir", str(cache_dir), "--prompts", "1", "--max-new-tokens", "8",
                     "--ks", "2", "--reps", "1", "--threads", "1", "--markdown", str(md)])
    assert rc == 130 and "after the last prompt's rounds: the tables cover every prompt" in md.read_text()


def test_an_interrupted_build_goes_on_from_its_checkpoints(micro, tmp_path, monkeypatch, caplog):
    """Ctrl-C during the target's training, then during the draft's: each next build goes on from the step its
    checkpoint saved (a trial lost 45 minutes of the default pair's build to one Ctrl-C) and ends with the very pair
    an uninterrupted build makes; the published entry holds no checkpoint."""
    from safetensors.torch import load_file

    from experiments.zoo import progress
    from experiments.zoo.sizes import get_size

    monkeypatch.setattr(progress, "CHECKPOINT_S", 0.0)  # a checkpoint after every step
    target_steps = get_size("micro").target_steps
    seen: list[list[int]] = []

    def stop_at(stop: int):
        seen.append([])

        def log_fn(metrics, step):
            seen[-1].append(step)
            if step == stop:
                raise KeyboardInterrupt
        return log_fn

    for stop in (3, target_steps + 2):  # in the target's training, then in the draft's
        with pytest.raises(KeyboardInterrupt):
            ensure_pair(cache_dir=str(tmp_path), log_fn=stop_at(stop), **MICRO)
        assert (tmp_path / "zoo" / ".micro.partial" / progress.KEY_FILE).is_file()
    with caplog.at_level(logging.INFO, logger="experiments.zoo.build"):
        pair = ensure_pair(cache_dir=str(tmp_path), log_fn=stop_at(-1), **MICRO)
    assert "going on from the build stopped in" in caplog.text and "tokenizer of the stopped build" in caplog.text
    # each build goes on after the step it was cut in (saved before it was logged): no step trained twice
    assert [(steps[0], steps[-1]) for steps in seen] == [(0, 3), (4, target_steps + 2), (target_steps + 3, seen[2][-1])]
    assert all(steps == list(range(steps[0], steps[-1] + 1)) for steps in seen)
    whole, _ = micro
    for part in ("target", "draft"):
        ours, ref = (load_file(Path(p) / part / "model.safetensors") for p in (pair.root, whole.root))
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), part
    assert not list(Path(pair.root).rglob(f"*{progress.CHECKPOINT_SUFFIX}")) and not (tmp_path / "zoo" / ".micro.partial").exists()
    assert set(cache.list_files(Path(pair.root))) == set(cache.list_files(Path(whole.root)))  # nothing else published
    m = pair.metrics  # summed over the three sessions
    assert m["build_sessions"] == 3 and m["build_s"] > m["target_train_s"] + m["draft_train_s"] + m["tokenizer_s"]


@pytest.mark.parametrize("why", ["settings", "force", "cpu_capability", "transformers"])
def test_a_stopped_build_of_other_settings_or_under_force_is_removed_with_a_warning(micro, tmp_path, copy_builder,
                                                                                   caplog, why):
    from experiments.zoo import progress

    partial = tmp_path / "zoo" / ".micro.partial"
    partial.mkdir(parents=True)
    key = progress.build_key(get_size_dict("micro"), 7 if why == "settings" else 0, "cpu", None)
    if why in ("cpu_capability", "transformers"):  # a build stopped on another CPU, or before an upgrade
        key[why] = "other"
    (partial / progress.KEY_FILE).write_text(json.dumps(key))
    (partial / "target.ckpt").write_bytes(b"from another build")
    with caplog.at_level(logging.WARNING, logger="experiments.zoo.progress"):
        pair = ensure_pair(cache_dir=str(tmp_path), force=why == "force", **MICRO)
    said = {"force": "force=true", "settings": "its settings differ: seed"}.get(why, f"its settings differ: {why}")
    assert f"removing the stopped build in {partial} ({said})" in caplog.text
    assert len(copy_builder) == 1 and not partial.exists() and cache.verify_entry(Path(pair.root))


def get_size_dict(name: str) -> dict:
    from experiments.zoo.sizes import get_size

    return get_size(name).to_dict()


def test_a_build_cut_between_checkpoints_goes_on_from_the_last_one(micro, tmp_path, monkeypatch):
    """No timed checkpoint yet (a minute apart): cut in the draft's training, the next build keeps the target (saved
    at its phase's end, the model alone) and trains the draft from its start, to the same pair."""
    from safetensors.torch import load_file

    from experiments.zoo import progress
    from experiments.zoo.sizes import get_size

    monkeypatch.setattr(progress, "CHECKPOINT_S", 1e9)
    target_steps, seen = get_size("micro").target_steps, []

    def log_fn(metrics, step):
        seen.append(step)
        if step == target_steps + 2 and seen.count(step) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_pair(cache_dir=str(tmp_path), log_fn=log_fn, **MICRO)
    assert "optimizer" not in torch.load(tmp_path / "zoo" / ".micro.partial" / "target.ckpt", weights_only=True)
    cut = len(seen)
    pair = ensure_pair(cache_dir=str(tmp_path), log_fn=log_fn, **MICRO)
    assert seen[cut] == target_steps  # the draft's first step again, no target step
    whole, _ = micro
    for part in ("target", "draft"):
        ours, ref = (load_file(Path(p) / part / "model.safetensors") for p in (pair.root, whole.root))
        assert all(torch.equal(ours[k], ref[k]) for k in ref), part


def test_a_build_cut_while_its_manifest_is_written_goes_on_without_training(micro, tmp_path, monkeypatch):
    """The checkpoints outlive the manifest (which leaves them out): a cut while the files are hashed loses no
    training (it lost the whole build), and the published entry lists only the pair's files."""
    from experiments.zoo import progress

    real, cut, steps = cache.file_sha256, [], []

    def hash_once(path):
        if not cut:
            cut.append(path)
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(cache, "file_sha256", hash_once)
    with pytest.raises(KeyboardInterrupt):
        ensure_pair(cache_dir=str(tmp_path), **MICRO)
    assert (tmp_path / "zoo" / ".micro.partial" / progress.KEY_FILE).is_file()
    pair = ensure_pair(cache_dir=str(tmp_path), log_fn=lambda metrics, step: steps.append(step), **MICRO)
    assert not steps and cache.verify_entry(Path(pair.root))  # no training step again
    whole, _ = micro
    assert set(cache.list_files(Path(pair.root))) == set(cache.list_files(Path(whole.root)))
    assert not (tmp_path / "zoo" / ".micro.partial").exists()
