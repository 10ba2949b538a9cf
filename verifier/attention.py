"""Tree-attention functions registered with transformers' ``AttentionInterface``.

The verifier switches a model to one of these for the duration of a forward pass
(:func:`verifier.tree_forward`) and passes what the attention needs through the forward's
keyword arguments (transformers hands them to the attention function), all built once per
forward and shared by every layer:

- ``specdec_prefix_len``: int, cache slots every new token sees;
- ``specdec_tree_mask``: ``[n, n]`` bool, true where new token i may see new token j, or None
  for a causal chunk (new token i sees new tokens 0..i: a prefill, a draft model's catch-up);
- ``specdec_key_mask``: ``[1, 1, n, S]`` bool dense key mask for SDPA, or None where SDPA needs
  none (one token, or a causal chunk, which takes SDPA's causal kernels);
- ``specdec_tree_plan``: a :class:`specdec_kernels.TreeAttentionPlan` (triton backend, a tree of at most
  ``specdec_kernels.MAX_TREE_TOKENS`` tokens) or None.

The triton backend runs the tree-attention kernel for verification and routes everything
else to SDPA: causal chunks (prefill), a single token (plain decoding: SDPA's decode kernels
need no mask) and trees wider than the kernel's limit.
"""
from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

BACKENDS = {"sdpa": "specdec_sdpa", "triton": "specdec_triton"}


def dense_tree_mask(prefix_len: int, tree_mask: torch.Tensor) -> torch.Tensor | None:
    """``[1, 1, n, prefix_len + n]`` bool: the prefix fully visible, the new tokens per ``tree_mask``.

    None when ``tree_mask`` is a single visible token: attention then needs no mask.
    """
    n = tree_mask.shape[0]
    if n == 1 and bool(tree_mask[0, 0]):
        return None
    mask = torch.ones(n, prefix_len + n, dtype=torch.bool, device=tree_mask.device)  # [n, S]
    mask[:, prefix_len:] = tree_mask
    return mask[None, None]  # [1, 1, n, S]


def _require_tree(kwargs: dict) -> None:
    if "specdec_prefix_len" not in kwargs:
        raise RuntimeError("specdec attention called outside verifier.tree_forward: it needs the tree mask")


def _sdpa(query, key, value, scaling, kwargs):
    """SDPA over ``query [B, Hq, n, D]`` and the cache's ``key/value [B, Hkv, S, D]``; ``[B, n, Hq, D]``."""
    mask = kwargs.get("specdec_key_mask")
    n, s = query.shape[2], key.shape[2]
    grouped = query.shape[1] != key.shape[1]
    if mask is not None and grouped and query.device.type == "cuda":
        return grouped_sdpa(query, key, value, mask, scaling), None
    if mask is None and kwargs.get("specdec_tree_mask") is None and n > 1:  # causal chunk after the prefix
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, s)  # query i sees keys 0 .. s - n + i, without materialising a mask
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=grouped)
    return out.transpose(1, 2), None  # [B, n, Hq, D]


def grouped_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                 scaling: float | None) -> torch.Tensor:
    """Masked SDPA of ``query [B, Hq, n, D]`` over ``key/value [B, Hkv, S, D]`` (``Hq = G Hkv``), with each KV
    head's G query heads packed into its query rows: ``[B, Hkv, G n, D]`` under the mask repeated per head.

    On a GPU, SDPA's fused kernels that take a boolean mask take no grouped heads. With ``enable_gqa`` and a mask,
    SDPA falls to its math path. There it expands K and V to every query head and computes in fp32, which cost
    an 8B-shaped target's captured forward 2x its whole time at context 4096 (``BENCHMARKS.md``, "Where the
    captured forward's time went"). Packed, the memory-efficient kernel reads each KV head once for its whole
    group. ``mask``: bool ``[B or 1, 1, n, S]``; returns ``[B, n, Hq, D]`` (what the attention function returns;
    whatever layout the kernel wrote its output in: the memory-efficient kernel's is ``[B, G n, Hkv, D]``)."""
    b, hq, n, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    packed = query.reshape(b, hkv, g * n, d)  # [B, Hkv, G n, D]: head h = k G + j sits in KV head k's group
    rows = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(mask.shape[0], 1, g * n, s)  # [B, 1, G n, S]
    out = scaled_dot_product_attention(packed, key, value, attn_mask=rows, scale=scaling)  # [B, Hkv, G n, D]
    return out.unflatten(2, (g, n)).permute(0, 3, 1, 2, 4).reshape(b, n, hq, d)  # [B, n, Hq, D]


def sdpa_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference backend: PyTorch SDPA with a dense boolean tree mask (GQA without copying k/v).

    query ``[B, Hq, n, D]``; key/value ``[B, Hkv, S, D]`` (cache included). Returns ``[B, n, Hq, D]``.
    """
    _require_tree(kwargs)
    return _sdpa(query, key, value, scaling, kwargs)


def triton_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Triton backend: the step's :class:`specdec_kernels.TreeAttentionPlan` (each KV tile read once for the whole
    tree and GQA group); forwards without a plan (causal chunks, one token, wide trees) take SDPA."""
    _require_tree(kwargs)
    plan = kwargs.get("specdec_tree_plan")
    if plan is None:
        return _sdpa(query, key, value, scaling, kwargs)
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return plan(query, key, value, sm_scale).transpose(1, 2), None  # [B, n, Hq, D]


AttentionInterface.register(BACKENDS["sdpa"], sdpa_tree_attention)
AttentionInterface.register(BACKENDS["triton"], triton_tree_attention)
