"""The verifier: one target forward over a whole draft tree, through a registered attention backend."""
from verifier.attention import BACKENDS
from verifier.verifier import Verifier, attention_backend, check_finite, tree_forward

__all__ = ["BACKENDS", "Verifier", "attention_backend", "check_finite", "tree_forward"]
