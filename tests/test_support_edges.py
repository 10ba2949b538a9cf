"""Edges of the support modules that the other tests reach only indirectly: atomic files and the run lock
(:mod:`specdec.files`), keyed random numbers (:mod:`specdec.rng`), checkpoint diagnostics
(:mod:`specdec.checkpoints`) and the lean draft forward (:mod:`drafters.fast_decoder`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from specdec.files import atomic_write, atomic_write_json, held_lock


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    """A write that fails halfway (a crash while serialising) leaves the previous file whole and no stray
    ``.name.*.tmp`` beside it (a directory of results is scanned later; stray files pile up)."""
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"old": 1})

    def half_then_fail(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"new": ')
        raise RuntimeError("planted: killed mid-write")

    with pytest.raises(RuntimeError, match="planted"):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text(encoding="utf-8")) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_json_options_override_the_default_layout(tmp_path):
    """``atomic_write_json(..., indent=1)`` (cost curves are written that way) takes the caller's layout over the
    default ``indent=2``."""
    path = tmp_path / "curve.json"
    atomic_write_json(path, {"a": [1]}, indent=1)
    assert path.read_text(encoding="utf-8") == '{\n "a": [\n  1\n ]\n}\n'


def test_the_lock_file_names_only_its_current_holder(tmp_path):
    """The lock file records the pid of the process holding it, alone: after earlier holders it is not a list
    of every pid that ever held it (the waiting message shows the file's content)."""
    lock = tmp_path / ".run.lock"
    lock.write_text("9999999\nleft over by a killed holder\n", encoding="utf-8")
    for _ in range(2):
        with held_lock(lock, lambda pid: f"waiting for {pid}"):
            assert lock.read_text(encoding="utf-8") == f"{os.getpid()}\n"


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_process_waits_for_the_holder_and_is_told_who_it_is(tmp_path):
    """The lock is exclusive: a second process asking for it prints ``waiting(pid)`` with the holder's pid and
    only enters once the holder lets go."""
    lock, ready, entered = tmp_path / ".run.lock", tmp_path / "ready", tmp_path / "entered"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = os.path.join(root, "specdec", "files.py")
    child = (f"import importlib.util, pathlib, sys, time\n"  # the module alone: no torch import in the child
             f"spec = importlib.util.spec_from_file_location('files', {source!r})\n"
             f"files = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(files)\n"
             f"held_lock = files.held_lock\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             f"with held_lock({str(lock)!r}, lambda pid: 'waiting for ' + pid, sys.stdout):\n"
             f"    pathlib.Path({str(entered)!r}).write_text(str(time.time()))\n")
    with held_lock(lock, lambda pid: f"waiting for {pid}"):
        proc = subprocess.Popen([sys.executable, "-c", child], cwd=root, stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # time for it to ask for the lock
        assert not entered.exists()  # still held here: the child waits
        released = time.time()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.splitlines()[0] == f"waiting for {os.getpid()}"
    assert float(entered.read_text()) >= released


def test_the_smallest_keyed_uniform_is_not_zero():
    """The exponential race divides by ``-log(u)``: ``u`` must never be 0 (``-log`` infinite, every token's key
    0). The key below is one whose hash has its top 24 bits all zero: the smallest value a draw can take."""
    from specdec.rng import uniform

    u = uniform(torch.tensor([1744053]))  # [1]
    assert float(u) > 0.0 and torch.isfinite(-torch.log(u)).all()


def test_the_largest_keyed_uniform_is_below_one_and_never_draws_an_impossible_token():
    """A hash whose top 24 bits are all ones gave ``u = 1.0`` exactly (float32 rounds ``(2^24 - 0.5) / 2^24`` up):
    ``-log u`` was 0, a probability-0 token's race key 0/0 = NaN won the argmax, and a positive one's could not win.
    About one zero-probability token in 2^24 per draw: with top-k or top-p over a 49152-token vocabulary, 0.3% of
    sampled draws (found by the sixth mutation pass)."""
    from specdec.rng import EXTRA, KeyedRandom, uniform

    assert float(uniform(torch.tensor([13985624]))) < 1.0  # that key's top 24 bits are all ones
    probs = torch.zeros(1, 4096)  # [1, V]
    probs[0, 7] = 1.0  # all mass on token 7; seed 4643's race holds a key of u = 1 at token 290
    assert KeyedRandom.for_seed(4643).categorical(probs, EXTRA).tolist() == [7]
    assert KeyedRandom.for_seed(4643).top_without_replacement(probs, 1, EXTRA).tolist() == [[7]]


def test_a_sharded_checkpoints_non_finite_weight_is_traced_to_its_shard(tmp_path):
    """A NaN weight is reported with the file that holds it. In a sharded checkpoint the index may name the tensor
    with or without the ``model.`` prefix the loaded module's parameter name has (a causal LM's ``model.layers...``
    against a base model's ``layers...``): either way the error names the right shard, not the directory."""
    from specdec.checkpoints import weights_file

    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    assert weights_file(tmp_path, "model.embed_tokens.weight").name == "model-00001-of-00002.safetensors"
    assert weights_file(tmp_path, "embed_tokens.weight").name == "model-00001-of-00002.safetensors"
    assert weights_file(tmp_path, "model.lm_head.weight").name == "model-00002-of-00002.safetensors"
    assert weights_file(tmp_path, "norm.weight") == tmp_path  # in no shard the index names: the directory


def test_why_a_checkpoint_did_not_load_is_named(tmp_path):
    """``load_failure`` turns a loader's error into the one the user can act on: a loader that asks for
    ``trust_remote_code`` (its config may name the code in ways other than ``auto_map``) is the remote-code
    error, and a directory of pickle weights of any usual suffix is named as such (they are not unpickled)."""
    from specdec.checkpoints import CheckpointError, RemoteCodeError, load_failure

    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    err = ValueError("Loading this model requires you to execute custom code; set trust_remote_code=True")
    assert isinstance(load_failure("target", str(tmp_path), err), RemoteCodeError)
    for name in ("pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"):
        directory = tmp_path / name.replace(".", "_")
        directory.mkdir()
        (directory / name).write_bytes(b"pickle")
        failure = load_failure("draft", str(directory), OSError("no file named model.safetensors"))
        assert isinstance(failure, CheckpointError) and f"has only pickle weights ({name})" in str(failure), name


def test_a_hub_id_that_the_hub_did_not_give_is_named_as_such(tmp_path, monkeypatch):
    """A hub id with no network: the model's and the tokenizer's errors say the name is no local directory and the
    hub did not give it (not that its tokenizer files are damaged: a new user's misreading, found by a trial); a
    tokenizer that needs a library not installed (sentencepiece) says so, not that its files are damaged."""
    import transformers

    from specdec.checkpoints import load_failure, not_local
    from specdec.errors import SpecDecError
    from specdec.models import load_tokenizer

    offline = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "is no local directory, so it was asked of the Hugging Face Hub" in str(load_failure("target", hub_id, offline))
    unknown = OSError("foo/bar is not a local folder and is not a valid model identifier listed on the hub")
    assert "no such repository" in str(load_failure("target", "foo/bar", unknown))
    assert not_local(str(tmp_path), offline) is None  # a local directory: its own files are the problem
    accelerate = ImportError("Using a device_map requires accelerate")  # the hub was never the problem
    assert "Hugging Face Hub" not in str(load_failure("target", hub_id, accelerate))

    def refuse(*args, **kwargs):
        raise offline
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(SpecDecError, match="no local directory, so it was asked of the Hugging Face Hub") as err:
        load_tokenizer(hub_id)
    assert "missing or damaged" not in str(err.value)
    (tmp_path / "tokenizer.json").write_text("{", encoding="utf-8")
    with pytest.raises(SpecDecError, match="missing or damaged"):  # a local directory: its files
        load_tokenizer(str(tmp_path))
    with pytest.raises(SpecDecError, match=r"tokenizer path '/no/such/dir' does not exist: .*\(tokenizer.json, "):
        load_tokenizer("/no/such/dir")  # a tokenizer's files, not a model's (config.json + *.safetensors)

    def need_library(*args, **kwargs):
        raise ImportError("LlamaTokenizer requires the SentencePiece library but it was not found: pip install "
                          "sentencepiece")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", need_library)
    with pytest.raises(SpecDecError, match="a library this tokenizer needs is not installed") as err:
        load_tokenizer(hub_id)  # not the hub's fault (the message names no hub miss), nor the files'
    assert "missing or damaged" not in str(err.value) and "sentencepiece" in str(err.value)


@pytest.mark.parametrize("n", [2, 3])
def test_the_lean_forward_of_a_short_block_is_causal(n):
    """A block fed without a key mask (a prompt chunk, a catch-up of two tokens) is causal in the lean forward as
    in the model's own: a token's logits do not depend on the tokens after it in the block."""
    from drafters.fast_decoder import fast_decoder, forward_lm
    from specdec.cache import SpecDecCache
    from tests.tiny_models import pair

    model = pair("llama")[1]
    assert fast_decoder(model) is not None
    positions = torch.arange(n)[None]  # [1, n]
    logits = []
    for last in (7, 9):
        ids = torch.tensor([[3, 4, 5][: n - 1] + [last]])  # [1, n]: only the last token differs
        fast, _ = forward_lm(model, ids, SpecDecCache.for_model(model, 8), positions, None, 0, True)  # [1, n, V]
        own, _ = forward_lm(model, ids, SpecDecCache.for_model(model, 8), positions, None, 0, False)  # [1, n, V]
        torch.testing.assert_close(fast, own, atol=2e-5, rtol=2e-5)
        logits.append(fast)
    torch.testing.assert_close(logits[0][:, :-1], logits[1][:, :-1], atol=1e-6, rtol=0)


def test_a_model_with_some_sliding_window_layers_takes_its_own_forward():
    """Qwen2 can slide its window in the upper layers only (``max_window_layers``): one sliding layer is enough
    for the lean forward (full attention only) to step aside."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from drafters.fast_decoder import fast_decoder, unsupported
    from tests.tiny_models import pair

    config = dict(pair("qwen2")[0].config.to_dict(), use_sliding_window=True, sliding_window=4, max_window_layers=1)
    config.pop("layer_types", None)
    model = Qwen2ForCausalLM(Qwen2Config(**config))  # 2 layers: the first full, the second sliding
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert not windows[0] and windows[-1]
    assert "sliding" in unsupported(model) and fast_decoder(model) is None


def test_a_model_with_another_activation_takes_its_own_forward():
    """The lean forward computes SiLU MLPs; a Llama-family model with another ``hidden_act`` runs its own forward
    (same logits as with ``fast=False``) instead of being computed with the wrong activation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from drafters.fast_decoder import fast_decoder, forward_lm, unsupported
    from specdec.cache import SpecDecCache
    from tests.tiny_models import pair

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(pair("llama")[1].config.to_dict(), hidden_act="gelu"))).eval()
    assert "hidden_act" in unsupported(model) and fast_decoder(model) is None
    ids, positions = torch.tensor([[3, 4, 5]]), torch.arange(3)[None]  # [1, 3] each
    fast, _ = forward_lm(model, ids, SpecDecCache.for_model(model, 8), positions, None, 0, True)  # [1, 3, V]
    own, _ = forward_lm(model, ids, SpecDecCache.for_model(model, 8), positions, None, 0, False)  # [1, 3, V]
    torch.testing.assert_close(fast, own)


