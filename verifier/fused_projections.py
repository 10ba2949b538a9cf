"""Fused projections: one wider matrix product where a layer's linears read the same input.

A decoder layer of a Llama-style model (Llama, Qwen2, Mistral: ``self_attn.q_proj / k_proj / v_proj``,
``mlp.gate_proj / up_proj``) runs five matrix products on two inputs. At batch 1 on a GPU each is a
matrix-vector product bound by its weight's bytes, and the small ones (k and v: 8 MB each on Llama-3.1-8B)
reach a third of the bandwidth that the large ones do (``BENCHMARKS.md``, "The step compiled, then
captured"). :func:`fuse_projections` concatenates each group's weights (and biases) into one matrix, once:
the group's first linear computes the whole product and the others return their slice of it. So q, k and v
cost one product, and gate and up another, as gpt-fast's ``wqkv`` does.

The switch is in place and for decoding only. A narrow linear (:mod:`verifier.narrow_linear`) fused this way
computes through ``F.linear`` again, so fusing is for GPUs, where the product is bound by bytes. The fused
weight replaces the originals (no memory is added), but a fused model's state dict no longer matches its
checkpoint: fuse a model you load for decoding, and do not save it. The products are the same up to float
rounding, since a wider matrix may take another kernel. Greedy outputs are checked against plain decoding,
as everywhere else.

The first linear of a group stores its output on the group; the others read it, and the last one clears it
(no activations are held between forwards). This relies on the layer calling them in order on the same input,
as transformers' attention and MLP modules do. Outside ``torch.compile``, each read checks that its input is
the stored one and raises otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The groups fused per layer: module paths within a decoder layer, in the order the layer calls them.
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


class _Group:
    """The last input a group's first linear saw and the fused product it computed for it."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None


class FusedPart(nn.Module):
    """One linear of a fused group: output columns ``lo .. hi`` of the group's product. The group's first part
    holds the fused ``weight [sum of outs, in]`` (and ``bias``) and computes the product."""

    def __init__(self, group: _Group, lo: int, hi: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 last: bool = False):
        super().__init__()
        self.group, self.lo, self.hi, self.last = group, lo, hi, last
        self.first = weight is not None
        if self.first:
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if self.first:
            group.x, group.out = x, F.linear(x, self.weight, self.bias)  # [..., sum of outs]
        elif not torch.compiler.is_compiling() and group.x is not x:
            raise RuntimeError("fused projections: a linear of a fused group was called before its group's first "
                               "one on the same input (this model's layer calls them in another order): load the "
                               "model again without fuse_projections")
        out = group.out[..., self.lo : self.hi]  # [..., out]
        if self.last:  # the group is done: hold no activations until the layer's next forward
            group.x = group.out = None
        return out

    def extra_repr(self) -> str:
        return f"columns {self.lo}..{self.hi} of a fused product" + (" (computes it)" if self.first else "")


def joined(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [sum of outs, in], bias [sum of outs] or None)`` of linears that read one input: a fused group's
    own (its first part's), or the linears' concatenated (a missing bias as zeros; None if none has one)."""
    if isinstance(linears[0], FusedPart):
        return linears[0].weight, linears[0].bias
    weight = torch.cat([lin.weight for lin in linears])  # [sum of outs, in]
    if all(lin.bias is None for lin in linears):
        return weight, None
    return weight, torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                              for lin in linears])  # [sum of outs]


def _fuse(parent: nn.Module, names: tuple[str, ...]) -> bool:
    """Fuse ``parent``'s linears ``names`` (plain ``nn.Linear`` or narrow linears of one input width); False,
    untouched, where they are not that."""
    from verifier.narrow_linear import NarrowLinear

    linears = [getattr(parent, n, None) for n in names]
    if not all(type(m) in (nn.Linear, NarrowLinear) for m in linears):
        return False
    if len({m.in_features for m in linears}) != 1:
        return False
    with torch.no_grad():
        weight, bias = joined(linears)  # [sum of outs, in], [sum of outs] or None
    group, lo = _Group(), 0
    for i, (name, m) in enumerate(zip(names, linears)):
        hi = lo + m.out_features
        setattr(parent, name, FusedPart(group, lo, hi, weight if i == 0 else None, bias if i == 0 else None,
                                        last=i == len(names) - 1))
        lo = hi
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse every decoder layer's q/k/v and gate/up projections of ``model`` in place (see the module
    docstring); returns how many groups were fused (0 for a model without such layers, or already fused)."""
    count = 0
    for module in model.modules():
        for child, names in GROUPS:
            parent = getattr(module, child, None)
            if isinstance(parent, nn.Module) and _fuse(parent, names):
                count += 1
    return count


def fused_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its projections fused (the original stays as it is; the copy holds a second
    set of weights)."""
    import copy

    fused = copy.deepcopy(model)
    if not fuse_projections(fused):
        from specdec.errors import ConfigError

        raise ConfigError(f"fuse projections: {type(model).__name__} has no layers with q/k/v or gate/up linears to "
                          "fuse (Llama-style attention and MLP modules): leave fusing off for this model")
    return fused


def has_fused_projections(model: nn.Module) -> bool:
    """Whether any of ``model``'s linears is a :class:`FusedPart`."""
    return any(isinstance(m, FusedPart) for m in model.modules())
