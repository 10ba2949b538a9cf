"""EAGLE heads on disk and in configs: heads for another target, corrupt or missing files and a version mismatch
are one error before decoding (and one ``error:`` line at the command line); the configs compose and build; the
drafter benchmark puts saved heads of each dtype and forward side by side. The drafter itself is tested in
``tests/test_eagle.py``."""
from __future__ import annotations

import pytest
import torch

from drafters import EagleDrafter
from drafters.eagle_heads import EagleHead
from specdec import SpecDecError, SpeculativeDecoder
from tests.test_eagle import VERSIONS
from tests.tiny_models import pair, peaky_pair

# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """eagle2 and eagle3 heads of the tiny Llama target, saved."""
    from drafters.eagle_heads import save_head

    root = tmp_path_factory.mktemp("eagle_heads")
    return {v: save_head(EagleHead.for_target(pair("llama")[0], v), root / v) for v in VERSIONS}


def test_bench_drafters_puts_heads_of_each_dtype_side_by_side(saved, tmp_path):
    from experiments.bench_drafters import head_drafters, parse_args

    args = parse_args(["--eagle3", str(saved["eagle3"]), "--head-dtypes", "float32,bfloat16", "--cache-dir", str(tmp_path)])
    heads = head_drafters(args, notes := [])
    assert sorted(h for h in heads if h.startswith("eagle3")) == ["eagle3_bf16", "eagle3_fp32"]
    assert heads["eagle3_bf16"](num_speculative_tokens=2).dtype == "bfloat16" and notes
    with pytest.raises(SystemExit):
        parse_args(["--head-dtypes", "bf16"])
    args = parse_args(["--eagle3", str(saved["eagle3"]), "--head-forwards", "fast,hf", "--cache-dir", str(tmp_path)])
    heads = head_drafters(args, [])
    assert sorted(h for h in heads if h.startswith("eagle3")) == ["eagle3_fast", "eagle3_hf"]
    assert heads["eagle3_fast"]().fast_forward and not heads["eagle3_hf"]().fast_forward
    with pytest.raises(SystemExit):
        parse_args(["--head-forwards", "slow"])
    with pytest.raises(SpecDecError, match=r"--eagle2 .*an eagle3 head; pass it as --eagle3 <dir>"):
        head_drafters(parse_args(["--eagle2", str(saved["eagle3"]), "--cache-dir", str(tmp_path)]), [])


def _copy(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / directory.name)


def test_heads_for_another_target_fail_before_decoding(saved):
    from drafters.eagle_heads import EagleHeadError

    other = pair("qwen2")[0]  # same hidden size and vocabulary, other weights
    with pytest.raises(EagleHeadError, match="trained for another target.*train_eagle target="):
        SpeculativeDecoder(other, EagleDrafter(saved["eagle2"])).generate(torch.tensor([[1, 2, 3]]), 4)
    with pytest.raises(EagleHeadError, match="hidden size 64 and vocabulary 257, the target has 32 and 6"):
        EagleDrafter(saved["eagle3"]).step_shape(peaky_pair()[0])


