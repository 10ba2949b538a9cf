"""The tree-attention kernel's launch choices: tile sizes, warps, pipeline stages, split-K's split count and merge.

:func:`default_config` holds what ``specdec_kernels.tune`` measured best on an H200 (BENCHMARKS.md); a
:class:`~specdec_kernels.TreeAttentionPlan` takes ``config=`` to override any of :data:`CONFIG_KEYS`.
"""
from __future__ import annotations

import torch
import triton


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, but enough to exercise split-K on long prefixes


def _pick_num_splits(n_programs, total_max, rows, elem_bytes, block_n, num_sms, programs_per_sm=2, rounding="up"):
    """Split the KV sequence until there are ``programs_per_sm`` programs per SM (``rounding`` ``up``: at least
    that many; ``down``: at most), keeping >= 2 tiles per split and the fp32 workspace traffic (written, then
    read back from L2) below the K/V traffic."""
    if n_programs >= num_sms:
        return 1
    aim = programs_per_sm * num_sms
    splits = triton.cdiv(aim, n_programs) if rounding == "up" else max(1, aim // n_programs)
    splits = min(splits, max(1, total_max // (2 * block_n)))
    splits = min(splits, max(1, (total_max * elem_bytes) // (4 * rows)))
    return max(1, min(splits, 128))


#: The launch choices a plan may override (``TreeAttentionPlan(config=...)``; ``specdec_kernels.tune`` sweeps
#: them): rows of (query head, tree token) per program, KV slots per tile, warps, software-pipeline stages,
#: and the programs per SM that split-K aims for.
CONFIG_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "programs_per_sm", "merge", "split_rounding")
#: The values of the keys that are not numbers: how split-K's partials are merged (``kernel``: a second, small
#: kernel; ``fused``: the last split of each M-block merges in the first, behind an arrival count) and how the
#: split count meets the programs-per-SM aim (``up``: at least that many programs; ``down``: at most, so that no
#: SM runs more programs than the rest).
CONFIG_CHOICES = dict(merge=("kernel", "fused"), split_rounding=("up", "down"))


def default_config(dtype: torch.dtype, head_dim: int, rows: int) -> dict:
    """The launch choices for one layout: ``rows`` = query heads per KV head * tree tokens."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles, no spills
        max_m, block_n = 16, (32 if block_d <= 128 else 16)
    else:  # fp16/bf16 tensor cores (wgmma from BLOCK_M = 64 on Hopper)
        max_m, block_n = (128, 64) if block_d <= 128 else (64, 32)
    block_m = min(max(16, triton.next_power_of_2(rows)), max_m)
    # bf16 on an H200 (specdec_kernels.tune, BENCHMARKS.md): 3 stages beat 2 at every shape measured (by up to
    # 25%); one program per SM suits a single M-block, two suit trees whose rows need two (N = 64, G = 4)
    return dict(block_m=block_m, block_n=block_n, num_warps=8 if block_m * block_d >= 128 * 128 else 4,
                num_stages=2 if dtype == torch.float32 else 3, programs_per_sm=2 if rows > block_m else 1,
                merge="kernel", split_rounding="up")


def _config(dtype, head_dim, rows, overrides: dict | None) -> dict:
    unknown = set(overrides or {}) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"tree_attention: unknown config keys {sorted(unknown)}; known: {list(CONFIG_KEYS)}")
    for key, choices in CONFIG_CHOICES.items():
        if key in (overrides or {}) and overrides[key] not in choices:
            raise ValueError(f"tree_attention: config {key}={overrides[key]!r}: choose one of {list(choices)}")
    return {**default_config(dtype, head_dim, rows), **(overrides or {})}
