"""The sizes of the embedded model pair: tokenizer, target and draft shapes, training budgets.

``micro`` builds in well under a minute on two CPU cores (tests); ``default`` is the
benchmark pair, trained in 6-24 minutes on two idle CPU cores (machines differ).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import LlamaConfig

ENDOFTEXT = "<|endoftext|>"  # bos and eos; also separates documents in training
PAD = "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, PAD)  # ids 0 and 1


@dataclass(frozen=True)
class ModelShape:
    """A Llama shape (``LlamaConfig`` fields that vary between sizes)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class ZooSize:
    """Everything that defines one size of the embedded pair (recorded in its manifest)."""

    name: str
    vocab_size: int
    tokenizer_chars: int  # characters of training text the tokenizer is trained on (0 = all)
    corpus_chars: int  # characters of training text tokenized for the models (0 = all)
    context: int  # training sequence length
    max_position_embeddings: int
    target: ModelShape
    draft: ModelShape
    batch_size: int
    target_steps: int
    target_lr: float
    draft_steps: int
    draft_lr: float
    kl_weight: float  # draft loss = kl_weight * KL(target || draft) + (1 - kl_weight) * CE
    draft_init_from_target: bool  # copy embeddings, final norm and first layers into the draft
    eval_tokens: int  # held-out tokens used for losses and alpha
    build_time: str  # rough build time, for the "building" log line

    def to_dict(self) -> dict:
        """Plain-dict form for manifests and loggers."""
        return asdict(self)


SIZES: dict[str, ZooSize] = {
    "micro": ZooSize(
        name="micro",
        vocab_size=512,
        tokenizer_chars=500_000,
        corpus_chars=600_000,
        context=128,
        max_position_embeddings=512,
        target=ModelShape(64, 2, 176, 4, 2),
        draft=ModelShape(64, 1, 176, 4, 2),
        batch_size=8,
        target_steps=150,
        target_lr=3e-3,
        draft_steps=100,
        draft_lr=3e-3,
        kl_weight=0.9,
        draft_init_from_target=True,
        eval_tokens=8_192,
        build_time="under a minute on 2 CPU cores",
    ),
    "default": ZooSize(
        name="default",
        vocab_size=4096,
        tokenizer_chars=0,
        corpus_chars=0,
        context=512,
        max_position_embeddings=2048,
        target=ModelShape(512, 6, 1408, 8, 4),
        draft=ModelShape(512, 1, 1408, 8, 4),
        batch_size=4,
        target_steps=400,
        target_lr=1.5e-3,
        draft_steps=400,
        draft_lr=1.5e-3,
        kl_weight=0.9,
        draft_init_from_target=True,
        eval_tokens=65_536,
        build_time="6-24 minutes on 2 idle CPU cores (machines differ; longer beside other work), under a minute on a GPU",
    ),
}


def get_size(name: str) -> ZooSize:
    """The ``ZooSize`` called ``name``; ``ValueError`` listing the known sizes otherwise."""
    if name not in SIZES:
        raise ValueError(f"unknown zoo size {name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


def llama_config(size: ZooSize, shape: ModelShape) -> LlamaConfig:
    """The ``LlamaConfig`` of one model of the pair (special-token ids 0 = bos/eos, 1 = pad)."""
    return LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=size.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
