"""Offline byte-level BPE tokenizers for the models this project builds itself.

Nothing can be downloaded from a model hub here, so the built-in default model and the
reference model get a tokenizer trained with ``tokenizers`` on local text. Special tokens
follow the dLLM conventions: a dedicated mask token (``<|mdm_mask|>``, as in LLaDA), padding
and end-of-text.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "train_bpe_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "eos_token": "<|eos|>", "mask_token": "<|mdm_mask|>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens (specials included) on ``texts``.

    Deterministic for the same texts and size. Any byte string stays encodable because the
    256-byte alphabet is always in the vocabulary.
    """
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)} (bytes + specials)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
