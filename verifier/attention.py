"""Tree-attention functions registered with transformers' ``AttentionInterface``.

The verifier switches a model to one of these for the duration of a forward pass, and passes
the tree through the forward's keyword arguments (transformers hands them to the attention
function): ``specdec_prefix_len`` (int, cache slots fully visible), ``specdec_tree_mask``
(``[n, n]`` bool, true where new token i may see new token j) and, built once per forward for
the SDPA backend, ``specdec_dense_mask`` (``[1, 1, n, prefix_len + n]`` bool, or None when every
query sees every key).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface

BACKENDS = {"sdpa": "specdec_sdpa", "triton": "specdec_triton"}


def dense_tree_mask(prefix_len: int, tree_mask: torch.Tensor) -> torch.Tensor | None:
    """``[1, 1, n, prefix_len + n]`` bool: the prefix fully visible, the new tokens per ``tree_mask``.

    None when ``tree_mask`` is all true (a single token): attention then needs no mask.
    """
    n = tree_mask.shape[0]
    if n == 1 and bool(tree_mask[0, 0]):
        return None
    mask = torch.ones(n, prefix_len + n, dtype=torch.bool, device=tree_mask.device)  # [n, S]
    mask[:, prefix_len:] = tree_mask
    return mask[None, None]  # [1, 1, n, S]


def sdpa_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference backend: PyTorch SDPA with a dense boolean tree mask (GQA without copying k/v).

    query ``[B, Hq, n, D]``; key/value ``[B, Hkv, S, D]`` (cache included). Returns ``[B, n, Hq, D]``.
    """
    if "specdec_dense_mask" not in kwargs:
        raise RuntimeError("specdec attention called outside verifier.tree_forward: it needs the tree mask")
    mask = kwargs["specdec_dense_mask"]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )  # [B, Hq, n, D]
    return out.transpose(1, 2), None


def triton_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Triton backend: :func:`kernels.tree_attention` (reads each KV tile once for the whole tree and GQA group)."""
    from kernels import tree_attention

    if "specdec_tree_mask" not in kwargs:
        raise RuntimeError("specdec attention called outside verifier.tree_forward: it needs the tree mask")
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = tree_attention(query, key, value, kwargs["specdec_prefix_len"], kwargs["specdec_tree_mask"], sm_scale)  # [B, Hq, n, D]
    return out.transpose(1, 2), None


AttentionInterface.register(BACKENDS["sdpa"], sdpa_tree_attention)
AttentionInterface.register(BACKENDS["triton"], triton_tree_attention)
