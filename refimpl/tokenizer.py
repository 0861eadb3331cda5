"""Byte-level BPE tokenizer for the course model (Sennrich et al. 2016; GPT-2's byte-level variant).

Digits are split one per token before BPE, so numbers (pass keys, codes) are copied digit by digit — the
retrieval tasks in the course depend on that.  Saved so that ``AutoTokenizer.from_pretrained(path)`` works.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"

__all__ = ["EOS", "PAD", "train_tokenizer"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                    model_max_length: int = 2048):
    """Train byte-level BPE on ``texts`` and save a ``PreTrainedTokenizerFast`` to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or not 512 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be an int in [512, 65536]; got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=model_max_length, padding_side="left")
    fast.save_pretrained(os.fspath(out_dir))
    return fast
