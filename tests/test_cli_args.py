"""Bad arguments of the argparse tools (benchmarks, report, profiles, the kernel's bench and tune) and of the
draft build: one ``error:`` line naming the flag or key and the fix, exit status 2, no traceback and no usage
block, before anything runs. An output path that cannot be written fails at once, not after a run."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from specdec.errors import ConfigError, SpecDecError
from tests.test_cli_contract import error_line


def _status(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


CASES = {
    "report_out_is_a_file": ("experiments.report", ["{tmp}", "--out", "{file}"], ["--out", "is a file"]),
    "report_out_cannot_be_made": ("experiments.report", ["{tmp}", "--out", "{file}/sub"], ["--out", "cannot make"]),
    "bench_json_cannot_be_made": ("experiments.bench", ["--json", "{file}/sub/b.json"], ["--json", "cannot make"]),
    "bench_markdown_is_a_dir": ("experiments.bench", ["--markdown", "{tmp}"], ["--markdown", "is a directory"]),
    "bench_confidence": ("experiments.bench", ["--confidence", "0.3,1.5"], ["--confidence", "[0, 1)"]),
    "suite_temperature": ("experiments.bench_suite", ["--temperature", "-1"], ["--temperature", "0 for greedy"]),
    "drafters_temperatures": ("experiments.bench_drafters", ["--temperatures", "0,-0.5"], ["--temperatures", "0 for greedy"]),
    "profile_context": ("experiments.step_profile", ["--context", "-5"], ["--context", "integer >= 1"]),
    "kernel_bench_dtype": ("specdec_kernels.bench", ["--dtypes", "float8"], ["--dtypes", "float8"]),
    "kernel_bench_ns": ("specdec_kernels.bench", ["--ns", "0"], ["--ns", "integer >= 1"]),
    "tune_grid_no_values": ("specdec_kernels.tune", ["--grid", "merge"], ["--grid 'merge'", "key=v1,v2"]),
    "tune_grid_not_an_int": ("specdec_kernels.tune", ["--grid", "num_stages=abc"], ["positive integers"]),
    "tune_grid_choice": ("specdec_kernels.tune", ["--grid", "merge=fast"], ["merge is one of"]),
    "tune_heads": ("specdec_kernels.tune", ["--hkv", "5"], ["--hq 32", "--hkv"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_argument_is_one_error_line_before_anything_runs(case, tmp_path, capsys):
    import importlib

    module, argv, fragments = CASES[case]
    afile = tmp_path / "a_file"
    afile.write_text("x")
    argv = [a.format(tmp=tmp_path, file=afile) for a in argv]
    status = _status(importlib.import_module(module).main, argv)
    err = capsys.readouterr().err
    error_line(err, 2, status, *fragments)
    assert "usage:" not in err


def test_the_kernel_tools_without_a_gpu_say_so_with_status_2(capsys, monkeypatch):
    from specdec_kernels import bench, tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _status(tune.main, []) == 2
    error_line(capsys.readouterr().err, 2, 2, "no CUDA device", "--interpret-smoke")
    assert _status(bench.main, []) == 2
    error_line(capsys.readouterr().err, 2, 2, "no CUDA device", "--interpret-smoke")


@pytest.mark.parametrize("settings, fragment", [({"steps": 0}, "steps=0"), ({"heldout_chats": 192}, "heldout_chats < chats"),
                                                ({"lr": 0.0}, "lr=0.0"), ({"batch_size": "8"}, "batch_size='8'")])
def test_draft_settings_are_checked(settings, fragment):
    """build_draft steps=0 used to cache an untrained draft (loss NaN) and reuse it afterwards."""
    from experiments.draft_training import DraftSettings

    with pytest.raises(ConfigError, match=re.escape(fragment)):
        DraftSettings(**settings)


def test_a_cached_draft_built_otherwise_is_named_when_reused(tmp_path, caplog):
    from experiments.draft_training import DraftSettings, _warn_other_settings

    asked = vars(DraftSettings()) | {"steps": 60}
    with caplog.at_level(logging.WARNING):
        _warn_other_settings(tmp_path, asked | {"steps": 3}, asked)
    assert "steps=3 (asked: 60)" in caplog.text and "force=true" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _warn_other_settings(tmp_path, asked, asked)
    assert not caplog.text


def test_a_directory_that_is_no_saved_model_is_named_by_its_key(tmp_path):
    """model.target at a directory without config.json: the key and 'no saved model', not the tokenizer or
    transformers' "Should have a model_type key"; one with a config and no weights: no safetensors."""
    from experiments.models_from_config import load_models
    from specdec.models import load_causal_lm, tiny_random_pair

    target, _, tokenizer = tiny_random_pair("llama")
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(SpecDecError, match=r"model.target path .* holds no config.json"):
        load_models({"source": "hf", "target": str(tmp_path / "tok"), "tokenizer": str(tmp_path / "tok")})
    with pytest.raises(SpecDecError, match=r"model.target path .* does not exist"):
        load_models({"source": "hf", "target": str(tmp_path / "nope")})
    target.config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(SpecDecError, match=r"holds no \*.safetensors weights"):
        load_causal_lm(str(tmp_path / "config_only"), role="target")


@pytest.mark.parametrize("module", ["experiments.bench_batch", "experiments.greedy_check"])
def test_a_library_module_run_as_a_command_names_the_command(module):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300, check=False)
    error_line(proc.stderr, 2, proc.returncode, "is not a command", "python -m experiments.")


def test_an_output_directory_is_checked_when_the_flag_is_read_and_made_only_by_a_good_run(tmp_path, capsys):
    """``report --out`` fails at once where it cannot be made, and a report of a wrong run directory leaves no
    empty ``--out`` directory behind."""
    from experiments import cli
    from experiments.report import main

    assert cli.output_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b" and not (tmp_path / "a").exists()
    assert main([str(tmp_path / "no_such_run"), "--out", str(tmp_path / "a" / "b"), "--wandb", "none"]) == 2
    assert not (tmp_path / "a").exists()
    assert capsys.readouterr().err.startswith("error:")



@pytest.mark.parametrize("module", ["specdec_kernels.bench", "specdec_kernels.tune"])
def test_the_kernel_tools_turn_out_of_memory_into_one_error_line(module, monkeypatch, capsys):
    """A shape too large for the GPU is the input's doing: one line, status 2, as for every other command."""
    import importlib

    tool = importlib.import_module(module)

    def too_large(argv=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(tool, "_main", too_large)
    status = tool.main([])
    error_line(capsys.readouterr().err, 2, status, "out of memory")
