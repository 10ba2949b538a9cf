"""Triton kernels with plain-tensor signatures, each with a PyTorch ``*_ref`` beside it.

Imports only torch and triton. To run the kernels on the CPU (tests, CI), set
``TRITON_INTERPRET=1`` in the environment before triton is first imported.
"""
from specdec_kernels.tree_attention import (MAX_TREE_TOKENS, TreeAttentionPlan, pack_tree_mask, tree_attention,
                                            tree_attention_ref)

__all__ = ["MAX_TREE_TOKENS", "TreeAttentionPlan", "pack_tree_mask", "tree_attention", "tree_attention_ref"]
