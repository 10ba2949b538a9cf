"""Narrow linears: cheaper verify forwards of a few rows on the CPU.

A verify forward runs the target's linears on ``1 + nodes`` rows. On the CPU, ``F.linear`` computes
``X @ W^T`` through MKL; with one row MKL takes a matrix-vector path bound by the bytes of ``W``, but with
two to a few dozen rows its transposed-``W`` matrix-matrix path is 2-4x slower than that (SmolLM2's LM
head, 576 -> 49152, on a 2-core AVX2 VM: 15 ms at 1 row, 30-42 ms at 2-16 rows). Two other products keep
those rows near the one-row cost (``BENCHMARKS.md``, "Narrow linears" and "Packed linears"):

- ``transposed``: ``(W @ X^T)^T`` through MKL (10-12 ms at 2-4 rows, 21-27 ms at 8-16): no extra memory,
  any dtype.
- ``packed``: from :data:`PACKED_FROM_ROWS` rows on, oneDNN's linear on a copy of ``W`` reordered once into
  its blocked layout (``torch.ops.mkldnn``; the LM head 13-16 ms at 8-16 rows, the decoder layers' matrices
  alike), ``transposed`` below that, where MKL measured faster on the layers' matrices. The packed copy costs
  as much memory as the weights; it is made at the first call that uses it and again whenever the weight
  changes, and it is never part of the state dict.

:func:`use_narrow_linears` switches a model's ``nn.Linear`` modules to :class:`NarrowLinear` in place
(weights, names and state dicts unchanged); ``auto``, the default for float32 models on the CPU, first times both
products against ``F.linear`` on the model's matrix shapes and uses the faster one only where it wins
(:func:`measured_product`: a CPU whose MKL has no slow multi-row path keeps ``F.linear``). One row, more than
``max_rows`` rows (32 ``transposed``, 128 ``packed``) and anything that needs gradients go through ``F.linear`` as
before, so plain one-token decoding (ours and Hugging Face's ``generate`` on the same model) and long prefills
are untouched. The product is the
same up to float rounding (another summation order); greedy outputs are checked against plain decoding as
everywhere else.
"""
from __future__ import annotations

import copy
import functools
import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from specdec.errors import ConfigError
from specdec.timing import clearly_faster, fastest_seconds

log = logging.getLogger(__name__)

#: Rows above which ``F.linear`` is used again (``transposed``): prefills and wide trees, where the layouts cost
#: about the same.
MAX_ROWS = 32
#: The same for ``packed``: oneDNN's LM head stayed 1.7x faster than ``F.linear`` up to 128 rows (53 against 88 ms
#: for SmolLM2's), the decoder matrices about even from 32 rows on.
PACKED_MAX_ROWS = 128
PRODUCTS = ("packed", "transposed")
MODES = ("auto", "on", "off", *PRODUCTS)
#: ``packed``: the fewest rows that take oneDNN's packed weights (2-5 rows: ``transposed``, 5-40% faster on
#: SmolLM2's decoder matrices on a 2-core AVX2 VM; from 6 rows oneDNN was faster on every matrix).
PACKED_FROM_ROWS = 6
#: The row count oneDNN is told to expect when it packs a weight (one pack serves every width; 8 and 32 measured
#: alike on SmolLM2's matrices, 1 was slower at every width above 1).
PACK_ROWS = 8

# module -> (weight identity and version, packed weight). Outside the module so that ``copy.deepcopy`` works (oneDNN
# tensors have no storage to copy): a copy packs its own weight at its first multi-row call.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def packed_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU can pack a ``dtype`` weight for oneDNN's linear (tried once)."""
    try:
        weight = torch.ones(4, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), packed, None, "none", [], "")
        return bool(torch.allclose(out.float(), torch.full((2, 4), 8.0)))
    except (RuntimeError, AttributeError, NotImplementedError, TypeError, ValueError):  # no oneDNN, no such op
        return False


def _packed_weight(module: nn.Linear) -> torch.Tensor:
    """``module``'s weight in oneDNN's layout, packed again when the weight was replaced or changed in place."""
    weight = module.weight
    key = (weight.data_ptr(), weight._version)
    entry = _PACKED.get(module)
    if entry is None or entry[0] != key:
        entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
        _PACKED[module] = entry
    return entry[1]


