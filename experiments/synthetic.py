"""Random-weight models of real shapes, for timing on a GPU (acceptance rates are meaningless).

``synthetic_pair("llama-8b", "cuda", torch.bfloat16)`` builds a target of Llama-3.1-8B's shape (32
layers, hidden 4096, 32 query / 8 KV heads, vocabulary 128256) directly on the device, and a
layer-truncated self-draft: the target's first ``draft_layers`` layers, its final norm and its LM
head, sharing the target's tensors (no copy; see :func:`drafters.layer_skip.truncated_view`). Neither model has an EOS token, so every decode runs
to ``max_new_tokens``. Importable without hydra or wandb.
"""
from __future__ import annotations

import torch

#: Llama shapes by name: Llama-3.1-8B, Llama-3.2-1B, and a micro one for CPU tests of the tooling.
SHAPES = {
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "llama-micro": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 10000.0},
}
DRAFT_LAYERS = 2  # the self-draft's layers unless --draft-layers says otherwise
PROMPT_LEN = 256  # random prompt tokens unless --prompt-len says otherwise


def _config(name: str, layers: int | None = None):
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"--synthetic {name!r} is unknown; choose one of {sorted(SHAPES)}")
    shape = dict(SHAPES[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(**shape, max_position_embeddings=16384, tie_word_embeddings=False, eos_token_id=None,
                       bos_token_id=0, pad_token_id=0)


def _build(config, device: str | torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: an 8B model in seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0, bos_token_id=0)
    return model


def synthetic_pair(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                   draft_layers: int = DRAFT_LAYERS, seed: int = 0):
    """``(target, draft)``: a random target of shape ``name`` and its layer-truncated self-draft.

    The draft is :func:`drafters.layer_skip.truncated_view`: its own modules and config (so the
    static / captured step's attention switch and cache size apply to it), the target's tensors.
    """
    from drafters.layer_skip import truncated_view

    check_draft_layers(name, draft_layers)  # before an 8B target is built
    target = _build(_config(name), device, dtype, seed)
    return target, truncated_view(target, draft_layers)


def check_draft_layers(name: str, draft_layers: int) -> None:
    """ValueError unless ``name`` is a known shape and ``draft_layers`` leaves its target at least one layer more."""
    layers = _config(name).num_hidden_layers
    if not 1 <= draft_layers < layers:
        raise ValueError(f"--draft-layers {draft_layers}: use 1..{layers - 1} (--synthetic {name} has {layers} layers)")


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (what one forward reads at least once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` prompts ``[1, length]`` of random token ids (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (1, length), generator=gen) for _ in range(count)]