def test_a_draft_vocabulary_breaks_frequency_ties_by_the_lower_id():
    """Tokens never seen in the data all tie at zero; the draft vocabulary fills up with the lowest of them (a
    deterministic choice: the same data gives the same vocabulary, whatever the sort's algorithm for the size)."""
    from drafters.draft_vocab import frequent_tokens

    ids = frequent_tokens([torch.tensor([[5, 5, 7]])], size=10, vocab=1000, always=[999])  # [10]
    assert ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 999]


def test_heads_for_another_vocabulary_are_refused_even_with_the_same_hidden_size():
    """Heads whose hidden size matches the target but whose vocabulary does not (another tokenizer of the same
    width) belong to another model: refused with both sizes named, before any of their logits are used."""
    from drafters.eagle_heads import FILES
    from drafters.head_files import check_target
    from tests.tiny_models import pair

    target = pair("llama")[0]
    hidden, vocab = target.get_output_embeddings().weight.shape[1], target.get_output_embeddings().weight.shape[0]
    check_target(FILES, hidden, vocab, {}, None, target)  # its own sizes: fine
    with pytest.raises(FILES.error, match=f"vocabulary {vocab + 1}, the target has {hidden} and {vocab}"):
        check_target(FILES, hidden, vocab + 1, {}, None, target)