class NarrowLinear(nn.Linear):
    """``nn.Linear`` computing 2..``max_rows`` rows by ``product`` (``packed`` from ``packed_from`` rows, else
    ``transposed``; see the module docstring); every other call is ``F.linear``."""

    max_rows: int = MAX_ROWS
    product: str = "transposed"
    packed_from: int = PACKED_FROM_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 1 < rows <= self.max_rows or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1]).contiguous()  # [rows, in]; oneDNN misreads strided rows
        if self.product == "packed" and rows >= self.packed_from and self._packable():
            out = torch.ops.mkldnn._linear_pointwise(flat, _packed_weight(self), self.bias, "none", [], "")  # [rows, out]
        else:
            out = torch.mm(self.weight, flat.t()).t()  # [rows, out]
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])  # [..., out]

    def _packable(self) -> bool:
        """Whether oneDNN packs this weight as it is now (a model moved to a GPU or cast to a dtype oneDNN cannot
        pack here after the switch falls back to ``transposed``)."""
        return self.weight.device.type == "cpu" and packed_available(self.weight.dtype)


def best_product(model: nn.Module) -> str:
    """``packed`` where oneDNN can pack ``model``'s weights (a CPU model whose dtype it packs), else ``transposed``."""
    weight = next(model.parameters(), None)
    if weight is not None and weight.device.type == "cpu" and packed_available(weight.dtype):
        return "packed"
    return "transposed"


#: ``auto``: the row counts (a verify's) at which each product is timed against ``F.linear`` (a product must be
#: :func:`specdec.timing.clearly_faster`). On a 2-core AVX2 VM MKL's multi-row path made
#: ``F.linear`` 2-4x dearer there; on a Xeon with AVX-512 and AMX it was the fastest (2026-12-06): measured, not assumed.
AUTO_WIDTHS = (3, 5, 8)


def measured_product(model: nn.Module) -> str | None:
    """The product ``auto`` uses on ``model`` here: the fastest of ``transposed`` and (where oneDNN packs)
    ``packed`` on ``model``'s largest linear and its commonest one (an LM head, a decoder layer's matrix) at
    :data:`AUTO_WIDTHS` rows, if it takes under :data:`specdec.timing.MARGIN` of ``F.linear``'s time; else None (plain
    linears). Timed once per shapes and thread count, on random float32 weights of those shapes (about a second)."""
    shapes = [tuple(m.weight.shape) for m in model.modules() if type(m) in (nn.Linear, NarrowLinear)]
    if not shapes:
        return None
    largest = max(shapes, key=lambda s: s[0] * s[1])
    commonest = max(sorted(set(shapes)), key=shapes.count)
    return _fastest(tuple(dict.fromkeys((largest, commonest))), torch.get_num_threads())


@functools.cache
def _fastest(shapes: tuple[tuple[int, int], ...], threads: int) -> str | None:
    """:func:`measured_product`'s choice for linears of these ``(out, in)`` shapes (``threads``: the cache key)."""
    products = ["transposed"] + (["packed"] if packed_available() else [])
    seconds = _product_seconds(shapes, ("plain", *products))
    best = min(products, key=seconds.get)
    choice = best if clearly_faster(seconds[best], seconds["plain"]) else None
    log.info("narrow linears (auto): %s (seconds at %s rows: %s)", choice or "plain F.linear",
             AUTO_WIDTHS, {p: round(s, 6) for p, s in seconds.items()})
    return choice


def _product_seconds(shapes: tuple[tuple[int, int], ...], products: tuple[str, ...], reps: int = 7) -> dict:
    """``{product: seconds}``: one call of a float32 linear of each ``(out, in)`` shape at each of
    :data:`AUTO_WIDTHS` rows, summed, computed by each product (``plain``: ``F.linear``), timed by :func:`specdec.timing.fastest_seconds`
    (in turns, each call's fastest of ``reps``)."""
    with torch.random.fork_rng(devices=[]):  # the run's random stream is the same whether this ran or was cached
        layers = {shape: nn.Linear(shape[1], shape[0], bias=False) for shape in shapes}
        inputs = {shape: [torch.randn(rows, shape[1]) for rows in AUTO_WIDTHS] for shape in shapes}  # [rows, in]
    holders = {}
    for product in products:
        for shape, layer in layers.items():
            holder = nn.Sequential(copy.deepcopy(layer))
            if product != "plain":
                use_narrow_linears(holder, product=product)
            holders[product, shape] = holder
    calls = {(product, shape, i): functools.partial(holder, x) for (product, shape), holder in holders.items()
             for i, x in enumerate(inputs[shape])}
    best = fastest_seconds(calls, reps)
    return {product: sum(s for (p, *_), s in best.items() if p == product) for product in products}


