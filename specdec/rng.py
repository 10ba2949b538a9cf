"""Counter-based random numbers: every draw is a pure function of (seed, step, purpose, index).

The decode loops draw every random number of a step (acceptance tests, recovered and bonus tokens,
sampled drafts) from a key instead of a stream: the row's seed, the row's step number, what the
draw is for, and its index (node, rank, ...). The same key gives the same number on every device,
in every batch layout and whatever else was drawn before, so:

- row i of a batched run reproduces the batch-1 run with seed ``seed + i`` token for token, with no
  Python loop over rows and no per-row generator;
- no draw needs the host: the numbers are integer hashes computed by tensor ops (graph-capturable).

The hash is SplitMix64's finaliser over 64-bit integer tensors (wrapping multiplication, logical
shifts emulated with masks); 24 of its bits make a float32 uniform in (0, 1). A categorical draw is
an exponential race over the vocabulary, one keyed uniform per token (:func:`race`), so it is
insensitive to the last-bit differences between a batched and a batch-1 forward.
"""
from __future__ import annotations

import torch

_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
_M2 = -7723592293110705685  # 0x94D049BB133111EB
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_LOW = [(1 << (64 - s)) - 1 for s in range(64)]  # masks that make >> a logical shift


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` by ``s`` (torch's ``>>`` is arithmetic)."""
    return (x >> s) & _LOW[s]


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: a bijection of 64-bit integers that spreads every input bit."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def hash_keys(*keys) -> torch.Tensor:
    """One int64 hash per broadcast element of ``keys`` (int64 tensors or python ints), order-sensitive."""
    h = None
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.int64) if not isinstance(key, torch.Tensor) else key.long()
        h = _mix(key * _GOLDEN + 1) if h is None else _mix((h ^ key) * _GOLDEN + 1)
    return h


#: The largest float32 below 1.
_BELOW_ONE = 1.0 - 2.0**-24


def uniform(*keys) -> torch.Tensor:
    """A float32 uniform in (0, 1) per broadcast element of ``keys`` (see :func:`hash_keys`): the top 24 bits,
    centred, ``(bits + 0.5) / 2^24``. float32 rounds the largest, ``1 - 2^-25``, up to 1: it is kept just below
    1, or ``-log u`` would be 0 and a race (:func:`race`) would draw a token of probability 0 (its key 0/0)."""
    bits = _srl(hash_keys(*keys), 40)  # the top 24 bits
    return ((bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))).clamp_(max=_BELOW_ONE)


def race(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The exponential race (Gumbel-max): ``argmax_v probs[..., v] / E_v`` with ``E_v = -log u[..., v]``.

    Draws index v with probability ``probs[v] / sum(probs)`` (unnormalised ``probs`` are fine; zero
    entries are never drawn), and the winner only changes if two contenders are within rounding of
    each other: two code paths whose ``probs`` differ in the last bits (a batched and a batch-1
    forward) draw the same token but with probability about 1e-7, whatever the vocabulary size (an
    inverse CDF over V entries would flip with probability about V times that).
    """
    return (probs.float() / -torch.log(u)).argmax(-1)


# What a draw is for: part of every key, so draws for different purposes never coincide.
ACCEPT = 1  # the uniform that accepts or rejects draft node i
EXTRA = 2  # the recovered or bonus token of a step
DRAFT = 3  # a draft model's sampled token at depth d of a chain
CHILD = 4  # a sampled child: (tree node index, draw index)


class KeyedRandom:
    """The random numbers of one decode run (batch 1) or of a batch of rows, keyed by row seed and step.

    Args:
        seeds: ``[B]`` int64 seeds, one per row (row i of ``generate_batch``: ``seed + i``).

    ``step`` (``[B]`` int64) is the step number of each row; the decode loop sets it before each
    step. Every draw names its purpose (:data:`ACCEPT`, :data:`EXTRA`, ...) and an index, and returns
    one value per row: ``[B, *index shape]``.
    """

    def __init__(self, seeds: torch.Tensor):
        self.seeds = seeds.long()  # [B]
        self.step = torch.zeros_like(self.seeds)  # [B]

    @classmethod
    def for_seed(cls, seed: int, device: torch.device | str = "cpu") -> KeyedRandom:
        """The batch-1 stream of ``generate(..., seed=seed)``."""
        return cls(torch.tensor([int(seed)], dtype=torch.long, device=device))

    def row(self, i: int) -> KeyedRandom:
        """Row ``i``'s own stream (batch 1), at the same step."""
        single = KeyedRandom(self.seeds[i : i + 1])
        single.step = self.step[i : i + 1].clone()
        return single

    def select_rows(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.seeds.device)
        self.seeds, self.step = self.seeds.index_select(0, index), self.step.index_select(0, index)

    def extend(self, seeds: list[int]) -> None:
        """Append rows with ``seeds``, at step 0 (continuous batching admits rows this way)."""
        new = torch.tensor(seeds, dtype=torch.long, device=self.seeds.device)  # [B']
        self.seeds, self.step = torch.cat([self.seeds, new]), torch.cat([self.step, torch.zeros_like(new)])

    def set_step(self, step: int | torch.Tensor) -> None:
        self.step = torch.as_tensor(step, dtype=torch.long, device=self.seeds.device).expand_as(self.seeds).clone()

    def _on_device(self, index: int | torch.Tensor) -> torch.Tensor:
        """``index`` as int64 on the rows' device. A python int is filled there (a kernel), not copied from
        the host: a host-to-device copy cannot be captured in a CUDA graph (``compile=graph``)."""
        if isinstance(index, torch.Tensor):
            return index.to(device=self.seeds.device, dtype=torch.long)
        return torch.full((), int(index), dtype=torch.long, device=self.seeds.device)

    def uniform(self, purpose: int, *index) -> torch.Tensor:
        """``[B, *index]`` uniforms in (0, 1) for draws ``index`` (int64 tensors broadcast together)."""
        index = [self._on_device(i) for i in index]
        shape = torch.broadcast_shapes(*(i.shape for i in index)) if index else ()
        extra = (1,) * len(shape)
        seeds, step = self.seeds.view(-1, *extra), self.step.view(-1, *extra)  # [B, 1, ...]
        return uniform(seeds, step, purpose, *[i.expand(shape) for i in index])

    def uniform_per_row(self, purpose: int, index: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` uniforms where row b's draws are indexed by ``index[b, ...]`` (e.g. each row's own
        node), equal to row b's batch-1 ``uniform(purpose, index[b])``."""
        index = index.long()
        extra = (1,) * (index.dim() - 1)
        return uniform(self.seeds.view(-1, *extra), self.step.view(-1, *extra), purpose, index)

    def categorical(self, probs: torch.Tensor, purpose: int, *index) -> torch.Tensor:
        """Draws from ``probs [B, *index, V]`` (unnormalised) by an exponential race over the vocabulary,
        keyed ``(purpose, *index, token)``: ``[B, *index]`` int64."""
        vocab = torch.arange(probs.shape[-1], device=self.seeds.device)  # [V]
        index = [self._on_device(i)[..., None] for i in index]
        return race(probs, self.uniform(purpose, *index, vocab))

    def top_without_replacement(self, probs: torch.Tensor, m: int, purpose: int, *index) -> torch.Tensor:
        """``m`` draws without replacement from ``probs [B, *index, V]``, in draw order (Gumbel-top-k, keyed
        like :meth:`categorical`): ``[B, *index, m]``. The caller drops draws past the support."""
        vocab = torch.arange(probs.shape[-1], device=self.seeds.device)  # [V]
        index = [self._on_device(i)[..., None] for i in index]
        keys = probs.float() / -torch.log(self.uniform(purpose, *index, vocab))  # [B, *index, V]
        return keys.topk(m, dim=-1).indices
