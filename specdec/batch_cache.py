"""A preallocated KV cache for a batch of sequences of different lengths (ragged rows, no re-alignment).

Layout ``[B, H, capacity, D]`` per layer, as :class:`specdec.cache.SpecDecCache`, with one length per
row: every row starts at slot 0, and a step's block of ``n`` tokens (root + draft nodes, padded to
the batch's widest tree) is written at the row's own length. No left padding and no shifting of
rows: what differs between rows is only their length, held on the device (``lengths``, for position
ids and masks) and mirrored on the host (``host_lengths``, read once per step with the accepted
counts). After the verify forward, :meth:`BatchCache.keep_block` keeps each row's accepted slots
(gather then scatter, so overlapping moves are safe) and advances its length; slots past a row's
length are stale and never visible. :meth:`BatchCache.select_rows` drops finished rows.

The interface (``begin_block``, ``block_mask``, ``keep_block``, ``keep_slots``, ``set_lengths``,
``select_rows``, ``lengths``) is what the batched step uses; a paged layout could implement it with a
block table instead of contiguous rows.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec.cache import CacheOverflowError
from specdec.models import text_config


def _flat_index(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[B * H * n]`` indices into ``buf.view(-1, D)`` of ``buf[b, h, slots[b, j]]`` (in ``[B, H, n]`` order) for
    ``buf [B, H, C, D]`` and ``slots [B, n]``."""
    b, h, c, _ = buf.shape
    base = torch.arange(b * h, device=buf.device).view(b, h, 1) * c  # [B, H, 1]
    return (base + slots[:, None, :]).reshape(-1)  # [B * H * n]


def _write_slots(buf: torch.Tensor, index: torch.Tensor, states: torch.Tensor, slots: torch.Tensor) -> None:
    """``buf[b, h, slots[b, j]] = states[b, h, j]`` for ``buf [B, H, C, D]`` (contiguous), ``slots [B, n]``
    (distinct per row), its :func:`_flat_index` ``index`` and ``states [B, H, n, D]``.

    Eagerly, ``index_copy_`` on rows of the flattened buffer: on the CPU 3-4x faster than an indexed store
    with broadcast index tensors (5 us against 16-25 us for one layer's block of 4 rows), and ``scatter_``
    of bf16 rows is slower still. Under ``torch.compile``, the indexed store on the 4-D buffer: inductor
    (torch 2.11) does not write an ``index_copy_`` into a graph input in place but copies the whole buffer
    out and back (two full passes per layer and tensor; an 8B model's step at context 4096 spent 0.7 ms
    there), while it fuses an ``index_put_`` with the kernel that computes ``states``. All write the same
    values."""
    if torch.compiler.is_compiling():
        b, h = buf.shape[:2]
        rows = torch.arange(b, device=buf.device)[:, None, None]  # [B, 1, 1]
        heads = torch.arange(h, device=buf.device)[None, :, None]  # [1, H, 1]
        buf.index_put_((rows, heads, slots[:, None, :]), states)  # [B, H, n] cells of D values
        return
    buf.view(-1, buf.shape[-1]).index_copy_(0, index, states.reshape(-1, buf.shape[-1]))


