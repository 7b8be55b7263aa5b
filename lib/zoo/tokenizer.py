"""A byte-level tokenizer in Hugging Face format: token id = byte value.

Ids 0..255 are the 256 bytes (spelled with GPT-2's printable byte alphabet so the
vocabulary file is valid JSON text); id 256 is `<|endoftext|>`, used as BOS, EOS
and padding. Any UTF-8 text round-trips, and `AutoTokenizer.from_pretrained`
loads it like any hub tokenizer.
"""

from __future__ import annotations

from pathlib import Path

BOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_byte_tokenizer(model_max_length: int):
    """A `PreTrainedTokenizerFast` whose ids are raw bytes plus BOS = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab[BOS_TOKEN] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([BOS_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        pad_token=BOS_TOKEN,
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_byte_tokenizer(folder: Path, model_max_length: int) -> None:
    build_byte_tokenizer(model_max_length).save_pretrained(str(folder))
