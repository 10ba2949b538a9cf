"""Byte-level BPE tokenizer trained on the corpus, saved as a transformers tokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from experiments.corpus import read_text
from experiments.zoo.sizes import ENDOFTEXT, PAD, SPECIAL_TOKENS


def iter_texts(files: Iterable[Path], max_chars: int = 0) -> Iterator[str]:
    """Texts of ``files`` in order, stopping once ``max_chars`` characters were yielded (0 = all)."""
    total = 0
    for path in files:
        text = read_text(path)
        if not text:
            continue
        yield text
        total += len(text)
        if max_chars and total >= max_chars:
            return


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; bos = eos = ``<|endoftext|>`` (prepended), pad = ``<|pad|>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(ENDOFTEXT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{ENDOFTEXT} $A", pair=f"{ENDOFTEXT} $A {ENDOFTEXT} $B", special_tokens=[(ENDOFTEXT, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=PAD, model_max_length=2048
    )
