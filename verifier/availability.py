"""Whether an attention backend can run here, checked before any decoding starts.

The Triton backend runs its kernel on a CUDA GPU, or on the CPU in Triton's interpreter, which must
be switched on (``TRITON_INTERPRET=1``) before triton is first imported. Without this check the
first verify step would fail deep inside the kernel launcher, after models were loaded and the
baseline had started.
"""
from __future__ import annotations

import importlib.util

import torch

from specdec.errors import ConfigError


def check_attn_backend(backend: str, device: str | torch.device) -> None:
    """Raise :class:`ConfigError` (naming ``attn_backend`` and the fix) if ``backend`` cannot run on ``device``.

    ``sdpa`` runs anywhere. ``triton`` needs the triton package, and on a device other than a CUDA GPU,
    Triton's interpreter. Unknown names are left to the verifier, which lists the known ones.
    """
    if backend != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("attn_backend=triton needs the triton package, which is not installed: "
                          "pip install triton (or use attn_backend=sdpa, the reference backend)")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"attn_backend=triton on {device}: no CUDA GPU is visible to torch here; "
                              "use attn_backend=sdpa or run on a GPU machine")
        return
    if not triton_interpreted():
        raise ConfigError(
            f"attn_backend=triton on the {device.type.upper()} runs the Triton kernel in its interpreter, which is "
            "off: start the command with TRITON_INTERPRET=1 in the environment (slow; for testing the kernel), "
            "or use attn_backend=sdpa (the reference backend, same results)")
    from specdec_kernels.tree_attention import interpreter_problem

    problem = interpreter_problem()
    if problem:
        raise ConfigError(f"attn_backend=triton on the {device.type.upper()}: {problem}, or use attn_backend=sdpa")


def triton_interpreted() -> bool:
    """True when the tree-attention kernel would run in Triton's interpreter (TRITON_INTERPRET=1 was in
    the environment when triton was first imported)."""
    # imports triton (and so fixes the mode) if not yet done
    from specdec_kernels.tree_attention import _is_interpreted

    return _is_interpreted()


def usable_backends(requested: list[str] | None, device: str | torch.device) -> list[str]:
    """The attention backends a benchmark runs on ``device``: ``requested``, each checked by
    :func:`check_attn_backend` (one :class:`ConfigError` before anything runs, naming ``--backends``), or by
    default ``sdpa`` plus ``triton`` where its kernel runs here (a CUDA GPU, or the CPU with the interpreter on)."""
    if requested is None:
        try:
            check_attn_backend("triton", device)
        except ConfigError:
            return ["sdpa"]
        return ["sdpa", "triton"]
    for backend in requested:
        try:
            check_attn_backend(backend, device)
        except ConfigError as err:
            raise ConfigError(f"{err}; or leave {backend} out of --backends") from err
    return list(requested)
