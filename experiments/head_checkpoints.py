"""Training checkpoints of draft heads (:mod:`experiments.head_training`): written atomically, resumed only with
the settings they were written with."""
from __future__ import annotations

from pathlib import Path

import torch

from experiments.head_data import DEFAULT_ANSWER_TOKENS
from specdec.errors import ConfigError
from specdec.files import atomic_write


def save_checkpoint(path: Path, step: int, heads: torch.nn.Module, optimizer, settings: dict, elapsed: float,
                    wandb_group: str | None = None, generated_rows: torch.Tensor | None = None) -> None:
    """Write the heads, optimizer state and progress (and the W&B group its runs log to) to ``path`` atomically;
    ``generated_rows [R, T]``: the corpus rows the target continued (a resume reads them back: minutes on a large
    target)."""
    state = {"step": step, "heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "settings": settings,
             "elapsed_s": elapsed, "wandb_group": wandb_group}
    if generated_rows is not None:
        state["generated_rows"] = generated_rows
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, settings: dict) -> dict:
    """The checkpoint at ``path``; :class:`ConfigError` if it was written with other settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file (truncated, not a checkpoint): its error's first line
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:160].rstrip(": ")
        raise ConfigError(f"checkpoint {path} is unreadable ({detail}); delete it or pass resume=false") from exc
    if changed := setting_changes(state["settings"], settings):
        raise ConfigError(f"checkpoint {path} was written with other settings ({', '.join(changed)}); pass resume=false "
                          f"to start over, or out_dir=<another dir>")
    return state


#: Settings recorded only when not at their default (older checkpoints and heads lack them): compared with it.
OPTIONAL_SETTINGS = {"generated_source": "corpus", "init_from": None, "draft_vocab": 0,
                     "generated_max_new_tokens": DEFAULT_ANSWER_TOKENS}


def setting_changes(saved: dict, settings: dict) -> list[str]:
    """``"key: saved -> now"`` for every setting that differs (an optional one absent on either side is its
    default)."""
    keys = list(settings) + [k for k in OPTIONAL_SETTINGS if k not in settings]
    pairs = {k: (saved.get(k, OPTIONAL_SETTINGS.get(k)), settings.get(k, OPTIONAL_SETTINGS.get(k))) for k in keys}
    return [f"{k}: {was!r} -> {now!r}" for k, (was, now) in pairs.items() if was != now]
