"""Loading Hugging Face models safely, the in-memory tiny random pair, and compatibility checks."""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from specdec.errors import SpecDecError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt_neox")
log = logging.getLogger(__name__)


def text_config(model):
    """The config of ``model``'s language model (a multimodal model's text part; else its own config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(model) -> int | None:
    """The model's maximum context (``max_position_embeddings``), or None if it declares none (or has no config)."""
    return getattr(text_config(model), "max_position_embeddings", None) if hasattr(model, "config") else None


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SpecDecError(f"dtype={name!r} is unknown; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 matmuls (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: a CUDA GPU of compute capability 8.0 or later, or a CPU
    with AVX512-BF16/AMX."""
    device = torch.device(device)
    if device.type == "cuda":  # compute capability 8 (Ampere) and later; earlier GPUs only emulate bf16
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_has_bf16()


#: ``auto`` on a CPU with native bf16 matmuls: the rows (a draft's forward) at which a module's matrix products are
#: timed in bfloat16 against its own dtype (bfloat16 must be :func:`specdec.timing.clearly_faster`). On a Xeon
#: with AMX (torch 2.13) a one-row bf16 product of a small matrix cost 20-30 us more than float32's, and the embedded
#: draft's forward took 1.37 ms in bf16 against 1.12 ms (2026-12-06): native is not the same as faster.
AUTO_BF16_ROWS = (1, 4)
#: ``auto``'s decisions in this process: (shapes and counts, dtype, threads) -> bfloat16 or not.
_DECIDED: dict = {}


def auto_dtype(module: torch.nn.Module | None, device: str | torch.device, dtype: torch.dtype,
               what: str = "draft model") -> torch.dtype:
    """What ``auto`` runs ``module`` (``what``: a draft model, a drafter's head) in on ``device`` instead of ``dtype``
    (its target's): bfloat16 on a GPU with native bf16; on a CPU with native bf16 matmuls, bfloat16 only if
    ``module``'s matrix products (:func:`matmul_weights`) take under :data:`specdec.timing.MARGIN` of their time in
    ``dtype`` at :data:`AUTO_BF16_ROWS` rows (timed once per shapes, dtype and thread count in a process, on the
    module's own weights, logged); else ``dtype``."""
    device = torch.device(device)
    if not has_native_bf16(device) or dtype == torch.bfloat16:
        return dtype
    if device.type != "cpu":
        return torch.bfloat16
    weights = matmul_weights(module) if module is not None else {}
    if not weights:
        return dtype
    key = (tuple(sorted((shape, count) for shape, (_, count) in weights.items())), dtype, torch.get_num_threads())
    if key not in _DECIDED:
        from specdec.timing import clearly_faster

        seconds = _dtype_seconds(weights, (dtype, torch.bfloat16))
        _DECIDED[key] = clearly_faster(seconds[torch.bfloat16], seconds[dtype])
        log.info("%s dtype (auto): %s; seconds of its matrix products at %s rows: %s", what,
                 "bfloat16" if _DECIDED[key] else _name(dtype), AUTO_BF16_ROWS,
                 {_name(d): round(v, 6) for d, v in seconds.items()})
    return torch.bfloat16 if _DECIDED[key] else dtype


def cast_module(module: torch.nn.Module, dtype: torch.dtype, device: str | torch.device | None = None):
    """``module.to(device, dtype)``, except that rotary frequencies (``inv_freq`` buffers) stay float32, as they are
    in a model loaded in ``dtype`` (``from_pretrained(dtype=...)``): rounded to bf16 they would shift every
    position's angle (about half a radian near position 500), and a draft cast after loading would draft other
    tokens than the same draft loaded in bf16."""
    keep = {name: buf.float() for name, buf in module.named_buffers() if name.endswith("inv_freq")}
    module.to(device=device, dtype=dtype)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        holder = module.get_submodule(owner)
        setattr(holder, attr, buf.to(getattr(holder, attr).device))
    return module


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def matmul_weights(module: torch.nn.Module) -> dict[tuple[int, int], tuple[torch.Tensor, int]]:
    """``{(out, in): (one weight of that shape, how many products of it)}`` over ``module``'s ``nn.Linear``
    layers and modules that name the matrix they multiply by ``matmul_weight`` (a draft-vocabulary LM head)."""
    found: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    for sub in module.modules():
        weight = sub.weight if isinstance(sub, torch.nn.Linear) else getattr(sub, "matmul_weight", None)
        if weight is not None:
            first, count = found.get(tuple(weight.shape), (weight, 0))
            found[tuple(weight.shape)] = (first, count + 1)
    return found


def _dtype_seconds(weights: dict[tuple[int, int], tuple[torch.Tensor, int]], dtypes: tuple[torch.dtype, ...]) -> dict:
    """``{dtype: seconds}``: one ``F.linear`` by each weight at each of :data:`AUTO_BF16_ROWS` rows, times how many
    products of its shape there are, summed. One shape at a time (a copy of its weight per dtype, then freed), the
    dtypes in turns (:func:`specdec.timing.fastest_seconds`)."""
    from specdec.timing import fastest_seconds

    total = dict.fromkeys(dtypes, 0.0)
    with torch.random.fork_rng(devices=[]):  # the run's random stream is the same whether this ran or was cached
        inputs = {(shape, rows): torch.randn(rows, shape[1]) for shape in weights for rows in AUTO_BF16_ROWS}
    with torch.no_grad():
        for shape, (weight, count) in weights.items():
            copies = {dt: weight.detach().to(dt) for dt in dtypes}  # [out, in]; the module's own where dtypes agree
            calls = {(dt, rows): functools.partial(F.linear, inputs[shape, rows].to(dt), copies[dt])
                     for rows in AUTO_BF16_ROWS for dt in dtypes}
            for (dt, _), seconds in fastest_seconds(calls).items():
                total[dt] += seconds * count
    return total


def resolve_draft_dtype(draft_dtype: str | None, dtype: str, device: str, key: str = "model.draft_dtype") -> str:
    """The dtype name to load a draft model in.

    ``None`` means the target's ``dtype``; ``auto`` means ``bfloat16`` on a GPU with bf16 and ``dtype`` elsewhere,
    where :func:`auto_dtype` then decides on the loaded draft (on a CPU with native bf16 matmuls, bfloat16 if
    measured faster). A draft's precision never changes what is emitted (the target verifies every token); it
    changes how often drafts are accepted and what they cost. ``key`` names the setting in the error.
    """
    check_dtype_choice(draft_dtype, key)
    if draft_dtype is None:
        return dtype
    if draft_dtype == "auto":
        return "bfloat16" if has_native_bf16(device) and torch.device(device).type != "cpu" else dtype
    return draft_dtype


def check_device(device: str | torch.device, key: str = "model.device") -> torch.device:
    """``device`` as a :class:`torch.device`, or :class:`SpecDecError` naming ``key`` when it is not a device name
    or is not present here (CUDA without a GPU or a CUDA build of torch, an index past the last GPU, MPS off a Mac)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise SpecDecError(f"{key}={device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecDecError(f"{key}={device}: no CUDA GPU is visible to this torch build "
                               f"({torch.__version__}); use {key}=cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SpecDecError(f"{key}={device}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0 .. "
                               f"cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SpecDecError(f"{key}={device}: MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise SpecDecError(f"{key}={device}: this framework runs on cpu, cuda or mps")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s kind of accelerator: every visible CUDA GPU (a target spread
    over several by ``device_map`` runs on each), so a timer read after it counts all of a phase; no-op on the CPU."""
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def set_threads(threads: int | None, key: str = "num_threads") -> None:
    """``torch.set_num_threads(threads)``; None keeps torch's default; below 1 is a :class:`SpecDecError` naming ``key``."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SpecDecError(f"{key}={threads}: give a number of CPU threads >= 1 (or null for torch's default)")
    torch.set_num_threads(threads)


def check_dtype_choice(choice: str | None, key: str) -> None:
    """Raise :class:`SpecDecError` naming ``key`` unless ``choice`` is None, ``auto`` or a dtype name."""
    if choice is not None and choice != "auto" and choice not in DTYPES:
        raise SpecDecError(f"{key}={choice!r} is unknown; choose null, auto or one of {sorted(DTYPES)}")


def head_dtype(choice: str | None, target_dtype: torch.dtype, device: str | torch.device,
               key: str = "drafter.dtype", *, head: torch.nn.Module | None = None) -> torch.dtype:
    """The torch dtype of a drafter's ``head`` on a target of ``target_dtype``: None = the target's, ``auto`` =
    :func:`auto_dtype` (bfloat16 on a GPU with bf16, or on a CPU where ``head``'s matrix products measure faster
    in it; else the target's), or the named dtype."""
    check_dtype_choice(choice, key)
    if choice is None:
        return target_dtype
    if choice == "auto":
        return auto_dtype(head, device, target_dtype, "drafter head")
    return DTYPES[choice]


def check_path(path: str, what: str, holds: str = "config.json + *.safetensors") -> None:
    """Fail early, naming the path, when a local directory is missing (a hub id passes); ``holds``: the files such a
    directory has."""
    expanded = os.path.expanduser(path)
    hub_like = not path.startswith(("/", ".", "~")) and path.count("/") <= 1
    if os.path.isfile(expanded):
        raise SpecDecError(f"{what} path {path!r} is a file, not a directory: point it at the directory written by "
                           f"save_pretrained ({holds}), e.g. {os.path.dirname(os.path.abspath(expanded))!r} if it "
                           "holds them")
    if not os.path.isdir(expanded) and not hub_like:
        raise SpecDecError(
            f"{what} path {path!r} does not exist: point it at a directory written by save_pretrained "
            f"({holds}), or at a hub id when a hub is reachable"
        )


def check_checkpoint_dir(path: str, what: str) -> None:
    """Fail early, naming ``what`` (a role or a config key) and the path, when a local checkpoint directory is
    missing or holds no saved model (no ``config.json``; weights that fail to load are named by
    :func:`specdec.checkpoints.load_failure`)."""
    check_path(path, what)
    expanded = os.path.expanduser(path)
    if not os.path.isdir(expanded):  # a hub id
        return
    if not os.path.isfile(os.path.join(expanded, "config.json")):
        raise SpecDecError(f"{what} path {path!r} holds no config.json, so no saved model: point it at a directory "
                           "written by save_pretrained (config.json + *.safetensors)")


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                   device_map: str | dict | None = None, role: str = "model"):
    """``AutoModelForCausalLM.from_pretrained`` with safetensors only, in eval mode on ``device``.

    ``device_map`` (e.g. ``"auto"``, needs ``accelerate``) spreads a model too large for one device
    over several; ``device`` is then ignored. ``role`` (``target``, ``draft``) names the checkpoint in
    errors. Raises :class:`SpecDecError` naming the path when the checkpoint is missing, and
    :class:`specdec.checkpoints.CheckpointError` naming the file when one is truncated or holds NaN/inf
    weights; :class:`specdec.checkpoints.RemoteCodeError` when it needs ``trust_remote_code``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from specdec.checkpoints import check_finite_weights, load_failure

    check_checkpoint_dir(path, role)
    extra = {"device_map": device_map} if device_map is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(path), dtype=_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
            **extra,
        )
    except (OSError, ValueError, ImportError, SafetensorError) as err:
        if isinstance(err, SpecDecError):
            raise
        raise load_failure(role, path, err) from err
    check_finite_weights(model, role, path)
    return (model if device_map is not None else model.to(device)).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
#: What a tokenizer directory holds, as errors say it.
TOKENIZER_HOLDS = f"{', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}"


def load_tokenizer(path: str, trust_remote_code: bool = False, elsewhere: str = "", what: str = "tokenizer"):
    """``AutoTokenizer.from_pretrained`` with a clear error for a missing path or unreadable tokenizer files.

    ``elsewhere`` names the option that points at a tokenizer kept in another directory; the error for a
    local directory without tokenizer files suggests it. ``what`` names the path in the error for a missing one.
    """
    from transformers import AutoTokenizer

    from specdec.checkpoints import RemoteCodeError, not_local

    check_path(path, what, holds=TOKENIZER_HOLDS)
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded) and not any(os.path.exists(os.path.join(expanded, f)) for f in TOKENIZER_FILES):
        fix = f"pass {elsewhere}=<the directory that holds it>" if elsewhere else "save it there with save_pretrained"
        raise SpecDecError(f"{path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {fix}")
    try:
        return AutoTokenizer.from_pretrained(expanded, trust_remote_code=trust_remote_code)
    except Exception as err:  # tokenizers raises plain Exceptions for a damaged tokenizer.json
        if "trust_remote_code" in str(err):
            raise RemoteCodeError("tokenizer", path) from err
        detail = " ".join(str(err).split())
        cause = not_local(path, err) or _tokenizer_cause(err)
        raise SpecDecError(f"could not load the tokenizer from {path!r} ({type(err).__name__}: {detail}): "
                           f"{cause}") from err


def _tokenizer_cause(err: BaseException) -> str:
    """What to do about a tokenizer that failed to load for a reason other than the hub: a library it needs is
    missing (an ImportError, or transformers saying which package to install), else damaged or missing files."""
    text = str(err).lower()
    if isinstance(err, ImportError) or any(says in text for says in ("pip install", "requires the", "need to have")):
        return "a library this tokenizer needs is not installed: install the one the message names (pip install ...)"
    return ("its tokenizer files (tokenizer.json, tokenizer_config.json) are missing or damaged; save them again "
            "with save_pretrained")


def tokenizer_or_none(path: str, trust_remote_code: bool = False):
    """The tokenizer saved in the directory ``path`` (e.g. a draft's, to compare with the target's), or None where it
    holds none or none that loads."""
    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    except SpecDecError:
        return None


def vocab_size(model) -> int:
    """Rows of the output embedding: the size of the distributions the model emits (a draft vocabulary
    head, :class:`drafters.draft_vocab.DraftVocabHead`, emits the whole vocabulary's)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "vocab", None) or head.weight.shape[0])


def check_same_vocab(target, draft) -> None:
    """Raise :class:`SpecDecError` unless draft and target emit distributions over the same vocabulary."""
    vt, vd = vocab_size(target), vocab_size(draft)
    if vt != vd:
        raise SpecDecError(
            f"draft model vocabulary ({vd} tokens) does not match the target's ({vt} tokens): the draft must "
            "share the target's tokenizer; pick a draft from the same model family or use drafter=ngram (if the "
            "two share one tokenizer and only their LM heads' padding rows differ, save that tokenizer with the "
            f"draft, or pass drafters.vocab_padding.padded_to(draft, {vt}))"
        )


def byte_tokenizer():
    """A real byte-level tokenizer (256 byte tokens + ``<|endoftext|>``), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _tiny_config(arch: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, eos: int):
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=2048, eos_token_id=eos, bos_token_id=eos,
                  tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=kv_heads, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=kv_heads, **common)
    if arch == "mistral":
        return MistralConfig(num_key_value_heads=kv_heads, sliding_window=None, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **common)
    raise SpecDecError(f"tiny_random arch={arch!r} is unknown; choose one of {TINY_ARCHS}")


def tiny_random_pair(arch: str = "llama", seed: int = 0, vocab: int | None = None, hidden: int = 64, layers: int = 2):
    """A small randomly initialised (target, draft, tokenizer) built in memory, for smoke runs and tests.

    The target has ``layers`` layers of width ``hidden``; the draft one layer of half the width.
    Both use a byte-level tokenizer (257 tokens) unless ``vocab`` is given (then no tokenizer: None).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = byte_tokenizer() if vocab is None else None
    vocab = len(tokenizer) if vocab is None else vocab
    eos = vocab - 1
    models = []
    for i, (h, n_layers, heads, kv) in enumerate(((hidden, layers, 4, 2), (hidden // 2, 1, 2, 1))):
        torch.manual_seed(seed * 2 + i)
        config = _tiny_config(arch, vocab, h, n_layers, heads, kv, eos)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
        models.append(model)
    return models[0], models[1], tokenizer
