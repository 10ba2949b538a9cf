"""A preallocated KV cache that speaks transformers' ``Cache`` interface and rolls back.

Any Hugging Face decoder writes to it through ``Cache.update``. On top of that it adds
``truncate(n)`` (forget everything from slot n on) and ``compact(keep_idx)`` (move the KV of
the accepted tree nodes to contiguous slots and drop the rest).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec.errors import SpecDecError
from specdec.models import text_config


class CacheOverflowError(SpecDecError):
    """A write would go past the cache's preallocated capacity."""


class SpecDecLayer(CacheLayerMixin):
    """One layer's keys and values, ``[B, H, capacity, D]``, valid up to ``length``."""

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, h, self.capacity, dk)  # [B, H, C, Dk]
        self.values = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])  # [B, H, C, Dv]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H, n, D]`` keys/values; return the valid ``[B, H, length, D]`` views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            raise CacheOverflowError(
                f"KV cache overflow: writing {n} tokens at slot {self.length} needs {end} slots, capacity is "
                f"{self.capacity}. Lower max_new_tokens or the draft size, or build the cache with a larger capacity."
            )
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def get_max_cache_shape(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    @torch.no_grad()
    def compact(self, src: torch.Tensor, offset: int) -> None:
        """Keep slots ``offset + src`` (``[M]``, ascending) at ``offset .. offset + M``; drop the rest."""
        if self.is_initialized and src.numel() > 0:
            dst = slice(offset, offset + src.numel())
            self.keys[:, :, dst] = self.keys.index_select(2, src + offset)  # [B, H, M, D]
            self.values[:, :, dst] = self.values.index_select(2, src + offset)  # [B, H, M, D]
        self.length = offset + src.numel()


class SpecDecCache(Cache):
    """Preallocated, rollback-capable KV cache for ``num_layers`` attention layers.

    Args:
        num_layers: the model's number of decoder layers.
        capacity: the most tokens it holds; a write past it raises :class:`CacheOverflowError`.
    """

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[SpecDecLayer(capacity) for _ in range(num_layers)])
        self.capacity = int(capacity)

    @classmethod
    def for_model(cls, model, capacity: int) -> SpecDecCache:
        """A cache sized for ``model``'s layer count."""
        return cls(text_config(model).num_hidden_layers, capacity)

    @property
    def length(self) -> int:
        """Number of valid (committed or pending) slots."""
        return self.layers[0].length

    def truncate(self, n: int) -> None:
        """Forget every slot from ``n`` on (no-op when already shorter)."""
        if n < 0:
            raise ValueError(f"truncate(n={n}): n must be >= 0")
        for layer in self.layers:
            layer.truncate(n)

    def compact(self, keep_idx, offset: int = 0) -> None:
        """Keep only the slots ``offset + keep_idx`` (ascending), moved to contiguous slots from ``offset``.

        Slots below ``offset`` stay as they are; everything after the kept ones is dropped.
        ``compact(list(range(n)))`` equals ``truncate(n)``.
        """
        if offset > self.length:
            raise ValueError(f"compact(offset={offset}): the offset is past the cache length {self.length}")
        contiguous = isinstance(keep_idx, list) and keep_idx == list(range(len(keep_idx)))
        if contiguous and offset + len(keep_idx) <= self.length:  # (past the length: the check below says so)
            self.truncate(offset + len(keep_idx))  # already contiguous (always so on a chain)
            return
        src = torch.as_tensor(keep_idx, dtype=torch.long).reshape(-1)  # [M]
        if src.numel() and (bool((src[1:] <= src[:-1]).any()) or int(src[0]) < 0):
            raise ValueError("compact(keep_idx): indices must be strictly increasing and >= 0")
        if src.numel() and offset + int(src[-1]) >= self.length:
            raise ValueError(f"compact(keep_idx): slot {offset + int(src[-1])} is past the cache length {self.length}")
        # The leading run of slots that stay where they are needs no copy.
        same = int((src == torch.arange(src.numel())).long().cumprod(0).sum()) if src.numel() else 0
        moved = src[same:] - same  # [M - same]
        for layer in self.layers:
            src_dev = moved.to(layer.keys.device) if layer.is_initialized else moved
            layer.compact(src_dev, offset + same)
