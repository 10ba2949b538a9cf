"""Small models for the tests, built in memory (cached per process)."""
from __future__ import annotations

import copy
import functools

import torch

from specdec.models import tiny_random_pair


@functools.cache
def pair(arch: str = "llama"):
    """(target, random draft, byte tokenizer) of the given architecture."""
    return tiny_random_pair(arch, seed=0)


@functools.cache
def noisy_copy(arch: str = "llama", noise: float = 0.1, seed: int = 1):
    """A draft that agrees with the target often but not always: the target with noisy weights."""
    return _with_noise(pair(arch)[0], noise, seed)


def _with_noise(model, noise: float, seed: int):
    """A copy of ``model`` with Gaussian noise of ``noise`` times each tensor's std added to its weights."""
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    return noisy


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


@functools.cache
def peaky_noisy_pair(vocab: int = 6, noise: float = 0.6, seed: int = 1):
    """``peaky_pair``'s target and a noisy copy of it as the draft: p and q overlap after any warping.

    Drafts are accepted often but not always (about half the time on a chain at temperature 1.0,
    0.7 with top-k 3 and top-p 0.8), so both branches of an acceptance rule run and a wrong residual
    or q update shows in a chi-square test.
    """
    target, _ = peaky_pair(vocab)
    return target, _with_noise(target, noise, seed)


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
