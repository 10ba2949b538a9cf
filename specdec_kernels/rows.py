"""Tree attention over per-row prefix lengths held on the device, as one PyTorch operator.

``tree_attention_rows(q, k, v, prefix, bits, sm_scale)`` is :func:`specdec_kernels.tree_attention` for a
fixed-shape decode step (:mod:`specdec.static_step`): ``prefix`` is an int tensor ``[B]`` on the device
(each row's cached length, never read back to the host), the tree comes packed
(:func:`specdec_kernels.pack_tree_mask`, one tree for every row) and the caller's cache guarantees
``prefix + N <= S``. It is registered as the custom operator ``specdec::tree_attention_rows``: ``torch.compile``
keeps it as one opaque call (its fake returns ``q``'s shape) and a CUDA graph captures its launches. The
launch choices of each input layout are made once and kept (:func:`specdec_kernels.tree_attention.rows_launch`).
"""
from __future__ import annotations

import functools

import torch

from specdec_kernels._tree_attention_jit import MAX_TREE_TOKENS
from specdec_kernels.tree_attention import pack_tree_mask, rows_launch

_LAUNCHES: dict = {}  # input layout -> launch(q, k, v, bits, prefix)
MAX_LAUNCHES = 256  # layouts kept (each capacity is one; compile=static does not round capacities up)


@torch.library.custom_op("specdec::tree_attention_rows", mutates_args=())
def tree_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: torch.Tensor,
                        bits: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """``q [B, Hq, N, D]`` against ``k, v [B, Hkv, S, D]``: row ``b`` sees slots ``< prefix[b]`` and, of its
    tree's slots ``prefix[b] + j``, those set in ``bits``; returns ``[B, Hq, N, D]``."""
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, sm_scale)
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= MAX_LAUNCHES:
            _LAUNCHES.clear()  # rebuilt on demand: a launch's choices cost microseconds, not a compile
        launch = _LAUNCHES[key] = rows_launch(q, k, v, prefix, bits, sm_scale)
    return launch(q, k, v, bits, prefix)


@tree_attention_rows.register_fake
def _shape_only(q, k, v, prefix, bits, sm_scale):
    return torch.empty_like(q)


def _apply(q, k, v, sm_scale, *, prefix, bits):
    return tree_attention_rows(q, k, v, prefix, bits, float(sm_scale))


def rows_plan(prefix: torch.Tensor, bits: torch.Tensor):
    """The ``plan(q, k, v, sm_scale)`` that :func:`verifier.attention.triton_tree_attention` calls in every layer
    of one fixed-shape forward."""
    return functools.partial(_apply, prefix=prefix, bits=bits)


def packed_for(mask: torch.Tensor) -> torch.Tensor | None:
    """A fixed-shape step's verify tree ``mask [n, n]`` packed for the kernel (``[n]``) where it fits the
    kernel; else None (the step's SDPA path)."""
    if mask.shape[-1] > MAX_TREE_TOKENS:
        return None
    return pack_tree_mask(mask)  # [n]