def test_a_heads_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    """A heads file whose tensor does not fit the config's shape (files of two trainings mixed) fails with the
    heads' own error naming the tensor and both shapes, not torch's bare ``load_state_dict`` size mismatch."""
    from safetensors.torch import save_file

    from drafters.eagle_heads import FILES
    from drafters.head_files import load_into, save_files

    save_files(FILES, torch.nn.Linear(4, 3), {"hidden_size": 4}, tmp_path)
    save_file({"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}, str(tmp_path / FILES.weights_file))
    with pytest.raises(FILES.error, match=r"tensor 'weight' has shape \(3, 5\), eagle_config.json implies \(3, 4\)"):
        load_into(FILES, torch.nn.Linear(4, 3), tmp_path, "hidden 4", "train")


def test_a_heads_config_of_another_format_version_is_refused(tmp_path):
    """A heads directory written by another version of the format (its tensors may mean something else) is
    refused by its config's ``format``, even when every required key is there."""
    from drafters.eagle_heads import FILES
    from drafters.head_files import read_config

    config = {"format": FILES.format + 1, **{key: 1 for key in FILES.required if key != "format"}}
    (tmp_path / FILES.config_file).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(FILES.error, match=f"is not a format-{FILES.format} EAGLE heads config"):
        read_config(FILES, tmp_path, "train")
    (tmp_path / FILES.config_file).write_text(json.dumps({**config, "format": FILES.format}), encoding="utf-8")
    assert read_config(FILES, tmp_path, "train")["format"] == FILES.format


@pytest.mark.parametrize("threads", [True, 0, 2.0])
def test_a_thread_count_must_be_a_positive_integer(threads):
    """``num_threads=true`` in a config is a typo, not "one thread": it is refused naming the key, as 0 and a
    float are, and torch's thread count is left alone."""
    from specdec.errors import SpecDecError
    from specdec.models import set_threads

    before = torch.get_num_threads()
    with pytest.raises(SpecDecError, match="num_threads=.*give a number of CPU threads >= 1"):
        set_threads(threads)
    assert torch.get_num_threads() == before


def test_a_missing_nested_local_path_is_named_and_a_draft_dtype_defaults_to_the_targets(tmp_path):
    """``a/b/c`` cannot be a hub id (``owner/name``): a missing directory of that form fails early naming the path;
    ``owner/name`` passes (it may be on a hub). With no draft dtype set, the draft loads in the target's dtype."""
    from specdec.errors import SpecDecError
    from specdec.models import check_path, resolve_draft_dtype

    with pytest.raises(SpecDecError, match="target path 'runs/ckpt/final' does not exist"):
        check_path("runs/ckpt/final", "target")
    check_path("HuggingFaceTB/SmolLM2-135M", "target")
    assert resolve_draft_dtype(None, "bfloat16", "cpu") == "bfloat16"
    assert resolve_draft_dtype("float16", "bfloat16", "cpu") == "float16"


def test_a_file_given_for_a_directory_is_named_as_a_file(tmp_path):
    """A file where a directory belongs (``drafter.draft_tokenizer=README.md``) was said not to exist; the draft
    tokenizer's hint named model files (config.json + *.safetensors), not a tokenizer's."""
    from omegaconf import OmegaConf

    from experiments.models_from_config import drafter_paths
    from specdec.errors import SpecDecError
    from specdec.models import check_path

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    file = tmp_path / "tok" / "tokenizer.json"
    with pytest.raises(SpecDecError, match=rf"^target path '{file}' is a file, not a directory: .*\(config.json \+ "
                                           rf"\*.safetensors\), e.g. '{tmp_path / 'tok'}' if it holds them"):
        check_path(str(file), "target")
    node = OmegaConf.create({"_target_": "drafters.CrossTokenizerDrafter", "draft": "zoo:micro/draft",
                             "draft_tokenizer": str(file)})
    with pytest.raises(SpecDecError, match=r"^drafter.draft_tokenizer path .* is a file, not a directory: .*\(tokenizer"
                                           r".json, tokenizer_config.json, .* or spiece.model\)"):
        drafter_paths(node, build=False)
    with pytest.raises(SpecDecError, match=r"^drafter.draft_tokenizer path .* does not exist: .*\(tokenizer.json"):
        drafter_paths(OmegaConf.create({**node, "draft_tokenizer": str(tmp_path / "none")}), build=False)


def test_an_atomic_write_gives_the_file_the_mode_a_plain_write_would(tmp_path):
    """The temp file is made 0600: moved onto the target as it was, every result, summary and cache file of a shared
    directory was unreadable by the others (a mutation pass found it); a new file gets the umask's mode, a
    rewritten one keeps its own."""
    from specdec.files import atomic_write_text

    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.json"
        plain.write_text("{}\n", encoding="utf-8")
        atomic = tmp_path / "summary.json"
        atomic_write_json(atomic, {"tau": 2.0})
        assert oct(atomic.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777) == "0o644"
        plain.chmod(0o640)
        atomic_write_text(plain, "{}\n")
        assert oct(plain.stat().st_mode & 0o777) == "0o640"
    finally:
        os.umask(old)