def _read_slots(buf: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``buf[b, h, slots[b, j]]`` as ``[B, H, M, D]`` for ``buf [B, H, C, D]`` and ``index`` = :func:`_flat_index`
    of ``slots [B, M]``."""
    b, h = buf.shape[:2]
    return buf.view(-1, buf.shape[-1]).index_select(0, index).view(b, h, -1, buf.shape[-1])


class BatchCacheLayer(CacheLayerMixin):
    """One layer's keys and values ``[B, H, capacity, D]``; writes go to the cache's current block slots."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: BatchCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, h, self.owner.capacity, dk)  # [B, H, C, Dk]
        self.values = value_states.new_zeros(b, h, self.owner.capacity, value_states.shape[-1])  # [B, H, C, Dv]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the block ``[B, H, n, D]`` at each row's length; return ``[B, H, end, D]`` views
        (``end`` = the longest row's length + n; a row's slots past its own block are masked)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index, slots = self.owner.block_index(self.keys), self.owner.block_slots  # [B * H * n], [B, n]
        _write_slots(self.keys, index, key_states, slots)
        _write_slots(self.values, index, value_states, slots)
        end = self.owner.block_end
        return self.keys[:, :, :end], self.values[:, :, :end]

    @torch.no_grad()
    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Per row, copy slots ``src [B, M]`` to ``dst [B, M]`` (all loads before any store)."""
        if not self.is_initialized:
            return
        load, store = _flat_index(self.keys, src), _flat_index(self.keys, dst)  # [B * H * M] each
        for buf in (self.keys, self.values):
            _write_slots(buf, store, _read_slots(buf, load), dst)  # every load before any store

    @torch.no_grad()
    def select_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)

    @torch.no_grad()
    def extend(self, other: BatchCacheLayer) -> None:
        """Append ``other``'s rows (``[B', H, capacity, D]``) after this layer's rows."""
        if not other.is_initialized:
            if self.is_initialized:  # other's rows were never written: zeros of this layer's shape
                b = len(other.owner.host_lengths)
                self.keys = torch.cat([self.keys, self.keys.new_zeros(b, *self.keys.shape[1:])])
                self.values = torch.cat([self.values, self.values.new_zeros(b, *self.values.shape[1:])])
            return
        if not self.is_initialized:  # this layer's rows (if any) were never written: zeros of other's shape
            b = len(self.owner.host_lengths)
            self.dtype, self.device, self.is_initialized = other.dtype, other.device, True
            self.keys = other.keys.new_zeros(b, *other.keys.shape[1:])  # [B, H, C, Dk]
            self.values = other.values.new_zeros(b, *other.values.shape[1:])  # [B, H, C, Dv]
        self.keys = torch.cat([self.keys, other.keys])  # [B + B', H, C, Dk]
        self.values = torch.cat([self.values, other.values])  # [B + B', H, C, Dv]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.owner.block_end, 0

    def get_seq_length(self) -> int:
        return max(self.owner.host_lengths, default=0)

    def get_max_length(self) -> int:
        return self.owner.capacity

    def get_max_cache_shape(self) -> int:
        return self.owner.capacity