def use_narrow_linears(model: nn.Module, max_rows: int | None = None, product: str | None = None) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to :class:`NarrowLinear` (in place); returns how many.

    ``product`` is ``packed`` or ``transposed`` (None: :func:`best_product`); ``max_rows`` None means
    :data:`PACKED_MAX_ROWS` or :data:`MAX_ROWS` by product. Subclasses of ``nn.Linear`` (quantized or adapter
    layers) are left as they are.
    """
    product = product or best_product(model)
    if product not in PRODUCTS:
        raise ValueError(f"narrow linears: product {product!r} is not one of {', '.join(PRODUCTS)}")
    max_rows = max_rows or (PACKED_MAX_ROWS if product == "packed" else MAX_ROWS)
    count = 0
    for module in model.modules():
        if type(module) in (nn.Linear, NarrowLinear):
            module.__class__ = NarrowLinear
            module.max_rows = max_rows
            module.product = product
            count += 1
    return count


def has_narrow_linears(model: nn.Module) -> bool:
    """Whether any of ``model``'s linears is a :class:`NarrowLinear`."""
    return narrow_product_of(model) is not None


def narrow_product_of(model: nn.Module) -> str | None:
    """The product of ``model``'s first :class:`NarrowLinear` (``packed``, ``transposed``), or None if it has none."""
    return next((m.product for m in model.modules() if type(m) is NarrowLinear), None)


def plain_linears(model: nn.Module) -> int:
    """Switch :class:`NarrowLinear` modules of ``model`` back to ``nn.Linear`` (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is NarrowLinear:
            module.__class__ = nn.Linear
            _PACKED.pop(module, None)
            count += 1
    return count


def narrow_mode(mode, key: str = "model.narrow_linears") -> str:
    """``mode`` as one of :data:`MODES` (true/false read as on/off); a ConfigError naming ``key`` otherwise."""
    if mode is True or mode is False or mode is None:
        mode = "on" if mode else "off"
    if mode not in MODES:
        raise ConfigError(f"{key}={mode!r}: choose {', '.join(MODES)}")
    return mode


def narrow_product(mode, model: nn.Module, key: str = "model.narrow_linears") -> str | None:
    """The product ``mode`` asks for on ``model`` (``packed``, ``transposed``), or None for plain linears.

    ``auto`` means :func:`measured_product` for a float32 model on the CPU (the product that is faster than
    ``F.linear`` here, if one is) and plain linears elsewhere; ``on`` means :func:`best_product` anywhere. ``packed`` on a model
    oneDNN cannot pack is a ConfigError naming ``key``.
    """
    mode = narrow_mode(mode, key)
    weight = next(model.parameters(), None)
    if mode == "off" or weight is None:
        return None
    if mode == "auto":
        return measured_product(model) if weight.device.type == "cpu" and weight.dtype == torch.float32 else None
    if mode == "packed" and best_product(model) != "packed":
        raise ConfigError(f"{key}=packed: oneDNN cannot pack {weight.dtype} weights on {weight.device.type} here; "
                          f"use {key}=transposed or auto")
    return mode if mode in PRODUCTS else best_product(model)


def narrow_wanted(mode, model: nn.Module, key: str = "model.narrow_linears") -> bool:
    """Whether ``mode`` asks for narrow linears on ``model`` (see :func:`narrow_product`)."""
    return narrow_product(mode, model, key) is not None


def apply_narrow_linears(model: nn.Module | None, mode="auto", key: str = "model.narrow_linears") -> int:
    """:func:`use_narrow_linears` on ``model`` with the product :func:`narrow_product` names; returns how many
    switched (0 when it names none)."""
    product = None if model is None else narrow_product(mode, model, key)
    if product is None:
        return 0
    count = use_narrow_linears(model, product=product)
    log.debug("narrow linears (%s): %d modules switched", product, count)
    return count


def narrow_models(models, mode="auto", key: str = "model.narrow_linears") -> str:
    """:func:`apply_narrow_linears` on each of ``models`` (None skipped); the product the first one (the target) uses
    (``packed``, ``transposed``), else ``off``: what the run's verifies used, for its summary or header (``auto``
    decides per model: a draft of other shapes or dtype may differ)."""
    used = []
    for model in models:
        if model is not None:
            apply_narrow_linears(model, mode, key)
            used.append(narrow_product_of(model) or "off")
    return used[0] if used else "off"
