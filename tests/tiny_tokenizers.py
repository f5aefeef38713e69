"""Word-level tokenizers built offline for the tests' tiny Hugging Face models (holds no tests)."""

from __future__ import annotations

import re
from collections.abc import Iterable


def word_level_tokenizer(words: Iterable[str], texts: Iterable[str] = ()):
    """A ``PreTrainedTokenizerFast`` over ``words`` and every word of ``texts`` (split on word
    characters and punctuation), with ``[UNK]`` and ``<|endoftext|>`` as BOS and EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_words = {"[UNK]", "<|endoftext|>", *words}
    for text in texts:
        vocab_words.update(re.findall(r"\w+|[^\w\s]+", text))
    vocab = {word: i for i, word in enumerate(sorted(vocab_words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