def test_corrupt_head_files_fail(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    from drafters.eagle_heads import FILES, EagleHeadError
    from specdec.checkpoints import CheckpointError

    missing = _copy(saved["eagle3"], tmp_path / "a")
    tensors = load_file(str(missing / FILES.weights_file))
    del tensors["fuse.weight"]
    save_file(tensors, str(missing / FILES.weights_file))
    with pytest.raises(EagleHeadError, match="lacks tensor 'fuse.weight'.*retrain with `python -m experiments.train_eagle`"):
        EagleDrafter(missing)
    cut = _copy(saved["eagle2"], tmp_path / "b")
    weights = cut / FILES.weights_file
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(EagleHeadError, match=f"EAGLE heads file {weights} is not a readable safetensors file"):
        EagleDrafter(cut)
    nan = _copy(saved["eagle2"], tmp_path / "c")
    tensors = load_file(str(nan / FILES.weights_file))
    tensors["model.model.norm.weight"][3] = float("nan")
    save_file(tensors, str(nan / FILES.weights_file))
    with pytest.raises(CheckpointError, match=r"EAGLE heads checkpoint .* holds NaN weights \(first in model.model.norm"):
        EagleDrafter(nan)
    (nan / FILES.config_file).write_text("{not json")
    with pytest.raises(EagleHeadError, match="eagle_config.json is unreadable or not valid JSON"):
        EagleDrafter(nan)


def test_version_mismatch_fails(saved):
    from drafters.eagle_heads import EagleHeadError

    with pytest.raises(EagleHeadError, match="drafter.version=eagle3 but the head at .* is an eagle2 head: set "
                                             "drafter.version=eagle2, or train an eagle3 head with "
                                             "`python -m experiments.train_eagle version=eagle3`"):
        EagleDrafter(saved["eagle2"], version="eagle3")
    with pytest.raises(EagleHeadError, match="drafter.version='eagle4' is unknown"):
        EagleDrafter(saved["eagle2"], version="eagle4")
    assert EagleDrafter(saved["eagle3"], version="eagle3").head.version == "eagle3"


def test_missing_heads_say_how_to_train_them(tmp_path, monkeypatch):
    from drafters.eagle_heads import EagleHeadError

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    drafter = EagleDrafter(version="eagle3")  # the default location: built lazily, so configs compose without heads
    with pytest.raises(EagleHeadError, match="no EAGLE heads at .*eagle3-zoo-default.*python -m experiments.train_eagle "
                                             "version=eagle3"):
        drafter.step_shape(pair("llama")[0])
    elsewhere = EagleDrafter(version="eagle3", zoo_size="micro", cache_dir=tmp_path / "other")  # model.cache_dir
    with pytest.raises(EagleHeadError, match=r"other/eagle/eagle3-zoo-micro.*`python -m experiments.train_eagle "
                                             r"version=eagle3 zoo_size=micro cache_dir=.*other` \(a few minutes at most on a CPU\)"):
        elsewhere.step_shape(pair("llama")[0])


@pytest.mark.parametrize("case", ["another_target", "no_heads", "version", "corrupt"])
def test_bad_heads_at_the_command_line(case, saved, tmp_path, monkeypatch, capsys):
    """One error line, exit status 2, before any prompt is decoded (no records written)."""
    from tests.test_cli_contract import error_line, main_in_process

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    heads = {"another_target": saved["eagle2"], "no_heads": "null", "version": saved["eagle2"],
             "corrupt": _copy(saved["eagle3"], tmp_path / "x")}[case]
    args = ["experiment=smoke", "drafter=eagle", f"drafter.heads={heads}", "num_prompts=1", "max_new_tokens=4",
            "warmup=0", "costs=false", f"hydra.run.dir={tmp_path / 'run'}"]
    if case == "another_target":
        args.append("model.arch=qwen2")
    if case == "version":
        args.append("drafter.version=eagle3")
    if case == "corrupt":
        (heads / "eagle_head.safetensors").write_bytes(b"\x00" * 5)
    code, err = main_in_process(monkeypatch, capsys, *args)
    fragment = {"another_target": "trained for another target", "no_heads": "no EAGLE heads at",
                "version": "is an eagle2 head", "corrupt": "is not a readable safetensors file"}[case]
    error_line(err, 2, code, fragment, "train_eagle")
    assert not (tmp_path / "run" / "records.jsonl").exists()


def test_an_unknown_head_dtype_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import experiments.decode
    from tests.test_cli_contract import error_line, main_in_process

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded before drafter.dtype was checked")

    monkeypatch.setattr(experiments.decode, "load_models", no_loading)
    code, err = main_in_process(monkeypatch, capsys, "experiment=smoke", "drafter=eagle", "drafter.dtype=bf16",
                                "num_prompts=1", "warmup=0", "costs=false", f"hydra.run.dir={tmp_path / 'run'}")
    error_line(err, 2, code, "drafter.dtype='bf16' is unknown; choose null, auto or one of")


# --------------------------------------------------------------------------- configs


def test_configs_compose_and_build(saved, tmp_path):
    from experiments import decode
    from experiments.loggers import NoLogger
    from experiments.models_from_config import load_models
    from tests.test_medusa import compose_decode

    cfg = compose_decode("model=tiny_random", "drafter=eagle", f"drafter.heads={saved['eagle3']}", "tree=binary")
    drafter = decode.build_drafter(cfg.drafter, load_models(cfg.model), cfg.get("tree"))
    assert isinstance(drafter, EagleDrafter) and drafter.mode == "static" and drafter.max_nodes == 30
    cfg = compose_decode("experiment=eagle", "drafter.budget=30", "drafter.num_speculative_tokens=6")
    assert cfg.model.source == "zoo" and cfg.drafter.zoo_size == "default" and cfg.drafter.budget == 30
    assert cfg.drafter.dtype == "auto"  # follows model.draft_dtype: bf16 on a bf16 GPU, or a CPU where it measures faster
    cfg = compose_decode("model=tiny_random", "drafter=eagle", f"drafter.heads={saved['eagle2']}",
                         "drafter.budget=8", "num_prompts=2", "max_new_tokens=12", "warmup=0", "logger=none", "costs=false")
    summary = decode.run(cfg, tmp_path, logger=NoLogger())
    assert summary["metrics"]["matches_baseline"] is True and summary["drafter_shape"]["draft_module"] == "probe"
    assert summary["drafter_shape"]["draft_dtype"] == "float32"  # the head's, as resolved (the target's here)



def test_a_resumed_run_drafts_with_the_head_dtype_auto_picked_before(saved, tmp_path, monkeypatch, capsys):
    """``drafter.dtype=auto`` decides per process (a timing on a CPU); a resumed run's head drafts in the dtype its
    kept records' head did (the earlier summary's ``drafter_shape.draft_dtype``), so a sampled run's tokens do not
    depend on where it was cut: the interrupted run's last prompt decodes again to the uninterrupted run's tokens."""
    from tests.test_auto_dtype import cut_and_resumed
    from tests.test_medusa import compose_decode

    cfg = compose_decode("model=tiny_random", "drafter=eagle", f"drafter.heads={saved['eagle2']}", "drafter.dtype=auto",
                         "sampling.temperature=1.0", "acceptance=rejection", "num_prompts=2", "max_new_tokens=12",
                         "warmup=0", "logger=none", "costs=false")
    whole, resumed, tokens = cut_and_resumed(cfg, tmp_path, monkeypatch)
    assert whole["drafter_shape"]["draft_dtype"] == "bfloat16" and tokens[0] == tokens[1]
    assert resumed["drafter_shape"]["draft_dtype"] == "bfloat16" and resumed["resumed_prompts"] == 1
    assert "drafter.dtype=auto: the head drafts in bfloat16" in capsys.readouterr().err
    assert cfg.drafter.dtype == "auto"  # the caller's config is left as it was


@pytest.mark.parametrize("case", ["medusa", "eagle_default", "hybrid_second"])
def test_missing_heads_fail_before_any_model_loads(case, tmp_path, monkeypatch, capsys):
    """A heads directory that is not there (given, or the default one untrained) is one error line naming the
    setting and the training command before any model is loaded or built (a trial waited for the embedded pair to
    build first)."""
    import experiments.decode
    from tests.test_cli_contract import error_line, main_in_process

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded before the heads directory was checked")

    monkeypatch.setattr(experiments.decode, "load_models", no_loading)
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "empty"))
    args, fragment = {
        "medusa": (["drafter=medusa", f"drafter.heads={tmp_path / 'nowhere'}"], "no Medusa heads at"),
        "eagle_default": (["drafter=eagle", "drafter.version=eagle3"], "train_eagle version=eagle3 zoo_size=micro"),
        "hybrid_second": (["drafter=hybrid", f"drafter.second.heads={tmp_path / 'nowhere'}"],
                          f"no EAGLE heads at '{tmp_path / 'nowhere'}'"),
    }[case]
    code, err = main_in_process(monkeypatch, capsys, "model=zoo_micro", *args, "num_prompts=1", "warmup=0",
                                "costs=false", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    error_line(err, 2, code, fragment)
    assert "the directory does not exist" in err


def test_empty_heads_mean_the_default_directory_as_for_the_drafter(tmp_path):
    """``check_files`` reads ``heads`` as the constructor does: empty is the zoo pair's default directory, and the
    drafter built with it names the command that trains that directory's heads (it named none for empty)."""
    from drafters import MedusaDrafter

    for drafter, loaded in ((EagleDrafter, "head"), (MedusaDrafter, "heads")):
        missing = f"no .* at '{tmp_path}/.*zoo-micro'.*zoo_size=micro cache_dir={tmp_path}`"
        with pytest.raises(SpecDecError, match=missing):
            drafter.check_files({"heads": "", "zoo_size": "micro", "cache_dir": str(tmp_path)})
        with pytest.raises(SpecDecError, match=missing):
            getattr(drafter(heads="", zoo_size="micro", cache_dir=str(tmp_path)), loaded)


def test_a_version_mismatch_names_the_training_for_the_heads_own_target():
    """A micro head's version mismatch suggested training for the default pair (no ``zoo_size=micro``)."""
    from drafters.head_files import target_options

    assert target_options({"zoo_size": "micro", "target": "/c/zoo/micro/target"}) == " zoo_size=micro"
    assert target_options({"zoo_size": "default", "target": "/c/zoo/default/target"}) == ""
    assert target_options({"pretrained": "smollm2", "target": "/c/models/smollm2"}) == " target=smollm2"
    assert target_options({"target": "/my/model"}) == " target=/my/model" and target_options({}) == ""
    own = {"target": "/my/model", "tokenizer": "/my/tok"}
    assert target_options(own) == " target=/my/model tokenizer=/my/tok"  # it dropped the tokenizer trained with
    assert target_options({"target": "/my/model", "tokenizer": "/my/model"}) == " target=/my/model"
