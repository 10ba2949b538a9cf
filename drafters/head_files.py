"""Draft heads on disk (Medusa's, EAGLE's): safetensors tensors plus a JSON config that names the target.

A heads directory holds ``<weights file>`` (the trained tensors, safetensors), ``<config file>``
(shape, format version and the target's fingerprint) and, after training, ``eval.json``. Every
head type describes its files with a :class:`HeadFormat`; the functions here write them atomically,
read them back with one clear error per problem (missing directory or file, unreadable JSON or
safetensors, a missing tensor, a tensor of the wrong shape, NaN/inf weights) and check that the
heads belong to the target they are used with (:func:`check_target`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import SpecDecError
from specdec.files import atomic_write, atomic_write_json
from specdec.models import text_config

EVAL_FILE = "eval.json"
PROBE_POINTS = 16  # weight values sampled per probed tensor for the fingerprint


HEADS_OPTION = "drafter.heads (drafter.second.heads under drafter=hybrid)"  # where errors send the heads' directory


@dataclass(frozen=True)
class HeadFormat:
    """How one kind of head is stored and where errors send the user.

    Attributes:
        label: the heads' name in messages (``"Medusa heads"``).
        weights_file, config_file: file names inside a heads directory.
        format: the config's ``format`` value this code reads and writes.
        train_command: the command that trains such heads (named in every error).
        error: the :class:`SpecDecError` subclass raised for these heads.
        required: config keys a valid config has.
    """

    label: str
    weights_file: str
    config_file: str
    format: int
    train_command: str
    error: type
    required: tuple[str, ...]

    def retrain(self) -> str:
        return f"retrain with `{self.train_command}`"


# --------------------------------------------------------------------------- target fingerprint


def _probe(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    # float32 linspace can round past the end of a tensor of more than 2**24 values: clamp (earlier indices unchanged)
    idx = torch.linspace(0, flat.numel() - 1, PROBE_POINTS).round().long().clamp_(max=flat.numel() - 1).to(flat.device)
    return [float(x) for x in flat[idx].float().cpu()]


def target_fingerprint(target) -> dict:
    """Identify a target: its shape (config fields) plus a sha256 over them and sampled weight values.

    The sha256 covers the shape and sampled values of the output embedding and the first, middle and last
    parameter tensors (it names cache directories, so it stays as it was); ``norms``, the L2 norm of every
    parameter tensor, tells apart checkpoints that differ elsewhere (one layer's MLP retrained), up to the
    rounding of a dtype round trip (:func:`same_target`).
    """
    config = text_config(target)
    out_emb = target.get_output_embeddings().weight
    shape = {"model_type": getattr(config, "model_type", None), "hidden_size": int(out_emb.shape[1]),
             "vocab_size": int(out_emb.shape[0]), "num_hidden_layers": getattr(config, "num_hidden_layers", None),
             "num_attention_heads": getattr(config, "num_attention_heads", None),
             "intermediate_size": getattr(config, "intermediate_size", None)}
    params = [p for _, p in target.named_parameters()]
    probe = _probe(out_emb) + [v for i in sorted({0, len(params) // 2, len(params) - 1}) for v in _probe(params[i])]
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    digest.update(torch.tensor(probe, dtype=torch.float32).numpy().tobytes())
    name = getattr(config, "_name_or_path", "") or getattr(target.config, "_name_or_path", "")
    norms = [float(torch.linalg.vector_norm(p.detach(), dtype=torch.float32)) for p in params]
    return {**shape, "name_or_path": str(name), "sha256": digest.hexdigest(), "probe": probe, "norms": norms}


def describe_target(info: dict) -> str:
    """A one-line description of a fingerprint, for error messages."""
    name = f"{info.get('name_or_path')!r}, " if info.get("name_or_path") else ""
    return (f"{name}{info.get('model_type')}, hidden {info.get('hidden_size')}, vocab {info.get('vocab_size')}, "
            f"fingerprint {str(info.get('sha256', '?'))[:12]}")


def same_target(recorded: dict, actual: dict) -> bool:
    """True if ``actual`` is the target ``recorded`` describes (same shape; same weights up to dtype rounding). A
    fingerprint written before ``norms`` existed is compared by its sampled values only."""
    if "norms" in recorded and "norms" in actual:
        a, b = torch.tensor(recorded["norms"]), torch.tensor(actual["norms"])
        if a.shape != b.shape or not bool(torch.allclose(a, b, rtol=1e-2, atol=1e-3)):
            return False
    if recorded.get("sha256") == actual.get("sha256"):
        return True
    keys = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if any(recorded.get(k) != actual.get(k) for k in keys):
        return False
    a, b = torch.tensor(recorded.get("probe", [])), torch.tensor(actual.get("probe", []))
    return a.shape == b.shape and a.numel() > 0 and bool(torch.allclose(a, b, rtol=1e-2, atol=1e-3))  # fp16/bf16 copies


def target_options(training: dict) -> str:
    """The training command's options that train for the target a head's ``training`` record names (`` zoo_size=micro``,
    `` target=<dir>``, with `` tokenizer=<dir>`` when such a target was trained with a tokenizer of its own; a zoo
    pair's own tokenizer is assumed; empty for the embedded default pair or an unknown target)."""
    if training.get("zoo_size") and not training.get("pretrained"):
        return "" if training["zoo_size"] == "default" else f" zoo_size={training['zoo_size']}"
    if not training.get("target"):
        return ""
    tokenizer = training.get("tokenizer")
    own = f" tokenizer={tokenizer}" if tokenizer and tokenizer != training["target"] else ""
    return f" target={training.get('pretrained') or training['target']}{own}"


def check_target(fmt: HeadFormat, hidden_size: int, vocab_size: int, recorded: dict, source: str | None,
                 target, fix: str | None = None) -> None:
    """Raise ``fmt.error`` unless heads of this shape, trained for ``recorded``, fit ``target`` (``fix``: what the
    error tells to do, by default to train heads for it and pass them as the drafter's heads)."""
    actual = target_fingerprint(target)
    where = f"at {source} " if source else ""
    fix = fix or (f"train heads for this target with `{fmt.train_command} target=<target dir>` (or `zoo_size=...` for "
                  f"the embedded pair) and pass their directory as {HEADS_OPTION}")
    if hidden_size != actual["hidden_size"] or vocab_size != actual["vocab_size"]:
        raise fmt.error(
            f"{fmt.label} {where}have hidden size {hidden_size} and vocabulary {vocab_size}, the target "
            f"has {actual['hidden_size']} and {actual['vocab_size']}: they belong to another model; {fix}")
    if recorded and not same_target(recorded, actual):
        raise fmt.error(
            f"{fmt.label} {where}were trained for another target ({describe_target(recorded)}), not this one "
            f"({describe_target(actual)}); {fix}")


# --------------------------------------------------------------------------- saving and loading


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SPECDEC_CACHE``, else ``~/.cache/specdec``."""
    if cache_dir is None:
        env = os.environ.get("SPECDEC_CACHE")
        cache_dir = Path(env).expanduser() if env else Path.home() / ".cache" / "specdec"
    return Path(cache_dir).expanduser()


def save_files(fmt: HeadFormat, module: torch.nn.Module, config: dict, directory: str | os.PathLike,
               evaluation: dict | None = None) -> Path:
    """Write ``module``'s state dict and ``config`` to ``directory`` (created if needed): tensors, then
    the eval report, then the config (last). Each file is replaced atomically."""
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in module.state_dict().items()}  # weights in float32; index tensors keep their type
    atomic_write(directory / fmt.weights_file, lambda tmp: save_file(tensors, tmp, metadata={"format": str(fmt.format)}))
    if evaluation is not None:
        atomic_write_json(directory / EVAL_FILE, evaluation)
    atomic_write_json(directory / fmt.config_file, {"format": fmt.format, **config})
    return directory


def missing(fmt: HeadFormat, directory: Path, what: str, how: str) -> SpecDecError:
    """The error for a heads directory that is not there (``how``: the training command and its options); one
    holding a training checkpoint only says that training has not finished."""
    if (directory / "checkpoint.pt").is_file():
        what += ("; a checkpoint.pt is there: the training writing them has not finished (rerun its command: it "
                 "goes on from the checkpoint)")
    return fmt.error(
        f"no {fmt.label} at {str(directory)!r} ({what}): train them with {how}, or point {HEADS_OPTION} at a "
        f"directory holding {fmt.config_file} and {fmt.weights_file}")


def zoo_training_command(fmt: HeadFormat, zoo_size: str, cache_dir: str | os.PathLike | None = None,
                         extra: str = "") -> str:
    """The exact command that trains ``fmt``'s heads for the embedded ``zoo_size`` pair into the directory a
    drafter with ``heads=null`` reads (``extra``: more options, e.g. ``version=eagle3``)."""
    options = " ".join(o for o in (extra, f"zoo_size={zoo_size}", f"cache_dir={cache_dir}" if cache_dir else "") if o)
    took = " (a few minutes at most on a CPU)" if zoo_size == "micro" else ""
    return f"`{fmt.train_command} {options}`{took}"


def check_default_dir(fmt: HeadFormat, directory: Path, zoo_size: str, cache_dir=None, extra: str = "") -> None:
    """Raise the missing-heads error, naming :func:`zoo_training_command`, if ``directory`` (the default heads
    directory of the ``zoo_size`` pair) does not exist."""
    if not directory.exists():
        raise missing(fmt, directory, "the directory does not exist",
                      zoo_training_command(fmt, zoo_size, cache_dir, extra))


@dataclass(frozen=True)
class HeadsPlace:
    """Where a drafter reads its heads: ``directory``, and for the embedded pair's default directory (``heads``
    null or empty) the pair it belongs to, ``zoo`` = (``zoo_size``, ``cache_dir``), so that a missing default
    names the exact command that trains it (``extra``: that command's other options, e.g. ``version=eagle3``)."""

    directory: Path
    zoo: tuple | None = None
    extra: str = ""

    def check(self, fmt: HeadFormat, how: str) -> None:
        """Raise ``fmt``'s missing-heads error now if the heads are not there: for the default directory its
        training command (:func:`check_default_dir`), else :func:`read_config`'s errors (``how``: how to train)."""
        if self.zoo is not None:
            check_default_dir(fmt, self.directory, *self.zoo, extra=self.extra)
        else:
            read_config(fmt, self.directory, how)


def heads_place(heads, default, zoo_size: str = "default", cache_dir=None, extra: str = "") -> HeadsPlace:
    """The :class:`HeadsPlace` of a drafter's ``heads`` setting (a directory; null or empty: ``default(zoo_size,
    cache_dir)``, the embedded ``zoo_size`` pair's heads directory), as its constructor and ``check_files`` read it."""
    if heads:
        return HeadsPlace(Path(heads).expanduser())
    return HeadsPlace(default(zoo_size, cache_dir), (zoo_size, cache_dir), extra)


def read_config(fmt: HeadFormat, directory: str | os.PathLike, how: str) -> dict:
    """The parsed config of a heads directory (``fmt.error`` if absent, unreadable or of another format)."""
    directory = Path(directory).expanduser()
    if directory.is_file():
        raise fmt.error(f"{str(directory)!r} is a file: point {HEADS_OPTION} at the directory that holds "
                        f"{fmt.config_file} and {fmt.weights_file} ({str(directory.parent)!r}?)")
    if not directory.is_dir():
        raise missing(fmt, directory, "the directory does not exist", how)
    path = directory / fmt.config_file
    if not path.is_file():
        raise missing(fmt, directory, f"{fmt.config_file} is missing", how)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise fmt.error(f"{path} is unreadable or not valid JSON ({exc}); {fmt.retrain()}") from exc
    if not isinstance(config, dict) or config.get("format") != fmt.format or any(k not in config for k in fmt.required):
        raise fmt.error(f"{path} is not a format-{fmt.format} {fmt.label} config (needs {fmt.required}); "
                        f"{fmt.retrain()}")
    return config


def read_eval(directory: str | os.PathLike) -> dict | None:
    """The ``eval.json`` report of a heads directory, or None if there is none (or it is unreadable)."""
    path = Path(directory).expanduser() / EVAL_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def load_into(fmt: HeadFormat, module: torch.nn.Module, directory: str | os.PathLike, shape_note: str, how: str):
    """Load the weights file of ``directory`` into ``module`` (every tensor of its state dict required).

    ``shape_note`` says what the config declares (for the message on a missing tensor). Raises
    ``fmt.error`` for a missing, unreadable or incomplete file or a tensor of the wrong shape, and
    :class:`specdec.checkpoints.CheckpointError` for NaN/inf weights. Returns ``module`` in eval mode.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from specdec.checkpoints import check_finite_weights

    directory = Path(directory).expanduser()
    weights = directory / fmt.weights_file
    if not weights.is_file():
        raise missing(fmt, directory, f"{fmt.weights_file} is missing", how)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise fmt.error(f"{fmt.label} file {weights} is not a readable safetensors file ({exc}); copy it again or "
                        f"{fmt.retrain()}") from exc
    expected = module.state_dict()
    for key, value in expected.items():
        if key not in tensors:
            raise fmt.error(f"{weights} lacks tensor {key!r} ({fmt.config_file} says {shape_note}): the file is "
                            f"incomplete or corrupt; copy it again or {fmt.retrain()}")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise fmt.error(
                f"{weights}: tensor {key!r} has shape {tuple(tensors[key].shape)}, {fmt.config_file} implies "
                f"{tuple(value.shape)}; the config and tensors do not belong together: {fmt.retrain()}")
    module.load_state_dict({k: tensors[k] for k in expected})
    check_finite_weights(module, fmt.label, weights)
    return module.eval()
