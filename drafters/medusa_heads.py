"""Medusa heads (Cai et al. 2024, arXiv 2401.10774): extra decoding heads over the target's last hidden state.

Head ``i`` (0-based) reads the target's final hidden state ``h_t`` (after the final norm) at the
position of the last accepted token ``x_t`` and predicts the token ``i + 1`` positions past the
next one: the target's own LM head on ``h_t`` gives ``x_{t+1}`` (the tree's root), head 0 gives
``x_{t+2}`` (tree depth 1), head ``i`` gives ``x_{t+2+i}`` (tree depth ``i + 1``).

Each head is ``num_blocks`` residual blocks ``x + SiLU(W x + b)`` followed by its own LM head
(initialised from the target's output embedding). Residual blocks start at zero, so an untrained
head predicts what the target's LM head predicts from ``h_t``.

On disk a heads directory holds ``medusa_heads.safetensors`` (the tensors), ``medusa_config.json``
(shape and the target the heads were trained for) and, after training, ``eval.json`` (held-out
accuracy per head and per rank, which picks the default tree).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdec.errors import SpecDecError
from specdec.files import atomic_write, atomic_write_json
from specdec.models import text_config

WEIGHTS_FILE = "medusa_heads.safetensors"
CONFIG_FILE = "medusa_config.json"
EVAL_FILE = "eval.json"
FORMAT = 1
TRAIN_COMMAND = "python -m experiments.train_medusa"
PROBE_POINTS = 16  # weight values sampled per probed tensor for the fingerprint


class MedusaHeadsError(SpecDecError):
    """Medusa heads are missing, incomplete, or do not belong to the target."""


# --------------------------------------------------------------------------- the module


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``; zero-initialised so that it starts as the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    """Residual blocks then an LM head: ``[..., H] -> [..., V]``."""

    def __init__(self, hidden_size: int, vocab_size: int, num_blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_blocks)])
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.blocks(hidden))


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads over a target's last hidden state.

    Args:
        hidden_size, vocab_size: the target's hidden width and output vocabulary.
        num_heads: how many heads (head ``i`` drafts tree depth ``i + 1``).
        num_blocks: residual blocks per head.
        target: the target's fingerprint (:func:`target_fingerprint`), recorded for load-time checks.
        source: where the heads were loaded from (for error messages), if anywhere.
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_blocks: int = 1,
                 target: dict | None = None, source: str | None = None):
        super().__init__()
        for name, value, low in (("num_heads", num_heads, 1), ("num_blocks", num_blocks, 0),
                                 ("hidden_size", hidden_size, 1), ("vocab_size", vocab_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MedusaHeadsError(f"{name}={value!r}: it must be an integer >= {low}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_blocks = num_blocks
        self.heads = nn.ModuleList(MedusaHead(hidden_size, vocab_size, num_blocks) for _ in range(num_heads))
        self.target_info = dict(target or {})
        self.source = source

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """Logits ``[K, ..., V]`` of the first ``num_heads`` heads (all by default) on ``hidden [..., H]``."""
        heads = self.heads[: num_heads or self.num_heads]
        return torch.stack([head(hidden) for head in heads])

    @classmethod
    def for_target(cls, target, num_heads: int, num_blocks: int = 1, init: str = "zero",
                   seed: int = 0) -> "MedusaHeads":
        """Heads shaped for ``target``; every LM head starts as a copy of the target's output embedding.

        ``init="zero"`` (Medusa's): residual blocks are the identity, so each head starts by predicting
        the target's next token. ``init="random"``: random residual blocks (seeded), for tests.
        """
        if init not in ("zero", "random"):
            raise MedusaHeadsError(f"init={init!r}: use 'zero' (Medusa's) or 'random'")
        out_emb = target.get_output_embeddings().weight  # [V, H]
        vocab, hidden = int(out_emb.shape[0]), int(out_emb.shape[1])
        heads = cls(hidden, vocab, num_heads, num_blocks, target=target_fingerprint(target))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for head in heads.heads:
                head.lm_head.weight.copy_(out_emb.detach().float().cpu())
                if init == "random":
                    for block in head.blocks:
                        block.linear.weight.copy_(torch.randn(hidden, hidden, generator=gen) / hidden**0.5)
                        block.linear.bias.copy_(torch.randn(hidden, generator=gen) * 0.1)
        return heads

    def config(self) -> dict:
        """The ``medusa_config.json`` content (without training details)."""
        return {"format": FORMAT, "num_heads": self.num_heads, "num_blocks": self.num_blocks,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "target": self.target_info}


# --------------------------------------------------------------------------- target fingerprint


def _probe(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    # float32 linspace can round past the end of a tensor of more than 2**24 values: clamp (earlier indices unchanged)
    idx = torch.linspace(0, flat.numel() - 1, PROBE_POINTS).round().long().clamp_(max=flat.numel() - 1).to(flat.device)
    return [float(x) for x in flat[idx].float().cpu()]


def target_fingerprint(target) -> dict:
    """Identify a target: its shape (config fields) plus a sha256 over them and sampled weight values.

    The sample covers the output embedding and the first, middle and last parameter tensors, so two
    checkpoints of the same architecture with different weights get different fingerprints.
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
    return {**shape, "name_or_path": str(name), "sha256": digest.hexdigest(), "probe": probe}


def _describe(info: dict) -> str:
    name = f"{info.get('name_or_path')!r}, " if info.get("name_or_path") else ""
    return (f"{name}{info.get('model_type')}, hidden {info.get('hidden_size')}, vocab {info.get('vocab_size')}, "
            f"fingerprint {str(info.get('sha256', '?'))[:12]}")


def same_target(recorded: dict, actual: dict) -> bool:
    """True if ``actual`` is the target ``recorded`` describes (same shape; same weights up to dtype rounding)."""
    if recorded.get("sha256") == actual.get("sha256"):
        return True
    keys = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if any(recorded.get(k) != actual.get(k) for k in keys):
        return False
    a, b = torch.tensor(recorded.get("probe", [])), torch.tensor(actual.get("probe", []))
    return a.shape == b.shape and a.numel() > 0 and bool(torch.allclose(a, b, rtol=1e-2, atol=1e-3))  # fp16/bf16 copies


def check_target(heads: MedusaHeads, target) -> None:
    """Raise :class:`MedusaHeadsError` unless ``heads`` were trained for ``target``."""
    actual = target_fingerprint(target)
    where = f"at {heads.source} " if heads.source else ""
    fix = (f"train heads for this target with `{TRAIN_COMMAND} target=<target dir>` (or `zoo_size=...` for the "
           f"embedded pair) and pass their directory as drafter.heads=<dir>")
    if heads.hidden_size != actual["hidden_size"] or heads.vocab_size != actual["vocab_size"]:
        raise MedusaHeadsError(
            f"Medusa heads {where}have hidden size {heads.hidden_size} and vocabulary {heads.vocab_size}, the target "
            f"has {actual['hidden_size']} and {actual['vocab_size']}: they belong to another model; {fix}")
    if heads.target_info and not same_target(heads.target_info, actual):
        raise MedusaHeadsError(
            f"Medusa heads {where}were trained for another target ({_describe(heads.target_info)}), not this one "
            f"({_describe(actual)}); {fix}")


# --------------------------------------------------------------------------- saving and loading


def default_heads_dir(zoo_size: str = "default", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``experiments.train_medusa`` puts the heads of the embedded pair's target:
    ``<cache>/medusa/zoo-<size>`` (cache: ``$SPECDEC_CACHE`` or ``~/.cache/specdec``)."""
    if cache_dir is None:
        env = os.environ.get("SPECDEC_CACHE")
        cache_dir = Path(env).expanduser() if env else Path.home() / ".cache" / "specdec"
    return Path(cache_dir).expanduser() / "medusa" / f"zoo-{zoo_size}"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file + ``os.replace``)."""
    atomic_write_json(path, data)


def save_heads(heads: MedusaHeads, directory: str | os.PathLike, training: dict | None = None,
               evaluation: dict | None = None) -> Path:
    """Write ``heads`` to ``directory`` (created if needed): tensors, then eval report, then config (last).

    Each file is replaced atomically, so a reader never sees a half-written file.
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": str(FORMAT)}))
    if evaluation is not None:
        write_json(directory / EVAL_FILE, evaluation)
    write_json(directory / CONFIG_FILE, {**heads.config(), "training": training or {}})
    return directory


def _missing(directory: Path, what: str) -> MedusaHeadsError:
    return MedusaHeadsError(
        f"no Medusa heads at {str(directory)!r} ({what}): train them with `{TRAIN_COMMAND}` (the embedded default "
        f"target; `zoo_size=micro` or `target=<dir>` for others), or point drafter.heads at a directory holding "
        f"{CONFIG_FILE} and {WEIGHTS_FILE}")


def read_heads_config(directory: str | os.PathLike) -> dict:
    """The parsed ``medusa_config.json`` of a heads directory (:class:`MedusaHeadsError` if absent or bad)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise _missing(directory, "the directory does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise _missing(directory, f"{CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MedusaHeadsError(f"{path} is unreadable or not valid JSON ({exc}); retrain with `{TRAIN_COMMAND}`") from exc
    keys = ("num_heads", "num_blocks", "hidden_size", "vocab_size")
    if not isinstance(config, dict) or config.get("format") != FORMAT or any(k not in config for k in keys):
        raise MedusaHeadsError(f"{path} is not a format-{FORMAT} Medusa config (needs {keys}); retrain with "
                               f"`{TRAIN_COMMAND}`")
    return config


def read_eval(directory: str | os.PathLike) -> dict | None:
    """The ``eval.json`` report of a heads directory, or None if there is none (or it is unreadable)."""
    path = Path(directory).expanduser() / EVAL_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def load_heads(directory: str | os.PathLike, num_heads: int | None = None) -> MedusaHeads:
    """Load the first ``num_heads`` heads (all by default) saved in ``directory``.

    Raises:
        MedusaHeadsError: the directory, config or tensor file is missing; the file lacks a tensor
            or has one of the wrong shape; or ``num_heads`` exceeds the heads trained.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from specdec.checkpoints import check_finite_weights

    directory = Path(directory).expanduser()
    config = read_heads_config(directory)
    trained = int(config["num_heads"])
    if num_heads is None:
        num_heads = trained
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise MedusaHeadsError(f"num_heads={num_heads!r}: it must be an integer >= 1 (or null for all heads)")
    if num_heads > trained:
        raise MedusaHeadsError(
            f"num_heads={num_heads} but the heads at {str(directory)!r} were trained with {trained}: use "
            f"num_heads<={trained}, or train more with `{TRAIN_COMMAND} num_heads={num_heads}`")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise _missing(directory, f"{WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise MedusaHeadsError(f"Medusa heads file {weights} is not a readable safetensors file ({exc}); copy it again "
                               f"or retrain with `{TRAIN_COMMAND}`") from exc
    heads = MedusaHeads(int(config["hidden_size"]), int(config["vocab_size"]), num_heads, int(config["num_blocks"]),
                        target=config.get("target"), source=str(directory))
    expected = heads.state_dict()
    for key, value in expected.items():
        if key not in tensors:
            raise MedusaHeadsError(
                f"{weights} lacks tensor {key!r} ({CONFIG_FILE} says {trained} heads with {config['num_blocks']} "
                f"residual block(s) each): the file is incomplete or corrupt; copy it again or retrain with "
                f"`{TRAIN_COMMAND}`")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise MedusaHeadsError(
                f"{weights}: tensor {key!r} has shape {tuple(tensors[key].shape)}, {CONFIG_FILE} implies "
                f"{tuple(value.shape)}; the config and tensors do not belong together: retrain with `{TRAIN_COMMAND}`")
    heads.load_state_dict({k: tensors[k] for k in expected})
    check_finite_weights(heads, "Medusa heads", weights)
    return heads.eval()
