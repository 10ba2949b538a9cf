"""Small models for the tests, built in memory (cached per process)."""
from __future__ import annotations

import copy
import functools

import torch

from specdec.models import tiny_random_pair


@functools.lru_cache(maxsize=None)
def pair(arch: str = "llama"):
    """(target, random draft, byte tokenizer) of the given architecture."""
    return tiny_random_pair(arch, seed=0)


@functools.lru_cache(maxsize=None)
def noisy_copy(arch: str = "llama", noise: float = 0.1, seed: int = 1):
    """A draft that agrees with the target often but not always: the target with noisy weights."""
    target = pair(arch)[0]
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    return draft


def peaky_pair(vocab: int = 6, seed: int = 0, scale: float = 20.0):
    """A (target, draft) pair over a tiny vocabulary with non-uniform, different distributions.

    Random init gives near-uniform outputs; scaling the output embeddings makes p and q distinct
    enough that a wrong acceptance rule shows in a chi-square test.
    """
    target, draft, _ = tiny_random_pair("llama", seed=seed, vocab=vocab, hidden=32, layers=1)
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(scale)
        draft.get_output_embeddings().weight.mul_(scale * 0.7)
    for m in (target, draft):  # no EOS inside the enumerated window
        m.generation_config.eos_token_id = None
        m.config.eos_token_id = None
    return target, draft


def prompts(tokenizer, n: int = 20, seed: int = 0) -> list[torch.Tensor]:
    """``n`` prompts ``[1, T]`` of varied length: code-like text plus random byte strings."""
    gen = torch.Generator().manual_seed(seed)
    snippets = ["def f(x):\n    return x", "import os\nimport sys\n", "class A:\n    pass\n", "for i in range(10):",
                "# comment", "x = [1, 2, 3]\n", "while True:\n    break", "if a == b:\n    c = d"]
    out = []
    for i in range(n):
        if i < len(snippets):
            ids = tokenizer(snippets[i], return_tensors="pt").input_ids
        else:
            length = int(torch.randint(1, 24, (1,), generator=gen))
            ids = torch.randint(0, len(tokenizer) - 1, (1, length), generator=gen)
        out.append(ids)
    return out
