"""Tree-attention functions registered with transformers' ``AttentionInterface``.

The verifier switches a model to one of these for the duration of a forward pass, and passes
the tree through the forward's keyword arguments (transformers hands them to the attention
function): ``specdec_prefix_len`` (int, cache slots fully visible) and ``specdec_tree_mask``
(``[n, n]`` bool, true where query i may see new token j).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface

BACKENDS = {"sdpa": "specdec_sdpa", "triton": "specdec_triton"}


def _tree_bool_mask(prefix_len: int, tree_mask: torch.Tensor, device) -> torch.Tensor:
    """``[1, 1, n, prefix_len + n]`` bool mask: the prefix fully visible, the new tokens per ``tree_mask``."""
    n = tree_mask.shape[0]
    mask = torch.ones(n, prefix_len + n, dtype=torch.bool, device=device)  # [n, S]
    mask[:, prefix_len:] = tree_mask.to(device)
    return mask[None, None]  # [1, 1, n, S]


def _spec_args(kwargs: dict, key_len: int, q_len: int):
    tree_mask = kwargs.get("specdec_tree_mask")
    prefix_len = kwargs.get("specdec_prefix_len", key_len - q_len)
    return tree_mask, prefix_len


def sdpa_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference backend: PyTorch SDPA with a dense boolean tree mask.

    query ``[B, Hq, n, D]``; key/value ``[B, Hkv, S, D]`` (cache included). Returns ``[B, n, Hq, D]``.
    """
    tree_mask, prefix_len = _spec_args(kwargs, key.shape[2], query.shape[2])
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
        value = value.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
    q_len = query.shape[2]
    if tree_mask is None and attention_mask is not None:
        mask = attention_mask
    elif tree_mask is None and q_len == 1:
        mask = None  # one query sees every key
    else:
        if tree_mask is None:  # plain causal over the new tokens
            tree_mask = torch.ones(q_len, q_len, dtype=torch.bool).tril()  # [n, n]
        mask = _tree_bool_mask(prefix_len, tree_mask, query.device)  # [1, 1, n, S]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling
    )  # [B, Hq, n, D]
    return out.transpose(1, 2).contiguous(), None


def triton_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Triton backend: :func:`kernels.tree_attention` (reads each KV tile once for the whole tree and GQA group)."""
    from kernels import tree_attention

    n = query.shape[2]
    tree_mask, prefix_len = _spec_args(kwargs, key.shape[2], n)
    if tree_mask is None:
        tree_mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()  # [n, n] causal
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = tree_attention(query, key, value, prefix_len, tree_mask.to(query.device), sm_scale)  # [B, Hq, n, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(BACKENDS["sdpa"], sdpa_tree_attention)
AttentionInterface.register(BACKENDS["triton"], triton_tree_attention)