class BatchCache(Cache):
    """Preallocated KV cache of ``batch`` rows with per-row lengths, for ``num_layers`` layers.

    Args:
        num_layers: the model's decoder layers.
        capacity: slots per row; a block past it raises :class:`CacheOverflowError` naming the row.
        batch: number of rows.
        device: where the per-row lengths live (the model's device).
    """

    def __init__(self, num_layers: int, capacity: int, batch: int, device: torch.device | str = "cpu",
                 row_ids: list[int] | None = None):
        self.capacity = int(capacity)
        self.host_lengths = [0] * batch
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        self.block_slots: torch.Tensor | None = None  # [B, n] where the current block is written
        self.block_end = 0
        self._block_index: tuple[torch.Size, torch.Tensor] | None = None  # the block's flat write index
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)  # a static block passed the capacity
        self.rows = list(row_ids) if row_ids is not None else list(range(batch))  # each current row's original index
        super().__init__(layers=[BatchCacheLayer(self) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model, capacity: int, batch: int, row_ids: list[int] | None = None) -> BatchCache:
        """A cache sized for ``model``'s layer count, its lengths on the model's device; ``row_ids``: the
        rows' indices in error messages (default ``0 .. batch - 1``)."""
        return cls(text_config(model).num_hidden_layers, capacity, batch, next(model.parameters()).device, row_ids)

    @property
    def batch(self) -> int:
        return len(self.host_lengths)

    def begin_block(self, n: int) -> None:
        """Place the next forward's ``n`` tokens of every row at that row's length."""
        longest = max(self.host_lengths)
        if longest + n > self.capacity:
            row = self.rows[self.host_lengths.index(longest)]
            raise CacheOverflowError(
                f"KV cache overflow in row {row}: writing {n} tokens at slot {longest} needs {longest + n} slots, "
                f"capacity is {self.capacity}. Lower max_new_tokens or the draft size."
            )
        offsets = torch.arange(n, device=self.lengths.device)  # [n]
        self.block_slots = self.lengths[:, None] + offsets  # [B, n]
        self.block_end = longest + n
        self._block_index = None

    def begin_static_block(self, n: int, offset: int = 0) -> None:
        """:meth:`begin_block` with fixed shapes and no host work: the ``n`` tokens go to slots
        ``lengths + offset + j``, attention spans the whole capacity (slots past a row's block are
        masked), lengths are read on the device only (captured steps). No host check: a block past the capacity
        sets :attr:`overflow`, which the step reports (the eager write of a row but the last would land in the
        next head's slots unnoticed; the compiled write and a CUDA index copy of the last row assert instead)."""
        self.block_slots = self.lengths[:, None] + offset + torch.arange(n, device=self.lengths.device)  # [B, n]
        self.overflow |= (self.block_slots[:, -1] >= self.capacity).any()
        self.block_end = self.capacity
        self._block_index = None

    def block_index(self, buf: torch.Tensor) -> torch.Tensor:
        """The current block's slots as flat row indices into ``buf [B, H, C, D]`` (``[B * H * n]``), computed
        once per block and shape: every layer's keys and values share it."""
        if self._block_index is None or self._block_index[0] != buf.shape[:3]:
            self._block_index = (buf.shape[:3], _flat_index(buf, self.block_slots))
        return self._block_index[1]

    def advance(self, counts: torch.Tensor) -> None:
        """Keep each row's first ``counts[b]`` block tokens (already in place): ``lengths += counts`` on the
        device, no host copy (the static step reads lengths back once per step with its results)."""
        self.lengths += counts

    def block_mask(self, tree_mask: torch.Tensor) -> torch.Tensor:
        """``[B, 1, n, end]`` bool key mask of the current block: key slot ``s`` is visible to block token
        ``j`` of row ``b`` iff ``s < lengths[b]`` or ``s = lengths[b] + i`` with ``tree_mask[b, j, i]``.

        ``tree_mask [B, n, w]``: ``w = n`` for a block written at the row's length; a static block
        written further on (``begin_static_block(n, offset)``) sees ``w`` slots from the length, and
        must see itself there (every query sees at least one key: no empty rows).
        """
        n, w = tree_mask.shape[-2], tree_mask.shape[-1]
        rel = torch.arange(self.block_end, device=self.lengths.device)[None, :] - self.lengths[:, None]  # [B, S]
        in_block = (rel >= 0) & (rel < w)  # [B, S]
        cols = rel.clamp(0, w - 1)[:, None, :].expand(-1, n, -1)  # [B, n, S]
        tree = tree_mask.gather(2, cols) & in_block[:, None, :]  # [B, n, S]
        return ((rel < 0)[:, None, :] | tree)[:, None]  # [B, 1, n, S]

    def keep_block(self, keep: list[list[int]]) -> None:
        """Per row, keep block tokens ``keep[b]`` (ascending block indices, e.g. the root 0 and the accepted
        nodes' ``1 + i``) in contiguous slots from the row's length, and drop the rest of the block."""
        self.keep_slots(list(self.host_lengths), keep)
        self.block_slots, self.block_end, self._block_index = None, 0, None

    def keep_slots(self, base: list[int], keep: list[list[int]]) -> None:
        """Per row, move slots ``base[b] + keep[b][j]`` (ascending) to ``base[b] + j`` and end the row there.

        Gathers every row's kept slots before scattering any (overlapping moves are safe); moves
        nothing when every row keeps a contiguous run from its base (a chain's accepted prefix).
        """
        if any(k != list(range(len(k))) for k in keep):
            m = max(len(k) for k in keep)
            rel = [k + list(range(len(k), m)) for k in keep]  # padding entries copy a slot onto itself
            start = torch.tensor(base, dtype=torch.long, device=self.lengths.device)[:, None]  # [B, 1]
            src = start + torch.tensor(rel, dtype=torch.long, device=self.lengths.device)  # [B, M]
            self.move_slots(src, start + torch.arange(m, device=self.lengths.device))  # [B, M]
        self.set_lengths([b + len(k) for b, k in zip(base, keep)])

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Per row, copy slots ``src [B, M]`` to ``dst [B, M]`` in every layer, all loads before any store
        (device only: the static step keeps accepted tree nodes this way; an entry with ``src = dst``
        moves nothing)."""
        for layer in self.layers:
            layer.move(src, dst)

    @torch.no_grad()
    def set_lengths(self, lengths: list[int]) -> None:
        """Set every row's length (slots past it become stale: a rollback)."""
        self.host_lengths = list(lengths)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.lengths.device)  # [B]

    def extend(self, other: BatchCache) -> None:
        """Append ``other``'s rows (same layers and capacity, e.g. new prompts prefilled on their own)
        after this cache's rows: continuous batching admits rows this way."""
        if other.capacity != self.capacity or len(other.layers) != len(self.layers):
            raise ValueError("BatchCache.extend needs a cache with the same capacity and layer count")
        for mine, theirs in zip(self.layers, other.layers):
            mine.extend(theirs)
        self.lengths = torch.cat([self.lengths, other.lengths])  # [B + B']
        self.host_lengths += other.host_lengths
        self.rows += other.rows

    def select_rows(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)  # [B']
        for layer in self.layers:
            layer.select_rows(index)
        self.lengths = self.lengths.index_select(0, index)
        self.host_lengths = [self.host_lengths[r] for r in rows]
        self.rows = [self.rows[r] for r in rows]
