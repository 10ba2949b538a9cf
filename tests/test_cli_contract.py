"""The failure contract at the command line (experiments/cli.py): every user error is ONE ``error:``
line naming the problem, the file or key and the fix, exit status 2, no traceback; our own bugs get
the traceback and a line asking to report them.

One subprocess per row of issue 13's table (tiny random pair, one prompt, a few tokens, no logger,
``costs=false``); the variants of a row (the draft instead of the target, ``+foo`` next to
``+model.foo``) run through the same entry point in this process, or through the library call.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

import experiments.schema  # noqa: F401  (registers base_config)
from experiments import cli, decode
from experiments.models_from_config import load_models
from experiments.overrides import check_added_keys, check_value_types
from specdec.checkpoints import CheckpointError, find_broken_file, safetensors_problem
from specdec.errors import ConfigError
from specdec.tree import load_preset
from tests.test_experiments import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["experiment=smoke", "num_prompts=1", "max_new_tokens=4", "warmup=0", "costs=false", "baseline=false"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path_factory.getbasetemp() / "specdec-cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny pair saved with save_pretrained, plus broken copies: truncated, NaN weights, remote code."""
    import shutil

    import torch

    from specdec.models import tiny_random_pair

    root = tmp_path_factory.mktemp("checkpoints")
    target, draft, tokenizer = tiny_random_pair()
    dirs = {name: root / name for name in ("target", "draft", "truncated", "nan", "remote")}
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    shutil.copytree(dirs["target"], dirs["truncated"])
    weights = dirs["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # cut short while copying
    with torch.no_grad():
        draft.get_output_embeddings().weight[3, 5] = float("nan")
    draft.save_pretrained(dirs["nan"])
    shutil.copytree(dirs["target"], dirs["remote"])
    config = json.loads((dirs["remote"] / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                       "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (dirs["remote"] / "config.json").write_text(json.dumps(config))
    return dirs


def run_cli(*args: str, env_drop: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    for name in env_drop:
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "experiments.decode", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def error_line(stderr: str, code: int, returncode: int, *fragments: str) -> str:
    """The one ``error:`` line of a failed command; checks exit status, no traceback, and the fragments."""
    assert returncode == code, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr and "Error executing job" not in stderr, stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def main_in_process(monkeypatch, capsys, *args: str, stdout: list | None = None, module=decode) -> tuple[int, str]:
    """``python -m experiments.decode <args>`` (or another Hydra command's ``module``) in this process; (exit
    status, stderr). ``stdout``: a list that gets what was printed to stdout (Hydra's log lines)."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [module.__name__, f"--config-path={CONF}", *args])
    capsys.readouterr()
    try:
        module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        GlobalHydra.instance().clear()
    captured = capsys.readouterr()
    if stdout is not None:
        stdout.append(captured.out)
    return code, captured.err


# --------------------------------------------------------------------------- corrupt checkpoints


def test_truncated_checkpoint_names_file_and_role(checkpoints, tmp_path):
    proc = run_cli(*TINY, "model=hf", f"model.target={checkpoints['truncated']}",
                   f"model.draft={checkpoints['draft']}", f"hydra.run.dir={tmp_path}")
    error_line(proc.stderr, 2, proc.returncode, "target checkpoint file", str(checkpoints["truncated"] / "model.safetensors"),
               "truncated", "save the model again")
    with pytest.raises(CheckpointError, match=r"draft checkpoint file .*model.safetensors' is unreadable \(truncated"):
        load_models({"source": "hf", "target": str(checkpoints["target"]), "draft": str(checkpoints["truncated"])})


def test_safetensors_header_checks(checkpoints, tmp_path):
    assert find_broken_file(checkpoints["target"]) is None
    stub = tmp_path / "model.safetensors"
    stub.write_bytes(b"\x01\x02")
    assert "shorter than the 8-byte header" in safetensors_problem(stub)
    stub.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert "header needs 1000000000 bytes" in safetensors_problem(stub)
    stub.write_bytes((4).to_bytes(8, "little") + b"{x!}")
    assert "not valid JSON" in safetensors_problem(stub)


def test_nan_weights_name_file_and_role(checkpoints, tmp_path):
    proc = run_cli(*TINY, "model=hf", f"model.target={checkpoints['target']}", f"model.draft={checkpoints['nan']}",
                   f"hydra.run.dir={tmp_path}")
    error_line(proc.stderr, 2, proc.returncode, "draft checkpoint", str(checkpoints["nan"] / "model.safetensors"),
               "NaN weights", "lm_head.weight", "save it again")
    assert not (tmp_path / "records.jsonl").exists()  # caught at load time, before any decoding
    with pytest.raises(CheckpointError, match=r"target checkpoint .* holds NaN weights"):
        load_models({"source": "hf", "target": str(checkpoints["nan"]), "tokenizer": str(checkpoints["target"])})


def test_medusa_heads_with_nan_or_cut_short_name_file_and_role(tmp_path):
    import torch

    from drafters.medusa_heads import WEIGHTS_FILE, MedusaHeads, MedusaHeadsError, load_heads, save_heads
    from tests.tiny_models import pair

    heads = MedusaHeads.for_target(pair("llama")[0], num_heads=2)
    with torch.no_grad():
        heads.heads[1].lm_head.weight[0, 0] = float("inf")
    save_heads(heads, tmp_path)
    with pytest.raises(CheckpointError, match=rf"Medusa heads checkpoint '{tmp_path / WEIGHTS_FILE}' holds infinite "
                                              r"weights \(first in heads.1.lm_head.weight\)"):
        load_heads(tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MedusaHeadsError, match=rf"Medusa heads file {weights} is not a readable safetensors file"):
        load_heads(tmp_path)


def test_nan_logits_at_decode_time_are_an_input_error(capsys):
    """NaN/inf logits (e.g. fp16 overflow) are the checkpoint's or the dtype's doing: one line, exit 2."""
    from specdec.errors import NonFiniteLogitsError

    @cli.guard()
    def failing() -> int:
        raise NonFiniteLogitsError("target forward at decode step 0: the model produced NaN logits. Check the dtype")

    assert failing() == 2
    error_line(capsys.readouterr().err, 2, 2, "target forward", "NaN logits")


def test_out_of_device_memory_is_an_input_error_with_the_fix(capsys):
    """A run whose sizes do not fit the device is the settings' doing: one line naming what to lower, exit 2."""
    @cli.guard()
    def failing() -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "139 GiB of which 1.2 GiB is free. Of the allocated memory ...")

    assert failing() == 2
    line = error_line(capsys.readouterr().err, 2, 2, "out of device memory", "Tried to allocate 2.00 GiB",
                      "batch size", "bfloat16")
    assert "allocated memory" not in line  # the allocator's advice is not ours to repeat

    @cli.guard()
    def wrapped() -> int:  # as dynamo raises a compiler's error: the OOM only in the context
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB. More text")
        except torch.OutOfMemoryError:
            raise RuntimeError("backend compiler failed") from None

    assert wrapped() == 2
    error_line(capsys.readouterr().err, 2, 2, "out of device memory", "Tried to allocate 64.00 MiB")


def test_remote_code_checkpoint_names_our_key(checkpoints, tmp_path):
    proc = run_cli(*TINY, "model=hf", f"model.target={checkpoints['remote']}", f"hydra.run.dir={tmp_path}")
    line = error_line(proc.stderr, 2, proc.returncode, "target checkpoint", str(checkpoints["remote"]),
                      "model.trust_remote_code=true")
    assert "trust_remote_code=True" not in line


# --------------------------------------------------------------------------- unknown +keys


def test_unknown_added_keys_list_the_valid_keys(tmp_path, monkeypatch, capsys):
    proc = run_cli(*TINY, "+model.foo=1", f"hydra.run.dir={tmp_path}")
    error_line(proc.stderr, 2, proc.returncode, "'model.foo'", "+model.foo=1", "model=tiny_random",
               "['arch', 'device', 'fuse_projections', 'narrow_linears', 'seed', 'source']")
    assert not (tmp_path / "summary.json").exists()
    code, err = main_in_process(monkeypatch, capsys, *TINY, "+foo=1", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "'foo'", "top level", "'max_new_tokens'", "'sampling'")
    code, err = main_in_process(monkeypatch, capsys, *TINY, "+sampling.foo=1", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "'sampling.foo'", "['min_p', 'temperature', 'top_k', 'top_p']")


def test_added_keys_that_are_known_pass():
    cfg = compose_cfg("experiment=smoke", "+drafter.foo=1", "+model.bar.baz=2", "+drafter.budget=3")
    choices = {"model": "tiny_random", "drafter": "draft_model", "experiment": "smoke"}
    check_added_keys(cfg, ["+drafter.budget=3", "+experiment=smoke", "++x=1"], choices)  # a constructor argument
    with pytest.raises(ConfigError, match=r"unknown key 'drafter.foo' .*drafter=draft_model has the keys \['_target_'"):
        check_added_keys(cfg, ["+drafter.foo=1"], choices)
    with pytest.raises(ConfigError, match=r"unknown key 'model.bar' \(from \+model.bar.baz=2\)"):
        check_added_keys(cfg, ["+model.bar.baz=2"], choices)


def test_compose_time_errors_are_one_line(tmp_path, monkeypatch, capsys):
    code, err = main_in_process(monkeypatch, capsys, "drafter=nope", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "Could not find 'drafter/nope'", "Available options in 'drafter': cross_tokenizer, draft_model, eagle, eagle3, hybrid, hybrid_draft, hybrid_medusa, layer_skip, medusa")
    assert "search path" not in err
    code, err = main_in_process(monkeypatch, capsys, "max_new_tokens=abc", f"hydra.run.dir={tmp_path}")
    assert error_line(err, 2, code) == "error: max_new_tokens='abc': max_new_tokens takes a whole number"
    for override, says in (("sampling.temperature=hot", ("sampling.temperature='hot': sampling.temperature takes a "
                                                         "number (e.g. 0.7)")),
                           ("baseline=maybe", "baseline='maybe': baseline takes true or false"),
                           ("batch_size=[2,4]", ("batch_size='[2,4]': batch_size takes a whole number; to run several "
                                                 "values, sweep them: -m batch_size=2,4")),  # it named no sweep
                           ("batch_size=null", ("batch_size=null: batch_size cannot be null, give it a value (--cfg job "
                                                "prints every key's default)"))):  # was Hydra's "is not Optional"
        code, err = main_in_process(monkeypatch, capsys, override, f"hydra.run.dir={tmp_path}")
        assert error_line(err, 2, code) == f"error: {says}"
    code, err = main_in_process(monkeypatch, capsys, "drafter.heads=~/heads", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "drafter.heads=~/heads", "needs Hydra quotes inside shell quotes")
    code, err = main_in_process(monkeypatch, capsys, "tree=none tree.paths=[[0]]", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "tree=none tree.paths=[[0]]: mismatched input", "give each key=value as its own argument")
    code, err = main_in_process(monkeypatch, capsys, "drafter.num_speculative_token=4", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "drafter.num_speculative_token is not a key", "did you mean drafter.num_speculative_tokens?")
    code, err = main_in_process(monkeypatch, capsys, "num_prompt=2", f"hydra.run.dir={tmp_path}")  # a top-level key
    error_line(err, 2, code, "num_prompt is not a key", "did you mean num_prompts?")
    code, err = main_in_process(monkeypatch, capsys, "tree=null", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "tree=none, not tree=null")
    code, err = main_in_process(monkeypatch, capsys, "tree=[[0],[1]]", f"hydra.run.dir={tmp_path}")  # a Hydra TypeError
    error_line(err, 2, code, "not a list of lists", "tree=none 'tree.paths=[[0],[1],[0,0]]'")
    code, err = main_in_process(monkeypatch, capsys, "tree=[binary,sparse60]", f"hydra.run.dir={tmp_path}")  # merged
    error_line(err, 2, code, "merges these options into one config", "-m tree=binary,sparse60")
    code, err = main_in_process(monkeypatch, capsys, "tree=[]", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "tree=[] names no option: a config group takes one option name")
    code, err = main_in_process(monkeypatch, capsys, "tree=[binary]", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "tree=[binary]: a config group takes an option name, without brackets: tree=binary")
    code, err = main_in_process(monkeypatch, capsys, "tree=none", "tree.paths=[[1],[0,0]]", f"hydra.run.dir={tmp_path}")
    error_line(err, 2, code, "tree=none with tree.paths=[[1],[0,0]] is not a valid tree",  # not the file's own paths
               "add the path [0] to the tree's paths")
    code, err = main_in_process(monkeypatch, capsys, "tree=binary", "drafter.num_speculative_tokens=2",
                                f"hydra.run.dir={tmp_path}")  # was ignored: a sweep over it gave identical runs
    error_line(err, 2, code, "drafter.num_speculative_tokens=2 has no effect with tree=binary", "tree=none")
    code, err = main_in_process(monkeypatch, capsys, "tree.paths=[[0],[1]]", f"hydra.run.dir={tmp_path}")
    line = error_line(err, 2, code, "tree.paths is not a key", "need its group chosen first: tree=none")
    assert "+tree.paths" not in line  # '+' would only lead to "unknown key 'tree'"


@pytest.mark.parametrize("command, override, fragment", [
    ("build_draft", "lr=abc", "lr='abc': it must be a number (the default is 0.001)"),
    ("train_medusa", "generated_fraction=half", "generated_fraction='half': it must be a number"),
    ("train_eagle", "steps=1.5", "steps=1.5: it must be an integer (the default is 300)"),
    ("train_eagle", "steps=true", "steps=True: it must be an integer"),
    ("build_zoo", "seed=x", "seed='x': it must be an integer (the default is 0)"),
    ("train_medusa", "resume=maybe", "resume='maybe': it must be true or false"),
])
def test_a_value_of_the_wrong_type_for_a_command_without_a_schema_is_one_error_line(
        tmp_path, monkeypatch, capsys, command, override, fragment):
    """The training and build commands have no schema: a key whose default is a number or a boolean takes only
    that, checked before anything is built or loaded (it was a float() failure or a traceback)."""
    module = importlib.import_module(f"experiments.{command}")
    code, err = main_in_process(monkeypatch, capsys, override, f"cache_dir={tmp_path / 'cache'}",
                                f"hydra.run.dir={tmp_path}", module=module)
    error_line(err, 2, code, fragment)
    assert not (tmp_path / "cache").exists()


def test_value_types_follow_the_config_files_defaults():
    defaults = {"lr": 0.001, "steps": 3, "flag": True, "name": "x", "maybe": None, "sub": {"k": 1}, "hydra": {"n": 1}}
    check_value_types({"lr": 2, "steps": None, "flag": False, "name": 5, "maybe": "y", "sub": {"k": 4},
                       "hydra": {"n": "z"}}, defaults)  # an int for a float, null, untyped keys, hydra's own
    for cfg, fragment in [({"sub": {"k": 1.5}}, "sub.k=1.5: it must be an integer"), ({"flag": 1}, "flag=1: it must be true"),
                          ({"lr": False}, "lr=False: it must be a number")]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            check_value_types(cfg, defaults)


def test_a_device_that_is_not_here_and_a_bad_thread_count_fail_before_anything_loads(tmp_path, monkeypatch, capsys):
    """cuda:99 is past the last GPU on any machine (on a CPU-only torch: no CUDA at all); the zoo pair is never
    built or loaded (a cache directory that stays empty)."""
    zoo = ["model=zoo_micro", f"model.cache_dir={tmp_path / 'cache'}"]
    for overrides, fragments in [((*zoo, "model.device=cuda:99"), ("model.device=cuda:99", "GPU")),
                                 ((*zoo, "model.device=banana"), ("model.device='banana' is not a device name", "cpu")),
                                 (("model.device=cuda:99",), ("model.device=cuda:99", "GPU")),  # the smoke run's pair
                                 (("num_threads=0",), ("num_threads=0", ">= 1"))]:
        code, err = main_in_process(monkeypatch, capsys, *TINY, *overrides, f"hydra.run.dir={tmp_path}")
        error_line(err, 2, code, *fragments)
        assert not (tmp_path / "summary.json").exists() and not (tmp_path / "cache").exists()


def test_a_misspelled_dtype_or_logger_mode_fails_before_anything_loads(tmp_path, monkeypatch, capsys):
    """``model.draft_dtype=bfloat61`` and ``logger.mode=offlin`` were caught only once the models had loaded (on a
    fresh machine: after the default pair's build), the mode after the run had started its files (a new-user
    trial found both); now no pair is built and no results are written."""
    zoo = ["model=zoo_micro", f"model.cache_dir={tmp_path / 'cache'}"]
    for overrides, fragment in [(("model.draft_dtype=bfloat61",), "model.draft_dtype='bfloat61' is unknown"),
                                (("model.dtype=float23",), "model.dtype='float23' is unknown"),
                                (("logger=wandb", "logger.mode=offlin"), "logger.mode='offlin' is unknown")]:
        code, err = main_in_process(monkeypatch, capsys, *TINY, *zoo, *overrides, f"hydra.run.dir={tmp_path}")
        error_line(err, 2, code, fragment)
        assert not (tmp_path / "records.jsonl").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib_local", marks=pytest.mark.requires("hydra_plugins.hydra_joblib_launcher"))])
def test_a_failing_job_does_not_stop_the_sweep(tmp_path, launcher):
    """Job #0 fails (num_threads=0); job #1 still runs to completion; the sweep ends with one summary error line and
    exit status 2, also when the jobs run in joblib's worker processes."""
    proc = run_cli("-m", *TINY, "num_threads=0,1", f"hydra.sweep.dir={tmp_path}", f"hydra/launcher={launcher}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    # joblib runs the jobs at once: job #1's progress bars (no newline until they end) share the terminal with
    # job #0's error line, which may then follow a bar's text on its line
    errors = re.findall(r"error: [^\r\n]*", proc.stderr)
    assert len(errors) == 2 and "num_threads=0" in errors[0] and "1 job(s) of this sweep failed (#0" in errors[1], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "1" / "summary.json").read_text())["status"] == "complete"
    from experiments.report import report  # job #0 left no results, but the report says why it failed

    assert report(tmp_path)["missing"] == [f"0 (num_threads=0): failed before writing results: {errors[0][7:]}"]
    if launcher == "basic":  # a command that succeeds there drops the stale note
        # -m after overrides (Hydra's argparse stopped there with a usage dump): moved first
        assert run_cli(*TINY, "-m", "num_threads=2", f"hydra.sweep.dir={tmp_path}").returncode == 0
        assert not (tmp_path / "0" / "error.txt").exists() and report(tmp_path)["missing"] == []


# --------------------------------------------------------------------------- tree files


TREE_FORMAT = "a tree file is a YAML mapping with a 'paths:' list"


def test_tree_file_of_the_wrong_shape_says_what_a_tree_file_is(tmp_path):
    tree_dir = tmp_path / "conf" / "tree"
    tree_dir.mkdir(parents=True)
    (tree_dir / "bare.yaml").write_text("- [0]\n- [1]\n- [0, 0]\n")
    proc = run_cli(*TINY, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "tree=bare",
                   f"hydra.run.dir={tmp_path / 'run'}")
    error_line(proc.stderr, 2, proc.returncode, "tree=bare", "is a list", "not a mapping", TREE_FORMAT)


@pytest.mark.parametrize("text, fragment", [
    ("- [0]\n- [1]\n", "is a list"),
    ("paths: 5\n", "paths is a int (5), not a list of paths"),
    ("paths: [0, 1]\n", "path 0 (0) is not a list of integers"),
    ("paths: [[0], [x]]\n", "path 1 (['x']) is not a list of integers"),
    ("path: [[0]]\n", "has no 'paths:' list"),
    ("paths: [[0], [0, 0]]\nmax_depth: 1\n", "has unknown key(s) ['max_depth']"),  # silently did nothing
    ("", "is empty, not a mapping"),
])
def test_tree_file_shapes(tmp_path, text, fragment):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_preset(path)
    assert fragment in str(info.value) and str(path) in str(info.value) and TREE_FORMAT in str(info.value)


def test_composed_tree_config_of_the_wrong_shape():
    from omegaconf import OmegaConf

    drafter = compose_cfg("drafter=draft_model").drafter
    with pytest.raises(ConfigError, match="paths is a int .*" + TREE_FORMAT):
        decode.tree_argument(drafter, OmegaConf.create({"paths": 5}))
    with pytest.raises(ConfigError, match="has no 'paths:' list"):
        decode.tree_argument(drafter, OmegaConf.create({"path": [[0]]}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['depth'\]"):  # +tree.depth=2
        decode.tree_argument(drafter, OmegaConf.create({"paths": [[0]], "depth": 2}))
    assert decode.tree_argument(drafter, OmegaConf.create({"paths": None})) == {}  # tree=none
